"""The losses under autocast follow PyTorch's float32 policy for losses (F.cross_entropy, F.mse_loss): the
loss comes back in float32, equal to F's under the same autocast, and the gradients in the inputs' dtype, on
the compiled and the fallback path, eager and under torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from helpers import assert_close, distill_oracle

AUTOCAST = dict(device_type="cpu", dtype=torch.bfloat16)
REDUCTIONS = ["mean", "sum", "none"]


def ce_inputs(dtype):
    sl = (torch.randn(12, 40) * 3).to(dtype).requires_grad_()
    tl = (torch.randn(9, 40) * 3).to(dtype).requires_grad_()
    sy, ty = torch.randint(0, 40, (12,)), torch.randint(0, 40, (9,))
    sy[0] = -100
    return sl, sy, tl, ty


def f_cross_entropy(sl, sy, tl, ty, alpha, reduction, **kw):
    """The formula from F.cross_entropy, run under whatever autocast is active."""
    s = (1 - alpha) * F.cross_entropy(sl, sy, reduction=reduction, **kw)
    t = alpha * F.cross_entropy(tl, ty, reduction=reduction, **kw)
    return (s, t) if reduction == "none" else s + t


def backward_of(out, inputs):
    """Gradients of a fixed combination of the loss (or of both per-row terms) with respect to inputs."""
    if isinstance(out, tuple):
        out = sum((o * torch.linspace(0.5, 1.5, o.numel()).reshape(o.shape)).sum() for o in out)
    return torch.autograd.grad(out, inputs, retain_graph=True)  # the compiled losses share one graph


def check_like_f(out, ref, grads, ref_grads):
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype == torch.float32, (o.dtype, r.dtype)
        assert_close(o, r, torch.float32, "loss")
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == rg.dtype, (g.dtype, rg.dtype)
        assert_close(g, rg, g.dtype, "gradient")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_is_f_under_autocast(backend, dtype, reduction):
    sl, sy, tl, ty = ce_inputs(dtype)
    with torch.autocast(**AUTOCAST):
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3, reduction=reduction, label_smoothing=0.1)
        ref = f_cross_entropy(sl, sy, tl, ty, 0.3, reduction, label_smoothing=0.1)
    check_like_f(out, ref, backward_of(out, (sl, tl)), backward_of(ref, (sl, tl)))


def test_cross_entropy_mixed_dtypes_are_cast_as_f_casts_them(backend):
    # bf16 logits (an autocast matmul's) with float32 probability targets and class weights: F under autocast
    # casts all to float32; outside autocast fastadapt refuses the mix (the README's dtype rule)
    sl, _, tl, ty = ce_inputs(torch.bfloat16)
    probs = torch.softmax(torch.randn(12, 40), -1)
    weight = torch.rand(40) + 0.5
    with torch.autocast(**AUTOCAST):
        out = fastadapt.alpha_weighted_cross_entropy(sl, probs, tl, ty, 0.6, target_weight=weight)
        ref = (0.4 * F.cross_entropy(sl, probs) + 0.6 * F.cross_entropy(tl, ty, weight=weight))
    check_like_f(out, ref, backward_of(out, (sl, tl)), backward_of(ref, (sl, tl)))


def test_float16_on_the_cpu_is_cast_under_autocast(backend):
    # outside autocast the CPU kernels refuse float16 (docs/ERRORS.md, ce-logits-half-cpu); F under autocast
    # takes it, cast to float32
    sl, sy, tl, ty = ce_inputs(torch.float16)
    with torch.autocast(**AUTOCAST):
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3)
        ref = f_cross_entropy(sl, sy, tl, ty, 0.3, "mean")
    check_like_f(out, ref, backward_of(out, (sl, tl)), backward_of(ref, (sl, tl)))


def test_cross_entropy_outside_autocast_keeps_the_logits_dtype(backend):
    sl, sy, tl, ty = ce_inputs(torch.bfloat16)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=False):
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty)
    assert out.dtype == torch.bfloat16
    ref = f_cross_entropy(sl.float(), sy, tl.float(), ty, 0.5, "mean").to(torch.bfloat16)
    assert out == ref, (out.item(), ref.item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mse_is_f_under_autocast(backend, dtype, reduction):
    sp, st = torch.randn(7, 5, dtype=dtype, requires_grad=True), torch.randn(7, 5, dtype=dtype, requires_grad=True)
    tp, tt = torch.randn(3, 2, dtype=dtype, requires_grad=True), torch.randn(3, 2)  # a float32 target: cast
    with torch.autocast(**AUTOCAST):
        out = fastadapt.alpha_weighted_mse(sp, st, tp, tt, 0.25, reduction=reduction)
        s, t = 0.75 * F.mse_loss(sp, st, reduction=reduction), 0.25 * F.mse_loss(tp, tt, reduction=reduction)
        ref = (s, t) if reduction == "none" else s + t
    check_like_f(out, ref, backward_of(out, (sp, st, tp)), backward_of(ref, (sp, st, tp)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_distillation_is_the_float32_formula_under_autocast(backend, dtype, reduction):
    # F has no fused distillation, and its log_softmax stays bf16 under CPU autocast: the reference is the
    # formula on the inputs cast to float32, which is what the float32 policy means for this loss
    z = (torch.randn(10, 30) * 3).to(dtype).requires_grad_()
    t = (torch.randn(10, 20) * 3).to(dtype)
    y = torch.randint(0, 30, (10,))
    with torch.autocast(**AUTOCAST):
        out = fastadapt.alpha_weighted_distillation(z, y, t, 0.7, 2.0, reduction=reduction)
    ref = distill_oracle(z.float(), y, t.float(), 0.7, 2.0, reduction=reduction)
    check_like_f(out, ref, backward_of(out, (z,)), backward_of(ref, (z,)))


def test_torch_compile_fullgraph_under_autocast(backend):
    sl, sy, tl, ty = ce_inputs(torch.bfloat16)
    sp, st = torch.randn(7, 5, dtype=torch.bfloat16, requires_grad=True), torch.randn(7, 5, dtype=torch.bfloat16)
    z, t = (torch.randn(10, 30) * 3).to(torch.bfloat16).requires_grad_(), torch.randn(10, 20).to(torch.bfloat16)
    y = torch.randint(0, 30, (10,))

    def losses(sl, tl, sp, z):
        return (fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3),
                fastadapt.alpha_weighted_mse(sp, st, sp, st, 0.3),
                fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 2.0))

    torch._dynamo.reset()
    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    inputs = (sl, tl, sp, z)
    with torch.autocast(**AUTOCAST):
        got, ref = compiled(*inputs), losses(*inputs)
    for g, r, used in zip(got, ref, ((sl, tl), (sp,), (z,))):
        check_like_f(g, r, backward_of(g, used), backward_of(r, used))
