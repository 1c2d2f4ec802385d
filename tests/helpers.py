"""Comparison helpers and the backend switch shared by the op tests."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from fastadapt.ops import _extension

# (rtol, atol) against a float64 reference computed from the same (rounded) inputs.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


# CUDA float32 uses the hardware exponential (__expf, a few ulp): looser than the CPU's.
CUDA_TOLERANCES = {**TOLERANCES, torch.float32: (1e-4, 1e-5)}


def assert_close(actual, expected, dtype, what, scale=1.0):
    """Values equal to within dtype tolerance; NaN where the reference has NaN, and nowhere else."""
    rtol, atol = (CUDA_TOLERANCES if actual.is_cuda else TOLERANCES)[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def grad_or_zeros(t):
    return t.grad if t.grad is not None else torch.zeros_like(t)


@contextlib.contextmanager
def use_backend(name):
    """Routes the public API through the compiled kernels ("compiled") or the pure-PyTorch fallback
    ("fallback", as if the extension had failed to load, without the warning)."""
    if name == "compiled":
        if not fastadapt.has_ops():
            pytest.skip("compiled extension not loaded: " + str(_extension._load_error))
        yield
        return
    saved = _extension._C, _extension._warned
    _extension._C, _extension._warned = None, True
    try:
        yield
    finally:
        _extension._C, _extension._warned = saved


def ce_oracle(sl, sy, tl, ty, alpha, *, ignore_index=-100, label_smoothing=0.0, reduction="mean", class_dim=1,
              source_weight=None, target_weight=None):
    """``alpha * F.cross_entropy(target) + (1 - alpha) * F.cross_entropy(source)`` from PyTorch's own op on the
    given (float64) logits, with each side's class weights; labels are class indices or probability
    targets. A side whose weight is 0 is not evaluated. (source, target) for reduction none."""
    terms = []
    for w, logits, labels, cw in ((1.0 - float(alpha), sl, sy, source_weight), (float(alpha), tl, ty, target_weight)):
        soft = labels.is_floating_point()
        if class_dim == -1 and logits.dim() > 1:
            logits, labels = logits.movedim(-1, 1), labels.movedim(-1, 1) if soft else labels
        if w == 0:
            rows = labels.shape if not soft else logits.shape[:1] + logits.shape[2:] if logits.dim() > 1 else ()
            terms.append(logits.new_zeros(rows if reduction == "none" else ()))
            continue
        terms.append(w * F.cross_entropy(logits, labels if soft else labels.long(),
                                         weight=None if cw is None else cw.to(logits.dtype), ignore_index=ignore_index,
                                         label_smoothing=label_smoothing, reduction=reduction))
    return tuple(terms) if reduction == "none" else terms[0] + terms[1]


def mse_oracle(sp, st, tp, tt, alpha, *, reduction="mean"):
    """``alpha * F.mse_loss(target side) + (1 - alpha) * F.mse_loss(source side)``; zero-weight sides skipped."""
    terms = []
    for w, p, t in ((1.0 - float(alpha), sp, st), (float(alpha), tp, tt)):
        terms.append(p.new_zeros(p.shape if reduction == "none" else ()) if w == 0
                     else w * F.mse_loss(p, t, reduction=reduction))
    return tuple(terms) if reduction == "none" else terms[0] + terms[1]


def distill_oracle(z, y, t, alpha, temperature, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                   class_dim=1):
    """``alpha * F.cross_entropy + (1 - alpha) * T**2 * F.kl_div(log_softmax(z[..., :K] / T), log_softmax(t / T),
    log_target=True)`` from PyTorch's own ops on the given (float64) logits, rows flattened (the KL's mean is
    "batchmean" over rows); a term whose weight is 0 is not evaluated. (distill, ce) for reduction none."""
    def rows(x):
        x = x.movedim(1, -1) if class_dim == 1 and x.dim() > 2 else x
        return x.reshape(y.numel(), x.shape[-1])

    z2, t2, a = rows(z), rows(t), float(alpha)
    k = t2.shape[-1]
    zeros = z.new_zeros(y.shape if reduction == "none" else ())
    if a == 1:
        kd = zeros
    else:
        kl = F.kl_div(F.log_softmax(z2[:, :k] / temperature, -1), F.log_softmax(t2 / temperature, -1), log_target=True,
                      reduction={"mean": "batchmean", "sum": "sum", "none": "none"}[reduction])
        kd = (1 - a) * temperature ** 2 * (kl.sum(-1).reshape(y.shape) if reduction == "none" else kl)
    if a == 0:
        ce = zeros
    else:
        ce = a * F.cross_entropy(z2, y.reshape(-1).long(), ignore_index=ignore_index, label_smoothing=label_smoothing,
                                 reduction=reduction)
        ce = ce.reshape(y.shape) if reduction == "none" else ce
    return (kd, ce) if reduction == "none" else kd + ce


def linear_ce_oracle(sh, sy, th, ty, weight, bias, alpha, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                     z_loss=0.0, softcap=None):
    """The unfused composition alpha_weighted_linear_cross_entropy must equal, from PyTorch's own ops:
    per side ``x = F.linear(hidden, weight, bias)``, ``x = softcap * tanh(x / softcap)`` when softcap is set,
    ``F.cross_entropy(x, labels, ...)`` plus ``z_loss * logsumexp(x) ** 2`` over the non-ignored rows
    (averaged with the cross-entropy for mean). A side whose weight is 0 is not evaluated; the z-term of a
    side with no non-ignored rows is 0 (its cross-entropy mean is already F's NaN, with zero gradients).
    (source, target) per row, of the labels' shapes, for reduction none."""
    terms = []
    for w, h, y in ((1.0 - float(alpha), sh, sy), (float(alpha), th, ty)):
        if w == 0:
            terms.append(h.new_zeros(y.shape if reduction == "none" else ()))
            continue
        x = F.linear(h, weight, bias).reshape(-1, weight.shape[0])
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        y2 = y.reshape(-1).long()
        ce = F.cross_entropy(x, y2, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
        if z_loss:
            kept = y2 != ignore_index
            z = torch.where(kept, torch.logsumexp(x, -1) ** 2, torch.zeros_like(x[:, 0])) * z_loss
            if reduction == "none":
                ce = ce + z
            elif int(kept.sum()):
                ce = ce + (z.sum() / kept.sum() if reduction == "mean" else z.sum())
        terms.append(w * (ce.reshape(y.shape) if reduction == "none" else ce))
    return tuple(terms) if reduction == "none" else terms[0] + terms[1]
