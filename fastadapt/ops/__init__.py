"""The operators: fused losses and layers, the extension that serves them, their fake kernels and the
pure-PyTorch reference. Imports nothing from fastadapt.training or fastadapt.apps."""
from fastadapt.ops import _fake  # noqa: F401  (fake kernels, so torch.compile traces the compiled ops)
from fastadapt.ops._extension import build_info, empty_cache, has_cuda_ops, has_ops
from fastadapt.ops.distillation import alpha_weighted_distillation
from fastadapt.ops.fuse import fuse_linear_relu
from fastadapt.ops.linear_cross_entropy import AlphaWeightedLinearCrossEntropy, alpha_weighted_linear_cross_entropy
from fastadapt.ops.linear_relu import FusedLinearReLU, linear_relu
from fastadapt.ops.losses import AlphaWeightedLoss, alpha_weighted_cross_entropy, alpha_weighted_mse

__all__ = [
    "AlphaWeightedLoss", "alpha_weighted_cross_entropy", "alpha_weighted_mse", "alpha_weighted_distillation",
    "AlphaWeightedLinearCrossEntropy", "alpha_weighted_linear_cross_entropy",
    "FusedLinearReLU", "linear_relu", "fuse_linear_relu",
    "build_info", "empty_cache", "has_cuda_ops", "has_ops",
]
