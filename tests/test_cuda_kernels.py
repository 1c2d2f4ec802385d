"""CUDA-specific behaviour of the fastadapt kernels: conventions that only exist on the device (no host
sync, NaN for out-of-range labels instead of a device assert, device-resident alpha), determinism,
int64 offsets beyond 2**31 elements, and the kernel paths (row widths, misaligned rows, dtypes).
Broad CUDA-vs-reference parity lives in the per-op test files.

Markers that scripts/gpu_check.sh selects by (registered in pyproject.toml):
  large      the cases past 2**31 elements (GBs of GPU memory, seconds each): run after the rest
  memcheck   about 25 fast cases that together reach every kernel variant: run under compute-sanitizer
  racecheck  one case per kernel that uses shared memory: run under racecheck
Dtype parameters carry ids=str ("torch.bfloat16"), so `-k bfloat16` selects by dtype.

The internal ops are spelled in ce_fwd / ce_bwd / mse_fwd / mse_bwd only; the tests that need no
internal op go through the public Python API.
"""
import itertools
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import fastadapt

pytestmark = pytest.mark.cuda

ops = torch.ops.fastadapt
DEV = "cuda"
GiB = 2**30
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _need_cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not fastadapt.has_cuda_ops():
        pytest.skip("fastadapt was built without CUDA kernels")
    yield
    torch.cuda.set_sync_debug_mode(0)


def _need_gpu_memory(gib):
    free, _ = torch.cuda.mem_get_info()
    if free < gib * GiB:
        pytest.skip(f"needs about {gib} GiB of free GPU memory, {free / GiB:.1f} free")


def _cases(combos, memcheck=(), racecheck=()):
    """pytest.param for every combination; those listed in `memcheck` / `racecheck` carry that marker."""
    out = []
    for c in combos:
        marks = [m for m, chosen in ((pytest.mark.memcheck, memcheck), (pytest.mark.racecheck, racecheck))
                 if c in chosen]
        out.append(pytest.param(*c, marks=marks))
    return out


# ---- the internal ops (the only place that spells their schemas) -----------------------------------

class CeFwd(NamedTuple):
    """_alpha_weighted_cross_entropy_forward's outputs. source / target are the weighted terms: 0-dim
    for reduction mean/sum (the loss is their sum), per row for none."""
    source: torch.Tensor
    target: torch.Tensor
    saved: list  # [source_lse (float64, rows), target_lse (float64, rows), divisors of mean (float64, 2)]
    source_grad: torch.Tensor  # 0 elements unless the kernel wrote it (never on CUDA)
    target_grad: torch.Tensor

    @property
    def loss(self):
        return self.source + self.target

    @property
    def lse(self):
        return self.saved[0], self.saved[1]

    @property
    def counts(self):  # without class weights the divisors of mean are the counts of non-ignored rows
        return self.saved[2]


class MseFwd(NamedTuple):
    source: torch.Tensor
    target: torch.Tensor
    saved: list
    source_grad: torch.Tensor  # the unit gradient d/d pred when the kernel wrote it, else 0 elements
    target_grad: torch.Tensor

    @property
    def loss(self):
        return self.source + self.target


def ce_fwd(sl, sy, tl, ty, alpha, reduction=1, ignore=-100, eps=0.0, write=(False, False)):
    return CeFwd(*ops._alpha_weighted_cross_entropy_forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, None, None,
                                                             list(write)))


def ce_bwd(g_s, g_t, sl, sy, tl, ty, alpha, fwd, reduction=1, ignore=-100, eps=0.0, mask=(True, True)):
    """Each side's gradient is scaled by its own grad_output (g_s, g_t: scalars for mean/sum, per row for
    none); a side masked out comes back with 0 elements, one whose grad_output is None with no gradient
    (see assert_no_gradient)."""
    return ops._alpha_weighted_cross_entropy_backward(g_s, g_t, sl, sy, tl, ty, alpha, fwd.saved, ignore, eps,
                                                      reduction, None, None, list(mask))


def mse_fwd(sp, st, tp, tt, alpha, reduction=1, write=(False, False)):
    return MseFwd(*ops._alpha_weighted_mse_forward(sp, st, tp, tt, alpha, reduction, list(write)))


def mse_bwd(g_s, g_t, sp, st, tp, tt, alpha, fwd=None, reduction=1, mask=(True, True)):
    """d/d pred of each side (d/d target is its negation), scaled by that side's grad_output."""
    saved = fwd.saved if fwd is not None else []
    return ops._alpha_weighted_mse_backward(g_s, g_t, sp, st, tp, tt, alpha, saved, reduction, list(mask))


# ---- float64 references ---------------------------------------------------------------------------

def ref_ce_rows(logits, labels, ignore=-100, eps=0.0):
    """Unweighted per-row losses, lse and unit-scale gradient rows, in float64 (ignored rows: 0)."""
    x = logits.double().reshape(-1, logits.shape[-1])
    y = labels.reshape(-1).long()
    C = x.shape[-1]
    valid = y != ignore
    yc = torch.where(valid, y, torch.zeros_like(y)).clamp(0, C - 1)
    lse = torch.logsumexp(x, -1)
    xy = x.gather(1, yc[:, None]).squeeze(1)
    loss = lse - (1 - eps) * xy
    if eps:
        loss = loss - eps / C * x.sum(-1)
    grad = torch.softmax(x, -1) - eps / C
    grad[torch.arange(len(yc), device=x.device), yc] -= 1 - eps
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    return loss, lse, grad


def tol(dtype):
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-9),
        torch.float32: dict(atol=2e-5, rtol=2e-4),
        torch.bfloat16: dict(atol=4e-3, rtol=2e-2),
        torch.float16: dict(atol=1e-3, rtol=4e-3),
    }[dtype]


def assert_close_scaled(got, want, dtype):
    """Within dtype tolerance, atol taken relative to the largest reference value (gradients of a mean
    over many rows and classes are far below the absolute tolerances)."""
    t = tol(dtype)
    scale = max(float(want.abs().max()), 1e-30) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, atol=t["atol"] * scale, rtol=t["rtol"])


def assert_no_gradient(g, like):
    """A side that gets no gradient (no grad_output): 0 elements (the schema's convention for a side
    without a grad_output) or, where an implementation returns one, zeros of the input's shape."""
    assert g.numel() == 0 or (g.shape == like.shape and torch.count_nonzero(g).item() == 0), (g.shape, like.shape)


def assert_forward_grad(got, unit_grad):
    """A gradient the forward wrote on request is the backward's for a unit grad_output (bitwise on CUDA,
    where the forward runs the backward kernel); 0 elements where the kernel writes none."""
    assert got.numel() in (0, unit_grad.numel())
    if got.numel() and got.is_cuda:
        assert torch.equal(got, unit_grad)
    elif got.numel():
        torch.testing.assert_close(got, unit_grad, **tol(got.dtype))


def make_ce(n_s, n_t, C, dtype=torch.float32, ignore_frac=0.1, device=DEV):
    sl = (torch.randn(n_s, C, device=device) * 3).to(dtype)
    tl = (torch.randn(n_t, C, device=device) * 3).to(dtype)
    sy = torch.randint(0, C, (n_s,), device=device)
    ty = torch.randint(0, C, (n_t,), device=device)
    sy[torch.rand(n_s, device=device) < ignore_frac] = -100
    ty[torch.rand(n_t, device=device) < ignore_frac] = -100
    return sl, sy, tl, ty


# ---- out-of-range labels --------------------------------------------------------------------------

@pytest.mark.memcheck
def test_out_of_range_label_gives_nan_not_a_device_assert():
    sl, sy, tl, ty = make_ce(16, 8, 10, ignore_frac=0.0)
    sy[3] = 10  # == C: out of range
    sy[5] = -7  # negative, not ignore_index
    alpha = torch.tensor(0.25)
    loss = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha)
    assert torch.isnan(loss).item()
    sl.requires_grad_(True)
    none_s, none_t = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, reduction="none")
    bad = torch.zeros(16, dtype=torch.bool, device=DEV)
    bad[3] = bad[5] = True
    assert torch.isnan(none_s[bad]).all()
    assert torch.isfinite(none_s[~bad]).all() and torch.isfinite(none_t).all()
    ref, _, ref_g = ref_ce_rows(sl.detach(), sy)
    torch.testing.assert_close(none_s[~bad].detach().double(), 0.75 * ref[~bad], **tol(torch.float32))
    # the gradient rows of the bad labels are NaN, the others are correct
    (gs,) = torch.autograd.grad(none_s, sl, torch.ones(16, device=DEV))
    assert torch.isnan(gs[bad]).all()
    torch.testing.assert_close(gs[~bad].double(), 0.75 * ref_g[~bad], **tol(torch.float32))
    # the CUDA context survived
    torch.cuda.synchronize()
    assert (torch.ones(4, device=DEV) * 2).sum().item() == 8.0


# ---- no host synchronisation ----------------------------------------------------------------------

def _grad_outputs(fwd, reduction):
    if reduction == 0:
        return torch.ones_like(fwd.source), torch.ones_like(fwd.target)
    return torch.ones((), device=DEV), torch.ones((), device=DEV)


def _ce_step(alpha, reduction):
    sl, sy, tl, ty = _CE_INPUTS
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=reduction)
    return ce_bwd(*_grad_outputs(fwd, reduction), sl, sy, tl, ty, alpha, fwd, reduction=reduction)


def _mse_step(alpha, reduction):
    sp, st, tp, tt = _MSE_INPUTS
    fwd = mse_fwd(sp, st, tp, tt, alpha, reduction, write=(True, False))
    return mse_bwd(*_grad_outputs(fwd, reduction), sp, st, tp, tt, alpha, fwd, reduction)


def _lr_step(bias):
    x, w, b = _LR_INPUTS
    y = ops.linear_relu(x, w, b if bias else None)
    return ops._linear_relu_backward(torch.ones_like(y), x, w, y, [True, True, bias])


_CE_INPUTS = _MSE_INPUTS = _LR_INPUTS = None


def _init_inputs():
    global _CE_INPUTS, _MSE_INPUTS, _LR_INPUTS
    _CE_INPUTS = make_ce(256, 128, 1000)
    _MSE_INPUTS = (torch.randn(1000, 7, device=DEV), torch.randn(1000, 7, device=DEV),
                   torch.randn(300, 7, device=DEV), torch.randn(300, 7, device=DEV))
    _LR_INPUTS = (torch.randn(64, 32, device=DEV), torch.randn(48, 32, device=DEV), torch.randn(48, device=DEV))


@pytest.mark.parametrize("alpha_device", ["cpu", "cuda"])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_no_host_sync(alpha_device, reduction):
    _init_inputs()
    alpha = torch.tensor(0.3, device=alpha_device)
    for _ in range(2):  # warm-up: lazy initialisation (cuBLAS handles, ...) may sync once
        _ce_step(alpha, reduction)
        _mse_step(alpha, reduction)
        _lr_step(True)
        _lr_step(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _ce_step(alpha, reduction)
        _mse_step(alpha, reduction)
        _lr_step(True)
        _lr_step(False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_no_host_sync_through_autograd():
    sl, sy, tl, ty = make_ce(64, 64, 500)
    sl.requires_grad_(True)
    tl.requires_grad_(True)
    alpha = torch.tensor(0.4, device=DEV)
    for _ in range(2):
        fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, label_smoothing=0.1).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, label_smoothing=0.1).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- determinism ----------------------------------------------------------------------------------

def _bitwise_same(runs):
    first = runs[0]
    for r in runs[1:]:
        assert len(r) == len(first)
        for a, b in zip(first, r):
            assert torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                               b.reshape(-1).view(torch.uint8) if b.numel() else b)


def test_deterministic_cross_entropy():
    sl, sy, tl, ty = make_ce(4096, 4096, 32000, dtype=torch.bfloat16)
    alpha = torch.tensor(0.3, device=DEV)
    one = torch.ones((), device=DEV, dtype=torch.bfloat16)
    runs = []
    for _ in range(10):
        fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=1, eps=0.1)
        gs, gt = ce_bwd(one, one, sl, sy, tl, ty, alpha, fwd, reduction=1, eps=0.1)
        runs.append((fwd.source, fwd.target, *fwd.saved, gs, gt))
    _bitwise_same(runs)


def test_deterministic_mse():
    sp, st = torch.randn(1 << 20, device=DEV), torch.randn(1 << 20, device=DEV)
    tp, tt = torch.randn(1 << 20, device=DEV), torch.randn(1 << 20, device=DEV)
    alpha = torch.tensor(0.6, device=DEV)
    one = torch.ones((), device=DEV)
    runs = []
    for _ in range(10):
        fwd = mse_fwd(sp, st, tp, tt, alpha, 1)
        gs, gt = mse_bwd(one, one, sp, st, tp, tt, alpha, fwd, 1)
        runs.append((fwd.source, fwd.target, gs, gt))
    _bitwise_same(runs)


def test_deterministic_linear_relu():
    x = torch.randn(4096, 1024, device=DEV)
    w = torch.randn(1024, 1024, device=DEV) / 32
    b = torch.randn(1024, device=DEV)
    runs = []
    for _ in range(10):
        y = ops.linear_relu(x, w, b)
        runs.append((y,) + tuple(ops._linear_relu_backward(torch.ones_like(y), x, w, y, [True, True, True])))
    _bitwise_same(runs)


# ---- device-resident alpha ------------------------------------------------------------------------

def test_device_alpha_changes_result_without_recompile():
    sl, sy, tl, ty = make_ce(128, 64, 300)
    alpha = torch.tensor(0.2, device=DEV)
    a = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha).clone()
    alpha.fill_(0.9)  # in place: same tensor, same kernel launch parameters
    b = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha)
    assert not torch.equal(a, b)
    ls, _, _ = ref_ce_rows(sl, sy)
    lt, _, _ = ref_ce_rows(tl, ty)
    for value, got in ((0.2, a), (0.9, b)):
        want = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, torch.tensor(value))
        torch.testing.assert_close(got, want)
        ref = value * lt.sum() / (ty != -100).sum() + (1 - value) * ls.sum() / (sy != -100).sum()
        torch.testing.assert_close(got.double(), ref, **tol(torch.float32))
    # MSE too
    sp, st, tp, tt = (torch.randn(50, 3, device=DEV) for _ in range(4))
    alpha.fill_(0.25)
    m1 = fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha).clone()
    alpha.fill_(0.75)
    m2 = fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha)
    for value, got in ((0.25, m1), (0.75, m2)):
        ref = value * ((tp - tt) ** 2).mean() + (1 - value) * ((sp - st) ** 2).mean()
        torch.testing.assert_close(got, ref)


@pytest.mark.memcheck
def test_device_alpha_out_of_range_gives_nan():
    sl, sy, tl, ty = make_ce(8, 8, 5)
    for bad in (1.5, -0.1, float("nan")):
        alpha = torch.tensor(bad, device=DEV)
        assert torch.isnan(fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha)).item()
        sp = torch.randn(4, device=DEV)
        assert torch.isnan(fastadapt.alpha_weighted_mse(sp, sp + 1, sp, sp, alpha)).item()


@pytest.mark.memcheck
def test_zero_weight_side_is_not_evaluated_with_device_alpha():
    sl, sy, tl, ty = make_ce(8, 8, 5)
    sl[2, 1] = float("nan")  # a NaN in the source must not reach the loss when alpha == 1
    alpha = torch.tensor(1.0, device=DEV)
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=1)
    assert fwd.source.item() == 0.0 and torch.isfinite(fwd.loss).item()
    one = torch.ones((), device=DEV)
    gs, gt = ce_bwd(one, one, sl, sy, tl, ty, alpha, fwd)
    assert gs.shape == sl.shape and torch.count_nonzero(gs).item() == 0 and torch.isfinite(gt).all()
    assert fwd.counts[1].item() == int((ty != -100).sum())


# ---- kernel paths: row widths, alignment, dtypes --------------------------------------------------

f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# (dtype, C, misalign). Row widths in 16-byte vectors pick the kernel variant: <= 8 (4 threads a row),
# <= 512 (a warp), more (a 512-thread block); C = 4099 also makes rows alternate their alignment.
CE_PATH_CASES = _cases(
    itertools.product(DTYPES, [3, 33, 1000, 4099, 50257], [False, True]),
    memcheck={(f32, 3, True), (bf16, 33, True), (f64, 33, False), (f32, 1000, True), (f16, 1000, False),
              (bf16, 4099, True), (f32, 4099, False), (f64, 4099, True), (f16, 50257, True)},
    racecheck={(f32, 4099, True)},  # the block-wide row reduction and the finalize block
)


@pytest.mark.parametrize("dtype,C,misalign", CE_PATH_CASES, ids=str)
def test_cross_entropy_paths(dtype, C, misalign):
    n = 37
    base = (torch.randn(n, C + 1, device=DEV) * 4).to(dtype)
    logits = base[:, 1:] if misalign else base[:, :C].contiguous()  # misaligned rows and row stride C+1
    labels = torch.randint(0, C, (n,), device=DEV)
    labels[::5] = -100
    eps = 0.1
    alpha = torch.tensor(0.5)
    tl, ty = logits[:5], labels[:5]
    valid, valid_t = labels != -100, ty != -100
    ref_loss, ref_lse, ref_g = ref_ce_rows(logits, labels, eps=eps)
    ref_loss_t, _, ref_g_t = ref_ce_rows(tl, ty, eps=eps)

    fwd = ce_fwd(logits, labels, tl, ty, alpha, reduction=0, eps=eps)
    torch.testing.assert_close(fwd.source.double(), 0.5 * ref_loss, **tol(dtype))
    torch.testing.assert_close(fwd.target.double(), 0.5 * ref_loss_t, **tol(dtype))
    lse_tol = tol(dtype if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(fwd.lse[0][valid].double(), ref_lse[valid], **lse_tol)
    g = torch.randn(n, device=DEV, dtype=dtype)
    gs, gt = ce_bwd(g, None, logits, labels, tl, ty, alpha, fwd, reduction=0, eps=eps, mask=(True, True))
    assert gs.shape == logits.shape and gs.dtype == dtype
    assert_no_gradient(gt, tl)  # no grad_output for that side
    torch.testing.assert_close(gs.double(), 0.5 * g.double()[:, None] * ref_g, **tol(dtype))

    # reduction mean: per-side terms, each side's gradient scaled by its own grad_output
    fwd = ce_fwd(logits, labels, tl, ty, alpha, reduction=1, eps=eps, write=(True, True))
    assert fwd.source.dim() == 0 and fwd.target.dim() == 0
    n_s, n_t = int(valid.sum()), int(valid_t.sum())
    torch.testing.assert_close(fwd.source.double(), 0.5 * ref_loss.sum() / n_s, **tol(dtype))
    torch.testing.assert_close(fwd.target.double(), 0.5 * ref_loss_t.sum() / n_t, **tol(dtype))
    assert fwd.counts.tolist() == [n_s, n_t]
    one = torch.ones((), device=DEV, dtype=dtype)
    unit_s, unit_t = ce_bwd(one, one, logits, labels, tl, ty, alpha, fwd, reduction=1, eps=eps)
    assert_forward_grad(fwd.source_grad, unit_s)
    assert_forward_grad(fwd.target_grad, unit_t)
    g_s = torch.tensor(0.75, device=DEV, dtype=dtype)
    g_t = torch.tensor(-1.25, device=DEV, dtype=dtype)
    gs, gt = ce_bwd(g_s, g_t, logits, labels, tl, ty, alpha, fwd, reduction=1, eps=eps)
    assert gs.shape == logits.shape and gt.shape == tl.shape
    assert_close_scaled(gs, 0.5 * g_s.double() / n_s * ref_g, dtype)
    assert_close_scaled(gt, 0.5 * g_t.double() / n_t * ref_g_t, dtype)
    gs_none, gt_only = ce_bwd(g_s, g_t, logits, labels, tl, ty, alpha, fwd, reduction=1, eps=eps, mask=(False, True))
    assert gs_none.numel() == 0 and torch.equal(gt_only, gt)


MSE_PATH_CASES = _cases(
    itertools.product(DTYPES, [1, 7, 4096 + 3], [0, 1, 2]),
    memcheck={(f32, 4099, 1), (bf16, 4099, 0), (f16, 7, 2), (f64, 4099, 2), (f32, 1, 0), (bf16, 7, 1)},
    racecheck={(f32, 4099, 1)},  # per-block partial sums and the finalize block
)


@pytest.mark.parametrize("dtype,n,reduction", MSE_PATH_CASES, ids=str)
def test_mse_paths(dtype, n, reduction):
    sp = torch.randn(n + 1, device=DEV).to(dtype)[1:]  # misaligned
    st = torch.randn(n, device=DEV).to(dtype)
    tp = torch.randn(3, n, device=DEV).to(dtype)
    tt = torch.randn(3, n, device=DEV).to(dtype)
    a = 0.3
    alpha = torch.tensor(a, device=DEV, dtype=torch.float64)  # a float32 0.3 is off by 1e-8: over fp64's tolerance
    out = mse_fwd(sp, st, tp, tt, alpha, reduction, write=(True, True))
    ds, dt = sp.double() - st.double(), tp.double() - tt.double()
    t = tol(dtype)
    if reduction == 0:
        torch.testing.assert_close(out.source.double(), (1 - a) * ds ** 2, **t)
        torch.testing.assert_close(out.target.double(), a * dt ** 2, **t)
    else:
        f = (lambda v: v.mean()) if reduction == 1 else (lambda v: v.sum())
        assert out.source.dim() == 0 and out.target.dim() == 0
        torch.testing.assert_close(out.source.double(), (1 - a) * f(ds ** 2), **t)
        torch.testing.assert_close(out.target.double(), a * f(dt ** 2), **t)
    ns, nt = (ds.numel(), dt.numel()) if reduction == 1 else (1, 1)
    # a gradient written by the forward on request (where the kernel writes one) is the unit one
    for got, want in ((out.source_grad, 2 * (1 - a) * ds / ns), (out.target_grad, 2 * a * dt / nt)):
        if got.numel():
            torch.testing.assert_close(got.double(), want, **t)
    if reduction == 0:
        g0, g1 = torch.randn(n, device=DEV).to(dtype), torch.randn(3, n, device=DEV).to(dtype)
    else:  # each side's own scalar grad_output
        g0, g1 = torch.tensor(0.75, device=DEV, dtype=dtype), torch.tensor(-1.25, device=DEV, dtype=dtype)
    gs, gt = mse_bwd(g0, g1, sp, st, tp, tt, alpha, out, reduction)
    assert gs.shape == sp.shape and gt.shape == tp.shape
    torch.testing.assert_close(gs.double(), g0.double() * 2 * (1 - a) * ds / ns, **t)
    torch.testing.assert_close(gt.double(), g1.double() * 2 * a * dt / nt, **t)
    if reduction == 0:
        # an expanded grad_output (stride 0) is read as one value; no grad_output: 0 elements
        ge = torch.tensor(0.5, device=DEV, dtype=dtype).expand(3, n)
        gs2, gt2 = mse_bwd(None, ge, sp, st, tp, tt, alpha, out, 0)
        assert_no_gradient(gs2, sp)
        torch.testing.assert_close(gt2.double(), 0.5 * 2 * a * dt, **t)


LINEAR_RELU_CASES = _cases(
    itertools.product(DTYPES, [True, False]),
    memcheck={(f32, True), (bf16, False), (f64, True)},
    racecheck={(f32, True)},  # the bias-gradient column sums
)


@pytest.mark.parametrize("dtype,bias", LINEAR_RELU_CASES, ids=str)
def test_linear_relu_paths(dtype, bias):
    x = torch.randn(5, 7, 33, device=DEV).to(dtype)
    w = (torch.randn(70, 33, device=DEV) / 6).to(dtype)
    b = torch.randn(70, device=DEV).to(dtype) if bias else None
    y = ops.linear_relu(x, w, b)
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = b.double().requires_grad_() if bias else None
    yd = torch.relu(torch.nn.functional.linear(xd, wd, bd))
    t = dict(atol=2e-2, rtol=2e-2) if dtype in (torch.bfloat16, torch.float16) else dict(atol=1e-4, rtol=1e-4)
    if dtype == torch.float64:
        t = dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(y.double(), yd, **t)
    g = torch.randn_like(y)
    gx, gw, gb = ops._linear_relu_backward(g, x, w, y, [True, True, bias])
    yd.backward(g.double())
    mask = y > 0  # the kernel's own mask (rounding may flip a near-zero pre-activation)
    gm = g.double() * mask
    torch.testing.assert_close(gx.double(), gm @ w.double(), **t)
    torch.testing.assert_close(gw.double(), gm.reshape(-1, 70).T @ x.double().reshape(-1, 33), **t)
    if bias:
        assert gb.shape == (70,)
        torch.testing.assert_close(gb.double(), gm.reshape(-1, 70).sum(0), **t)
    else:
        assert gb.numel() == 0
    # masked outputs are empty
    gx2, gw2, gb2 = ops._linear_relu_backward(g, x, w, y, [False, False, True])
    assert gx2.numel() == 0 and gw2.numel() == 0 and gb2.shape == (70,)


# ---- source and target of very different widths --------------------------------------------------

def check_different_class_counts(dtype, reduction, device=DEV, c_source=10, c_target=50257):
    """C_source = 10 and C_target = 50257 in one call: the narrowest kernel variant (a few threads per
    row) and the widest (a block per row) together, or, if one launch serves both sides, the 10-class
    rows on the block-per-row path. Value and gradients against F.cross_entropy in float64 (from the
    same rounded inputs)."""
    alpha, eps = 0.3, 0.1
    sl = (torch.randn(300, c_source, device=device) * 3).to(dtype).requires_grad_()
    tl = (torch.randn(64, c_target, device=device) * 3).to(dtype).requires_grad_()
    sy = torch.randint(0, c_source, (300,), device=device)
    ty = torch.randint(0, c_target, (64,), device=device)
    sy[::7] = -100
    ty[::9] = -100
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, label_smoothing=eps, reduction=reduction)
    sld, tld = sl.detach().double().requires_grad_(), tl.detach().double().requires_grad_()
    ref_s = (1 - alpha) * F.cross_entropy(sld, sy, label_smoothing=eps, reduction=reduction)
    ref_t = alpha * F.cross_entropy(tld, ty, label_smoothing=eps, reduction=reduction)
    if reduction == "none":
        s, t = out
        assert s.shape == (300,) and t.shape == (64,) and s.dtype == dtype
        assert_close_scaled(s.detach(), ref_s.detach(), dtype)
        assert_close_scaled(t.detach(), ref_t.detach(), dtype)
        ws = torch.randn(300, device=device).to(dtype)
        wt = torch.randn(64, device=device).to(dtype)
        torch.autograd.backward((s, t), (ws, wt))
        torch.autograd.backward((ref_s, ref_t), (ws.double(), wt.double()))
    else:
        assert out.shape == () and out.dtype == dtype
        ref = ref_s + ref_t
        torch.testing.assert_close(out.detach().double(), ref.detach(), **tol(dtype))
        out.backward()
        ref.backward()
    assert_close_scaled(sl.grad, sld.grad, dtype)
    assert_close_scaled(tl.grad, tld.grad, dtype)


@pytest.mark.memcheck
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cross_entropy_different_class_counts(dtype, reduction):
    check_different_class_counts(dtype, reduction)


# ---- more than 2**31 elements (marker `large`: run after everything else) ---------------------------

@pytest.mark.slow
@pytest.mark.large
def test_cross_entropy_beyond_int32_offsets():
    N, C = 70000, 32000  # 2.24e9 logits (4.5 GB in bf16): row offsets overflow int32
    assert N * C > 2**31
    _need_gpu_memory(14)
    tl = torch.randn(N, C, device=DEV, dtype=torch.bfloat16)
    ty = torch.randint(0, C, (N,), device=DEV)
    sl = torch.randn(4, C, device=DEV, dtype=torch.bfloat16)
    sy = torch.randint(0, C, (4,), device=DEV)
    alpha = torch.tensor(1.0)
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=0)
    rows = torch.tensor([0, 1, 67108, 67109, 68000, N - 2, N - 1], device=DEV)  # 2**31 / C is about 67108.9
    ref_loss, ref_lse, ref_g = ref_ce_rows(tl[rows], ty[rows])
    torch.testing.assert_close(fwd.target[rows].double(), ref_loss, **tol(torch.bfloat16))
    torch.testing.assert_close(fwd.lse[1][rows].double(), ref_lse, atol=1e-4, rtol=1e-5)
    _, gt = ce_bwd(None, torch.ones(N, device=DEV, dtype=torch.bfloat16), sl, sy, tl, ty, alpha, fwd, reduction=0,
                   mask=(False, True))
    torch.testing.assert_close(gt[rows].double(), ref_g, **tol(torch.bfloat16))
    del gt, fwd
    # the mean over all rows against a float64 reference computed in chunks
    fwd_mean = ce_fwd(sl, sy, tl, ty, alpha, reduction=1)
    total = 0.0
    for start in range(0, N, 4096):
        total += ref_ce_rows(tl[start:start + 4096], ty[start:start + 4096])[0].sum().item()
    assert abs(fwd_mean.loss.double().item() - total / N) < 2e-2 * abs(total / N) + 1e-2
    assert fwd_mean.counts[1].item() == N


def check_small_classes_beyond_int32(n_rows, boundary, window, device=DEV):
    """bf16 logits with C = 8: one 16-byte vector per row, the 4-threads-per-row kernel variant; rows at
    and past `boundary` (2**28 on the GPU) start beyond 2**31 elements. The rows in windows around row 0,
    the boundary and the end are checked (loss and gradient) against float64; the mean over every row
    against a float64 reference computed in chunks."""
    C, a = 8, 0.25
    g = torch.Generator(device=device).manual_seed(5)
    sl = torch.randn(n_rows, C, device=device, dtype=torch.bfloat16, generator=g).mul_(2).requires_grad_()
    sy = torch.randint(0, C, (n_rows,), device=device, generator=g)
    sy[::97] = -100
    tl = torch.randn(6, C, device=device, dtype=torch.bfloat16, generator=g)
    ty = torch.randint(0, C, (6,), device=device, generator=g)
    spans = [(0, window), (boundary - window, boundary + window), (n_rows - window, n_rows)]
    rows = torch.cat([torch.arange(max(lo, 0), min(hi, n_rows), device=device) for lo, hi in spans])
    ref_loss, _, ref_g = ref_ce_rows(sl.detach()[rows], sy[rows])
    bt = tol(torch.bfloat16)

    s_out, t_out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, a, reduction="none")
    assert s_out.shape == (n_rows,) and t_out.shape == (6,)
    torch.testing.assert_close(s_out.detach()[rows].double(), (1 - a) * ref_loss, **bt)
    s_out.backward(torch.ones_like(s_out))
    torch.testing.assert_close(sl.grad[rows].double(), (1 - a) * ref_g, **bt)
    del s_out, t_out
    sl.grad = None

    loss = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, a, reduction="mean")
    total, chunk = 0.0, 1 << 22
    for start in range(0, n_rows, chunk):
        total += ref_ce_rows(sl.detach()[start:start + chunk], sy[start:start + chunk])[0].sum().item()
    count = int((sy != -100).sum())
    lt, _, _ = ref_ce_rows(tl, ty)
    want = (1 - a) * total / count + a * lt.sum().item() / int((ty != -100).sum())
    assert abs(loss.double().item() - want) <= 1e-2 * abs(want) + 1e-3
    loss.backward()
    torch.testing.assert_close(sl.grad[rows].double() * count, (1 - a) * ref_g, **bt)


@pytest.mark.slow
@pytest.mark.large
def test_cross_entropy_small_classes_beyond_int32_offsets():
    n_rows = (1 << 28) + 4099  # 2**31 + 32792 logits (4.3 GB in bf16)
    _need_gpu_memory(24)
    check_small_classes_beyond_int32(n_rows, boundary=1 << 28, window=1 << 16)


def check_mse_misaligned_beyond_int32(n, boundary, window, device=DEV):
    """pred and target are views at storage offset 1 (2 bytes past a 16-byte boundary), so the whole
    side takes the scalar path; elements past `boundary` (2**31 on the GPU) sit beyond int32 offsets."""
    g = torch.Generator(device=device).manual_seed(6)
    pred = torch.randn(n + 1, device=device, dtype=torch.bfloat16, generator=g)[1:].requires_grad_()
    target = torch.randn(n + 1, device=device, dtype=torch.bfloat16, generator=g)[1:]
    assert pred.storage_offset() == 1 and pred.data_ptr() % 16 != 0 and target.data_ptr() % 16 != 0
    u, v = torch.zeros(3, device=device, dtype=torch.bfloat16), torch.ones(3, device=device, dtype=torch.bfloat16)
    loss = fastadapt.alpha_weighted_mse(pred, target, u, v, 0.0, reduction="sum")
    expect, chunk = 0.0, 1 << 27
    for start in range(0, n, chunk):
        dd = pred[start:start + chunk].detach().double() - target[start:start + chunk].double()
        expect += float((dd * dd).sum())
    assert abs(float(loss.detach()) - expect) <= 1e-2 * expect
    loss.backward()
    assert pred.grad.shape == (n,)
    for lo, hi in ((0, window), (boundary - window, boundary + window), (n - window, n)):
        lo, hi = max(lo, 0), min(hi, n)
        want = 2 * (pred[lo:hi].detach().double() - target[lo:hi].double())
        torch.testing.assert_close(pred.grad[lo:hi].double(), want, atol=1e-2, rtol=1e-2)


@pytest.mark.slow
@pytest.mark.large
def test_mse_misaligned_view_beyond_int32_offsets():
    _need_gpu_memory(24)
    check_mse_misaligned_beyond_int32(2**31 + 12_345, boundary=2**31, window=100_000)
