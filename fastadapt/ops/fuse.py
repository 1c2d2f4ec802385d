"""``fuse_linear_relu``: replace ``nn.Linear`` → ``nn.ReLU`` pairs with ``FusedLinearReLU``.

What is fused
    Two ADJACENT children of the same ``nn.Sequential`` (at any depth; a subclass counts when it keeps
    Sequential's ``forward``, ``__iter__`` and ``__call__``, as ``torchvision.ops.MLP`` does), the first
    exactly ``nn.Linear`` and the second exactly ``nn.ReLU`` (``inplace=True`` included). The Linear
    becomes a ``FusedLinearReLU`` that shares its Parameters, the ReLU becomes ``nn.Identity``: the
    Sequential keeps its indices, so state_dict keys (``0.weight`` stays ``0.weight``) and outputs do
    not change, and a state_dict loads into either model.

What is left alone (each pair is fused only when the rewrite provably gives the same results)
    * subclasses of ``nn.Linear`` or ``nn.ReLU`` and of ``nn.Sequential`` that override how the chain
      runs (their forward may differ), other activations, and a Linear and ReLU that are not siblings in one Sequential (e.g. the Linear last
      in one Sequential and the ReLU first in the next);
    * a Linear or ReLU module object that appears more than once in the model (shared or reused),
      or whose Sequential appears more than once;
    * a Linear or ReLU with any forward, forward-pre or backward hook, and every pair while global
      module hooks (``nn.modules.module.register_module_forward_hook`` etc.) are registered;
    * a Linear whose dtype the fused kernel does not take on its device (float16 on the CPU, say);
    * a pair whose Linear output could be read elsewhere. A Sequential's children run only in its own
      chain when every container from the root down to it is a plain ``nn.Sequential``. Otherwise the
      model is traced with ``torch.fx``; a pair is fused only if the trace shows the Linear called once,
      its output used only by the ReLU, and the ReLU called once. A model that cannot be traced then
      has only the pairs of the first kind fused.

What it says
    The number of pairs fused is logged (logger ``fastadapt.ops.fuse``, INFO). A ``nn.Linear`` →
    ``nn.ReLU`` pair (subclasses included) that sits in one Sequential but is left alone gives one
    UserWarning per call naming the pairs and why, so a model that "fuses nothing" does not do so
    silently.
"""
from __future__ import annotations

import copy as _copy
import logging
import warnings
from collections import Counter

import torch
from torch import nn

from fastadapt.ops._validate import float_dtypes
from fastadapt.ops.linear_relu import FusedLinearReLU

_log = logging.getLogger(__name__)
_LISTED = 3  # unfused pairs named in the warning; the rest are counted


def fuse_linear_relu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its provably equivalent Linear→ReLU pairs fused (see the module docstring).

    ``inplace=False`` (default) fuses a deep copy and leaves ``model`` untouched; ``inplace=True``
    rewrites ``model`` itself and returns it. The fused layers share the Parameters of the Linears they
    replace (in the copy, the copy's Parameters).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    if not inplace:
        model = _copy.deepcopy(model)
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    candidates = []  # (seq, linear name, relu name, qualified linear path, qualified relu path, proven)
    left = []  # (qualified linear path, qualified relu path, why it stays)
    global_hooks = _global_hooks()
    for path, seq, plain_seq, plain_chain in _sequentials(model):
        items = list(seq._modules.items())
        for (ln, lin), (rn, relu) in zip(items, items[1:]):
            if not (isinstance(lin, nn.Linear) and isinstance(relu, nn.ReLU)):
                continue
            why = ("global module hooks are registered" if global_hooks
                   else f"{type(seq).__name__} overrides how nn.Sequential runs its children" if not plain_seq
                   else "its Sequential appears more than once in the model" if uses[id(seq)] != 1
                   else _why_not_fusable(lin, relu, uses))
            if why:
                left.append((path + ln, path + rn, why))
            else:
                candidates.append((seq, ln, rn, path + ln, path + rn, plain_chain))
    graph_ok = None
    if not all(c[5] for c in candidates):
        graph_ok = _traced_pairs(model)
    fused = 0
    for seq, ln, rn, lpath, rpath, proven in candidates:
        if proven or (graph_ok is not None and (lpath, rpath) in graph_ok):
            lin = seq._modules[ln]
            seq._modules[ln] = FusedLinearReLU.from_linear(lin)
            seq._modules[rn] = nn.Identity()
            fused += 1
        else:
            left.append((lpath, rpath, "torch.fx cannot trace the model, so the Linear's output may be read elsewhere"
                         if graph_ok is None else "the Linear's output is read outside its Sequential, or either "
                         "module is called more than once"))
    _log.info("fuse_linear_relu: fused %d Linear->ReLU pair(s) in %s", fused, type(model).__name__)
    if left:
        listed = "; ".join(f"{lp} -> {rp}: {why}" for lp, rp, why in left[:_LISTED])
        more = f"; and {len(left) - _LISTED} more" if len(left) > _LISTED else ""
        warnings.warn(f"fuse_linear_relu: fused {fused} Linear->ReLU pair(s), left {len(left)} unfused ({listed}{more})",
                      UserWarning, stacklevel=2)
    return model


def _global_hooks() -> bool:
    g = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(len(getattr(g, n, {})) for n in names)


def _has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(m, n, {})) for n in names)


def _why_not_fusable(lin, relu, uses) -> str | None:
    """Why this Linear, ReLU pair of one plain Sequential cannot be fused; None when it can."""
    if type(lin) is not nn.Linear or type(relu) is not nn.ReLU:
        return f"{type(lin).__name__} -> {type(relu).__name__} is a subclass pair whose forward may differ"
    if uses[id(lin)] != 1 or uses[id(relu)] != 1:
        return "the Linear or the ReLU appears more than once in the model"
    if _has_hooks(lin) or _has_hooks(relu):
        return "the Linear or the ReLU has hooks"
    w = lin.weight
    if isinstance(w, nn.parameter.UninitializedParameter):
        return "the Linear is an uninitialised LazyLinear"
    if type(w) is not nn.Parameter:
        return f"the Linear's weight is a {type(w).__name__}, not an nn.Parameter"
    if lin.bias is not None and (lin.bias.dtype != w.dtype or lin.bias.device != w.device):
        return "the Linear's bias and weight differ in dtype or device"
    if w.dtype not in float_dtypes(w.device):
        return f"the fused kernel takes no {w.dtype} on {w.device.type}"
    return None


def _plain_sequential(m) -> bool:
    """An nn.Sequential, or a subclass that runs its children exactly as nn.Sequential does."""
    cls = type(m)
    return (isinstance(m, nn.Sequential) and cls.forward is nn.Sequential.forward
            and cls.__iter__ is nn.Sequential.__iter__ and cls.__call__ is nn.Module.__call__)


def _sequentials(model):
    """(qualified prefix, Sequential, runs its plain chain, reached through plain Sequentials only) for every
    nn.Sequential, subclasses included (those that are not plain are reported, never fused)."""
    out = []

    def visit(m, prefix, plain_chain):
        here = _plain_sequential(m)
        if isinstance(m, nn.Sequential):
            out.append((prefix, m, here, plain_chain))
        for name, child in m._modules.items():
            if child is not None:
                visit(child, prefix + name + ".", plain_chain and here)

    visit(model, "", True)
    return out


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, FusedLinearReLU) or super().is_leaf_module(m, qualname)


def _traced_pairs(model):
    """{(linear path, relu path)} whose trace proves the Linear's output feeds only that ReLU, each called
    once; None when the model cannot be traced."""
    try:
        graph = _Tracer().trace(model)
    except Exception:  # data-dependent control flow, non-tensor inputs, ...: prove nothing
        return None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = set()
    for n in graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or len(n.users) != 1:
            continue
        (user,) = n.users
        if (user.op == "call_module" and calls[user.target] == 1 and user.args == (n,) and not user.kwargs):
            pairs.add((n.target, user.target))
    return pairs
