"""Pure-PyTorch reference implementations: the fallback when the compiled kernels are missing, and
the oracle the tests compare the kernels against (in float64).

They take what the compiled ops take (arguments already validated; cross-entropy logits class-last)
and return what they return: the two weighted terms ``(source_term, target_term)``, in float32 for
bfloat16/float16 inputs (the caller rounds the sum once). A term whose weight is exactly 0 is not
evaluated at all, so alpha=1 with an empty, NaN or all-ignored source batch gives the target loss.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _is_zero(w) -> bool:
    # A tensor weight is zero-tested only where that costs no device sync and no graph break.
    if isinstance(w, torch.Tensor):
        if w.device.type != "cpu" or torch.compiler.is_compiling():
            return False
        return bool(w == 0)
    return w == 0


def _wide(t):
    """float32 arithmetic for bfloat16 and float16 inputs."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def cross_entropy_term(logits, labels, ignore_index, label_smoothing, reduction, weight=None):
    """F.cross_entropy of class-last logits (..., C) with labels (...) or probability targets (..., C) and
    optional class weights (C,), in float32 or better; reduction none gives one loss per row, (...)."""
    rows, classes = math.prod(logits.shape[:-1]), logits.shape[-1]
    target = (_wide(labels).reshape(rows, classes) if labels.is_floating_point() else labels.reshape(-1).long())
    out = F.cross_entropy(_wide(logits).reshape(rows, classes), target,
                          weight=None if weight is None else _wide(weight), ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def alpha_weighted_cross_entropy(source_logits, source_labels, target_logits, target_labels, alpha,
                                 ignore_index=-100, label_smoothing=0.0, reduction="mean", source_weight=None,
                                 target_weight=None):
    terms = []
    for weight, logits, labels, class_weight in ((1.0 - alpha, source_logits, source_labels, source_weight),
                                                 (alpha, target_logits, target_labels, target_weight)):
        if _is_zero(weight):  # not evaluated at all: a NaN or an empty batch on this side cannot reach the result
            terms.append(_wide(logits).new_zeros(logits.shape[:-1] if reduction == "none" else ()))
        else:
            loss = cross_entropy_term(logits, labels, ignore_index, label_smoothing, reduction, class_weight)
            terms.append((weight * loss).to(loss.dtype))
    return tuple(terms)


def alpha_weighted_mse(source_pred, source_target, target_pred, target_target, alpha, reduction="mean"):
    terms = []
    for weight, pred, target in ((1.0 - alpha, source_pred, source_target), (alpha, target_pred, target_target)):
        if _is_zero(weight):
            terms.append(_wide(pred).new_zeros(pred.shape if reduction == "none" else ()))
        else:
            loss = F.mse_loss(_wide(pred), _wide(target), reduction=reduction)
            terms.append((weight * loss).to(loss.dtype))
    return tuple(terms)


def alpha_weighted_distillation(logits, labels, teacher_logits, alpha, temperature, ignore_index=-100,
                                label_smoothing=0.0, reduction="mean"):
    """``(distill_term, ce_term)``: ``(1 - alpha) * T**2 * KL(softmax(t/T) || softmax(z[..., :K]/T))`` over all
    rows (mean: "batchmean", over rows) and ``alpha * F.cross_entropy``, from class-last logits."""
    rows, k = labels.numel(), teacher_logits.shape[-1]
    w_kd = 1.0 - alpha
    if _is_zero(w_kd):
        kd = _wide(logits).new_zeros(labels.shape if reduction == "none" else ())
    else:
        log_p = F.log_softmax(_wide(logits).reshape(rows, logits.shape[-1])[:, :k] / temperature, dim=-1)
        log_q = F.log_softmax(_wide(teacher_logits).reshape(rows, k) / temperature, dim=-1)
        q = log_q.exp()
        # F.kl_div's 0 * log 0 = 0, also where the teacher's logit is -inf (log_target=True gives NaN there);
        # a NaN stays NaN
        kl = torch.where(q == 0, 0.0, q * (log_q - log_p)).sum(-1)
        kl = kl.reshape(labels.shape) if reduction == "none" else kl.sum() / rows if reduction == "mean" else kl.sum()
        kd = (w_kd * temperature * temperature * kl).to(kl.dtype)
    if _is_zero(alpha):
        ce = _wide(logits).new_zeros(labels.shape if reduction == "none" else ())
    else:
        loss = cross_entropy_term(logits, labels, ignore_index, label_smoothing, reduction)
        ce = (alpha * loss).to(loss.dtype)
    return kd, ce


def linear_relu(x, weight, bias=None):
    return F.relu(F.linear(x, weight, bias))


def linear_ce_row_losses(logits, labels, ignore_index, label_smoothing, z_loss, softcap):
    """Per-row loss of alpha_weighted_linear_cross_entropy on (rows, V) logits in the accumulation type:
    softcap ``c * tanh(x / c)`` first, then F.cross_entropy (reduction none: 0 at ignored rows) plus
    ``z_loss * logsumexp ** 2`` at the rows not ignored. The chunked fallback
    (fastadapt/ops/linear_cross_entropy.py) applies it to one chunk of rows at a time."""
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    if z_loss != 0.0:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * torch.where(labels != ignore_index, lse * lse, torch.zeros_like(lse))
    return loss
