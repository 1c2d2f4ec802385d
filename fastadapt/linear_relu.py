"""Fused Linear + ReLU. (Stub: pure-PyTorch only until the kernels land.)"""
from __future__ import annotations

from fastadapt import reference


def linear_relu(x, weight, bias=None):
    return reference.linear_relu(x, weight, bias)
