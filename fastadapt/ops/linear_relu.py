"""Fused Linear + ReLU: ``relu(x @ weight.T + bias)`` as one op with one autograd node.

Forward writes the GEMM straight into the output and adds the bias and clamps in one more pass;
backward keeps only the output (its sign is the ReLU mask), never the pre-activation. The compiled
op serves the inputs when it is loaded for their device, else the pure-PyTorch reference runs.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastadapt.ops import _validate
from fastadapt.ops import reference
from fastadapt.ops import _extension
from fastadapt.ops._extension import use_compiled


def _check_args(x, weight, bias):
    """The checks of the C++ kernels, with the same wording, run before any kernel for both paths."""
    _validate.check_tensor("x", x)
    _validate.check_tensor("weight", weight)
    if bias is not None:
        _validate.check_tensor("bias", bias)
    if x.dtype not in (_validate._CUDA_FLOATS if x.device.type == "cuda" else _validate._CPU_FLOATS):
        kinds = "float32, float64, bfloat16" + (", float16" if x.device.type == "cuda" else "")
        raise TypeError(f"linear_relu: x must be a floating tensor ({kinds} on {x.device.type}), got dtype {x.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"linear_relu: weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("linear_relu: x must have shape (..., in_features), got a 0-dim tensor")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_relu: x.shape[-1] is {x.shape[-1]} but weight has in_features={weight.shape[1]} "
                         f"(weight shape {tuple(weight.shape)})")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"linear_relu: bias must have shape ({weight.shape[0]},) = (out_features,), "
                         f"got shape {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"linear_relu: {name} has dtype {t.dtype} but x has dtype {x.dtype}; they must match")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"linear_relu: {name} is on {t.device} but x is on {x.device}; "
                             "all inputs must share one device")


def linear_relu(x, weight, bias=None):
    """``relu(x @ weight.T + bias)`` for ``x`` of shape ``(..., in_features)`` and ``weight`` of shape
    ``(out_features, in_features)``; ``bias`` is ``(out_features,)`` or None.

    float32, bfloat16 and float64 on the CPU; float16 too on CUDA. Differentiable in x, weight and bias
    (once: double backward is not supported by the compiled op).
    """
    C = _extension._C  # read per call: the fallback must win whenever _C is None
    if C is not None and not torch.compiler.is_compiling():
        # The C++ kernel runs the checks of _check_args with the same messages; NotImplemented means
        # a subclass, a mode or a device the entry leaves to torch.ops (csrc/eager_entry.cpp).
        y = C.linear_relu_eager(x, weight, bias)
        if y is not NotImplemented:
            return y
    _check_args(x, weight, bias)
    if use_compiled(x):
        return torch.ops.fastadapt.linear_relu(x, weight, bias)
    return reference.linear_relu(x, weight, bias)


class FusedLinearReLU(nn.Module):
    """``nn.Sequential(nn.Linear(in_features, out_features, bias), nn.ReLU())`` as one layer.

    Parameter names, shapes and initialisation match ``nn.Linear``, so state_dicts load both ways.
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

    def forward(self, x):
        return linear_relu(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
