"""Model surgery for transfer learning: freezing (timm-style), head replacement/extension, pretrained loading."""
from __future__ import annotations

import os

import torch
from torch import nn

_HEAD_NAMES = ("head", "fc", "classifier")
_FROZEN_HOOK = "_fastadapt_frozen_bn_hook"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def get_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: a Linear called head/fc/classifier, else the last nn.Linear."""
    model = _unwrap(model)
    for name in _HEAD_NAMES:
        m = getattr(model, name, None)
        if isinstance(m, nn.Linear):
            return name, m
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Linear head (looked for "
                         f"{', '.join(_HEAD_NAMES)} and any nn.Linear)")
    return linears[-1]


def input_features(model: nn.Module) -> int | None:
    """in_features of the first layer that declares one (None when the model does not say)."""
    for m in _unwrap(model).modules():
        n = getattr(m, "in_features", None)
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    return None


def _resolve(model, modules) -> list[nn.Module]:
    model = _unwrap(model)
    if modules is None:
        return [model]
    if isinstance(modules, (str, nn.Module)):
        modules = [modules]
    out = []
    lookup = dict(model.named_modules())
    for m in modules:
        if isinstance(m, str):
            if m not in lookup:
                raise ValueError(f"modules: no submodule named {m!r} in {type(model).__name__} "
                                 f"(top-level names: {[n for n, _ in model.named_children()]})")
            out.append(lookup[m])
        elif isinstance(m, nn.Module):
            out.append(m)
        else:
            raise TypeError(f"modules must hold submodule names or nn.Modules, got {type(m).__name__}")
    return out


def _keep_bn_eval(module, _inputs):
    # model.train() flips every BatchNorm back to training; a frozen one must keep its running stats.
    module.training = False


def freeze(model: nn.Module, modules=None) -> nn.Module:
    """Stops gradients to ``modules`` (names or submodules; the whole model when None).

    Frozen BatchNorm layers go to eval mode and stay there through later ``model.train()`` calls,
    so their running statistics are not updated either."""
    for root in _resolve(model, modules):
        for p in root.parameters():
            p.requires_grad_(False)
        for m in root.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not hasattr(m, _FROZEN_HOOK):
                m.eval()
                setattr(m, _FROZEN_HOOK, m.register_forward_pre_hook(_keep_bn_eval))
    return model


def unfreeze(model: nn.Module, modules=None) -> nn.Module:
    """Undoes :func:`freeze` for ``modules`` (the whole model when None). BatchNorm follows the
    model's mode again from the next ``model.train()``/``eval()``."""
    for root in _resolve(model, modules):
        for p in root.parameters():
            p.requires_grad_(True)
        for m in root.modules():
            handle = getattr(m, _FROZEN_HOOK, None)
            if handle is not None:
                handle.remove()
                delattr(m, _FROZEN_HOOK)
                m.train(_unwrap(model).training)
    return model


def _set_head(model, name, new):
    parent = _unwrap(model)
    *path, leaf = name.split(".")
    for p in path:
        parent = getattr(parent, p)
    setattr(parent, leaf, new)


def _check_count(name, n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Swaps the head for a freshly initialised ``Linear(in_features, num_classes)`` (trainable)."""
    _check_count("num_classes", num_classes)
    name, old = get_head(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    _set_head(model, name, new)
    return model


def extend_head(model: nn.Module, num_new_classes: int) -> nn.Module:
    """Adds ``num_new_classes`` outputs after the existing ones; the old class rows are copied
    unchanged, so class ``k`` keeps its index and its learned weights. The new head's ``grown_from``
    attribute records the old class count (AdaptiveTrainer's LwF distils those classes only)."""
    _check_count("num_new_classes", num_new_classes)
    name, old = get_head(model)
    new = nn.Linear(old.in_features, old.out_features + num_new_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight[: old.out_features].copy_(old.weight)
        if old.bias is not None:
            new.bias[: old.out_features].copy_(old.bias)
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    # what the head knew before it grew: the classes an LwF teacher snapshot of this model can distil
    new.grown_from = old.out_features
    _set_head(model, name, new)
    return model


def forget_growth(model: nn.Module) -> None:
    """Drops the head's ``grown_from`` once training has taught it the new classes."""
    get_head(model)[1].__dict__.pop("grown_from", None)


def load_pretrained(path_or_module, model: nn.Module | None = None) -> nn.Module:
    """A pretrained model from a ``.safetensors``/``.pt`` file or a module.

    With ``model``, its weights are loaded from the source (strictly; shape mismatches name the
    keys) and ``model`` is returned. Without it, a file saved by fastadapt rebuilds its own MLP, or the
    Pipeline (preprocessing, MLP, label names) that the CLI saves."""
    if isinstance(path_or_module, nn.Module):
        if model is None:
            return path_or_module
        state = _unwrap(path_or_module).state_dict()
        config = None
    elif isinstance(path_or_module, (str, os.PathLike)):
        from fastadapt.training.checkpoint import read_weights

        state, config = read_weights(path_or_module)
    else:
        raise TypeError(f"path_or_module must be a path or an nn.Module, got {type(path_or_module).__name__}")
    if model is None:
        if config is None:
            raise ValueError(f"{os.fspath(path_or_module)!r} does not record its architecture; "
                             f"pass model= to load the weights into")
        from fastadapt.training.models import from_config

        model = from_config(config)
    load_state(model, state, source=str(path_or_module) if not isinstance(path_or_module, nn.Module) else "module")
    return model


def load_state(model: nn.Module, state: dict, source: str):
    target = _unwrap(model).state_dict()
    missing = sorted(set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    wrong = [f"{k}: {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
             for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                 f"shape mismatches [{'; '.join(wrong)}]" if wrong else ""]
        raise ValueError(f"weights from {source} do not fit {type(_unwrap(model)).__name__}: "
                         + ", ".join(p for p in parts if p))
    _unwrap(model).load_state_dict(state)
