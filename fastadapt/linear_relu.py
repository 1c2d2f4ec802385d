"""Fused Linear + ReLU. (Stub: pure-PyTorch only until the kernels land.)"""
from __future__ import annotations

from fastadapt import reference


def linear_relu(x, weight, bias=None):
    return reference.linear_relu(x, weight, bias)


import math

import torch
from torch import nn


class FusedLinearReLU(nn.Module):
    """relu(x @ weight.T + bias) in one layer; parameters as nn.Linear. (Stub until the kernels land.)"""

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if bias is False:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x):
        return linear_relu(x, self.weight, self.bias)
