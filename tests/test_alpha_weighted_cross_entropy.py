"""fastadapt.alpha_weighted_cross_entropy against a float64 reference built from F.cross_entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from conftest import DEVICES
from helpers import assert_close, ce_oracle, grad_or_zeros, use_backend

REDUCTIONS = ["mean", "sum", "none"]


def make_side(n, c, device, dtype, ignore_frac=0.0, label_dtype=torch.int64, layout="contiguous"):
    if layout == "row_stride":  # rows padded: a view with row stride > C
        logits = (torch.randn(n, c + 5, device=device) * 3).to(dtype)[:, :c]
    elif layout == "class_stride":  # class dimension strided: must be copied
        logits = (torch.randn(n, 2 * c, device=device) * 3).to(dtype)[:, ::2]
    else:
        logits = (torch.randn(n, c, device=device) * 3).to(dtype)
    labels = torch.randint(0, max(c, 1), (n,), device=device)
    if ignore_frac and n:
        labels[torch.rand(n, device=device) < ignore_frac] = -100
        labels[0] = -100
    if layout == "class_stride":
        labels = torch.stack([labels, labels], 1).reshape(-1)[::2]  # non-contiguous labels too
    return logits.requires_grad_(), labels.to(label_dtype)


def _f64(t, requires_grad=False):
    """A float64 leaf copy of t (requiring grad where t does, or when asked); integer labels as they are."""
    if t is None or not t.is_floating_point():
        return t
    return t.detach().double().requires_grad_(requires_grad or t.requires_grad)


def run_both(sl, sy, tl, ty, alpha, reduction, label_smoothing=0.0, ignore_index=-100, grad_scale=1.7, class_dim=1,
             source_weight=None, target_weight=None):
    """Loss and gradients from fastadapt and from the float64 reference: of the two logits, then of the
    probability targets that require grad."""
    kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, class_dim=class_dim)
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, source_weight=source_weight,
                                                 target_weight=target_weight, **kw)
    sl64, tl64, sy64, ty64 = _f64(sl, True), _f64(tl, True), _f64(sy), _f64(ty)
    ref = ce_oracle(sl64, sy64, tl64, ty64, alpha, source_weight=_f64(source_weight),
                    target_weight=_f64(target_weight), **kw)
    if reduction == "none":
        ws = torch.randn(out[0].shape, dtype=torch.float64, device=sl.device)
        wt = torch.randn(out[1].shape, dtype=torch.float64, device=tl.device)
        ((out[0].double() * ws).sum() + (out[1].double() * wt).sum()).backward()
        ((ref[0] * ws).sum() + (ref[1] * wt).sum()).backward()
    else:
        (out * grad_scale).backward()
        (ref * grad_scale).backward()
    targets = [(y, y64) for y, y64 in ((sy, sy64), (ty, ty64)) if y.requires_grad]
    grads = [grad_or_zeros(sl), grad_or_zeros(tl)] + [grad_or_zeros(y) for y, _ in targets]
    ref_grads = [grad_or_zeros(sl64), grad_or_zeros(tl64)] + [grad_or_zeros(y64) for _, y64 in targets]
    return out, ref, grads, ref_grads


def check(out, ref, grads, ref_grads, dtype, reduction):
    if reduction == "none":
        assert out[0].dtype == dtype and out[1].dtype == dtype
        assert out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
        assert_close(out[0], ref[0], dtype, "source losses")
        assert_close(out[1], ref[1], dtype, "target losses")
    else:
        assert out.dtype == dtype and out.shape == ()
        r = float(ref.detach())
        assert_close(out, ref, dtype, "loss", scale=max(1.0, abs(r)) if math.isfinite(r) else 1.0)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, ("source logits grad", "target logits grad")[i] if i < 2 else "probability target grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 3, 17, 423])
@pytest.mark.parametrize("c", [1, 2, 31, 32, 33, 1000, 32001])
def test_parity_shapes(backend, device, n, c):
    if n * c > 10**6 and backend == "fallback":
        pytest.skip("the fallback is F.cross_entropy itself; the large shapes only exercise the kernels")
    sl, sy = make_side(n, c, device, torch.float32, ignore_frac=0.2)
    tl, ty = make_side(n + 2, c + 1, device, torch.float32, ignore_frac=0.2)
    for reduction in REDUCTIONS:
        sl.grad = tl.grad = None
        check(*run_both(sl, sy, tl, ty, 0.37, reduction, label_smoothing=0.1), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
def test_parity_options(backend, device, reduction, ignore, label_smoothing, alpha):
    sl, sy = make_side(40, 33, device, torch.float32, ignore_frac=0.3 if ignore else 0.0)
    tl, ty = make_side(29, 10, device, torch.float32, ignore_frac=0.3 if ignore else 0.0)
    check(*run_both(sl, sy, tl, ty, alpha, reduction, label_smoothing), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.cuda)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_parity_dtypes(backend, device, dtype, reduction):
    if dtype == torch.float16 and device == "cpu":
        pytest.skip("float16 is a CUDA dtype")
    sl, sy = make_side(50, 130, device, dtype, ignore_frac=0.2)
    tl, ty = make_side(31, 70, device, dtype, ignore_frac=0.2)
    check(*run_both(sl, sy, tl, ty, 0.37, reduction, 0.1), dtype, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["row_stride", "class_stride"])
def test_non_contiguous_inputs(backend, device, layout):
    sl, sy = make_side(37, 50, device, torch.float32, 0.2, layout=layout)
    tl, ty = make_side(21, 64, device, torch.float32, 0.2, layout=layout)
    assert not sl.is_contiguous()
    for reduction in REDUCTIONS:
        sl.grad = tl.grad = None
        check(*run_both(sl, sy, tl, ty, 0.6, reduction, 0.1), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_label_dtypes_and_class_last_logits(backend, device, label_dtype):
    sl = torch.randn(4, 9, 17, device=device, requires_grad=True)
    sy = torch.randint(0, 17, (4, 9), device=device).to(label_dtype)
    tl = torch.randn(2, 5, 3, 11, device=device, requires_grad=True)
    ty = torch.randint(0, 11, (2, 5, 3), device=device).to(label_dtype)
    for reduction in REDUCTIONS:
        sl.grad = tl.grad = None
        out, ref, g, rg = run_both(sl, sy, tl, ty, 0.25, reduction, class_dim=-1)
        check(out, ref, g, rg, torch.float32, reduction)
        if reduction == "none":
            assert out[0].shape == (4, 9) and out[1].shape == (2, 5, 3)


def test_none_totals_equal_sum(backend):
    sl, sy = make_side(30, 20, "cpu", torch.float32, 0.3)
    tl, ty = make_side(25, 20, "cpu", torch.float32, 0.3)
    s, t = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3, reduction="none")
    total = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3, reduction="sum")
    torch.testing.assert_close(s.sum() + t.sum(), total, rtol=1e-5, atol=1e-5)
    assert (s[sy == -100] == 0).all() and (t[ty == -100] == 0).all()


def test_alpha_tensor_equals_float_and_module(backend):
    sl, sy = make_side(30, 20, "cpu", torch.float32)
    tl, ty = make_side(25, 12, "cpu", torch.float32)
    a = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, torch.tensor(0.8, dtype=torch.float64))
    b = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.8)
    mod = fastadapt.AlphaWeightedLoss(alpha=0.1, kind="cross_entropy", label_smoothing=0.0)
    mod.alpha = 0.8  # reassigned between steps
    c = mod(sl, sy, tl, ty)
    assert torch.equal(a, b) and torch.equal(b, c)
    expected = 0.8 * F.cross_entropy(tl, ty) + 0.2 * F.cross_entropy(sl, sy)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    assert "cross_entropy" in repr(mod) and "0.8" in repr(mod)


# ---- edge cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_all_rows_ignored_is_nan_like_the_formula(backend, device):
    sl, sy = make_side(5, 7, device, torch.float32)
    tl, ty = make_side(6, 7, device, torch.float32)
    ty[:] = -100
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5)
    assert torch.isnan(out)
    # the gradients follow the formula: zero for the all-ignored side, finite for the other
    _, _, g, rg = run_both(sl, sy, tl, ty, 0.5, "mean")
    assert (g[1] == 0).all() and torch.isfinite(g[0]).all()
    assert_close(g[1], rg[1], torch.float32, "target grad (all ignored)")
    s = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5, reduction="sum")
    torch.testing.assert_close(s, 0.5 * F.cross_entropy(sl, sy, reduction="sum"))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weight_term_is_not_evaluated(backend, device):
    tl, ty = make_side(6, 7, device, torch.float32)
    empty_l = torch.randn(0, 7, device=device, requires_grad=True)
    empty_y = torch.zeros(0, dtype=torch.long, device=device)
    out = fastadapt.alpha_weighted_cross_entropy(empty_l, empty_y, tl, ty, 1.0)
    torch.testing.assert_close(out, F.cross_entropy(tl, ty))
    nan_l = torch.full((3, 7), float("nan"), device=device, requires_grad=True)
    out = fastadapt.alpha_weighted_cross_entropy(nan_l, torch.zeros(3, dtype=torch.long, device=device), tl, ty, 1.0)
    torch.testing.assert_close(out, F.cross_entropy(tl, ty))
    out.backward()
    assert nan_l.grad is None or (nan_l.grad == 0).all()
    # both sides empty with weight: a mean over zero rows is NaN, as F.cross_entropy gives
    out = fastadapt.alpha_weighted_cross_entropy(empty_l, empty_y, empty_l, empty_y, 0.5)
    assert torch.isnan(out)


@pytest.mark.parametrize("device", DEVICES)
def test_extreme_logits(backend, device):
    sl = (torch.randn(20, 50, device=device).sign() * 1e4).requires_grad_()
    sy = torch.randint(0, 50, (20,), device=device)
    tl = torch.randn(9, 5, device=device)
    ty = torch.randint(0, 5, (9,), device=device)
    tl[0, ty[0]] = float("-inf")  # the target class has zero probability: loss +inf, gradient finite
    tl.requires_grad_()
    for reduction in REDUCTIONS:
        sl.grad = tl.grad = None
        out, ref, g, rg = run_both(sl, sy, tl, ty, 0.5, reduction)
        check(out, ref, g, rg, torch.float32, reduction)
    assert torch.isinf(fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_row_only_poisons_that_row(backend, device):
    sl, sy = make_side(8, 13, device, torch.float32)
    tl, ty = make_side(7, 13, device, torch.float32)
    with torch.no_grad():
        tl[3, 5] = float("nan")
    s, t = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5, reduction="none")
    assert torch.isnan(t[3]) and torch.isfinite(t[torch.arange(7, device=device) != 3]).all()
    assert torch.isfinite(s).all()
    (s.sum() + t.sum()).backward()
    assert torch.isnan(tl.grad[3]).all()
    rows = torch.arange(7, device=device) != 3
    assert torch.isfinite(tl.grad[rows]).all() and torch.isfinite(sl.grad).all()


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_unchanged(backend, device):
    sl, sy = make_side(16, 40, device, torch.float32, 0.2)
    tl, ty = make_side(16, 40, device, torch.float32, 0.2)
    before = [t.detach().clone() for t in (sl, sy, tl, ty)]
    for reduction in REDUCTIONS:
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5, reduction=reduction)
        (out[0].sum() + out[1].sum() if reduction == "none" else out).backward()
    for b, t in zip(before, (sl, sy, tl, ty)):
        assert torch.equal(b, t.detach())


def test_deterministic_repeats(backend):
    sl, sy = make_side(300, 999, "cpu", torch.float32, 0.1)
    tl, ty = make_side(200, 999, "cpu", torch.float32, 0.1)
    runs = []
    for _ in range(10):
        sl.grad = tl.grad = None
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.4, label_smoothing=0.1)
        out.backward()
        runs.append((out.detach().clone(), sl.grad.clone(), tl.grad.clone()))
    for r in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], r))


def test_retain_graph_second_backward_matches(backend):
    sl, sy = make_side(12, 9, "cpu", torch.float32)
    tl, ty = make_side(10, 9, "cpu", torch.float32)
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3)
    out.backward(retain_graph=True)
    first = (sl.grad.clone(), tl.grad.clone())
    out.backward()
    torch.testing.assert_close(sl.grad, 2 * first[0])
    torch.testing.assert_close(tl.grad, 2 * first[1])


def test_grad_only_for_one_side(backend):
    sl, sy = make_side(12, 9, "cpu", torch.float32)
    tl, ty = make_side(10, 9, "cpu", torch.float32)
    src = sl.detach()
    out = fastadapt.alpha_weighted_cross_entropy(src, sy, tl, ty, 0.3)
    out.backward()
    ref_t = tl.detach().double().requires_grad_()
    ce_oracle(src.double(), sy, ref_t, ty, 0.3).backward()
    assert_close(tl.grad, ref_t.grad, torch.float32, "target grad")


# ---- autograd / registration ----------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradcheck(backend, reduction, label_smoothing):
    sl, sy = make_side(5, 7, "cpu", torch.float64, 0.3)
    tl, ty = make_side(4, 3, "cpu", torch.float64, 0.3)

    def fn(a, b):
        out = fastadapt.alpha_weighted_cross_entropy(a, sy, b, ty, 0.37, label_smoothing=label_smoothing,
                                                     reduction=reduction)
        return out if reduction != "none" else out[0].sum() * 1.3 + out[1]

    assert torch.autograd.gradcheck(fn, (sl, tl))


def _op_args(requires_grad, reduction=1):
    sl, sy = make_side(6, 11, "cpu", torch.float32, 0.3)
    tl, ty = make_side(5, 4, "cpu", torch.float32, 0.3)
    sl = sl.detach().requires_grad_(requires_grad)
    tl = tl.detach().requires_grad_(requires_grad)
    return (sl, sy, tl, ty, torch.tensor(0.4, dtype=torch.float64), -100, 0.1, reduction, None, None)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_public_op(requires_grad, reduction):
    torch.library.opcheck(torch.ops.fastadapt.alpha_weighted_cross_entropy.default, _op_args(requires_grad, reduction))


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_internal_ops(reduction):
    args = _op_args(False, reduction)
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_cross_entropy_forward.default, (*args, [True, True]))
    saved = torch.ops.fastadapt._alpha_weighted_cross_entropy_forward(*args, [False, False])[2]
    g_s = torch.randn(args[1].shape) if reduction == 0 else torch.tensor(1.3)
    g_t = torch.randn(args[3].shape) if reduction == 0 else None  # a term that did not reach the loss
    bargs = (g_s, g_t, *args[:5], saved, *args[5:], [True, True])
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_cross_entropy_backward.default, bargs)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    sl, sy = make_side(20, 30, "cpu", torch.float32, 0.2)
    tl, ty = make_side(15, 30, "cpu", torch.float32, 0.2)

    def step(a, b, alpha):
        return fastadapt.alpha_weighted_cross_entropy(a, sy, b, ty, alpha, label_smoothing=0.1) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for alpha in (0.3, 0.9):  # a tensor alpha changes value without a recompile
        a_t = torch.tensor(alpha, dtype=torch.float64)
        sl.grad = tl.grad = None
        out = compiled(sl, tl, a_t)
        out.backward()
        got = (out.detach(), sl.grad.clone(), tl.grad.clone())
        sl.grad = tl.grad = None
        ref = step(sl, tl, a_t)
        ref.backward()
        torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], sl.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got[2], tl.grad, rtol=1e-5, atol=1e-7)


# ---- bad input ------------------------------------------------------------------------------

def _good():
    sl, sy = make_side(4, 5, "cpu", torch.float32)
    tl, ty = make_side(3, 6, "cpu", torch.float32)
    return [sl, sy, tl, ty]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, match",
    [
        (lambda a: a.__setitem__(1, torch.zeros(5, dtype=torch.long)), {}, ValueError, r"source_labels has shape \(5,\)"),
        (lambda a: a.__setitem__(3, torch.zeros(3, 2, dtype=torch.long)), {}, ValueError, r"target_labels has shape"),
        (lambda a: a.__setitem__(1, a[1].float()), {}, ValueError, r"source_labels holds probability targets \(dtype torch.float32\), so it must have the shape of source_logits, \(4, 5\), got \(4,\)"),
        (lambda a: a.__setitem__(3, a[3].bool()), {}, TypeError, r"target_labels must hold class indices \(an integer dtype\) or probability targets"),
        (lambda a: a.__setitem__(0, a[0].detach().long()), {}, TypeError, r"source_logits must be a floating tensor.*int64"),
        (lambda a: a.__setitem__(2, a[2].detach().half()), {}, TypeError, r"target_logits must be a floating tensor.*float16"),
        (lambda a: a.__setitem__(2, a[2].detach().double()), {}, TypeError, r"target_logits has dtype torch.float64 but source_logits"),
        (lambda a: a.__setitem__(1, a[1].to("meta")), {}, ValueError, r"source_labels is on meta but source_logits is on cpu"),
        (lambda a: None, {"alpha": 1.5}, ValueError, r"alpha must lie in \[0, 1\], got 1.5"),
        (lambda a: None, {"alpha": -0.1}, ValueError, r"alpha must lie in \[0, 1\], got -0.1"),
        (lambda a: None, {"alpha": float("nan")}, ValueError, r"alpha must lie in \[0, 1\], got nan"),
        (lambda a: None, {"alpha": torch.tensor(2.0)}, ValueError, r"alpha must lie in \[0, 1\], got 2.0"),
        (lambda a: None, {"alpha": torch.tensor([0.1, 0.2])}, ValueError, r"alpha must be a float or a 0-dim tensor"),
        (lambda a: None, {"label_smoothing": 1.2}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.2"),
        (lambda a: None, {"label_smoothing": -0.5}, ValueError, r"label_smoothing must lie in \[0, 1\], got -0.5"),
        (lambda a: None, {"reduction": "avg"}, ValueError, r"reduction must be one of .* got 'avg'"),
    ],
)
def test_bad_input_raises_before_running(backend, mutate, kwargs, exc, match):
    args = _good()
    mutate(args)
    before = [t.detach().clone() if t.device.type != "meta" else None for t in args]
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_cross_entropy(*args, **kwargs)
    for b, t in zip(before, args):
        if b is not None:
            assert torch.equal(b, t.detach())


def test_label_out_of_range_names_the_value():
    args = _good()
    args[3] = torch.tensor([0, 7, 1])
    with pytest.raises(IndexError, match=r"target_labels contains the label 7|Target 7 is out of bounds"):
        fastadapt.alpha_weighted_cross_entropy(*args)
    args[3] = torch.tensor([0, -3, 1])
    with pytest.raises(IndexError, match=r"-3"):
        fastadapt.alpha_weighted_cross_entropy(*args)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
def test_direct_op_call_is_memory_safe():
    """torch.ops.fastadapt.* skips the Python checks: what would index out of bounds still raises; an alpha
    outside [0, 1] gives NaN terms (the convention a device alpha needs, which cannot raise without a sync)."""
    sl, sy, tl, ty = _good()
    a = torch.tensor(0.5, dtype=torch.float64)
    op = torch.ops.fastadapt.alpha_weighted_cross_entropy
    s, t = op(sl, sy, tl, ty, torch.tensor(3.0), -100, 0.0, 1)
    assert torch.isnan(s) and torch.isnan(t)
    with pytest.raises(RuntimeError, match="reduction"):
        op(sl, sy, tl, ty, a, -100, 0.0, 7)
    with pytest.raises(IndexError, match="label 9 at flat position 1"):
        op(sl, torch.tensor([0, 9, 1, 2]), tl, ty, a, -100, 0.0, 1)
    with pytest.raises(RuntimeError, match="labels must have the shape of logits"):
        op(sl, torch.tensor([0, 1]), tl, ty, a, -100, 0.0, 1)
    with pytest.raises(RuntimeError, match="labels must have the shape of logits"):
        # flattened labels for (N, d, C) logits: the fake kernels would give the loss another shape
        op(sl.reshape(2, 2, 5), sy, tl, ty, a, -100, 0.0, 0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(sl, sy, tl.double(), ty, a, -100, 0.0, 1)
    with pytest.raises(RuntimeError, match="one value per class"):
        op(sl, sy, tl, ty, a, -100, 0.0, 1, torch.ones(4), None)
    with pytest.raises(IndexError, match="label 9 at flat position 1"):  # before weight[9] is read
        op(sl, torch.tensor([0, 9, 1, 2]), tl, ty, a, -100, 0.0, 1, torch.ones(5), None)
    with pytest.raises(RuntimeError, match="probability targets must have the logits' shape and dtype"):
        op(sl, torch.rand(4, 4), tl, ty, a, -100, 0.0, 1)
    with pytest.raises(RuntimeError, match="probability targets must have the logits' shape and dtype"):
        op(sl, torch.rand(4, 5, dtype=torch.float64), tl, ty, a, -100, 0.0, 1)


# ---- regressions: defects found by PyTorch's own sample inputs (issue 10) -------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [1.0, "tensor 1.0", 0.0])
def test_zero_weight_side_is_never_read(backend, device, reduction, alpha):
    """A side whose weight is exactly 0 is read neither in forward nor in backward: NaN logits there
    change nothing, on every reduction (reduction none used to give NaN gradients on the compiled path)."""
    a = torch.tensor(1.0, dtype=torch.float64) if alpha == "tensor 1.0" else alpha
    live = 0.0 if float(a) == 0.0 else 1.0  # the weight-1 side: target for alpha 1, source for alpha 0
    good, gy = make_side(4, 5, device, torch.float32)
    nan = torch.full((3, 5), float("nan"), device=device, requires_grad=True)
    ny = torch.tensor([0, 1, 2], device=device)
    args = (nan, ny, good, gy) if live == 1.0 else (good, gy, nan, ny)
    out = fastadapt.alpha_weighted_cross_entropy(*args, a, reduction=reduction)
    expected = F.cross_entropy(good.detach(), gy, reduction=reduction)
    if reduction == "none":
        dead, kept = (out[0], out[1]) if live == 1.0 else (out[1], out[0])
        assert (dead == 0).all()
        torch.testing.assert_close(kept, expected)
        (out[0].sum() * 0.7 + out[1].sum() * 1.3).backward()
    else:
        torch.testing.assert_close(out, expected)
        out.backward()
    assert nan.grad is None or (nan.grad == 0).all()
    assert torch.isfinite(good.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape, label_shape", [((0, 0), (0,)), ((0, 5), (0,)), ((0, 3, 4), (0, 4)), ((2, 3, 0), (2, 0))])
def test_empty_shapes_behave_alike_on_both_backends(device, shape, label_shape):
    """Every empty shape F.cross_entropy accepts gives F's answer on both backends (the fallback used to
    raise an unnamed reshape error on (0, 0) logits)."""
    results = {}
    for name in ("compiled", "fallback"):
        with use_backend(name):
            x = torch.randn(shape, device=device, requires_grad=True)
            y = torch.zeros(label_shape, dtype=torch.long, device=device)
            got = [fastadapt.alpha_weighted_cross_entropy(x, y, x, y, 0.5, reduction=r) for r in ("mean", "sum")]
            none = fastadapt.alpha_weighted_cross_entropy(x, y, x, y, 0.5, reduction="none")
            results[name] = (got, none)
            got[1].backward()
            assert x.grad.shape == x.shape
    for name, (got, none) in results.items():
        x = torch.randn(shape, device=device)
        y = torch.zeros(label_shape, dtype=torch.long, device=device)
        torch.testing.assert_close(got[0], F.cross_entropy(x, y), equal_nan=True, msg=f"{name} mean")
        torch.testing.assert_close(got[1], F.cross_entropy(x, y, reduction="sum"), msg=f"{name} sum")
        assert none[0].shape == none[1].shape == F.cross_entropy(x, y, reduction="none").shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_class_dim_1_reads_logits_as_f_does(backend, device, reduction):
    """(2, 4, 4) logits with (2, 4) labels are F's (N, C, d1): same value and gradients as F (they were
    read class-last, 1.610 instead of 1.879); class_dim=-1 reads the same numbers class-last."""
    x = torch.randn(2, 4, 4, device=device)
    y = torch.randint(0, 4, (2, 4), device=device)
    y[0, 1] = -100
    out, ref, g, rg = run_both(x.clone().requires_grad_(), y, x.clone().requires_grad_(), y, 0.37, reduction,
                               label_smoothing=0.1)
    check(out, ref, g, rg, torch.float32, reduction)
    last = x.movedim(1, -1).contiguous()
    out_last, ref_last, g_last, rg_last = run_both(last.clone().requires_grad_(), y, last.clone().requires_grad_(), y,
                                                   0.37, reduction, label_smoothing=0.1, class_dim=-1)
    check(out_last, ref_last, g_last, rg_last, torch.float32, reduction)
    for a, b in zip(out if reduction == "none" else [out], out_last if reduction == "none" else [out_last]):
        assert_close(a, b, torch.float32, "class_dim=1 vs class_dim=-1")


def test_class_last_logits_with_default_layout_say_how_to_pass_them(backend):
    logits = torch.randn(2, 7, 50)  # (batch, seq, vocab)
    labels = torch.randint(0, 50, (2, 7))
    with pytest.raises(ValueError, match=r"source_labels has shape \(2, 7\).*must have shape \(2, 50\).*class_dim=-1"):
        fastadapt.alpha_weighted_cross_entropy(logits, labels, logits, labels, 0.5)
    with pytest.raises(ValueError, match=r"class_dim must be 1 .* or -1"):
        fastadapt.alpha_weighted_cross_entropy(logits, labels, logits, labels, 0.5, class_dim=2)
    out = fastadapt.alpha_weighted_cross_entropy(logits, labels, logits, labels, 0.5, class_dim=-1)
    torch.testing.assert_close(out, F.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.1, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_label_smoothing_with_minus_inf_at_the_label(backend, device, label_smoothing, reduction):
    """F gives +inf (NaN when label_smoothing is 1: 0 * inf), with finite gradients; the kernels gave NaN."""
    for c in (5, 40, 3000):  # the small-class block path and the wide-row path
        x = torch.randn(3, c, device=device)
        y = torch.tensor([2, 0, 1], device=device)
        x[0, 2] = float("-inf")
        out, ref, g, rg = run_both(x.clone().requires_grad_(), y, x.clone().requires_grad_(), y, 0.5, reduction,
                                   label_smoothing=label_smoothing)
        check(out, ref, g, rg, torch.float32, reduction)
        expected = F.cross_entropy(x.double(), y, label_smoothing=label_smoothing, reduction=reduction)
        got = out[1] / 0.5 if reduction == "none" else out
        assert torch.equal(torch.isnan(got.double().cpu()), torch.isnan(expected.cpu()))
        assert torch.equal(torch.isinf(got.double().cpu()), torch.isinf(expected.cpu()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_dim", [1, -1])
def test_bf16_rank3_no_farther_from_float64_than_eager(backend, device, class_dim):
    """bf16 logits of rank 3 are computed in float32 on both backends (the fallback computed them in bf16:
    gradients up to 24x the tolerance): value and gradients no farther from float64 than eager bf16."""
    torch.manual_seed(3)
    x = (torch.randn(4, 33, 9, device=device) * 4).to(torch.bfloat16)  # (N, C, d1)
    y = torch.randint(0, 33, (4, 9), device=device)
    xin = (x.clone() if class_dim == 1 else x.movedim(1, -1).contiguous()).requires_grad_()
    out = fastadapt.alpha_weighted_cross_entropy(xin, y, xin, y, 0.5, label_smoothing=0.1, class_dim=class_dim)
    out.backward()
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, y, label_smoothing=0.1)
    ref.backward()
    xe = x.clone().requires_grad_()
    eager = F.cross_entropy(xe, y, label_smoothing=0.1)
    eager.backward()
    grad = xin.grad if class_dim == 1 else xin.grad.movedim(-1, 1)
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(out, ref) <= err(eager, ref) + 1e-3
    assert err(grad, x64.grad) <= err(xe.grad, x64.grad) * 1.01 + 1e-6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_finite_rows_near_the_float_range_stay_finite(backend, device, label_smoothing):
    """Logits in [1e38, 3e38]: without smoothing, log-softmax and the loss are finite although sum(x)
    overflows float32 (the CUDA forward detected NaN through that sum and gave NaN). With smoothing the
    mean log-probability overflows in F's float32 arithmetic too: +inf, as F gives."""
    x = torch.rand(6, 1000, device=device) * 2e38 + 1e38
    y = torch.randint(0, 1000, (6,), device=device)
    out, ref, g, rg = run_both(x.clone().requires_grad_(), y, x.clone().requires_grad_(), y, 0.5, "none",
                               label_smoothing=label_smoothing)
    f32 = 0.5 * F.cross_entropy(x, y, label_smoothing=label_smoothing, reduction="none")
    if label_smoothing == 0.0:
        assert torch.isfinite(f32).all()
        check(out, ref, g, rg, torch.float32, "none")
    else:
        assert torch.isposinf(f32).all()
        torch.testing.assert_close(out[1], f32)
        assert_close(g[1], rg[1], torch.float32, "gradients stay finite")


@pytest.mark.parametrize("device", DEVICES)
def test_smoothing_with_a_large_common_offset(backend, device):
    """mean(x) for logits 1e4 + noise: the kernels sum x - max, not x, so the noise is not lost."""
    x = (1e4 + torch.randn(9, 32001, device=device)).requires_grad_()
    y = torch.randint(0, 32001, (9,), device=device)
    for reduction in REDUCTIONS:
        x.grad = None
        t = x.detach().clone().requires_grad_()
        check(*run_both(x, y, t, y, 0.3, reduction, label_smoothing=0.2), torch.float32, reduction)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("device", DEVICES)
def test_per_row_grad_output_is_not_rounded_to_the_input_dtype(device):
    """A float32 per-row grad_output for bf16 logits (a direct backward call) is used in float32: the
    result is no farther from float64 than one computed with that grad_output rounded to bf16 (the CUDA
    kernel used to round it)."""
    torch.manual_seed(2)
    x = (torch.randn(64, 40, device=device) * 3).bfloat16()
    y = torch.randint(0, 40, (64,), device=device)
    a = torch.tensor(0.5, dtype=torch.float64)
    fwd = torch.ops.fastadapt._alpha_weighted_cross_entropy_forward(x, y, x, y, a, -100, 0.0, 0, None, None,
                                                                    [False, False])
    g = 1 + torch.rand(64, device=device) * 2 ** -7  # between bf16 neighbours of 1
    exact = 0.5 * g.double()[:, None] * (torch.softmax(x.double(), -1) - F.one_hot(y, 40).double())
    err = lambda grad: (grad.double() - exact).abs().max().item()  # noqa: E731
    bwd = torch.ops.fastadapt._alpha_weighted_cross_entropy_backward
    ours = bwd(g, None, x, y, x, y, a, fwd[2], -100, 0.0, 0, None, None, [True, False])[0]
    rounded = bwd(g.bfloat16(), None, x, y, x, y, a, fwd[2], -100, 0.0, 0, None, None, [True, False])[0]
    assert err(ours) <= err(rounded)
    assert err(ours) <= 2 ** -8 * exact.abs().max().item()


# ---- probability targets and class weights (F.cross_entropy's `target` of probabilities, `weight`) ----

def soft_targets(shape, device, dtype, requires_grad=False):
    """Rows of probabilities along the last dimension (a softmax of random scores), with some exact zeros."""
    t = torch.softmax(torch.randn(shape, device=device) * 2, -1)
    t = t * (torch.rand(shape, device=device) > 0.2)  # rows need not sum to 1: F does not ask it either
    return t.to(dtype).requires_grad_(requires_grad)


def class_weights(c, device, dtype):
    return (torch.rand(c, device=device) * 2 + 0.1).to(dtype)


# Each side: "index" (class indices, some ignored), "soft" (probability targets that require grad).
SIDE_KINDS = {
    "soft+index": ("soft", "index"),
    "index+soft": ("index", "soft"),
    "soft+soft": ("soft", "soft"),
    "index+index": ("index", "index"),
}


def make_kind(kind, n, c, device, dtype=torch.float32, ignore_frac=0.3):
    logits, labels = make_side(n, c, device, dtype, ignore_frac=ignore_frac)
    if kind == "soft":
        labels = soft_targets((n, c), device, dtype, requires_grad=True)
    return logits, labels


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 3, 33])
@pytest.mark.parametrize("c", [1, 3, 33])
@pytest.mark.parametrize("kinds", list(SIDE_KINDS))
@pytest.mark.parametrize("weights", ["both", "source", "none"])
def test_soft_targets_and_class_weights(backend, device, n, c, kinds, weights):
    ks, kt = SIDE_KINDS[kinds]
    sl, sy = make_kind(ks, n, c, device)
    tl, ty = make_kind(kt, n + 2, c + 1, device)
    sw = class_weights(c, device, torch.float32) if weights in ("both", "source") else None
    tw = class_weights(c + 1, device, torch.float32) if weights == "both" else None
    for reduction in REDUCTIONS:
        for eps in (0.0, 0.15):
            for t in (sl, tl, sy, ty):
                t.grad = None
            check(*run_both(sl, sy, tl, ty, 0.37, reduction, label_smoothing=eps, source_weight=sw,
                            target_weight=tw), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_targets_and_class_weights_wide_rows(backend, device, reduction):
    """A 32001-class vocabulary: the wide-row path of the kernels, with weights on both kinds of side."""
    sl, sy = make_kind("soft", 5, 32001, device)
    tl, ty = make_kind("index", 7, 32001, device)
    w = class_weights(32001, device, torch.float32)
    check(*run_both(sl, sy, tl, ty, 0.4, reduction, label_smoothing=0.1, source_weight=w, target_weight=w),
          torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_class_weights_with_ignored_rows(backend, device, label_smoothing):
    """mean divides by the sum of the labels' weights over the rows not ignored, as F; all rows ignored
    gives NaN for mean (0 / 0, as F) and 0 for sum."""
    sl, sy = make_side(40, 9, device, torch.float32, ignore_frac=0.5)
    tl, ty = make_side(12, 9, device, torch.float32)
    w = class_weights(9, device, torch.float32)
    for reduction in REDUCTIONS:
        sl.grad = tl.grad = None
        check(*run_both(sl, sy, tl, ty, 0.5, reduction, label_smoothing, source_weight=w, target_weight=w),
              torch.float32, reduction)
    ty[:] = -100
    for reduction in ("mean", "sum"):
        out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.5, reduction=reduction,
                                                     label_smoothing=label_smoothing, source_weight=w, target_weight=w)
        ref = ce_oracle(sl.detach().double(), sy, tl.detach().double(), ty, 0.5, reduction=reduction,
                        label_smoothing=label_smoothing, source_weight=w.double(), target_weight=w.double())
        assert torch.isnan(ref) == (reduction == "mean")
        assert_close(out, ref, torch.float32, f"all target rows ignored, {reduction}",
                     scale=1.0 if reduction == "mean" else abs(float(ref)) + 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_soft_targets_class_dim_1_and_class_last(backend, device, reduction):
    """(N, C, d) probability targets with class_dim=1 (F's layout, moved class-last together with the
    logits) and (B, T, V) ones with class_dim=-1; class weights on one side."""
    x = torch.randn(3, 7, 5, device=device) * 3
    p = soft_targets((3, 5, 7), device, torch.float32).movedim(-1, 1)  # rows of probabilities along dim 1
    w = class_weights(7, device, torch.float32)
    y = torch.randint(0, 7, (3, 5), device=device)
    for class_dim, (xs, ps) in ((1, (x, p)), (-1, (x.movedim(1, -1), p.movedim(1, -1)))):
        sl, sy = xs.clone().requires_grad_(), ps.detach().clone().requires_grad_()
        tl = xs.clone().requires_grad_()
        # class indices keep their (N, d) shape in either layout
        out, ref, g, rg = run_both(sl, sy, tl, y, 0.3, reduction, 0.1, class_dim=class_dim, source_weight=w)
        check(out, ref, g, rg, torch.float32, reduction)
        if reduction == "none":
            assert out[0].shape == (3, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 1.0, "tensor"])
def test_zero_weight_side_with_soft_targets_and_weights_is_not_read(backend, device, alpha):
    """A side whose alpha weight is 0 is not evaluated: NaN logits, targets and class weights there do
    not reach the loss, and its inputs get zero gradients."""
    good_l, good_y = make_kind("soft", 6, 4, device)
    bad_l = torch.full((5, 4), math.nan, device=device, requires_grad=True)
    bad_y = torch.full((5, 4), math.nan, device=device, requires_grad=True)
    bad_w = torch.full((4,), math.nan, device=device)
    w = class_weights(4, device, torch.float32)
    a = torch.tensor(1.0, dtype=torch.float64) if alpha == "tensor" else alpha
    if alpha == 0.0:
        args, kw = (good_l, good_y, bad_l, bad_y), dict(source_weight=w, target_weight=bad_w)
    else:
        args, kw = (bad_l, bad_y, good_l, good_y), dict(source_weight=bad_w, target_weight=w)
    out = fastadapt.alpha_weighted_cross_entropy(*args, a, **kw)
    ref = F.cross_entropy(good_l.detach().double(), good_y.detach().double(), weight=w.double())
    assert_close(out, ref, torch.float32, "loss")
    out.backward()
    for t in (bad_l, bad_y):
        assert t.grad is None or bool((t.grad == 0).all())
    assert torch.isfinite(good_l.grad).all() and torch.isfinite(good_y.grad).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.25, "tensor"])
def test_soft_and_weighted_alpha_tensor_equals_float(backend, device, alpha):
    sl, sy = make_kind("soft", 8, 6, device)
    tl, ty = make_kind("index", 9, 6, device)
    w = class_weights(6, device, torch.float32)
    a = torch.tensor(0.25, dtype=torch.float64) if alpha == "tensor" else alpha
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, a, target_weight=w, label_smoothing=0.1)
    ref = ce_oracle(sl.detach().double(), sy.detach().double(), tl.detach().double(), ty, 0.25, target_weight=w.double(),
                    label_smoothing=0.1)
    assert_close(out, ref, torch.float32, "loss")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["soft", "index"])
def test_bf16_soft_and_weighted_no_farther_from_float64_than_eager(backend, device, kind):
    torch.manual_seed(5)
    x = (torch.randn(24, 50, device=device) * 4).to(torch.bfloat16)
    y = soft_targets((24, 50), device, torch.bfloat16) if kind == "soft" else torch.randint(0, 50, (24,), device=device)
    w = class_weights(50, device, torch.bfloat16)
    xin = x.clone().requires_grad_()
    out = fastadapt.alpha_weighted_cross_entropy(xin, y, xin, y, 0.5, label_smoothing=0.1, source_weight=w,
                                                 target_weight=w)
    out.backward()
    x64 = x.double().requires_grad_()
    ref = F.cross_entropy(x64, y.double() if kind == "soft" else y, weight=w.double(), label_smoothing=0.1)
    ref.backward()
    xe = x.clone().requires_grad_()
    eager = F.cross_entropy(xe, y, weight=w, label_smoothing=0.1)
    eager.backward()
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(out, ref) <= err(eager, ref) + 1e-3
    assert err(xin.grad, x64.grad) <= err(xe.grad, x64.grad) * 1.01 + 1e-6


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradcheck_soft_targets_and_class_weights(backend, reduction, label_smoothing):
    """float64 gradcheck through the logits and the probability targets, with class weights."""
    sl = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    sy = soft_targets((5, 4), "cpu", torch.float64, requires_grad=True)
    tl = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ty = torch.tensor([0, 2, -100, 1, 1, 0])
    sw, tw = class_weights(4, "cpu", torch.float64), class_weights(3, "cpu", torch.float64)

    def fn(a, b, c):
        out = fastadapt.alpha_weighted_cross_entropy(a, b, c, ty, 0.3, reduction=reduction,
                                                     label_smoothing=label_smoothing, source_weight=sw, target_weight=tw)
        return out if reduction != "none" else torch.cat([out[0], out[1]])

    assert torch.autograd.gradcheck(fn, (sl, sy, tl))


def _op_args_soft_weighted(requires_grad, reduction=1):
    sl = torch.randn(6, 11, requires_grad=requires_grad)
    sy = soft_targets((6, 11), "cpu", torch.float32, requires_grad=requires_grad)
    tl, ty = make_side(5, 4, "cpu", torch.float32, 0.3)
    tl = tl.detach().requires_grad_(requires_grad)
    sw, tw = class_weights(11, "cpu", torch.float32), class_weights(4, "cpu", torch.float32)
    return (sl, sy, tl, ty, torch.tensor(0.4, dtype=torch.float64), -100, 0.1, reduction, sw, tw)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_soft_targets_and_class_weights(requires_grad, reduction):
    args = _op_args_soft_weighted(requires_grad, reduction)
    torch.library.opcheck(torch.ops.fastadapt.alpha_weighted_cross_entropy.default, args)
    internal = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_cross_entropy_forward.default, (*internal, [True, True]))
    saved = torch.ops.fastadapt._alpha_weighted_cross_entropy_forward(*internal, [False, False])[2]
    g_s = torch.randn(6) if reduction == 0 else torch.tensor(1.3)
    g_t = torch.randn(5) if reduction == 0 else torch.tensor(0.7)
    bargs = (g_s, g_t, *internal[:5], saved, *internal[5:], [True, True])
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_cross_entropy_backward.default, bargs)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_soft_targets_and_class_weights(backend, compile_backend):
    sl, sy = make_kind("soft", 20, 30, "cpu")
    tl, ty = make_kind("index", 15, 30, "cpu")
    sw, tw = class_weights(30, "cpu", torch.float32), class_weights(30, "cpu", torch.float32)

    def step(a, b, p, alpha):
        return fastadapt.alpha_weighted_cross_entropy(a, p, b, ty, alpha, label_smoothing=0.1, source_weight=sw,
                                                      target_weight=tw) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for alpha in (0.3, 0.9):
        a_t = torch.tensor(alpha, dtype=torch.float64)
        leaves = (sl, tl, sy)
        for t in leaves:
            t.grad = None
        out = compiled(sl, tl, sy, a_t)
        out.backward()
        got = [out.detach()] + [t.grad.clone() for t in leaves]
        for t in leaves:
            t.grad = None
        ref = step(sl, tl, sy, a_t)
        ref.backward()
        oracle = 2.0 * ce_oracle(sl.detach().double(), sy.detach().double(), tl.detach().double(), ty, alpha,
                                 label_smoothing=0.1, source_weight=sw.double(), target_weight=tw.double())
        torch.testing.assert_close(got[0].double(), oracle, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-6)
        for g, t in zip(got[1:], leaves):
            torch.testing.assert_close(g, t.grad, rtol=1e-5, atol=1e-7)


def test_module_takes_soft_targets_and_class_weights(backend):
    sl, sy = make_kind("soft", 10, 7, "cpu")
    tl, ty = make_kind("index", 12, 5, "cpu")
    sw, tw = class_weights(7, "cpu", torch.float32), class_weights(5, "cpu", torch.float32)
    mod = fastadapt.AlphaWeightedLoss(alpha=0.3, kind="cross_entropy", source_weight=sw, target_weight=tw,
                                      label_smoothing=0.05)
    got = mod(sl, sy, tl, ty)
    ref = ce_oracle(sl.detach().double(), sy.detach().double(), tl.detach().double(), ty, 0.3, label_smoothing=0.05,
                    source_weight=sw.double(), target_weight=tw.double())
    assert_close(got, ref, torch.float32, "module loss")
    assert torch.equal(got, fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.3, source_weight=sw,
                                                                   target_weight=tw, label_smoothing=0.05))
    # the weights are buffers, as nn.CrossEntropyLoss's: in the state dict, moved by .to(), not in repr
    assert set(mod.state_dict()) == {"source_weight", "target_weight"}
    assert mod.to(torch.float64).target_weight.dtype == torch.float64 and "tensor" not in repr(mod)


def _soft_good():
    sl, sy = make_kind("soft", 4, 5, "cpu")
    tl, ty = make_side(3, 6, "cpu", torch.float32)
    return [sl, sy.detach(), tl, ty]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, match",
    [
        (lambda a: a.__setitem__(1, a[1][:, :4]), {}, ValueError,
         r"source_labels holds probability targets \(dtype torch.float32\), so it must have the shape of "
         r"source_logits, \(4, 5\), got \(4, 4\)"),
        (lambda a: a.__setitem__(1, a[1].double()), {}, TypeError,
         r"source_labels holds probability targets of dtype torch.float64 but source_logits has dtype torch.float32"),
        (lambda a: None, {"ignore_index": 0}, ValueError,
         r"ignore_index=0 does not apply to probability targets \(source_labels has dtype torch.float32\)"),
        (lambda a: None, {"source_weight": torch.ones(4)}, ValueError,
         r"source_weight must be 1-D with one weight per class of source_logits \(5\), got shape \(4,\)"),
        (lambda a: None, {"target_weight": torch.ones(1, 6)}, ValueError,
         r"target_weight must be 1-D with one weight per class of target_logits \(6\), got shape \(1, 6\)"),
        (lambda a: None, {"target_weight": torch.ones(6, dtype=torch.float64)}, TypeError,
         r"target_weight has dtype torch.float64 but target_logits has dtype torch.float32"),
        (lambda a: None, {"source_weight": torch.ones(5, device="meta")}, ValueError,
         r"source_weight is on meta but source_logits is on cpu"),
        (lambda a: None, {"source_weight": torch.ones(5, requires_grad=True)}, ValueError,
         r"source_weight requires grad, but fastadapt does not differentiate class weights"),
        (lambda a: None, {"target_weight": [1.0] * 6}, TypeError, r"target_weight must be a torch.Tensor, got list"),
    ],
)
def test_bad_soft_targets_and_weights_raise_before_running(backend, mutate, kwargs, exc, match):
    args = _soft_good()
    mutate(args)
    before = [t.detach().clone() for t in args]
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_cross_entropy(*args, **kwargs)
    for b, t in zip(before, args):
        assert torch.equal(b, t.detach()) and t.grad is None
