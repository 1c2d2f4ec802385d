"""``fuse_linear_relu``: replace ``nn.Linear`` → ``nn.ReLU`` pairs with ``FusedLinearReLU``.

What is fused
    Two ADJACENT children of the same ``nn.Sequential`` (exactly that class, at any depth), the first
    exactly ``nn.Linear`` and the second exactly ``nn.ReLU`` (``inplace=True`` included). The Linear
    becomes a ``FusedLinearReLU`` that shares its Parameters, the ReLU becomes ``nn.Identity``: the
    Sequential keeps its indices, so state_dict keys (``0.weight`` stays ``0.weight``) and outputs do
    not change, and a state_dict loads into either model.

What is left alone (each pair is fused only when the rewrite provably gives the same results)
    * subclasses of ``nn.Sequential``, ``nn.Linear`` or ``nn.ReLU`` (their forward may differ), other
      activations, and a Linear and ReLU that are not siblings in one Sequential (e.g. the Linear last
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
"""
from __future__ import annotations

import copy as _copy
from collections import Counter

import torch
from torch import nn

from fastadapt.ops._validate import float_dtypes
from fastadapt.ops.linear_relu import FusedLinearReLU


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
    if _global_hooks():
        return model
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    candidates = []  # (seq, linear name, relu name, qualified linear path, qualified relu path, proven)
    for path, seq, plain in _sequentials(model):
        if uses[id(seq)] != 1:
            continue
        items = list(seq._modules.items())
        for (ln, lin), (rn, relu) in zip(items, items[1:]):
            if _fusable(lin, relu, uses):
                candidates.append((seq, ln, rn, path + ln, path + rn, plain))
    if not candidates:
        return model
    graph_ok = None
    if not all(c[5] for c in candidates):
        graph_ok = _traced_pairs(model)
    for seq, ln, rn, lpath, rpath, plain in candidates:
        if plain or (graph_ok is not None and (lpath, rpath) in graph_ok):
            lin = seq._modules[ln]
            seq._modules[ln] = FusedLinearReLU.from_linear(lin)
            seq._modules[rn] = nn.Identity()
    return model


def _global_hooks() -> bool:
    g = nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
             "_global_backward_pre_hooks")
    return any(len(getattr(g, n, {})) for n in names)


def _has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(m, n, {})) for n in names)


def _fusable(lin, relu, uses) -> bool:
    if type(lin) is not nn.Linear or type(relu) is not nn.ReLU:
        return False
    if uses[id(lin)] != 1 or uses[id(relu)] != 1 or _has_hooks(lin) or _has_hooks(relu):
        return False
    w = lin.weight
    if isinstance(w, nn.parameter.UninitializedParameter) or type(w) is not nn.Parameter:
        return False
    if lin.bias is not None and (lin.bias.dtype != w.dtype or lin.bias.device != w.device):
        return False
    return w.dtype in float_dtypes(w.device)


def _sequentials(model):
    """(qualified prefix, Sequential, reached through plain Sequentials only) for every exact Sequential."""
    out = []

    def visit(m, prefix, plain_chain):
        here = type(m) is nn.Sequential
        if here:
            out.append((prefix, m, plain_chain))
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
