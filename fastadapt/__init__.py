"""fastadapt: fused C++/CUDA kernels and training loops for transfer and adaptive learning in PyTorch."""
from fastadapt._extension import build_info, empty_cache, has_cuda_ops, has_ops
from fastadapt import _fake  # noqa: F401  (fake kernels, so torch.compile traces the compiled ops)
from fastadapt.losses import AlphaWeightedLoss, alpha_weighted_cross_entropy, alpha_weighted_mse
from fastadapt.linear_relu import FusedLinearReLU, linear_relu
from fastadapt.fuse import fuse_linear_relu
from fastadapt.training import (MLP, AdaptiveTrainer, Callback, EarlyStopping, History, ModelCheckpoint, TransferTrainer,
                                extend_head, freeze, load_pretrained, replace_head, unfreeze)

__all__ = [
    "AlphaWeightedLoss", "alpha_weighted_cross_entropy", "alpha_weighted_mse",
    "FusedLinearReLU", "linear_relu", "fuse_linear_relu",
    "MLP", "AdaptiveTrainer", "Callback", "EarlyStopping", "History", "ModelCheckpoint", "TransferTrainer",
    "extend_head", "freeze", "load_pretrained", "replace_head", "unfreeze",
    "build_info", "empty_cache", "has_cuda_ops", "has_ops",
]
