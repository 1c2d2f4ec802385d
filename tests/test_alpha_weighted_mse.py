"""fastadapt.alpha_weighted_mse against a float64 reference built from F.mse_loss."""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from conftest import DEVICES
from helpers import assert_close, grad_or_zeros, mse_oracle

REDUCTIONS = ["mean", "sum", "none"]


def pair(shape, device, dtype, target_grad=False, scale=1.0):
    x = (torch.randn(shape, device=device) * (2 * scale)).to(dtype).requires_grad_()
    y = (torch.randn(shape, device=device) * scale).to(dtype).requires_grad_(target_grad)
    return x, y


def run_both(sp, st, tp, tt, alpha, reduction, grad_scale=0.7):
    out = fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha, reduction=reduction)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (sp, st, tp, tt)]
    ref = mse_oracle(*leaves, alpha, reduction=reduction)
    if reduction == "none":
        ws = torch.randn(sp.shape, dtype=torch.float64, device=sp.device)
        wt = torch.randn(tp.shape, dtype=torch.float64, device=tp.device)
        ((out[0].double() * ws).sum() + (out[1].double() * wt).sum()).backward()
        ((ref[0] * ws).sum() + (ref[1] * wt).sum()).backward()
    else:
        (out * grad_scale).backward()
        (ref * grad_scale).backward()
    return out, ref, [grad_or_zeros(t) for t in (sp, st, tp, tt)], [grad_or_zeros(t) for t in leaves]


def check(out, ref, grads, ref_grads, dtype, reduction):
    if reduction == "none":
        assert out[0].dtype == dtype and out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
        assert_close(out[0], ref[0], dtype, "source losses")
        assert_close(out[1], ref[1], dtype, "target losses")
    else:
        assert out.dtype == dtype and out.shape == ()
        assert_close(out, ref, dtype, "loss", scale=max(1.0, abs(float(ref.detach()))))
    for name, g, r in zip(("source_pred", "source_target", "target_pred", "target_target"), grads, ref_grads):
        assert_close(g, r, dtype, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", [((0,), (3,)), ((1,), (1,)), ((3, 33), (17,)), ((423, 7), (32001,)),
                                    ((2, 5, 31), (1000, 3)), ((70000,), (40000,))])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_parity(backend, device, shapes, reduction, alpha):
    sp, st = pair(shapes[0], device, torch.float32, target_grad=True)
    tp, tt = pair(shapes[1], device, torch.float32)
    check(*run_both(sp, st, tp, tt, alpha, reduction), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity_dtypes(backend, device, dtype, reduction):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 is a CUDA dtype")
    # float16 sums: at unit scale the target's sum of squares (about 0.6 * 5 * 50001 = 150000) is past
    # float16's largest value (65504), so both backends return inf while the float64 reference is
    # finite. At scale 1/4 the loss is about 9600: finite, and still summed over every block.
    scale = 0.25 if dtype == torch.float16 and reduction == "sum" else 1.0
    sp, st = pair((300, 7), device, dtype, target_grad=True, scale=scale)
    tp, tt = pair((50001,), device, dtype, scale=scale)
    check(*run_both(sp, st, tp, tt, 0.6, reduction), dtype, reduction)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous(backend, device):
    sp, st = pair((40, 30), device, torch.float32)
    tp, tt = pair((30, 40), device, torch.float32)
    sp_t = sp.detach().t().requires_grad_()  # a leaf with transposed strides
    for reduction in REDUCTIONS:
        sp_t.grad = tp.grad = None
        check(*run_both(sp_t, st.t(), tp, tt, 0.3, reduction), torch.float32, reduction)


def test_matches_formula_and_module(backend):
    sp, st = pair((64, 3), "cpu", torch.float32)
    tp, tt = pair((32, 3), "cpu", torch.float32)
    got = fastadapt.AlphaWeightedLoss(alpha=0.25, kind="mse")(sp, st, tp, tt)
    torch.testing.assert_close(got, 0.25 * F.mse_loss(tp, tt) + 0.75 * F.mse_loss(sp, st), rtol=1e-5, atol=1e-6)
    s, t = fastadapt.alpha_weighted_mse(sp, st, tp, tt, 0.25, reduction="none")
    total = fastadapt.alpha_weighted_mse(sp, st, tp, tt, 0.25, reduction="sum")
    torch.testing.assert_close(s.sum() + t.sum(), total, rtol=1e-5, atol=1e-5)


def test_zero_weight_side_not_evaluated(backend):
    tp, tt = pair((10,), "cpu", torch.float32)
    sp = torch.full((4,), float("nan"), requires_grad=True)
    out = fastadapt.alpha_weighted_mse(sp, torch.zeros(4), tp, tt, 1.0)
    torch.testing.assert_close(out, F.mse_loss(tp, tt))
    out = fastadapt.alpha_weighted_mse(torch.zeros(0), torch.zeros(0), tp, tt, 1.0)
    torch.testing.assert_close(out, F.mse_loss(tp, tt))
    assert torch.isnan(fastadapt.alpha_weighted_mse(torch.zeros(0), torch.zeros(0), tp, tt, 0.5))


def test_inputs_unchanged_and_deterministic(backend):
    sp, st = pair((5000,), "cpu", torch.float32, target_grad=True)
    tp, tt = pair((7000,), "cpu", torch.float32)
    before = [t.detach().clone() for t in (sp, st, tp, tt)]
    runs = []
    for _ in range(10):
        for t in (sp, st, tp):
            t.grad = None
        out = fastadapt.alpha_weighted_mse(sp, st, tp, tt, 0.5)
        out.backward()
        runs.append([out.detach().clone(), sp.grad.clone(), st.grad.clone(), tp.grad.clone()])
    for b, t in zip(before, (sp, st, tp, tt)):
        assert torch.equal(b, t.detach())
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(backend, reduction):
    sp, st = pair((5, 3), "cpu", torch.float64, target_grad=True)
    tp, tt = pair((7,), "cpu", torch.float64, target_grad=True)

    def fn(a, b, c, d):
        out = fastadapt.alpha_weighted_mse(a, b, c, d, 0.37, reduction=reduction)
        return out if reduction != "none" else (out[0].sum() * 1.3, out[1])

    assert torch.autograd.gradcheck(fn, (sp, st, tp, tt))


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck(requires_grad, reduction):
    sp, st = pair((6, 4), "cpu", torch.float32)
    tp, tt = pair((9,), "cpu", torch.float32)
    args = [t.detach().requires_grad_(requires_grad) for t in (sp, st, tp, tt)]
    a = torch.tensor(0.3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastadapt.alpha_weighted_mse.default, (*args, a, reduction))
    if not requires_grad:
        torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_mse_forward.default, (*args, a, reduction, [True, True]))
        g_s = torch.randn(6, 4) if reduction == 0 else torch.tensor(0.5)
        g_t = torch.randn(9) if reduction == 0 else None  # a term that did not reach the loss
        torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_mse_backward.default,
                              (g_s, g_t, *args, a, [], reduction, [True, True]))


def test_torch_compile_fullgraph(backend):
    sp, st = pair((64, 5), "cpu", torch.float32)
    tp, tt = pair((80, 5), "cpu", torch.float32)
    fn = lambda a, b, alpha: fastadapt.alpha_weighted_mse(a, st, b, tt, alpha) * 3.0  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    alpha = torch.tensor(0.2, dtype=torch.float64)
    out = compiled(sp, tp, alpha)
    out.backward()
    got = (out.detach(), sp.grad.clone(), tp.grad.clone())
    sp.grad = tp.grad = None
    ref = fn(sp, tp, alpha)
    ref.backward()
    torch.testing.assert_close(got[0], ref.detach())
    torch.testing.assert_close(got[1], sp.grad)
    torch.testing.assert_close(got[2], tp.grad)


@pytest.mark.parametrize(
    "args, exc, match",
    [
        (lambda a, b: (a[:, :1], b, a, b), ValueError, r"source_target has shape \(8, 2\) but source_pred has shape \(8, 1\)"),
        (lambda a, b: (a[:, 0], b[:, :1], a, b), ValueError, r"shapes must match exactly"),
        (lambda a, b: (a, b.double(), a, b), TypeError, r"source_target has dtype torch.float64 but source_pred"),
        (lambda a, b: (a.long(), b.long(), a, b), TypeError, r"source_pred must be a floating tensor"),
        (lambda a, b: (a, b, a.double(), b.double()), TypeError, r"target_pred has dtype torch.float64 but source_pred"),
        (lambda a, b: (a, b, a, b.to("meta")), ValueError, r"target_target is on meta"),
    ],
)
def test_bad_input(backend, args, exc, match):
    a, b = torch.randn(8, 2), torch.randn(8, 2)
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_mse(*args(a, b))


def test_bad_alpha_and_reduction(backend):
    a = torch.randn(3)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.01"):
        fastadapt.alpha_weighted_mse(a, a, a, a, 1.01)
    with pytest.raises(ValueError, match=r"reduction must be one of"):
        fastadapt.alpha_weighted_mse(a, a, a, a, reduction="batchmean")
