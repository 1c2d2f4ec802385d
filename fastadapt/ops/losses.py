"""The alpha-weighted source/target losses: ``alpha * loss_target + (1 - alpha) * loss_source``.

Functional API plus a thin ``nn.Module``. Each call validates its arguments (fastadapt/ops/_validate.py),
then runs the fused compiled op when it is available for the inputs' device, else the pure-PyTorch
reference. Both return the two weighted terms in float32 or better; reduction mean/sum adds them
here, and the result is rounded to the inputs' dtype once (kept in float32 under autocast: _autocast).
"""
from __future__ import annotations

import torch
from torch import nn

from fastadapt.ops import _validate, reference
from fastadapt.ops._extension import has_ops, use_compiled

# The ops, looked up once: the attribute chain torch.ops.fastadapt.<op>.default costs on every call.
_CROSS_ENTROPY = torch.ops.fastadapt.alpha_weighted_cross_entropy.default if has_ops() else None
_MSE = torch.ops.fastadapt.alpha_weighted_mse.default if has_ops() else None


def alpha_weighted_cross_entropy(source_logits, source_labels, target_logits, target_labels, alpha=0.5, *,
                                 ignore_index=-100, label_smoothing=0.0, reduction="mean", class_dim=1,
                                 source_weight=None, target_weight=None):
    """``alpha * CE(target) + (1 - alpha) * CE(source)``, fused into one pass over each logits tensor.

    Each term is ``F.cross_entropy(logits, labels, weight=..., ignore_index=..., label_smoothing=...,
    reduction=...)`` of its side; source and target may differ in rows and in classes. ``class_dim=1``
    (default) reads the logits as F.cross_entropy does: ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` with
    labels ``()``, ``(N,)`` or ``(N, d1, ...)``. ``class_dim=-1`` reads them class-last, ``(..., C)`` with
    labels ``(...)``: a language model's ``(batch, seq, vocab)`` logits with ``(batch, seq)`` labels,
    without a copy.

    Each side's labels are either class indices of any integer dtype, or probability (soft) targets: a
    floating tensor of the logits' shape and dtype, as F.cross_entropy takes them (rows need not sum
    to 1; ``ignore_index`` does not apply to them, and as in F must then be negative). Gradients flow to
    probability targets that require grad, as in F.

    ``source_weight`` / ``target_weight``: optional per-class weights of that side, F's ``weight``: 1-D,
    one per class, in the logits' dtype and on their device. With class indices a row's loss is scaled
    by its label's weight and ``reduction="mean"`` divides by the sum of those weights over the rows not
    ignored; with probability targets each class's term is scaled and the mean divides by the number of
    rows. No gradient flows to them (F differentiates them): one that requires grad is refused.

    ``reduction="none"`` returns ``(source_losses, target_losses)``, one loss per row (the logits' shape
    without the class dimension), already weighted by alpha, 0 at ignored rows. A term whose weight is
    exactly 0 is not evaluated (neither its logits, labels nor class weights are read). Pass ``alpha``
    as a 0-dim tensor to change it between steps without recompiling under ``torch.compile``.
    """
    (source_logits, source_labels, target_logits, target_labels, source_weight, target_weight), loss_dtype = _autocast(
        source_logits, source_labels, target_logits, target_labels, source_weight, target_weight)
    _validate.check_class_dim(class_dim)
    sl, sy = _validate.ce_side("source", source_logits, source_labels, class_dim)
    tl, ty = _validate.ce_side("target", target_logits, target_labels, class_dim)
    _validate.check_same_dtype("source_logits", source_logits, "target_logits", target_logits)
    _validate.check_same_device(source_logits=source_logits, source_labels=source_labels,
                                target_logits=target_logits, target_labels=target_labels)
    _validate.check_label_smoothing(label_smoothing)
    _validate.check_ignore_index(ignore_index)
    if ignore_index >= 0:
        _validate.check_soft_ignore_index(ignore_index, (("source_labels", sy), ("target_labels", ty)))
    if source_weight is not None or target_weight is not None:
        _validate.check_class_weight("source_weight", source_weight, "source_logits", sl)
        _validate.check_class_weight("target_weight", target_weight, "target_logits", tl)
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, source_logits.device)
    args = (sl, sy, tl, ty, a, ignore_index, float(label_smoothing))
    try:
        if use_compiled(sl):
            terms = _CROSS_ENTROPY(*args, red, source_weight, target_weight)
        else:
            terms = reference.alpha_weighted_cross_entropy(*args, reduction, source_weight, target_weight)
    except IndexError:
        # a label out of range, found by the CPU kernel (or by F in the fallback): name the argument
        if torch.compiler.is_compiling() or sl.device.type != "cpu":
            raise
        evaluated = [("source_labels", sl, sy)] if float(a) != 1.0 else []
        if float(a) != 0.0:
            evaluated.append(("target_labels", tl, ty))
        _validate.raise_named_label_error(evaluated, ignore_index)
        raise
    return _combine(terms, red, loss_dtype)


def _autocast(*tensors):
    """PyTorch's autocast policy for losses, as F.cross_entropy and F.mse_loss follow it: under autocast on the
    inputs' device (CPU or CUDA) the floating inputs are cast to float32 (float64 stays) and the loss comes
    back in float32, on the compiled and the fallback path alike, rather than rounded to the inputs' bf16.

    Returns the tensors and the loss's dtype (outside autocast the first input's). When the floating inputs
    already share one dtype nothing is copied: the kernels and the reference compute in float32 or better and
    return float32 terms for bfloat16/float16 inputs, so skipping the final rounding gives what the cast
    would, and the gradients come back in the inputs' dtype as through F's cast. Mixed dtypes (bf16 logits
    with float32 probability targets or class weights, say) and a dtype the kernels do not take on that
    device are cast, as F's policy would, instead of being refused. Done here, not as an Autocast kernel of the ops: the validation, the
    fallback and the final rounding all happen in this layer, before and after the op.
    """
    first = tensors[0]
    if not isinstance(first, torch.Tensor):
        return tensors, None  # refused by the validation that follows
    device = first.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors, first.dtype
    dtypes = {t.dtype for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point()}
    if len(dtypes) > 1 or not dtypes <= set(_validate.float_dtypes(first.device)):  # float16 on the CPU, say
        tensors = tuple(t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                        else t for t in tensors)
    return tensors, torch.promote_types(tensors[0].dtype, torch.float32)


def _combine(terms, reduction_code, dtype):
    # the terms are in float32 or better: a bf16 loss is rounded once, after the addition
    if reduction_code == 0:
        return _as(terms[0], dtype), _as(terms[1], dtype)
    return _as(terms[0] + terms[1], dtype)


def _as(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to() still costs a dispatch


def alpha_weighted_mse(source_pred, source_target, target_pred, target_target, alpha=0.5, *, reduction="mean"):
    """``alpha * MSE(target) + (1 - alpha) * MSE(source)`` in one fused pass per side.

    Each term is ``F.mse_loss(pred, target, reduction=...)`` of its side. Shapes must match exactly:
    unlike ``F.mse_loss``, (N, 1) against (N,) raises instead of broadcasting. Gradients flow to
    predictions and to targets. ``reduction="none"`` returns ``(source_losses, target_losses)``.
    """
    (source_pred, source_target, target_pred, target_target), loss_dtype = _autocast(
        source_pred, source_target, target_pred, target_target)
    _validate.check_mse_side("source", source_pred, source_target)
    _validate.check_mse_side("target", target_pred, target_target)
    _validate.check_same_dtype("source_pred", source_pred, "target_pred", target_pred)
    _validate.check_same_device(source_pred=source_pred, source_target=source_target,
                                target_pred=target_pred, target_target=target_target)
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, source_pred.device)
    if use_compiled(source_pred):
        terms = _MSE(source_pred, source_target, target_pred, target_target, a, red)
    else:
        terms = reference.alpha_weighted_mse(source_pred, source_target, target_pred, target_target, a, reduction)
    return _combine(terms, red, loss_dtype)


class AlphaWeightedLoss(nn.Module):
    """``alpha * loss(target) + (1 - alpha) * loss(source)`` as a module.

    ``kind`` is ``"cross_entropy"`` or ``"mse"``; other keyword options go to the functional form.
    ``alpha`` may be reassigned between steps (a float, or a 0-dim tensor for schedules under compile).
    Class weights (``source_weight``, ``target_weight``) are buffers, as ``nn.CrossEntropyLoss``'s
    ``weight``: ``.to(device)`` moves them and the state dict holds them.
    """

    _WEIGHTS = ("source_weight", "target_weight")

    _KINDS = {"cross_entropy": alpha_weighted_cross_entropy, "mse": alpha_weighted_mse}
    _OPTIONS = {"cross_entropy": {"ignore_index", "label_smoothing", "reduction", "class_dim", "source_weight",
                                  "target_weight"},
                "mse": {"reduction"}}

    def __init__(self, alpha=0.5, kind="cross_entropy", **options):
        super().__init__()
        if kind not in self._KINDS:
            raise ValueError(f"kind must be one of {sorted(self._KINDS)}, got {kind!r}")
        unknown = set(options) - self._OPTIONS[kind]
        if unknown:
            raise TypeError(f"unexpected option(s) for kind={kind!r}: {sorted(unknown)}; "
                            f"allowed: {sorted(self._OPTIONS[kind])}")
        if not isinstance(alpha, torch.Tensor):
            _validate.check_alpha_value(float(alpha))
        self.alpha = alpha
        self.kind = kind
        for name in self._WEIGHTS:
            self.register_buffer(name, options.pop(name, None))
        self.options = options

    def forward(self, source_out, source_y, target_out, target_y):
        weights = {name: getattr(self, name) for name in self._WEIGHTS if getattr(self, name) is not None}
        return self._KINDS[self.kind](source_out, source_y, target_out, target_y, self.alpha, **self.options, **weights)

    def __prepare_scriptable__(self):
        # torch.jit.script calls this before compiling: say what to use instead of TorchScript's
        # "python value of type ... cannot be used as a value" from deep inside the argument checks
        raise TypeError(f"{type(self).__name__} does not support torch.jit.script (deprecated by PyTorch); run it "
                        "eagerly, under torch.compile or torch.export")

    def extra_repr(self) -> str:
        alpha = float(self.alpha) if not isinstance(self.alpha, torch.Tensor) or self.alpha.device.type == "cpu" else "tensor"
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"kind={self.kind!r}, alpha={alpha}{opts}"
