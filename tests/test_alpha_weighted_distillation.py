"""fastadapt.alpha_weighted_distillation against a float64 reference built from F.cross_entropy and F.kl_div."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastadapt
from conftest import DEVICES
from helpers import assert_close, distill_oracle, grad_or_zeros

REDUCTIONS = ["mean", "sum", "none"]


def make_inputs(shape, c, k, device, dtype=torch.float32, ignore_frac=0.2, class_dim=-1):
    """Student logits (requires grad), labels and teacher logits; shape is the rows' shape (labels')."""
    def logits(classes):
        x = torch.randn(*shape, classes, device=device) * 3
        return (x.movedim(-1, 1) if class_dim == 1 and len(shape) >= 1 else x).contiguous().to(dtype)

    z, t = logits(c), logits(k)
    y = torch.randint(0, max(c, 1), shape, device=device)
    if ignore_frac and y.numel():
        flat = y.view(-1)
        flat[torch.rand(flat.numel(), device=device) < ignore_frac] = -100
        flat[0] = -100
    return z.requires_grad_(), y, t


def run_both(z, y, t, alpha, temperature, reduction, grad_scale=1.7, **kw):
    """Loss and logits gradient from fastadapt and from the float64 reference."""
    kw = dict(reduction=reduction, **kw)
    out = fastadapt.alpha_weighted_distillation(z, y, t, alpha, temperature, **kw)
    z64 = z.detach().double().requires_grad_()
    ref = distill_oracle(z64, y, t.double(), alpha, temperature, **kw)
    if reduction == "none":
        wk = torch.randn(y.shape, dtype=torch.float64, device=y.device)
        wc = torch.randn(y.shape, dtype=torch.float64, device=y.device)
        ((out[0].double() * wk).sum() + (out[1].double() * wc).sum()).backward()
        ((ref[0] * wk).sum() + (ref[1] * wc).sum()).backward()
    else:
        (out * grad_scale).backward()
        (ref * grad_scale).backward()
    return out, ref, grad_or_zeros(z), grad_or_zeros(z64)


def check(out, ref, grad, ref_grad, dtype, reduction):
    if reduction == "none":
        assert out[0].dtype == dtype and out[1].dtype == dtype
        assert out[0].shape == ref[0].shape and out[1].shape == ref[1].shape
        assert_close(out[0], ref[0], dtype, "distill losses")
        assert_close(out[1], ref[1], dtype, "ce losses")
    else:
        assert out.dtype == dtype and out.shape == ()
        r = float(ref.detach())
        assert_close(out, ref, dtype, "loss", scale=max(1.0, abs(r)) if math.isfinite(r) else 1.0)
    assert_close(grad, ref_grad, dtype, "grad")


# ---- values and gradients -------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [0, 1, 3, 33])
@pytest.mark.parametrize("c", [1, 3, 33])
@pytest.mark.parametrize("grown", [False, True])
def test_parity_shapes(backend, device, n, c, grown):
    k = max(1, c // 3) if grown else c  # a grown head: the teacher knows the first K classes
    z, y, t = make_inputs((n,), c, k, device)
    for reduction in REDUCTIONS:
        z.grad = None
        check(*run_both(z, y, t, 0.3, 2.0, reduction, label_smoothing=0.1), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [32001, 1000])
def test_parity_large_vocabulary(device, k):
    """One wide case (C = 32001, through the kernels' wide-row paths): the fallback is F itself."""
    z, y, t = make_inputs((3,), 32001, k, device)
    for reduction in REDUCTIONS:
        z.grad = None
        check(*run_both(z, y, t, 0.3, 2.0, reduction), torch.float32, reduction)


ALPHAS = [0.0, 0.3, 1.0, "tensor"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("class_dim", [1, -1])
def test_parity_options(backend, device, reduction, temperature, alpha, class_dim):
    # class_dim=1: (N, C, d) logits with (N, d) labels; -1: (B, S, C) with (B, S)
    z, y, t = make_inputs((4, 5), 9, 6, device, class_dim=class_dim)
    a = torch.tensor(0.6, dtype=torch.float64) if alpha == "tensor" else alpha
    smoothing = 0.15 if temperature == 2.0 else 0.0
    check(*run_both(z, y, t, a, temperature, reduction, label_smoothing=smoothing, class_dim=class_dim),
          torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float64_and_one_dim_logits(backend, device, reduction):
    z, y, t = make_inputs((7,), 12, 12, device, dtype=torch.float64)
    check(*run_both(z, y, t, 0.4, 3.0, reduction), torch.float64, reduction)
    z1 = torch.randn(5, device=device, dtype=torch.float64, requires_grad=True)  # (C,) with a 0-dim label
    check(*run_both(z1, torch.tensor(2, device=device), torch.randn(4, device=device, dtype=torch.float64), 0.4, 2.0,
                    reduction), torch.float64, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_are_still_distilled(backend, device, reduction):
    z, y, t = make_inputs((6,), 10, 7, device, ignore_frac=0.5)
    kd, ce = fastadapt.alpha_weighted_distillation(z, y, t, 0.5, 2.0, reduction="none")
    ignored = y == -100
    assert bool(ignored.any())
    assert torch.all(ce[ignored] == 0) and torch.all(kd[ignored] > 0)
    check(*run_both(z, y, t, 0.5, 2.0, reduction), torch.float32, reduction)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_all_ignored_mean_is_nan_as_f_unless_alpha_is_0(backend, device, alpha):
    """F.cross_entropy's mean over no labels is 0/0 = NaN, and so is the total unless the CE weight is 0;
    the distillation part of the gradient is unaffected (F's CE gradient is 0 there)."""
    z, y, t = make_inputs((5,), 8, 8, device, ignore_frac=0.0)
    y = torch.full_like(y, -100)
    out, ref, grad, ref_grad = run_both(z, y, t, alpha, 2.0, "mean")
    assert math.isnan(float(out.detach())) == (alpha != 0.0) == math.isnan(float(ref.detach()))
    assert_close(grad, ref_grad, torch.float32, "grad")
    assert torch.isfinite(grad).all()
    z.grad = None
    check(*run_both(z, y, t, alpha, 2.0, "sum"), torch.float32, "sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_zero_weight_term_is_not_read(backend, device, reduction):
    """alpha=1: a NaN teacher reaches neither the loss nor the gradient; alpha=0: labels out of range are
    never read."""
    z, y, t = make_inputs((6,), 9, 5, device)
    out, ref, grad, ref_grad = run_both(z, y, torch.full_like(t, float("nan")), 1.0, 2.0, reduction)
    check(out, ref, grad, ref_grad, torch.float32, reduction)
    assert torch.isfinite(grad).all()
    z.grad = None
    bad = torch.full_like(y, 12345)
    out = fastadapt.alpha_weighted_distillation(z, bad, t, 0.0, 2.0, reduction=reduction)
    total = out if reduction != "none" else out[0].sum() + out[1].sum()
    total.backward()
    z64 = z.detach().double().requires_grad_()
    ref = distill_oracle(z64, y, t.double(), 0.0, 2.0, reduction=reduction)  # labels irrelevant at alpha=0
    (ref if reduction != "none" else ref[0].sum() + ref[1].sum()).backward()
    assert_close(total, ref if reduction != "none" else ref[0].sum() + ref[1].sum(), torch.float32, "loss")
    assert_close(z.grad, z64.grad, torch.float32, "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("class_dim", [1, -1])
def test_bf16_no_farther_from_float64_than_eager(backend, device, class_dim):
    torch.manual_seed(3)
    z, y, t = make_inputs((4, 9), 33, 20, device, dtype=torch.bfloat16, class_dim=class_dim)
    kw = dict(label_smoothing=0.1, class_dim=class_dim)
    out = fastadapt.alpha_weighted_distillation(z, y, t, 0.4, 2.0, **kw)
    out.backward()
    z64 = z.detach().double().requires_grad_()
    ref = distill_oracle(z64, y, t.double(), 0.4, 2.0, **kw)
    ref.backward()
    ze = z.detach().clone().requires_grad_()
    eager = distill_oracle(ze, y, t, 0.4, 2.0, **kw)  # the same PyTorch ops in bf16
    eager.backward()
    assert out.dtype == torch.bfloat16
    err = lambda a, b: (a.double() - b.double()).abs().max().item()  # noqa: E731
    assert err(out, ref) <= err(eager, ref) + 1e-3
    assert err(z.grad, z64.grad) <= err(ze.grad, z64.grad) * 1.01 + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_large_common_offset_and_masked_teacher_class(backend, device):
    """Logits near 1e4 keep their differences; a teacher logit of -inf (a class the teacher gives
    probability 0) adds 0 to the KL, as F.kl_div with a probability target."""
    z, y, t = make_inputs((5,), 20, 20, device, ignore_frac=0.0)
    z = (z.detach() + 1e4).requires_grad_()
    check(*run_both(z, y, t + 1e4, 0.3, 2.0, "mean"), torch.float32, "mean")
    t = t.clone()
    t[:, 3] = float("-inf")
    z.grad = None
    out = fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 2.0)
    out.backward()
    z64 = z.detach().double().requires_grad_()
    kl = F.kl_div(F.log_softmax(z64 / 2.0, -1), F.softmax(t.double() / 2.0, -1), reduction="batchmean")
    ref = 0.3 * F.cross_entropy(z64, y) + 0.7 * 4.0 * kl
    ref.backward()
    assert torch.isfinite(out)
    assert_close(out, ref, torch.float32, "loss", scale=float(ref.detach()))
    assert_close(z.grad, z64.grad, torch.float32, "grad")


@pytest.mark.parametrize("device", DEVICES)
def test_masked_student_class_the_teacher_gives_no_mass(backend, device):
    """A student logit of -inf (a masked class) where the teacher's probability underflows to 0 adds
    nothing to the KL (q log(q/p) -> 0 as q -> 0), not NaN from inf * 0. (F.kl_div itself computes
    0 * inf there and gives NaN, so the reference sums over the classes the teacher gives mass.)"""
    z = torch.tensor([[float("-inf"), 0.0], [0.0, 1.0]], device=device)
    t = torch.tensor([[0.0, 1000.0], [0.5, 0.0]], device=device)
    y = torch.tensor([1, 0], device=device)
    out = fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 1.0)
    q = F.softmax(t.double(), -1)
    kl = torch.where(q > 0, q * (q.log() - F.log_softmax(z.double(), -1)), 0.0).sum(-1).mean()
    ref = 0.3 * F.cross_entropy(z.double(), y) + 0.7 * kl
    assert torch.isfinite(ref) and torch.isfinite(out)
    assert_close(out, ref, torch.float32, "loss", scale=float(ref))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_teacher_row_poisons_only_that_row(backend, device):
    z, y, t = make_inputs((4,), 6, 6, device, ignore_frac=0.0)
    t[2, 1] = float("nan")
    kd, ce = fastadapt.alpha_weighted_distillation(z, y, t, 0.5, 2.0, reduction="none")
    assert torch.isnan(kd[2]) and torch.isfinite(kd[[0, 1, 3]]).all() and torch.isfinite(ce).all()


def test_grad_output_per_term_and_retain_graph(backend):
    """Each term's gradient follows its own grad_output (reduction none), and a retained graph gives the
    same gradient twice (the forward-written gradient is not consumed by the first backward)."""
    z, y, t = make_inputs((8,), 12, 9, "cpu")
    out = fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 2.0)
    out.backward(retain_graph=True)
    first = z.grad.clone()
    z.grad = None
    out.backward()
    assert torch.equal(first, z.grad)
    for keep in (0, 1):
        z.grad = None
        kd, ce = fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 2.0, reduction="none")
        (kd if keep == 0 else ce).sum().backward()
        z64 = z.detach().double().requires_grad_()
        ref = distill_oracle(z64, y, t.double(), 0.3, 2.0, reduction="none")
        ref[keep].sum().backward()
        assert_close(z.grad, z64.grad, torch.float32, f"grad of term {keep}")


def test_deterministic_repeats_and_thread_counts(backend):
    """The same bits on every run and with 1 or 2 threads: 1000 rows of 300 classes are several
    parallel chunks, whose partial sums are combined in a fixed order."""
    z, y, t = make_inputs((1000,), 300, 200, "cpu")
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            z.grad = None
            out = fastadapt.alpha_weighted_distillation(z, y, t, 0.3, 2.0)
            out.backward()
            runs.append((out.detach(), z.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    for out, grad in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(grad, runs[0][1])


# ---- autograd / registration ----------------------------------------------------------------

@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_gradcheck(backend, reduction, label_smoothing):
    z, y, t = make_inputs((5,), 7, 4, "cpu", dtype=torch.float64, ignore_frac=0.3)

    def fn(x):
        out = fastadapt.alpha_weighted_distillation(x, y, t, 0.37, 2.0, label_smoothing=label_smoothing,
                                                    reduction=reduction)
        return out if reduction != "none" else out[0] * 1.3 + out[1]

    assert torch.autograd.gradcheck(fn, (z,))


def _op_args(requires_grad, reduction=1):
    z, y, t = make_inputs((6,), 11, 7, "cpu", ignore_frac=0.3)
    return (z.detach().requires_grad_(requires_grad), y, t, torch.tensor(0.4, dtype=torch.float64), 2.0, -100, 0.1,
            reduction)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_opcheck_public_op(requires_grad, reduction):
    torch.library.opcheck(torch.ops.fastadapt.alpha_weighted_distillation.default, _op_args(requires_grad, reduction))


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
@pytest.mark.parametrize("reduction", [0, 1])
def test_opcheck_internal_ops(reduction):
    args = _op_args(False, reduction)
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_distillation_forward.default, (*args, True))
    saved = torch.ops.fastadapt._alpha_weighted_distillation_forward(*args, False)[2]
    g_kd = torch.randn(args[1].shape) if reduction == 0 else torch.tensor(1.3)
    g_ce = torch.randn(args[1].shape) if reduction == 0 else None  # a term that did not reach the loss
    bargs = (g_kd, g_ce, *args[:4], saved, *args[4:])
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_distillation_backward.default, bargs)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compile_backend):
    z, y, t = make_inputs((20,), 30, 25, "cpu")

    def step(x, alpha):
        return fastadapt.alpha_weighted_distillation(x, y, t, alpha, 2.0, label_smoothing=0.1) * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    for alpha in (0.3, 0.9):  # a tensor alpha changes value without a recompile
        a_t = torch.tensor(alpha, dtype=torch.float64)
        z.grad = None
        out = compiled(z, a_t)
        out.backward()
        got = (out.detach(), z.grad.clone())
        z.grad = None
        ref = step(z, a_t)
        ref.backward()
        torch.testing.assert_close(got[0], ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[1], z.grad, rtol=1e-5, atol=1e-7)


# ---- bad input ------------------------------------------------------------------------------

def _good():
    z, y, t = make_inputs((4,), 5, 3, "cpu")
    return [z, y, t]


@pytest.mark.parametrize(
    "mutate, kwargs, exc, match",
    [
        (lambda a: a.__setitem__(2, torch.zeros(4, 6)), {}, ValueError,
         r"teacher_logits has 6 classes \(shape \(4, 6\)\) but logits has 5 \(shape \(4, 5\)\)"),
        (lambda a: a.__setitem__(2, torch.zeros(4, 0)), {}, ValueError, r"teacher_logits has 0 classes"),
        (lambda a: a.__setitem__(2, torch.zeros(3, 3)), {}, ValueError,
         r"teacher_logits has shape \(3, 3\) but logits has shape \(4, 5\)"),
        (lambda a: a.__setitem__(2, torch.zeros(4, 3, 1)), {}, ValueError, r"teacher_logits has shape \(4, 3, 1\)"),
        (lambda a: a.__setitem__(2, a[2].double()), {}, TypeError,
         r"teacher_logits has dtype torch.float64 but logits has dtype torch.float32"),
        (lambda a: a.__setitem__(2, a[2].to("meta")), {}, ValueError, r"teacher_logits is on meta but logits is on cpu"),
        (lambda a: a.__setitem__(2, a[2].clone().requires_grad_()), {}, ValueError,
         r"teacher_logits requires grad.*torch.no_grad\(\) or pass teacher_logits.detach\(\)"),
        (lambda a: a.__setitem__(2, [[0.0]]), {}, TypeError, r"teacher_logits must be a torch.Tensor, got list"),
        (lambda a: a.__setitem__(1, torch.zeros(3, dtype=torch.long)), {}, ValueError, r"labels has shape \(3,\)"),
        (lambda a: a.__setitem__(1, a[1].float()), {}, TypeError,
         r"labels must hold class indices \(an integer dtype\), got dtype torch.float32"),
        (lambda a: a.__setitem__(0, a[0].detach().long()), {}, TypeError, r"logits must be a floating tensor"),
        (lambda a: None, {"temperature": 0.0}, ValueError, r"temperature must be a finite float > 0, got 0.0"),
        (lambda a: None, {"temperature": -2.0}, ValueError, r"temperature must be a finite float > 0, got -2.0"),
        (lambda a: None, {"temperature": float("nan")}, ValueError, r"temperature must be a finite float > 0, got nan"),
        (lambda a: None, {"temperature": float("inf")}, ValueError, r"temperature must be a finite float > 0, got inf"),
        (lambda a: None, {"temperature": "2"}, TypeError, r"temperature must be a float, got str"),
        (lambda a: None, {"temperature": True}, TypeError, r"temperature must be a float, got bool"),
        (lambda a: None, {"alpha": 1.5}, ValueError, r"alpha must lie in \[0, 1\], got 1.5"),
        (lambda a: None, {"label_smoothing": 1.2}, ValueError, r"label_smoothing must lie in \[0, 1\], got 1.2"),
        (lambda a: None, {"reduction": "batchmean"}, ValueError, r"reduction must be one of .* got 'batchmean'"),
        (lambda a: None, {"class_dim": 0}, ValueError, r"class_dim must be 1 .* got 0"),
    ],
)
def test_bad_input_raises_before_running(backend, mutate, kwargs, exc, match):
    args = _good()
    mutate(args)
    before = [t.detach().clone() if isinstance(t, torch.Tensor) and t.device.type != "meta" else None for t in args]
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_distillation(*args, **kwargs)
    for b, t in zip(before, args):
        if b is not None:
            assert torch.equal(b, t.detach())


def test_label_out_of_range_names_the_value(backend):
    z, y, t = _good()
    with pytest.raises(IndexError, match=r"labels contains the label 7|Target 7 is out of bounds"):
        fastadapt.alpha_weighted_distillation(z, torch.tensor([0, 7, 1, 2]), t)


@pytest.mark.skipif(not fastadapt.has_ops(), reason="compiled extension not loaded")
def test_direct_op_call_is_memory_safe():
    """torch.ops.fastadapt.* skips the Python checks: what would read out of bounds still raises."""
    z, y, t = _good()
    a = torch.tensor(0.5, dtype=torch.float64)
    op = torch.ops.fastadapt.alpha_weighted_distillation
    with pytest.raises(RuntimeError, match="1 <= K <= C"):
        op(z, y, torch.zeros(4, 6), a, 2.0)
    with pytest.raises(RuntimeError, match="leading dimensions"):
        op(z, y, torch.zeros(3, 3), a, 2.0)
    with pytest.raises(RuntimeError, match="temperature"):
        op(z, y, t, a, 0.0)
    with pytest.raises(IndexError):
        op(z, torch.tensor([0, 9, 1, 2]), t, a, 2.0)
    with pytest.raises(RuntimeError, match="class indices"):
        op(z, torch.rand(z.shape), t, a, 2.0)
    with pytest.raises(RuntimeError, match="teacher_logits must not require grad"):
        op(z, y, t.clone().requires_grad_(), a, 2.0)


# ---- CUDA conventions (no host sync) ----------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_cuda_device_alpha_and_write_grad_match_cpu(reduction):
    """A device-resident alpha gives what a CPU alpha gives; the forward op asked for the gradient gives
    the backward op's gradient for unit grad_outputs; both match the CPU kernels."""
    z, y, t = make_inputs((37,), 300, 200, "cpu", ignore_frac=0.3)
    z = z.detach()
    args = (-100, 0.1, reduction)
    cpu = torch.ops.fastadapt._alpha_weighted_distillation_forward(z, y, t, torch.tensor(0.3, dtype=torch.float64),
                                                                   2.0, *args, True)
    zc, yc, tc = z.cuda(), y.cuda(), t.cuda()
    for alpha in (torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64, device="cuda")):
        kd, ce, saved, grad = torch.ops.fastadapt._alpha_weighted_distillation_forward(zc, yc, tc, alpha, 2.0, *args,
                                                                                       True)
        assert_close(kd, cpu[0], torch.float32, "distill term")
        assert_close(ce, cpu[1], torch.float32, "ce term")
        assert_close(saved[0], cpu[2][0], torch.float32, "log-sum-exps")
        assert int(saved[1]) == int(cpu[2][1])
        assert_close(grad, cpu[3], torch.float32, "grad written in the forward")
        ones = torch.ones(y.shape, device="cuda") if reduction == 0 else torch.tensor(1.0, device="cuda")
        back = torch.ops.fastadapt._alpha_weighted_distillation_backward(ones, ones, zc, yc, tc, alpha, saved, 2.0,
                                                                         *args)
        assert_close(back, cpu[3], torch.float32, "grad of the backward op")


@pytest.mark.cuda
def test_cuda_label_out_of_range_is_nan_not_an_error():
    z, y, t = make_inputs((4,), 5, 3, "cuda", ignore_frac=0.0)
    y[1] = 7
    kd, ce = torch.ops.fastadapt.alpha_weighted_distillation(z.detach(), y, t, torch.tensor(0.5, dtype=torch.float64),
                                                             2.0, -100, 0.0, 0)
    assert torch.isnan(ce[1]) and torch.isfinite(ce[[0, 2, 3]]).all() and torch.isfinite(kd).all()
