"""Fused linear + alpha-weighted cross-entropy for large vocabularies:
``alpha * CE(target_hidden @ W.T + b, target_labels) + (1 - alpha) * CE(source_hidden @ W.T + b, source_labels)``
without ever holding the (rows x V) logits of a side at once.

The compiled op (csrc/chunked_linear_ce.h: the chunked algorithm, one copy for the CPU and CUDA row
passes) serves every reduction on the CPU and CUDA; the pure-PyTorch chunked implementation below is the
fallback where it is missing (another device, an extension that failed to load) and is chunked too, so
the fallback has no memory cliff either. Argument checks: fastadapt/ops/_validate.py, before both.

Why chunked, and why the gradients are computed in the forward pass: a language model's output layer
makes N x V logits (N = 8192, V = 128256 is 4.2 GB in fp32), and eager cross-entropy adds a
log-softmax and a gradient of the same size. Processing `chunk_size` rows at a time bounds the extra
memory by a few chunk x V buffers. The weight gradient sums over every row, so it cannot be formed
from a per-row grad_output later without a second pass over all the GEMMs; for reduction mean/sum the
loss has a single grad_output, so the forward writes the gradients for a unit grad_output and the
backward only scales them (as Liger-Kernel and torch's chunked F.linear_cross_entropy do). With
reduction none each row has its own grad_output: the backward then runs the chunked pass again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastadapt.ops import _validate
from fastadapt.ops._extension import has_ops, use_compiled
from fastadapt.ops.losses import _as, _combine
from fastadapt.ops.reference import _is_zero, _wide, linear_ce_row_losses

# What the chunk buffers of the compiled op may hold when chunk_size is None: 16 MB, or 1/32 of the larger
# side's float32 logits when that is more (the budget for the whole extra memory is 64 MB or 1/16
# of one side's eager logits, whichever is larger). Every chunk re-reads W twice and re-streams the
# float32 weight gradient once, so larger chunks are faster, but the step's peak grows by more than the
# buffer (the BLAS's own workspace): 16 MB measured 37 MB extra in all, 24 MB and 32 MB 60-66 MB
# (BENCHMARKS.md, issue 13).
_CHUNK_BYTES = 16 << 20

_LINEAR_CE = (torch.ops.fastadapt.alpha_weighted_linear_cross_entropy.default
              if has_ops() and hasattr(torch.ops.fastadapt, "_alpha_weighted_linear_cross_entropy_backward") else None)


def default_chunk_size(vocab: int, rows: int = 0, dtype=torch.float32, softcap=None) -> int:
    """Rows per chunk for a V-class head, `rows` the larger side's: the chunk buffers (the logits in the
    inputs' dtype, widened to float32 for bf16, and a separate dlogits buffer only with softcap; see
    csrc/chunked_linear_ce.h) within the budget above, at least one row."""
    acc = 8 if dtype == torch.float64 else 4
    per_elem = (acc if dtype in (torch.float32, torch.float64) else 2 + acc) + (acc if softcap is not None else 0)
    budget = max(_CHUNK_BYTES, rows * vocab * 4 // 32)
    return max(1, budget // (per_elem * max(vocab, 1)))


def alpha_weighted_linear_cross_entropy(source_hidden, source_labels, target_hidden, target_labels, weight, bias=None,
                                        alpha=0.5, *, ignore_index=-100, label_smoothing=0.0, reduction="mean",
                                        z_loss=0.0, softcap=None, chunk_size=None):
    """``alpha * CE(target) + (1 - alpha) * CE(source)`` where each side's logits are ``F.linear(hidden,
    weight, bias)``, computed ``chunk_size`` rows at a time so that the logits never exist whole.

    hidden: ``(..., D)`` per side (the sides may differ in rows); labels: class indices ``(...)``;
    weight: ``(V, D)`` (an ``nn.Linear`` head's, or a language model's output embeddings), bias ``(V,)``
    or None. Value and gradients (both hiddens, weight, bias) equal those of
    ``alpha_weighted_cross_entropy(F.linear(source_hidden, weight, bias), source_labels,
    F.linear(target_hidden, weight, bias), target_labels, alpha, class_dim=-1, ...)`` with two options
    on each row's logits ``x``:

    * ``softcap=c``: the logits are ``c * tanh(x / c)`` (Gemma 2) before the softmax;
    * ``z_loss=z``: each non-ignored row adds ``z * logsumexp(x) ** 2`` (PaLM), averaged with the
      row's cross-entropy (``reduction="mean"`` divides by the number of non-ignored rows).

    ``reduction="none"`` returns ``(source_losses, target_losses)`` of the labels' shapes, already
    weighted, 0 at ignored rows. A side whose weight is exactly 0 is not evaluated. A weight that does
    not require grad (a frozen head) costs no weight-gradient GEMM. Double backward is not supported.
    """
    low = _autocast_dtype(source_hidden, weight)
    if low is not None:
        # autocast's policy for this composition: F.linear runs in the autocast dtype, F.cross_entropy
        # in float32 (so the loss comes back in float32: the terms are in the accumulation type already)
        source_hidden, target_hidden, weight = (t.to(low) for t in (source_hidden, target_hidden, weight))
        bias = None if bias is None else bias.to(low)
    _validate.check_linear_ce_args(source_hidden, source_labels, target_hidden, target_labels, weight, bias)
    _validate.check_label_smoothing(label_smoothing)
    _validate.check_ignore_index(ignore_index)
    _validate.check_z_loss(z_loss)
    _validate.check_softcap(softcap)
    _validate.check_chunk_size(chunk_size)
    red = _validate.reduction_code(reduction)
    a = _validate.alpha_tensor(alpha, source_hidden.device)
    sides = ((1.0 - a, "source_labels", source_labels), (a, "target_labels", target_labels))
    if not torch.compiler.is_compiling() and source_hidden.device.type == "cpu":
        # the label range is checked before any GEMM runs (on the CPU, where reading it costs no sync)
        _validate.check_linear_ce_labels([(n, y) for w, n, y in sides if not _is_zero(w)], weight, ignore_index)
    rows = max(source_hidden.numel(), target_hidden.numel()) // max(weight.shape[1], 1)
    chunk = chunk_size or default_chunk_size(weight.shape[0], rows, weight.dtype, softcap)
    if _LINEAR_CE is not None and source_hidden.device.type in ("cpu", "cuda") and use_compiled(source_hidden):
        # the compiled op takes hidden flattened to (rows, D) and returns its terms in the accumulation type
        d = weight.shape[1]
        terms = _LINEAR_CE(source_hidden.reshape(-1, d), source_labels.reshape(-1), target_hidden.reshape(-1, d),
                           target_labels.reshape(-1), weight, bias, a, ignore_index, float(label_smoothing), red,
                           float(z_loss), None if softcap is None else float(softcap), chunk)
        if red == 0:
            terms = (terms[0].reshape(source_labels.shape), terms[1].reshape(target_labels.shape))
    else:
        terms = _ChunkedLinearCrossEntropy.apply(source_hidden, source_labels, target_hidden, target_labels, weight,
                                                 bias, a, ignore_index, float(label_smoothing), red, float(z_loss),
                                                 softcap, chunk)
    out_dtype = torch.float32 if low is not None else source_hidden.dtype
    if red != 0:  # the loss is already the sum of the two terms (one grad_output: see the module docstring)
        return _as(terms[0], out_dtype)
    return _combine(terms, red, out_dtype)


def _autocast_dtype(hidden, weight):
    """The autocast dtype when autocast is on for the inputs' device and they are float32 (where F.linear
    would cast), else None."""
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        return None  # the argument checks name the wrong type
    dev = hidden.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return None
    low = torch.get_autocast_dtype(dev)
    if not all(t.dtype in (torch.float32, low) for t in (hidden, weight)):
        return None  # float64 is outside autocast's policy (F.linear keeps it), as is anything else
    return low


class LinearCrossEntropyArgs:
    """The options of one call, as the chunked pass reads them."""

    def __init__(self, weight, bias, ignore_index, label_smoothing, z_loss, softcap, chunk):
        self.weight, self.bias = weight, bias
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing
        self.z_loss, self.softcap, self.chunk = z_loss, softcap, chunk


def _side_pass(hidden, labels, o, scale, grads):
    """One side's rows, chunk by chunk: returns the per-row losses (acc type, (rows,)). With ``scale``
    (a float, or per-row factors (rows,)) also adds this side's gradients of ``sum(scale * row_loss)``
    into ``grads`` = [grad_hidden (rows, D) or None, grad_weight (fp32/acc) or None, grad_bias or None].

    Only the chunk's logits and their gradient exist at a time. The softmax part goes through autograd
    on the chunk's logits alone (so it is F.cross_entropy's own formula, softcap and z-loss included);
    the three GEMMs are explicit, so that grad_weight is accumulated in the accumulation type and a
    frozen weight costs no GEMM."""
    w, b = o.weight, o.bias
    rows = hidden.shape[0]
    losses = []
    for r0 in range(0, rows, o.chunk):
        h = hidden[r0:r0 + o.chunk]
        y = labels[r0:r0 + o.chunk]
        with torch.no_grad():
            x = F.linear(h, w, b)  # in the inputs' dtype, as the unfused composition rounds its logits
        x = _wide(x).requires_grad_(scale is not None)
        with torch.enable_grad():
            loss = linear_ce_row_losses(x, y, o.ignore_index, o.label_smoothing, o.z_loss, o.softcap)
            if scale is None:
                losses.append(loss.detach())
                continue
            s = scale if not isinstance(scale, torch.Tensor) else scale[r0:r0 + o.chunk]
            (dx,) = torch.autograd.grad((loss * s).sum(), x)
        losses.append(loss.detach())
        g_h, g_w, g_b = grads
        if g_h is not None:
            g_h[r0:r0 + o.chunk] = (dx.to(w.dtype) @ w).to(g_h.dtype)
        if g_w is not None:
            g_w.addmm_(dx.t(), _wide(h))  # fp32 accumulation for bf16 inputs
        if g_b is not None:
            g_b.add_(dx.sum(0))
    return torch.cat(losses) if losses else hidden.new_zeros((0,), dtype=_wide(hidden).dtype)


def _denominator(labels, ignore_index):
    return int((labels != ignore_index).sum())


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Returns (total, unused) for reduction mean/sum, (source_losses, target_losses) for none, in the
    accumulation type; hidden arrives (..., D) and is flattened here."""

    @staticmethod
    def forward(ctx, sh, sy, th, ty, weight, bias, alpha, ignore_index, eps, red, z_loss, softcap, chunk):
        o = LinearCrossEntropyArgs(weight, bias, ignore_index, eps, z_loss, softcap, chunk)
        acc = _wide(sh).dtype
        hiddens = (sh.reshape(-1, sh.shape[-1]), th.reshape(-1, th.shape[-1]))
        labels = (sy.reshape(-1).long(), ty.reshape(-1).long())
        side_w = (1.0 - float(alpha), float(alpha))
        need_h = (ctx.needs_input_grad[0], ctx.needs_input_grad[2])
        need_w, need_b = ctx.needs_input_grad[4], bias is not None and ctx.needs_input_grad[5]
        ctx.shapes = (sh.shape, th.shape)
        ctx.red = red
        if red == 0:
            # per-row grad_outputs arrive in backward: the chunked pass runs there
            terms = []
            for k in range(2):
                if side_w[k] == 0.0:
                    terms.append(torch.zeros(labels[k].shape, dtype=acc, device=sh.device))
                    continue
                loss = _side_pass(hiddens[k], labels[k], o, None, None)
                terms.append((side_w[k] * loss.double()).to(acc))
            ctx.save_for_backward(*hiddens, *labels)
            ctx.o, ctx.side_w = o, side_w
            return terms[0].reshape(sy.shape), terms[1].reshape(ty.shape)
        g_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        g_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        g_hs = [None, None]
        total = 0.0
        for k in range(2):
            if side_w[k] == 0.0:  # not evaluated: not read in forward or backward
                g_hs[k] = torch.zeros_like(hiddens[k]) if need_h[k] else None
                continue
            denom = _denominator(labels[k], ignore_index) if red == 1 else 1
            # F.cross_entropy's mean over no rows is NaN with zero gradients: scale 0, loss 0/0
            scale = side_w[k] / denom if denom else 0.0
            g_hs[k] = torch.empty_like(hiddens[k]) if need_h[k] else None
            loss = _side_pass(hiddens[k], labels[k], o, scale, [g_hs[k], g_w, g_b])
            s = loss.double().sum()
            total = total + side_w[k] * (s / denom if denom else s * float("nan"))
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (*g_hs, g_w, g_b)))
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        out = torch.as_tensor(total, dtype=torch.float64).to(device=sh.device, dtype=acc)
        return out, torch.zeros((), dtype=acc, device=sh.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_total, g_other):
        none = [None] * 13
        if ctx.red == 0:
            return _ChunkedLinearCrossEntropy._backward_none(ctx, g_total, g_other)
        g_sh, g_th, g_w, g_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        need = ctx.needs_input_grad
        go = g_total
        none[0] = (g_sh * go.to(g_sh.dtype)).reshape(ctx.shapes[0]) if need[0] else None
        none[2] = (g_th * go.to(g_th.dtype)).reshape(ctx.shapes[1]) if need[2] else None
        none[4] = (g_w * go).to(w_dtype) if need[4] else None
        none[5] = (g_b * go).to(b_dtype) if b_dtype is not None and need[5] else None
        return tuple(none)

    @staticmethod
    def _backward_none(ctx, g_s, g_t):
        sh, th, sy, ty = ctx.saved_tensors
        o, side_w = ctx.o, ctx.side_w
        need = ctx.needs_input_grad
        acc = _wide(sh).dtype
        need_b = o.bias is not None and need[5]
        g_w = torch.zeros(o.weight.shape, dtype=acc, device=o.weight.device) if need[4] else None
        g_b = torch.zeros(o.bias.shape, dtype=acc, device=o.bias.device) if need_b else None
        g_h = []
        for k, (h, y, go) in enumerate(((sh, sy, g_s), (th, ty, g_t))):
            gh = torch.zeros_like(h) if need[2 * k] else None
            if side_w[k] != 0.0 and go is not None:
                _side_pass(h, y, o, side_w[k] * go.reshape(-1).to(acc), [gh, g_w, g_b])
            g_h.append(gh)
        out = [None] * 13
        out[0] = g_h[0].reshape(ctx.shapes[0]) if g_h[0] is not None else None
        out[2] = g_h[1].reshape(ctx.shapes[1]) if g_h[1] is not None else None
        out[4] = g_w.to(o.weight.dtype) if g_w is not None else None
        out[5] = g_b.to(o.bias.dtype) if g_b is not None else None
        return tuple(out)


class AlphaWeightedLinearCrossEntropy(nn.Module):
    """The fused loss over an existing output layer, without copying its weight.

    ``head`` is an ``nn.Linear`` (its ``weight`` and ``bias`` are read at each call, so training,
    freezing or swapping them is seen) or, for a Hugging Face model, ``model.get_output_embeddings()``.
    ``forward(source_hidden, source_labels, target_hidden, target_labels)`` takes the hidden states that
    would enter the head. Other keyword options go to ``alpha_weighted_linear_cross_entropy``.
    """

    def __init__(self, head: nn.Module, alpha=0.5, **options):
        super().__init__()
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise TypeError(f"head must have a weight tensor (an nn.Linear or output embeddings), got "
                            f"{type(head).__name__}")
        # kept outside the module's children: the loss owns no parameters, the model does
        self.__dict__["head"] = head
        self.alpha = alpha
        self.options = options

    def forward(self, source_hidden, source_labels, target_hidden, target_labels):
        head = self.__dict__["head"]
        return alpha_weighted_linear_cross_entropy(source_hidden, source_labels, target_hidden, target_labels,
                                                   head.weight, getattr(head, "bias", None), self.alpha,
                                                   **self.options)
