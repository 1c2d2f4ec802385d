"""Pure-PyTorch reference implementations: the fallback when the compiled kernels are missing, and
the oracle the tests compare the kernels against (in float64).

They follow the public semantics exactly, including the rule that a term whose weight is exactly 0 is
not evaluated at all (so alpha=1 with an empty or all-ignored source batch gives the target loss).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _weights(alpha):
    """(source weight, target weight) as Python floats or 0-dim tensors."""
    return 1.0 - alpha, alpha


def _is_zero(w) -> bool:
    # A tensor weight is zero-tested only where that costs no device sync and no graph break.
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return bool(w == 0)
    return w == 0


def _ce_term(logits, labels, ignore_index, label_smoothing, reduction):
    flat = logits.reshape(-1, logits.shape[-1])
    lab = labels.reshape(-1).long()
    out = F.cross_entropy(
        flat, lab, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction
    )
    return out.reshape(labels.shape) if reduction == "none" else out


def alpha_weighted_cross_entropy(source_logits, source_labels, target_logits, target_labels, alpha,
                                 ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    w_s, w_t = _weights(alpha)
    args = (ignore_index, label_smoothing, reduction)
    return _combine(
        w_s, w_t, reduction,
        lambda: _ce_term(source_logits, source_labels, *args),
        lambda: _ce_term(target_logits, target_labels, *args),
        source_labels.shape, target_labels.shape, source_logits, target_logits,
    )


def alpha_weighted_mse(source_pred, source_target, target_pred, target_target, alpha, reduction="mean"):
    w_s, w_t = _weights(alpha)
    return _combine(
        w_s, w_t, reduction,
        lambda: F.mse_loss(source_pred, source_target, reduction=reduction),
        lambda: F.mse_loss(target_pred, target_target, reduction=reduction),
        source_pred.shape, target_pred.shape, source_pred, target_pred,
    )


def _combine(w_s, w_t, reduction, source_term, target_term, s_shape, t_shape, s_like, t_like):
    def weighted(w, term, shape, like):
        if _is_zero(w):
            # not evaluated at all: a NaN or an empty batch on this side cannot reach the result
            return like.new_zeros(shape if reduction == "none" else ())
        return (w * term()).to(like.dtype)

    s = weighted(w_s, source_term, s_shape, s_like)
    t = weighted(w_t, target_term, t_shape, t_like)
    if reduction == "none":
        return s, t
    return s + t


def linear_relu(x, weight, bias=None):
    return F.relu(F.linear(x, weight, bias))
