"""CUDA-specific behaviour of the fastadapt kernels: conventions that only exist on the device (no host
sync, NaN for out-of-range labels instead of a device assert, device-resident alpha), determinism,
int64 offsets beyond 2**31 elements, and the kernel paths (row widths, misaligned rows, dtypes).
Broad CUDA-vs-reference parity lives in the per-op test files."""
import pytest
import torch

import fastadapt

pytestmark = pytest.mark.cuda

ops = torch.ops.fastadapt
DEV = "cuda"


@pytest.fixture(autouse=True)
def _need_cuda_ops():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not fastadapt.has_cuda_ops():
        pytest.skip("fastadapt was built without CUDA kernels")
    yield
    torch.cuda.set_sync_debug_mode(0)


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


def ce_fwd(sl, sy, tl, ty, alpha, reduction=1, ignore=-100, eps=0.0, write=(False, False)):
    return ops._alpha_weighted_cross_entropy_forward(sl, sy, tl, ty, alpha, ignore, eps, reduction, list(write))


def ce_bwd(g0, g1, sl, sy, tl, ty, alpha, fwd, reduction=1, ignore=-100, eps=0.0, mask=(True, True)):
    return ops._alpha_weighted_cross_entropy_backward(g0, g1, sl, sy, tl, ty, alpha, fwd[2], fwd[3], fwd[4],
                                                      ignore, eps, reduction, list(mask))


def make_ce(n_s, n_t, C, dtype=torch.float32, ignore_frac=0.1, device=DEV):
    sl = (torch.randn(n_s, C, device=device) * 3).to(dtype)
    tl = (torch.randn(n_t, C, device=device) * 3).to(dtype)
    sy = torch.randint(0, C, (n_s,), device=device)
    ty = torch.randint(0, C, (n_t,), device=device)
    sy[torch.rand(n_s, device=device) < ignore_frac] = -100
    ty[torch.rand(n_t, device=device) < ignore_frac] = -100
    return sl, sy, tl, ty


# ---- out-of-range labels --------------------------------------------------------------------------

def test_out_of_range_label_gives_nan_not_a_device_assert():
    sl, sy, tl, ty = make_ce(16, 8, 10, ignore_frac=0.0)
    sy[3] = 10  # == C: out of range
    sy[5] = -7  # negative, not ignore_index
    alpha = torch.tensor(0.25)
    loss, _ = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.0, 1)
    assert torch.isnan(loss).item()
    none_s, none_t = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.0, 0)
    bad = torch.zeros(16, dtype=torch.bool, device=DEV)
    bad[3] = bad[5] = True
    assert torch.isnan(none_s[bad]).all()
    assert torch.isfinite(none_s[~bad]).all() and torch.isfinite(none_t).all()
    ref, _, ref_g = ref_ce_rows(sl, sy)
    torch.testing.assert_close(none_s[~bad].double(), 0.75 * ref[~bad], **tol(torch.float32))
    # the gradient rows of the bad labels are NaN, the others are correct
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=0)
    gs, gt = ce_bwd(torch.ones(16, device=DEV), torch.ones(8, device=DEV), sl, sy, tl, ty, alpha, fwd, reduction=0)
    assert torch.isnan(gs[bad]).all()
    torch.testing.assert_close(gs[~bad].double(), 0.75 * ref_g[~bad], **tol(torch.float32))
    # the CUDA context survived
    torch.cuda.synchronize()
    assert (torch.ones(4, device=DEV) * 2).sum().item() == 8.0


# ---- no host synchronisation ----------------------------------------------------------------------

def _ce_step(alpha, reduction):
    sl, sy, tl, ty = _CE_INPUTS
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=reduction)
    if reduction == 0:
        g0, g1 = torch.ones_like(fwd[0]), torch.ones_like(fwd[1])
    else:
        g0, g1 = torch.ones((), device=DEV), None
    return ce_bwd(g0, g1, sl, sy, tl, ty, alpha, fwd, reduction=reduction)


def _mse_step(alpha, reduction):
    sp, st, tp, tt = _MSE_INPUTS
    out = ops._alpha_weighted_mse_forward(sp, st, tp, tt, alpha, reduction, [True, False])
    if reduction == 0:
        g0, g1 = torch.ones_like(out[0]), torch.ones_like(out[1])
    else:
        g0, g1 = torch.ones((), device=DEV), None
    return ops._alpha_weighted_mse_backward(g0, g1, sp, st, tp, tt, alpha, reduction, [True, True])


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
        loss, _ = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.1, 1)
        loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.1, 1)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ---- determinism ----------------------------------------------------------------------------------

def _bitwise_same(runs):
    first = runs[0]
    for r in runs[1:]:
        for a, b in zip(first, r):
            assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                               b.view(-1).view(torch.uint8) if b.numel() else b)


def test_deterministic_cross_entropy():
    sl, sy, tl, ty = make_ce(4096, 4096, 32000, dtype=torch.bfloat16)
    alpha = torch.tensor(0.3, device=DEV)
    runs = []
    for _ in range(10):
        fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=1, eps=0.1)
        gs, gt = ce_bwd(torch.ones((), device=DEV), None, sl, sy, tl, ty, alpha, fwd, reduction=1, eps=0.1)
        runs.append((fwd[0], fwd[2], fwd[3], fwd[4], gs, gt))
    _bitwise_same(runs)


def test_deterministic_mse():
    sp, st = torch.randn(1 << 20, device=DEV), torch.randn(1 << 20, device=DEV)
    tp, tt = torch.randn(1 << 20, device=DEV), torch.randn(1 << 20, device=DEV)
    alpha = torch.tensor(0.6, device=DEV)
    runs = []
    for _ in range(10):
        out = ops._alpha_weighted_mse_forward(sp, st, tp, tt, alpha, 1, [False, False])
        gs, gt = ops._alpha_weighted_mse_backward(torch.ones((), device=DEV), None, sp, st, tp, tt, alpha, 1,
                                                  [True, True])
        runs.append((out[0], gs, gt))
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


# ---- more than 2**31 elements -----------------------------------------------------------------------

@pytest.mark.slow
def test_cross_entropy_beyond_int32_offsets():
    N, C = 70000, 32000  # 2.24e9 logits (4.5 GB in bf16): row offsets overflow int32
    assert N * C > 2**31
    free, _ = torch.cuda.mem_get_info()
    if free < 14 * 2**30:
        pytest.skip("needs about 14 GB of free GPU memory")
    tl = torch.randn(N, C, device=DEV, dtype=torch.bfloat16)
    ty = torch.randint(0, C, (N,), device=DEV)
    sl = torch.randn(4, C, device=DEV, dtype=torch.bfloat16)
    sy = torch.randint(0, C, (4,), device=DEV)
    alpha = torch.tensor(1.0)
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=0)
    rows = torch.tensor([0, 1, 67108, 67109, 68000, N - 2, N - 1], device=DEV)  # 2**31 / C is about 67108.9
    ref_loss, ref_lse, ref_g = ref_ce_rows(tl[rows], ty[rows])
    torch.testing.assert_close(fwd[1][rows].double(), ref_loss, **tol(torch.bfloat16))
    torch.testing.assert_close(fwd[3][rows].double(), ref_lse, atol=1e-4, rtol=1e-5)
    _, gt = ce_bwd(None, torch.ones(N, device=DEV, dtype=torch.bfloat16), sl, sy, tl, ty, alpha, fwd, reduction=0,
                   mask=(False, True))
    torch.testing.assert_close(gt[rows].double(), ref_g, **tol(torch.bfloat16))
    del gt
    # the mean over all rows against a float64 reference computed in chunks
    fwd_mean = ce_fwd(sl, sy, tl, ty, alpha, reduction=1)
    total = 0.0
    for start in range(0, N, 4096):
        total += ref_ce_rows(tl[start:start + 4096], ty[start:start + 4096])[0].sum().item()
    assert abs(fwd_mean[0].double().item() - total / N) < 2e-2 * abs(total / N) + 1e-2
    assert fwd_mean[4].tolist() == [0, N]


# ---- device-resident alpha ------------------------------------------------------------------------

def test_device_alpha_changes_result_without_recompile():
    sl, sy, tl, ty = make_ce(128, 64, 300)
    alpha = torch.tensor(0.2, device=DEV)
    a = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.0, 1)[0].clone()
    alpha.fill_(0.9)  # in place: same tensor, same kernel launch parameters
    b = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.0, 1)[0]
    assert not torch.equal(a, b)
    for value, got in ((0.2, a), (0.9, b)):
        want = ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, torch.tensor(value), -100, 0.0, 1)[0]
        torch.testing.assert_close(got, want)
        ls, _, _ = ref_ce_rows(sl, sy)
        lt, _, _ = ref_ce_rows(tl, ty)
        ref = value * lt.sum() / (ty != -100).sum() + (1 - value) * ls.sum() / (sy != -100).sum()
        torch.testing.assert_close(got.double(), ref, **tol(torch.float32))
    # MSE too
    sp, st, tp, tt = (torch.randn(50, 3, device=DEV) for _ in range(4))
    alpha.fill_(0.25)
    m1 = ops.alpha_weighted_mse(sp, st, tp, tt, alpha, 1)[0].clone()
    alpha.fill_(0.75)
    m2 = ops.alpha_weighted_mse(sp, st, tp, tt, alpha, 1)[0]
    for value, got in ((0.25, m1), (0.75, m2)):
        ref = value * ((tp - tt) ** 2).mean() + (1 - value) * ((sp - st) ** 2).mean()
        torch.testing.assert_close(got, ref)


def test_device_alpha_out_of_range_gives_nan():
    sl, sy, tl, ty = make_ce(8, 8, 5)
    for bad in (1.5, -0.1, float("nan")):
        alpha = torch.tensor(bad, device=DEV)
        assert torch.isnan(ops.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha, -100, 0.0, 1)[0]).item()
        sp = torch.randn(4, device=DEV)
        assert torch.isnan(ops.alpha_weighted_mse(sp, sp + 1, sp, sp, alpha, 1)[0]).item()


def test_zero_weight_side_is_not_evaluated_with_device_alpha():
    sl, sy, tl, ty = make_ce(8, 8, 5)
    sl[2, 1] = float("nan")  # a NaN in the source must not reach the loss when alpha == 1
    alpha = torch.tensor(1.0, device=DEV)
    fwd = ce_fwd(sl, sy, tl, ty, alpha, reduction=1)
    assert torch.isfinite(fwd[0]).item()
    gs, gt = ce_bwd(torch.ones((), device=DEV), None, sl, sy, tl, ty, alpha, fwd)
    assert torch.count_nonzero(gs).item() == 0 and torch.isfinite(gt).all()
    assert fwd[4][0].item() == 0


# ---- kernel paths: row widths, alignment, dtypes --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [3, 33, 1000, 4099, 50257])
@pytest.mark.parametrize("misalign", [False, True])
def test_cross_entropy_paths(dtype, C, misalign):
    n = 37
    base = (torch.randn(n, C + 1, device=DEV) * 4).to(dtype)
    logits = base[:, 1:] if misalign else base[:, :C].contiguous()  # misaligned rows and row stride C+1
    labels = torch.randint(0, C, (n,), device=DEV)
    labels[::5] = -100
    eps = 0.1
    alpha = torch.tensor(0.5)
    fwd = ce_fwd(logits, labels, logits[:5], labels[:5], alpha, reduction=0, eps=eps)
    ref_loss, ref_lse, ref_g = ref_ce_rows(logits, labels, eps=eps)
    torch.testing.assert_close(fwd[0].double(), 0.5 * ref_loss, **tol(dtype))
    valid = labels != -100
    torch.testing.assert_close(fwd[2][valid].double(), ref_lse[valid], **tol(dtype if dtype == torch.float64
                                                                               else torch.float32))
    g = torch.randn(n, device=DEV, dtype=dtype)
    gs, _ = ce_bwd(g, None, logits, labels, logits[:5], labels[:5], alpha, fwd, reduction=0, eps=eps,
                   mask=(True, False))
    assert gs.shape == logits.shape and gs.dtype == dtype
    torch.testing.assert_close(gs.double(), 0.5 * g.double()[:, None] * ref_g, **tol(dtype))
    # the unit gradient written by the forward on request equals the backward op's
    fwd_w = ce_fwd(logits, labels, logits[:5], labels[:5], alpha, reduction=1, eps=eps, write=(True, True))
    gs1, gt1 = ce_bwd(torch.ones((), device=DEV, dtype=dtype), None, logits, labels, logits[:5], labels[:5], alpha,
                      fwd_w, reduction=1, eps=eps)
    assert torch.equal(fwd_w[5], gs1) and torch.equal(fwd_w[6], gt1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 7, 4096 + 3])
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_mse_paths(dtype, n, reduction):
    sp = torch.randn(n + 1, device=DEV).to(dtype)[1:]  # misaligned
    st = torch.randn(n, device=DEV).to(dtype)
    tp = torch.randn(3, n, device=DEV).to(dtype)
    tt = torch.randn(3, n, device=DEV).to(dtype)
    a = 0.3
    alpha = torch.tensor(a, device=DEV)
    out = ops._alpha_weighted_mse_forward(sp, st, tp, tt, alpha, reduction, [True, True])
    ds, dt = sp.double() - st.double(), tp.double() - tt.double()
    t = tol(dtype)
    if reduction == 0:
        torch.testing.assert_close(out[0].double(), (1 - a) * ds ** 2, **t)
        torch.testing.assert_close(out[1].double(), a * dt ** 2, **t)
    else:
        f = (lambda v: v.mean()) if reduction == 1 else (lambda v: v.sum())
        torch.testing.assert_close(out[0].double(), a * f(dt ** 2) + (1 - a) * f(ds ** 2), **t)
    ns, nt = (ds.numel(), dt.numel()) if reduction == 1 else (1, 1)
    torch.testing.assert_close(out[2].double(), 2 * (1 - a) * ds / ns, **t)
    torch.testing.assert_close(out[3].double(), 2 * a * dt / nt, **t)
    if reduction == 0:
        g0, g1 = torch.randn(n, device=DEV).to(dtype), torch.randn(3, n, device=DEV).to(dtype)
        gs, gt = ops._alpha_weighted_mse_backward(g0, g1, sp, st, tp, tt, alpha, 0, [True, True])
        torch.testing.assert_close(gs.double(), g0.double() * 2 * (1 - a) * ds, **t)
        torch.testing.assert_close(gt.double(), g1.double() * 2 * a * dt, **t)
        # an expanded grad_output (stride 0) is read as one value
        ge = torch.tensor(0.5, device=DEV, dtype=dtype).expand(3, n)
        _, gt2 = ops._alpha_weighted_mse_backward(None, ge, sp, st, tp, tt, alpha, 0, [False, True])
        torch.testing.assert_close(gt2.double(), 0.5 * 2 * a * dt, **t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
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
