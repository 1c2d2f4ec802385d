"""Argument checks shared by the compiled path and the fallback, so both fail the same way and before
any kernel runs. Each message names the argument and the bad value."""
from __future__ import annotations

import math

import torch

from fastadapt.ops.reference import REDUCTIONS

_CPU_FLOATS = (torch.float32, torch.float64, torch.bfloat16)
_CUDA_FLOATS = _CPU_FLOATS + (torch.float16,)


def reduction_code(reduction) -> int:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    return REDUCTIONS[reduction]


def check_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_float_dtype(name, t):
    allowed = _CUDA_FLOATS if t.device.type == "cuda" else _CPU_FLOATS
    if t.dtype not in allowed:
        kinds = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be a floating tensor ({kinds} on {t.device.type}), got dtype {t.dtype}")


def check_same_device(**tensors):
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{name} is on {t.device} but {name0} is on {t0.device}; all inputs must share one device")


def alpha_tensor(alpha, device) -> torch.Tensor:
    """alpha as a 0-dim float64 tensor (CPU, or the inputs' device), validated where that costs no sync."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.dim() > 1:
            raise ValueError(f"alpha must be a float or a 0-dim tensor, got a tensor of shape {tuple(alpha.shape)}")
        if not alpha.is_floating_point():
            raise TypeError(f"alpha must be a floating tensor, got dtype {alpha.dtype}")
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: fastadapt does not differentiate with respect to alpha")
        if alpha.device.type != "cpu" and alpha.device != device:
            raise ValueError(f"alpha is on {alpha.device} but the inputs are on {device}")
        if alpha.device.type == "cpu" and not torch.compiler.is_compiling():
            check_alpha_value(float(alpha))
        return alpha.reshape(())
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or a 0-dim tensor, got {type(alpha).__name__}")
    check_alpha_value(float(alpha))
    return torch.tensor(float(alpha), dtype=torch.float64)


def check_alpha_value(a: float):
    if math.isnan(a) or a < 0.0 or a > 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {a}")


def check_label_smoothing(eps):
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(eps).__name__}")
    if math.isnan(eps) or eps < 0.0 or eps > 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {eps}")


def check_ce_side(side, logits, labels):
    ln, bn = f"{side}_logits", f"{side}_labels"
    check_tensor(ln, logits)
    check_tensor(bn, labels)
    check_float_dtype(ln, logits)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{bn} must have an integer dtype, got {labels.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{ln} must have a class dimension (shape (..., C)), got a 0-dim tensor")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"{bn} has shape {tuple(labels.shape)} but {ln} has shape {tuple(logits.shape)}; "
            f"labels must have the logits' shape without the last (class) dimension"
        )
    if logits.shape[-1] == 0 and labels.numel() > 0:
        raise ValueError(f"{ln} has 0 classes")


def check_mse_side(side, pred, target):
    pn, tn = f"{side}_pred", f"{side}_target"
    check_tensor(pn, pred)
    check_tensor(tn, target)
    check_float_dtype(pn, pred)
    if target.dtype != pred.dtype:
        raise TypeError(f"{tn} has dtype {target.dtype} but {pn} has dtype {pred.dtype}")
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(
            f"{tn} has shape {tuple(target.shape)} but {pn} has shape {tuple(pred.shape)}; "
            f"shapes must match exactly (fastadapt does not broadcast)"
        )


def check_same_dtype(name_a, a, name_b, b):
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} has dtype {b.dtype} but {name_a} has dtype {a.dtype}; they must match")


def check_labels_in_range(name, labels, classes, ignore_index):
    """The compiled CPU kernel's label check, for the fallback on the CPU (on CUDA it would cost a sync,
    and the CUDA kernels give a NaN loss instead): same exception, same message."""
    if labels.device.type != "cpu" or labels.numel() == 0 or torch.compiler.is_compiling():
        return
    flat = labels.reshape(-1)
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= classes))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise IndexError(f"{name} contains the label {int(flat[i])} (at flat position {i}), outside [0, {classes}) "
                         f"and not ignore_index ({ignore_index})")
