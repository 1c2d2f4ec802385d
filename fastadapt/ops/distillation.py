"""Knowledge distillation for continual learning (Learning without Forgetting), fused:
``alpha * CE(logits, labels) + (1 - alpha) * T**2 * KL(softmax(teacher_logits / T) || softmax(logits[..., :K] / T))``.

Validated as the other losses (fastadapt/ops/_validate.py), then the fused compiled op where it serves
the inputs' device, else the pure-PyTorch reference; the two terms come back in float32 or better and
are added and rounded once (losses._combine), under autocast to float32 (losses._autocast).
"""
from __future__ import annotations

import torch

from fastadapt.ops import _validate, reference
from fastadapt.ops._extension import has_ops, use_compiled
from fastadapt.ops.losses import _autocast, _combine

_DISTILLATION = torch.ops.fastadapt.alpha_weighted_distillation.default if has_ops() else None


def alpha_weighted_distillation(logits, labels, teacher_logits, alpha=0.5, temperature=1.0, *, ignore_index=-100,
                                label_smoothing=0.0, reduction="mean", class_dim=1):
    """``alpha * CE(logits, labels) + (1 - alpha) * T**2 * KL(q || p)``, fused into one pass over the logits.

    The cross-entropy term is ``F.cross_entropy(logits, labels, ignore_index=..., label_smoothing=...,
    reduction=...)``, logits laid out as for ``alpha_weighted_cross_entropy`` (``class_dim=1``: ``(C,)``,
    ``(N, C)``, ``(N, C, d1, ...)``; ``class_dim=-1``: ``(..., C)``). ``teacher_logits`` are the frozen
    teacher's logits for the same inputs, same layout, dtype and device, with K classes, 1 <= K <= C: the
    distillation covers the first K (old) classes of a grown head. Per row, ``q = softmax(t / T)`` and
    ``p = softmax(z[:K] / T)``; every row is distilled, also those whose label is ``ignore_index``.

    ``reduction="mean"`` averages the cross-entropy over non-ignored rows and the KL over all rows
    (``F.kl_div``'s "batchmean" of the flattened rows); ``"sum"`` sums both; ``"none"`` returns
    ``(distill_losses, ce_losses)``, each of the labels' shape, already weighted. A term whose weight is
    exactly 0 is not evaluated: with ``alpha=1`` the teacher is not read, with ``alpha=0`` the labels
    are not. As ``F.cross_entropy``, a mean over all-ignored labels is NaN, and with it the loss unless
    ``alpha == 0``. No gradient flows to the teacher: a ``teacher_logits`` that requires grad raises.
    """
    (logits, teacher_logits), loss_dtype = _autocast(logits, teacher_logits)
    _validate.check_class_dim(class_dim)
    _validate.check_class_indices("labels", labels)
    z, _ = _validate.ce_side("", logits, labels, class_dim)
    t = _validate.teacher_side(teacher_logits, logits, class_dim)
    _validate.check_same_device(logits=logits, labels=labels, teacher_logits=teacher_logits)
    _validate.check_temperature(temperature)
    _validate.check_label_smoothing(label_smoothing)
    _validate.check_ignore_index(ignore_index)
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, logits.device)
    args = (z, labels, t, a, float(temperature), ignore_index, float(label_smoothing))
    try:
        if use_compiled(z):
            terms = _DISTILLATION(*args, red)
        else:
            terms = reference.alpha_weighted_distillation(*args, reduction)
    except IndexError:
        # a label out of range, found by the CPU kernel (or by F in the fallback): name the argument
        if torch.compiler.is_compiling() or z.device.type != "cpu" or float(a) == 0.0:
            raise
        _validate.raise_named_label_error([("labels", z, labels)], ignore_index)
        raise
    return _combine(terms, red, loss_dtype)
