"""Fused Linear + ReLU: ``relu(x @ weight.T + bias)`` as one op with one autograd node.

Forward writes the GEMM straight into the output and adds the bias and clamps in one more pass;
backward keeps only the output (its sign is the ReLU mask), never the pre-activation. The compiled
op serves the inputs when it is loaded for their device, else the pure-PyTorch reference runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fastadapt.ops import _validate, reference
from fastadapt.ops._extension import has_cuda_ops, has_ops, use_compiled

# The op, looked up once: the attribute chain torch.ops.fastadapt.linear_relu.default costs on every call.
_LINEAR_RELU = torch.ops.fastadapt.linear_relu.default if has_ops() else None


def linear_relu(x, weight, bias=None):
    """``relu(x @ weight.T + bias)`` for ``x`` of shape ``(..., in_features)`` and ``weight`` of shape
    ``(out_features, in_features)``; ``bias`` is ``(out_features,)`` or None.

    float32, bfloat16 and float64 on the CPU; float16 too on CUDA. Differentiable in x, weight and bias
    (once: double backward is not supported by the compiled op).
    """
    _validate.check_linear_relu_args(x, weight, bias)
    if use_compiled(x):
        return _LINEAR_RELU(x, weight, bias)
    return reference.linear_relu(x, weight, bias)


# What a FusedLinearReLU runs under torch.jit.script, which compiles neither linear_relu's Python checks nor
# its extension lookup: the op itself (its C++ checks still run), or the reference where no compiled kernel
# serves the input, as use_compiled decides, fixed by what loaded at import (TorchScript reads no globals).
def _scripted_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.relu(torch.nn.functional.linear(x, weight, bias))


if has_cuda_ops():
    def _scripted_linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return torch.ops.fastadapt.linear_relu(x, weight, bias)
elif has_ops():
    def _scripted_linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.is_cuda:
            return _scripted_reference(x, weight, bias)
        return torch.ops.fastadapt.linear_relu(x, weight, bias)
else:
    _scripted_linear_relu = _scripted_reference


class FusedLinearReLU(nn.Module):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias), nn.ReLU())`` as one layer.

    Parameter names, shapes and initialisation match ``nn.Linear``, so an ``nn.Linear``'s state_dict loads
    into it and its state_dict loads into an ``nn.Linear``. The Sequential's state_dict (``0.weight``,
    ``0.bias``) loads into it too; the other way, load it into the Sequential's Linear
    (``seq[0].load_state_dict(fused.state_dict())``).
    """

    __constants__ = ["in_features", "out_features"]

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's initialisation, draw for draw (same RNG calls in the same order).
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_features
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear, *, copy=False):
        """A fused layer computing ``relu(linear(x))``. Shares ``linear``'s Parameters (training one
        trains the other) unless ``copy=True``, which clones them."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if isinstance(linear.weight, nn.parameter.UninitializedParameter):
            raise ValueError("linear is an uninitialised nn.LazyLinear; run one forward pass first")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features

        def take(p):
            if p is None or not copy:
                return p
            return nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)

        self.weight = take(linear.weight)
        if linear.bias is not None:
            self.bias = take(linear.bias)
        else:
            self.register_parameter("bias", None)
        self.train(linear.training)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Take the state_dict of the nn.Sequential(nn.Linear, nn.ReLU) this layer replaces: its Linear's
        # keys are 0.weight and 0.bias. Only when our own key is absent, so nothing is silently overridden
        # (state_dict is load_state_dict's own copy: renaming keys in it is what BatchNorm's loader does too).
        for name in ("weight", "bias"):
            if prefix + "0." + name in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = state_dict.pop(prefix + "0." + name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def forward(self, x):
        if torch.jit.is_scripting():  # the branch TorchScript compiles (the other it skips)
            return _scripted_linear_relu(x, self.weight, self.bias)
        return linear_relu(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
