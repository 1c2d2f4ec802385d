"""Fake (meta) kernels for every compiled op, so torch.compile and opcheck can trace them without
running them. Shapes here must match the C++ kernels exactly (csrc/<op>.h states them)."""
from __future__ import annotations

import torch

from fastadapt.ops._extension import has_ops


def _terms(reduction, s_shape, t_shape, like):
    """A two-sided loss's weighted terms, in the accumulation type (float32 for bf16/fp16): per row or
    element for reduction none (0), else 0-dim each."""
    dtype = torch.float32 if like.dtype in (torch.bfloat16, torch.float16) else like.dtype
    if reduction == 0:
        return like.new_empty(s_shape, dtype=dtype), like.new_empty(t_shape, dtype=dtype)
    return like.new_empty((), dtype=dtype), like.new_empty((), dtype=dtype)


def _grad_or_empty(flag, like):
    return torch.empty(like.shape, dtype=like.dtype, device=like.device) if flag else like.new_empty((0,))


if has_ops():
    lib = "fastadapt::"

    # A cross-entropy side's rows: the logits' shape without the class dimension (the labels' shape for
    # class indices; probability targets have the logits' shape).
    @torch.library.register_fake(lib + "alpha_weighted_cross_entropy")
    def _(sl, sy, tl, ty, alpha, ignore_index, label_smoothing, reduction, source_weight, target_weight):
        return _terms(reduction, sl.shape[:-1], tl.shape[:-1], sl)

    @torch.library.register_fake(lib + "_alpha_weighted_cross_entropy_forward")
    def _(sl, sy, tl, ty, alpha, ignore_index, label_smoothing, reduction, source_weight, target_weight, write_grad):
        term_s, term_t = _terms(reduction, sl.shape[:-1], tl.shape[:-1], sl)
        # per-row log-sum-exp, float64 whatever the logits (csrc/cpu/row_kernels.h), and the two
        # divisors of reduction mean (float64)
        saved = [sl.new_empty((sl.shape[:-1].numel(),), dtype=torch.float64),
                 tl.new_empty((tl.shape[:-1].numel(),), dtype=torch.float64), sl.new_empty((2,), dtype=torch.float64)]
        return term_s, term_t, saved, _grad_or_empty(write_grad[0], sl), _grad_or_empty(write_grad[1], tl)

    @torch.library.register_fake(lib + "_alpha_weighted_cross_entropy_backward")
    def _(g_s, g_t, sl, sy, tl, ty, alpha, saved, ignore_index, label_smoothing, reduction, source_weight,
          target_weight, mask):
        return _grad_or_empty(mask[0], sl), _grad_or_empty(mask[1], tl)

    @torch.library.register_fake(lib + "alpha_weighted_mse")
    def _(sp, st, tp, tt, alpha, reduction):
        return _terms(reduction, sp.shape, tp.shape, sp)

    @torch.library.register_fake(lib + "_alpha_weighted_mse_forward")
    def _(sp, st, tp, tt, alpha, reduction, write_grad):
        term_s, term_t = _terms(reduction, sp.shape, tp.shape, sp)
        return term_s, term_t, [], _grad_or_empty(write_grad[0], sp), _grad_or_empty(write_grad[1], tp)

    @torch.library.register_fake(lib + "_alpha_weighted_mse_backward")
    def _(g_s, g_t, sp, st, tp, tt, alpha, saved, reduction, mask):
        return _grad_or_empty(mask[0], sp), _grad_or_empty(mask[1], tp)

    @torch.library.register_fake(lib + "alpha_weighted_distillation")
    def _(z, y, t, alpha, temperature, ignore_index, label_smoothing, reduction):
        return _terms(reduction, y.shape, y.shape, z)

    @torch.library.register_fake(lib + "_alpha_weighted_distillation_forward")
    def _(z, y, t, alpha, temperature, ignore_index, label_smoothing, reduction, write_grad):
        term_kd, term_ce = _terms(reduction, y.shape, y.shape, z)
        # per row the three log-sum-exps (float64) and the count of non-ignored rows
        saved = [z.new_empty((y.numel(), 3), dtype=torch.float64), z.new_empty((1,), dtype=torch.int64)]
        return term_kd, term_ce, saved, _grad_or_empty(write_grad, z)

    @torch.library.register_fake(lib + "_alpha_weighted_distillation_backward")
    def _(g_kd, g_ce, z, y, t, alpha, saved, temperature, ignore_index, label_smoothing, reduction):
        return _grad_or_empty(True, z)

    @torch.library.register_fake(lib + "linear_relu")
    def _(x, weight, bias):
        torch._check(x.shape[-1] == weight.shape[1])
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.register_fake(lib + "_linear_relu_backward")
    def _(grad_output, x, weight, output, mask):
        gb = weight.new_empty((weight.shape[0],)) if mask[2] else weight.new_empty((0,))
        return _grad_or_empty(mask[0], x), _grad_or_empty(mask[1], weight), gb


# alpha_weighted_linear_cross_entropy: registered only where the loaded extension has the op, so an
# extension built before it (a stale or shared _C) still imports. Outputs are in the accumulation type:
# (loss 0-dim, 0 elements) for mean/sum, the two sides' per-row losses for none; the gradients are the
# hiddens' in their dtype, the weight's and bias's in the accumulation type
# (csrc/alpha_weighted_linear_cross_entropy.h).
if has_ops() and hasattr(torch.ops.fastadapt, "_alpha_weighted_linear_cross_entropy_backward"):
    def _linear_ce_out(sh, th, weight, reduction):
        if reduction == 0:
            return _terms(0, (sh.shape[0],), (th.shape[0],), weight)
        loss = _terms(1, (), (), weight)[0]
        return loss, loss.new_empty((0,))

    def _linear_ce_grads(sh, th, weight, bias, write_grad):
        acc = _terms(1, (), (), weight)[0].dtype
        gw = weight.new_empty(weight.shape, dtype=acc) if write_grad[2] else weight.new_empty((0,), dtype=acc)
        gb = weight.new_empty((weight.shape[0],), dtype=acc) if write_grad[3] and bias is not None \
            else weight.new_empty((0,), dtype=acc)
        return _grad_or_empty(write_grad[0], sh), _grad_or_empty(write_grad[1], th), gw, gb

    @torch.library.register_fake("fastadapt::alpha_weighted_linear_cross_entropy")
    def _(sh, sy, th, ty, weight, bias, alpha, ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_size):
        return _linear_ce_out(sh, th, weight, reduction)

    @torch.library.register_fake("fastadapt::_alpha_weighted_linear_cross_entropy_forward")
    def _(sh, sy, th, ty, weight, bias, alpha, ignore_index, label_smoothing, reduction, z_loss, softcap, chunk_size,
          write_grad):
        grads = _linear_ce_grads(sh, th, weight, bias, write_grad if reduction != 0 else [False] * 4)
        return (*_linear_ce_out(sh, th, weight, reduction), *grads)

    @torch.library.register_fake("fastadapt::_alpha_weighted_linear_cross_entropy_backward")
    def _(grad_source, grad_target, sh, sy, th, ty, weight, bias, alpha, ignore_index, label_smoothing, z_loss,
          softcap, chunk_size, write_grad):
        return _linear_ce_grads(sh, th, weight, bias, write_grad)
