"""The alpha-weighted source/target losses: ``alpha * loss_target + (1 - alpha) * loss_source``.

Functional API plus a thin ``nn.Module``. Each call validates its arguments, then runs the fused
compiled op when it is available for the inputs' device, else the pure-PyTorch reference.
"""
from __future__ import annotations

import torch
from torch import nn

from fastadapt.ops import _validate
from fastadapt.ops import reference
from fastadapt.ops._extension import use_compiled


def alpha_weighted_cross_entropy(source_logits, source_labels, target_logits, target_labels, alpha=0.5, *,
                                 ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """``alpha * CE(target) + (1 - alpha) * CE(source)``, fused into one pass over each logits tensor.

    Logits are ``(..., C)`` with labels ``(...)`` of any integer dtype; source and target may differ in
    rows and in classes. Each term is the mean over its own non-ignored rows (``reduction="mean"``).
    ``reduction="none"`` returns ``(source_losses, target_losses)``, per row, already weighted, 0 at
    ignored rows. A term whose weight is exactly 0 is not evaluated. Pass ``alpha`` as a 0-dim tensor
    to change it between steps without recompiling under ``torch.compile``.
    """
    _validate.check_ce_side("source", source_logits, source_labels)
    _validate.check_ce_side("target", target_logits, target_labels)
    _validate.check_same_dtype("source_logits", source_logits, "target_logits", target_logits)
    _validate.check_same_device(source_logits=source_logits, source_labels=source_labels,
                        target_logits=target_logits, target_labels=target_labels)
    _validate.check_label_smoothing(label_smoothing)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, source_logits.device)
    if use_compiled(source_logits):
        out0, out1 = torch.ops.fastadapt.alpha_weighted_cross_entropy(
            source_logits, source_labels, target_logits, target_labels, a, ignore_index, float(label_smoothing), red)
        return (out0, out1) if red == 0 else out0
    if a.device.type == "cpu" and not torch.compiler.is_compiling():
        # as the compiled CPU kernel: a named IndexError, checked only on sides whose weight is not 0
        if float(a) != 1.0:
            _validate.check_labels_in_range("source_labels", source_labels, source_logits.shape[-1], ignore_index)
        if float(a) != 0.0:
            _validate.check_labels_in_range("target_labels", target_labels, target_logits.shape[-1], ignore_index)
    return reference.alpha_weighted_cross_entropy(
        source_logits, source_labels, target_logits, target_labels, alpha if not isinstance(alpha, torch.Tensor) else a,
        ignore_index=ignore_index, label_smoothing=float(label_smoothing), reduction=reduction)


def alpha_weighted_mse(source_pred, source_target, target_pred, target_target, alpha=0.5, *, reduction="mean"):
    """``alpha * MSE(target) + (1 - alpha) * MSE(source)`` in one fused pass per side.

    Shapes must match exactly: unlike ``F.mse_loss``, (N, 1) against (N,) raises instead of broadcasting.
    Gradients flow to predictions and to targets.
    """
    _validate.check_mse_side("source", source_pred, source_target)
    _validate.check_mse_side("target", target_pred, target_target)
    _validate.check_same_dtype("source_pred", source_pred, "target_pred", target_pred)
    _validate.check_same_device(source_pred=source_pred, source_target=source_target,
                        target_pred=target_pred, target_target=target_target)
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, source_pred.device)
    if use_compiled(source_pred):
        out0, out1 = torch.ops.fastadapt.alpha_weighted_mse(
            source_pred, source_target, target_pred, target_target, a, red)
        return (out0, out1) if red == 0 else out0
    return reference.alpha_weighted_mse(
        source_pred, source_target, target_pred, target_target,
        alpha if not isinstance(alpha, torch.Tensor) else a, reduction=reduction)


class AlphaWeightedLoss(nn.Module):
    """``alpha * loss(target) + (1 - alpha) * loss(source)`` as a module.

    ``kind`` is ``"cross_entropy"`` or ``"mse"``; other keyword options go to the functional form.
    ``alpha`` may be reassigned between steps (a float, or a 0-dim tensor for schedules under compile).
    """

    _KINDS = {"cross_entropy": alpha_weighted_cross_entropy, "mse": alpha_weighted_mse}

    def __init__(self, alpha=0.5, kind="cross_entropy", **options):
        super().__init__()
        if kind not in self._KINDS:
            raise ValueError(f"kind must be one of {sorted(self._KINDS)}, got {kind!r}")
        allowed = {"cross_entropy": {"ignore_index", "label_smoothing", "reduction"}, "mse": {"reduction"}}[kind]
        unknown = set(options) - allowed
        if unknown:
            raise TypeError(f"unexpected option(s) for kind={kind!r}: {sorted(unknown)}; allowed: {sorted(allowed)}")
        if not isinstance(alpha, torch.Tensor):
            _validate.check_alpha_value(float(alpha))
        self.alpha = alpha
        self.kind = kind
        self.options = options

    def forward(self, source_out, source_y, target_out, target_y):
        return self._KINDS[self.kind](source_out, source_y, target_out, target_y, self.alpha, **self.options)

    def extra_repr(self) -> str:
        alpha = float(self.alpha) if not isinstance(self.alpha, torch.Tensor) or self.alpha.device.type == "cpu" else "tensor"
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"kind={self.kind!r}, alpha={alpha}{opts}"
