"""fastadapt: fused C++/CUDA kernels and training loops for transfer and adaptive learning in PyTorch.

Three layers, each importing only from the ones before it: ``fastadapt.ops`` (fused losses and
layers), ``fastadapt.training`` (trainers, callbacks, checkpoints, model surgery) and
``fastadapt.apps`` (CLI, demo, readers; not imported here).
"""
from fastadapt._version import __version__
from fastadapt.ops import (AlphaWeightedLinearCrossEntropy, AlphaWeightedLoss, FusedLinearReLU,
                           alpha_weighted_cross_entropy, alpha_weighted_distillation,
                           alpha_weighted_linear_cross_entropy, alpha_weighted_mse, build_info, empty_cache, fuse_linear_relu,
                           has_cuda_ops, has_ops, linear_relu)
from fastadapt.training import (MLP, AdaptiveConfig, AdaptiveTrainer, Callback, EarlyStopping, History, ModelCheckpoint,
                                TrainConfig, TransferTrainer, extend_head, freeze, load_pretrained, replace_head,
                                unfreeze)

__all__ = [
    "__version__",
    "AlphaWeightedLoss", "alpha_weighted_cross_entropy", "AlphaWeightedLinearCrossEntropy",
    "alpha_weighted_linear_cross_entropy", "alpha_weighted_mse", "alpha_weighted_distillation",
    "FusedLinearReLU", "linear_relu", "fuse_linear_relu",
    "MLP", "AdaptiveConfig", "AdaptiveTrainer", "Callback", "EarlyStopping", "History", "ModelCheckpoint",
    "TrainConfig", "TransferTrainer",
    "extend_head", "freeze", "load_pretrained", "replace_head", "unfreeze",
    "build_info", "empty_cache", "has_cuda_ops", "has_ops",
]
