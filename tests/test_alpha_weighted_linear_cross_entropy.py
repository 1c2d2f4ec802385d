"""fastadapt.alpha_weighted_linear_cross_entropy against the unfused composition in float64 (F.linear +
F.cross_entropy, helpers.linear_ce_oracle), through the compiled op (CPU, and CUDA where a GPU exists)
and the pure-PyTorch chunked fallback (the `backend` fixture). Small chunk sizes make every case span
several chunks."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadapt
from fastadapt.ops import linear_cross_entropy as lce
from devices import DEVICES
from helpers import assert_close, grad_or_zeros, linear_ce_oracle, use_backend

REDUCTIONS = ["mean", "sum", "none"]
D = 7


def make_side(n, v, dtype=torch.float32, ignore_frac=0.0, lead=(), device="cpu"):
    hidden = torch.randn(*lead, n, D).to(device=device, dtype=dtype).requires_grad_()
    labels = torch.randint(0, v, (*lead, n))
    if ignore_frac and n:
        labels[torch.rand(labels.shape) < ignore_frac] = -100
    return hidden, labels.to(device)


def make_head(v, dtype=torch.float32, bias=True, frozen=False, device="cpu"):
    w = (torch.randn(v, D) * 0.5).to(device=device, dtype=dtype).requires_grad_(not frozen)
    b = (torch.randn(v) * 0.5).to(device=device, dtype=dtype).requires_grad_(not frozen) if bias else None
    return w, b


def _f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def run_both(sh, sy, th, ty, w, b, alpha, reduction, grad_scale=1.7, **kw):
    """Loss and the gradients of (source_hidden, target_hidden, weight, bias) from fastadapt and from the
    float64 oracle, under the same grad_output (random per row for reduction none)."""
    out = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, alpha, reduction=reduction, **kw)
    kw.pop("chunk_size", None)
    leaves = [sh, th, w, b]
    leaves64 = [_f64(t) for t in leaves]
    ref = linear_ce_oracle(leaves64[0], sy, leaves64[1], ty, leaves64[2], leaves64[3], alpha, reduction=reduction,
                           **kw)
    if reduction == "none":
        ws = torch.randn(sy.shape, dtype=torch.float64, device=sy.device)
        wt = torch.randn(ty.shape, dtype=torch.float64, device=ty.device)
        ((out[0].double() * ws).sum() + (out[1].double() * wt).sum()).backward()
        ((ref[0] * ws).sum() + (ref[1] * wt).sum()).backward()
    else:
        (out * grad_scale).backward()
        (ref * grad_scale).backward()
    pairs = [(grad_or_zeros(t), grad_or_zeros(t64)) for t, t64 in zip(leaves, leaves64)
             if t is not None and t.requires_grad]
    return out, ref, pairs


def check(out, ref, pairs, dtype, reduction):
    if reduction == "none":
        for o, r, what in ((out[0], ref[0], "source losses"), (out[1], ref[1], "target losses")):
            assert o.dtype == dtype and o.shape == r.shape
            assert_close(o, r, dtype, what)
    else:
        assert out.dtype == dtype and out.shape == ()
        r = float(ref.detach())
        assert_close(out, ref, dtype, "loss", scale=max(1.0, abs(r)) if math.isfinite(r) else 1.0)
    for i, (g, r) in enumerate(pairs):
        assert g.dtype == dtype
        assert_close(g, r, dtype, f"gradient {i}")


@pytest.mark.parametrize("rows", [(0, 3), (1, 33), (3, 1), (33, 0), (33, 33)])
@pytest.mark.parametrize("v", [1, 5, 33])
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("device", DEVICES)
def test_parity_shapes(backend, rows, v, alpha, reduction, bias, device):
    sh, sy = make_side(rows[0], v, device=device)
    th, ty = make_side(rows[1], v, device=device)
    w, b = make_head(v, bias=bias, device=device)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, alpha, reduction, chunk_size=4)
    check(out, ref, pairs, torch.float32, reduction)
    if reduction == "mean" and 0.0 < alpha < 1.0 and 0 in rows:
        assert math.isnan(float(out.detach()))  # F.cross_entropy's mean over no rows, as in the composition


@pytest.mark.parametrize("smoothing, z_loss, softcap", [(0.1, 0.0, None), (0.0, 1e-3, None), (0.0, 0.0, 3.0),
                                                         (0.2, 1e-2, 2.5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("device", DEVICES)
def test_parity_options(backend, smoothing, z_loss, softcap, reduction, alpha, device):
    sh, sy = make_side(19, 33, ignore_frac=0.3, device=device)
    th, ty = make_side(11, 33, ignore_frac=0.3, device=device)
    w, b = make_head(33, device=device)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, alpha, reduction, chunk_size=5, label_smoothing=smoothing,
                               z_loss=z_loss, softcap=softcap)
    check(out, ref, pairs, torch.float32, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
@pytest.mark.parametrize("device", DEVICES)
def test_all_ignored_side(backend, reduction, z_loss, device):
    """A side whose every row is ignored: its mean is F's NaN with zero gradients; sum and none give 0."""
    sh, sy = make_side(6, 5, device=device)
    sy[:] = -100
    th, ty = make_side(9, 5, ignore_frac=0.2, device=device)
    w, b = make_head(5, device=device)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, 0.37, reduction, chunk_size=4, z_loss=z_loss)
    check(out, ref, pairs, torch.float32, reduction)
    assert torch.all(sh.grad == 0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_frozen_head(backend, reduction):
    """A frozen weight and bias get no gradient and cost no weight-gradient work; the hiddens still get theirs."""
    sh, sy = make_side(10, 33)
    th, ty = make_side(7, 33)
    w, b = make_head(33, frozen=True)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, 0.37, reduction, chunk_size=3)
    check(out, ref, pairs, torch.float32, reduction)
    assert w.grad is None and b.grad is None and len(pairs) == 2


def test_frozen_head_skips_weight_gemm(monkeypatch):
    """No weight-gradient GEMM for a frozen head: the fallback's chunked pass is handed no grad_weight
    buffer (the compiled op's node asks for no weight gradient: write_grad[2] is the weight's requires_grad)."""
    seen = []
    real = lce._side_pass

    def spy(hidden, labels, o, scale, grads):
        seen.append(grads is not None and grads[1] is not None)
        return real(hidden, labels, o, scale, grads)

    monkeypatch.setattr(lce, "_side_pass", spy)
    sh, sy = make_side(5, 9)
    th, ty = make_side(5, 9)
    w, _ = make_head(9, bias=False, frozen=True)
    with use_backend("fallback"):
        fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w).backward()
    assert seen == [False, False]
    assert sh.grad is not None and torch.isfinite(sh.grad).all() and sh.grad.abs().sum() > 0


def test_leading_dims_and_label_dtype(backend):
    """(batch, seq, D) hidden with (batch, seq) int32 labels, as a language model has them."""
    sh, sy = make_side(5, 33, lead=(2,))
    th, ty = make_side(4, 33, lead=(3,))
    w, b = make_head(33)
    out, ref, pairs = run_both(sh, sy.int(), th, ty.int(), w, b, 0.5, "none", chunk_size=4)
    assert out[0].shape == (2, 5) and out[1].shape == (3, 4)
    check(out, ref, pairs, torch.float32, "none")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16(backend, reduction, device):
    sh, sy = make_side(17, 33, torch.bfloat16, ignore_frac=0.2, device=device)
    th, ty = make_side(9, 33, torch.bfloat16, device=device)
    w, b = make_head(33, torch.bfloat16, device=device)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, 0.37, reduction, chunk_size=4, z_loss=1e-3, softcap=4.0)
    check(out, ref, pairs, torch.bfloat16, reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(backend, reduction, device):
    sh, sy = make_side(4, 5, torch.float64, ignore_frac=0.3, device=device)
    th, ty = make_side(3, 5, torch.float64, device=device)
    w, b = make_head(5, torch.float64, device=device)

    def f(sh, th, w, b):
        out = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.37, reduction=reduction,
                                                            label_smoothing=0.1, z_loss=1e-2, softcap=3.0,
                                                            chunk_size=2)
        return out

    assert torch.autograd.gradcheck(f, (sh, th, w, b))


def test_chunk_size_does_not_change_the_result(backend):
    """Chunks change only the order of grad_weight's sums: equal to float32 rounding, and bit-identical
    when rerun with the same chunk size (determinism)."""
    sh, sy = make_side(37, 33, ignore_frac=0.2)
    th, ty = make_side(21, 33)
    w, b = make_head(33)
    results = {}
    for chunk in (1, 7, 64, 7):
        for t in (sh, th, w, b):
            t.grad = None
        loss = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.3, chunk_size=chunk)
        loss.backward()
        got = [loss.detach().clone()] + [t.grad.clone() for t in (sh, th, w, b)]
        if chunk in results:
            assert all(torch.equal(a, c) for a, c in zip(results[chunk], got))
        results[chunk] = got
    for a, c in zip(results[1], results[64]):
        assert_close(a, c, torch.float32, "chunk 1 against chunk 64")


def test_matches_alpha_weighted_cross_entropy(backend):
    """The definition: alpha_weighted_cross_entropy of the two sides' F.linear logits."""
    sh, sy = make_side(9, 33, ignore_frac=0.3)
    th, ty = make_side(13, 33)
    w, b = make_head(33)
    fused = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.37, label_smoothing=0.1,
                                                          chunk_size=4)
    unfused = fastadapt.alpha_weighted_cross_entropy(F.linear(sh, w, b), sy, F.linear(th, w, b), ty, 0.37,
                                                     label_smoothing=0.1)
    grads_fused = torch.autograd.grad(fused, (sh, th, w, b))
    grads_unfused = torch.autograd.grad(unfused, (sh, th, w, b))
    assert_close(fused, unfused, torch.float32, "loss")
    for g, r in zip(grads_fused, grads_unfused):
        assert_close(g, r, torch.float32, "gradient")


def test_module_wraps_a_linear_head_without_copying(backend):
    head = nn.Linear(D, 33)
    loss_fn = fastadapt.AlphaWeightedLinearCrossEntropy(head, alpha=0.25, chunk_size=4, label_smoothing=0.05)
    assert list(loss_fn.parameters()) == []  # the model owns the head's parameters, not the loss
    sh, sy = make_side(6, 33)
    th, ty = make_side(5, 33)
    loss = loss_fn(sh, sy, th, ty)
    loss.backward()
    ref = linear_ce_oracle(sh.detach().double(), sy, th.detach().double(), ty, head.weight.detach().double(),
                           head.bias.detach().double(), 0.25, label_smoothing=0.05)
    assert_close(loss, ref, torch.float32, "loss")
    assert head.weight.grad is not None and head.bias.grad is not None
    with torch.no_grad():
        head.weight.mul_(2)  # the module reads the head at each call: an update is seen
    assert not torch.allclose(loss_fn(sh, sy, th, ty), loss)


def test_default_chunk_size():
    """16 MB of chunk buffers (one float32 buffer; bf16 adds its own logits; softcap a second buffer), or
    1/32 of the larger side's float32 logits when that is more."""
    assert lce.default_chunk_size(32000) == 131
    assert lce.default_chunk_size(128256) == 32
    assert lce.default_chunk_size(128256, dtype=torch.bfloat16) == 21
    assert lce.default_chunk_size(32000, softcap=30.0) == 65
    assert lce.default_chunk_size(128256, rows=8192) == 8192 * 128256 * 4 // 32 // (4 * 128256)  # 256 rows
    assert lce.default_chunk_size(1) == lce._CHUNK_BYTES // 4
    assert lce.default_chunk_size(10 ** 9) == 1


def _args(**over):
    sh, sy = make_side(3, 5)
    th, ty = make_side(2, 5)
    w, b = make_head(5)
    a = dict(source_hidden=sh, source_labels=sy, target_hidden=th, target_labels=ty, weight=w, bias=b)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, match", [
    (dict(source_hidden=torch.randn(3, D + 1)), ValueError, r"source_hidden has shape \(3, 8\).*\(\.\.\., 7\)"),
    (dict(target_labels=torch.zeros(3, dtype=torch.long)), ValueError, r"target_labels has shape \(3,\)"),
    (dict(source_hidden=torch.zeros(3, D, dtype=torch.long)), TypeError, "source_hidden must be a floating tensor"),
    (dict(source_labels=torch.zeros(3)), TypeError, "source_labels must hold class indices"),
    (dict(weight=torch.randn(5, D, dtype=torch.float64)), TypeError, "weight has dtype torch.float64"),
    (dict(weight=torch.randn(5 * D)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(4)), ValueError, r"bias must have shape \(5,\)"),
    (dict(weight=torch.randn(5, D, device="meta")), ValueError, "weight is on meta"),
    (dict(source_labels=torch.tensor([0, 5, 1])), IndexError, r"source_labels contains the label 5 \(at flat pos"),
    (dict(target_labels=torch.tensor([-1, 0])), IndexError, "target_labels contains the label -1"),
])
def test_errors_named_before_compute(backend, over, exc, match, monkeypatch):
    def fail(*a):
        pytest.fail("a kernel ran before the arguments were checked")

    monkeypatch.setattr(lce, "_side_pass", fail)
    if lce._LINEAR_CE is not None:
        monkeypatch.setattr(lce, "_LINEAR_CE", fail)
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_linear_cross_entropy(**_args(**over))


@pytest.mark.parametrize("kw, exc, match", [
    (dict(z_loss=-1.0), ValueError, "z_loss must be a finite float >= 0"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a finite float > 0"),
    (dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    (dict(chunk_size=2.0), TypeError, "chunk_size must be None or an int"),
    (dict(reduction="avg"), ValueError, "reduction must be one of"),
    (dict(alpha=1.5), ValueError, "alpha must lie in"),
    (dict(label_smoothing=2.0), ValueError, "label_smoothing must lie in"),
])
def test_option_errors(backend, kw, exc, match):
    with pytest.raises(exc, match=match):
        fastadapt.alpha_weighted_linear_cross_entropy(**_args(), **kw)


def test_zero_weight_side_is_not_read(backend):
    """alpha = 1: the source side's labels are neither range-checked nor read, and NaN hiddens cannot reach the loss."""
    sh, sy = make_side(4, 5)
    with torch.no_grad():
        sh.fill_(float("nan"))
    sy[0] = 99
    th, ty = make_side(3, 5)
    w, b = make_head(5)
    out, ref, pairs = run_both(sh, sy, th, ty, w, b, 1.0, "mean", chunk_size=2)
    check(out, ref, pairs, torch.float32, "mean")
    assert torch.all(sh.grad == 0)


def test_combinations_of_required_grads(backend):
    """Any subset of (source_hidden, target_hidden, weight) requiring grad gets exactly its gradients."""
    for req in itertools.product([False, True], repeat=3):
        if not any(req):
            continue
        sh, sy = make_side(5, 9)
        th, ty = make_side(4, 9)
        w, _ = make_head(9, bias=False)
        for t, r in zip((sh, th, w), req):
            t.requires_grad_(r)
        out, ref, pairs = run_both(sh, sy, th, ty, w, None, 0.6, "sum", chunk_size=2)
        check(out, ref, pairs, torch.float32, "sum")
        assert [t.grad is not None for t in (sh, th, w)] == list(req)


compiled_only = pytest.mark.skipif(not fastadapt.has_ops() or lce._LINEAR_CE is None,
                                   reason="compiled extension (with the linear cross-entropy op) not loaded")


def _op_args(requires_grad, bias=True, reduction=1, softcap=None):
    sh, sy = make_side(9, 33, ignore_frac=0.2)
    th, ty = make_side(6, 33)
    w, b = make_head(33, bias=bias)
    for t in (sh, th, w, b):
        if t is not None:
            t.requires_grad_(requires_grad)
    return (sh, sy, th, ty, w, b, torch.tensor(0.37, dtype=torch.float64), -100, 0.1, reduction, 1e-3, softcap, 4)


@compiled_only
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("bias, reduction, softcap", [(True, 1, None), (False, 2, 3.0), (True, 0, 2.0)])
def test_opcheck(requires_grad, bias, reduction, softcap):
    args = _op_args(requires_grad, bias, reduction, softcap)
    torch.library.opcheck(torch.ops.fastadapt.alpha_weighted_linear_cross_entropy.default, args)
    internal = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
    want = [True, True, True, bias]
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_linear_cross_entropy_forward.default,
                          (*internal, want))
    sh, sy, th, ty, w, b, a, ignore, eps, _, z, cap, chunk = internal
    grads = (torch.randn(sh.shape[0], dtype=torch.float64), None)
    torch.library.opcheck(torch.ops.fastadapt._alpha_weighted_linear_cross_entropy_backward.default,
                          (*grads, sh, sy, th, ty, w, b, a, ignore, eps, z, cap, chunk, want))


@compiled_only
def test_compiled_op_serves_every_reduction():
    """Every reduction on the CPU goes through the C++ op and its autograd node (none's backward is the
    backward op, a second chunked pass)."""
    with use_backend("compiled"):
        sh, sy = make_side(5, 9)
        th, ty = make_side(4, 9)
        w, b = make_head(9)
        for reduction in ("mean", "sum"):
            out = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, reduction=reduction)
            assert "AlphaWeightedLinearCrossEntropy" in out.grad_fn.name()
        out = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, reduction="none")
        assert "AlphaWeightedLinearCrossEntropy" in out[0].grad_fn.next_functions[0][0].name() \
            or "AlphaWeightedLinearCrossEntropy" in out[0].grad_fn.name()


def _gemm_rows(fn):
    """The row counts (M) of the aten GEMMs that produce logits (N = V columns) while fn runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    rows = []
    for e in prof.events():
        mats = [list(s) for s in e.input_shapes or [] if len(s) == 2]
        # (M, D) @ (D, V): addmm's bias is 1-dim, so the two factors come first (then an out= tensor)
        if e.name in ("aten::mm", "aten::addmm") and len(mats) >= 2 and mats[0][1] == D and mats[1] == [D, 33]:
            rows.append(mats[0][0])
    return rows


@compiled_only
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_ignored_rows_cost_no_gemm_work(reduction):
    """On the CPU the non-ignored rows of a side are gathered before the GEMMs: with 12 of 20 rows ignored,
    the logits GEMMs see 8 rows in total (chunks of 4); the values still match the composition."""
    sh, sy = make_side(20, 33)
    sy[::5] = 1  # keep a known pattern: 8 rows kept
    keep = torch.zeros(20, dtype=torch.bool)
    keep[torch.tensor([0, 3, 5, 9, 10, 14, 15, 19])] = True
    sy[~keep] = -100
    th, ty = make_side(0, 33)
    w, b = make_head(33)
    with use_backend("compiled"):
        rows = _gemm_rows(lambda: fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.0,
                                                                                reduction=reduction, chunk_size=4))
        assert rows == [4, 4]
        out, ref, pairs = run_both(sh, sy, th, ty, w, b, 0.0, reduction, chunk_size=4)
    check(out, ref, pairs, torch.float32, reduction)
    assert torch.all(sh.grad[~keep] == 0) and torch.all(sh.grad[keep].abs().sum(1) > 0)


@compiled_only
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_torch_compile_fullgraph(compile_backend, reduction):
    """No graph break (PyTorch's own chunked F.linear_cross_entropy falls back to eager under compile), and
    the same values and gradients as eager; a tensor alpha changes without a recompile."""
    sh, sy = make_side(20, 33, ignore_frac=0.2)
    th, ty = make_side(15, 33)
    w, b = make_head(33)
    scales = torch.linspace(0.5, 2.0, 20), torch.linspace(-1.0, 1.0, 15)

    def step(a, c, w, b, alpha):
        out = fastadapt.alpha_weighted_linear_cross_entropy(a, sy, c, ty, w, b, alpha, label_smoothing=0.1,
                                                            z_loss=1e-3, softcap=5.0, chunk_size=8,
                                                            reduction=reduction)
        if reduction == "none":
            return (out[0] * scales[0]).sum() + (out[1] * scales[1]).sum()
        return out * 2.0

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    with use_backend("compiled"):
        for alpha in (0.3, 0.9):
            a_t = torch.tensor(alpha, dtype=torch.float64)
            results = []
            for fn in (compiled, step):
                for t in (sh, th, w, b):
                    t.grad = None
                out = fn(sh, th, w, b, a_t)
                out.backward()
                results.append([out.detach()] + [t.grad.clone() for t in (sh, th, w, b)])
            for got, ref in zip(*results):
                assert_close(got, ref, torch.float32, f"compiled against eager, alpha={alpha}")


@compiled_only
def test_deterministic_across_thread_counts():
    """For a given chunk size the compiled op's loss and gradients are bit-identical at 1 and 2 threads."""
    sh, sy = make_side(70, 257, ignore_frac=0.1)
    th, ty = make_side(50, 257)
    w, b = make_head(257)
    threads = torch.get_num_threads()
    results = []
    try:
        with use_backend("compiled"):
            for n in (1, 2, 1):
                torch.set_num_threads(n)
                for t in (sh, th, w, b):
                    t.grad = None
                loss = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.4, z_loss=1e-3,
                                                                     chunk_size=16)
                loss.backward()
                results.append([loss.detach()] + [t.grad.clone() for t in (sh, th, w, b)])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, c) for a, c in zip(results[0], other))


@compiled_only
@pytest.mark.slow
@pytest.mark.large
@pytest.mark.parametrize("device", DEVICES)
def test_beyond_int32_logits(device):
    """2**31 + logits elements (V = 131072 classes x 16400 rows, D = 4): the logits never exist, and the
    loss and every gradient match a float64 composition evaluated in row blocks."""
    import psutil

    if psutil.virtual_memory().available < 6 * 2**30:
        pytest.skip("needs about 6 GiB of free memory")
    v, n, d = 131072, 16400, 4
    assert n * v > 2**31
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    y = y.to(device)
    w = (torch.randn(v, d, generator=g) * 0.5).to(device).requires_grad_()
    empty_h, empty_y = torch.zeros(0, d, device=device), torch.zeros(0, dtype=torch.long, device=device)
    with use_backend("compiled"):
        loss = fastadapt.alpha_weighted_linear_cross_entropy(empty_h, empty_y, h, y, w, None, 1.0, z_loss=1e-4)
        loss.backward()
    # float64 reference, 512 rows at a time: sum of row losses, and the gradients of their mean
    h64, w64 = h.detach().double(), w.detach().double().requires_grad_()
    kept = int((y != -100).sum())
    total = torch.zeros((), dtype=torch.float64, device=device)
    gh = torch.empty_like(h64)
    for r0 in range(0, n, 512):
        hb = h64[r0:r0 + 512].clone().requires_grad_()
        x = hb @ w64.t()
        yb = y[r0:r0 + 512]
        lse = torch.logsumexp(x, -1)
        part = (F.cross_entropy(x, yb, reduction="sum")
                + 1e-4 * torch.where(yb != -100, lse * lse, torch.zeros_like(lse)).sum()) / kept
        part.backward()
        gh[r0:r0 + 512] = hb.grad
        total += part.detach()
    assert_close(loss, total, torch.float32, "loss")
    assert_close(h.grad, gh, torch.float32, "hidden gradient")
    assert_close(w.grad, w64.grad, torch.float32, "weight gradient")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_autocast_bfloat16(backend, reduction):
    """Under bf16 autocast with float32 hidden and head (a model's usual set-up): F.linear's policy (bf16
    GEMMs) and F.cross_entropy's (a float32 loss), so the result equals the eager composition under the
    same autocast, in float32, and the float32 leaves get float32 gradients."""
    sh, sy = make_side(13, 33, ignore_frac=0.2)
    th, ty = make_side(9, 33)
    w, b = make_head(33)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, b, 0.37, reduction=reduction,
                                                            chunk_size=4)
        ref_s = F.cross_entropy(F.linear(sh, w, b), sy, reduction=reduction) * 0.63
        ref_t = F.cross_entropy(F.linear(th, w, b), ty, reduction=reduction) * 0.37
    outs, refs = (out, (ref_s, ref_t)) if reduction == "none" else ((out,), (ref_s + ref_t,))
    for o, r in zip(outs, refs):
        assert o.dtype == torch.float32 and r.dtype == torch.float32
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
    leaves = (sh, th, w, b)
    total = sum(o.sum() for o in outs)
    total_ref = sum(r.sum() for r in refs)
    for g, gr in zip(torch.autograd.grad(total, leaves), torch.autograd.grad(total_ref, leaves)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, gr, rtol=2e-2, atol=2e-3)
