"""Large-index safety: tensors with more than 2**31 elements, so any offset computed in 32-bit arithmetic
overflows (and reads or writes the wrong place, or crashes).

Every kernel offset is int64 by construction (row * row_stride, chunk * kChunk with int64 operands,
and on CUDA int64 row offsets); these tests are what shows it. They use bf16 (4.3 GB per tensor),
keep the peak under about 13 GB, and check a narrow slice of rows whose offsets exceed 2**31 against a
float64 reference on those rows only. CUDA's own cases live in test_cuda_kernels.py
(marker `large`: wide rows, C = 8 rows past 2**28, a misaligned MSE view); the aligned MSE one is here.
"""
import gc

import psutil
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from devices import CUDA

pytestmark = pytest.mark.slow

GiB = 2**30
N, C = 67_200, 32_000  # 2.15e9 logits; 2**31 / C is about 67108.9, so rows >= 67109 start beyond 2**31
ROWS = [0, 1, 67_107, 67_108, 67_109, 67_150, N - 2, N - 1]


def _need_memory(gib):
    avail = psutil.virtual_memory().available / GiB
    if avail < gib:
        pytest.skip(f"needs about {gib} GiB of free memory, {avail:.1f} available")


def _patterned_logits(n, c, device="cpu"):
    """(n, c) bf16 logits without generating 2e9 random numbers: a random block of 1031 rows repeated
    (1031 is prime, so the repetition is not aligned with any power of two), plus one large logit per
    row at a row-dependent class, so a row read at a wrong offset gives a different loss."""
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(1031, c, generator=g) * 2).to(torch.bfloat16).to(device)
    x = torch.empty(n, c, dtype=torch.bfloat16, device=device)
    for start in range(0, n, 1031):
        stop = min(start + 1031, n)
        x[start:stop] = base[: stop - start]
    r = torch.arange(n, device=device)
    x[r, (r * 7919) % c] = 9.0
    return x


def _ref_rows(x, y, rows):
    """Float64 loss and gradient (of the sum) of the given rows."""
    xr = x[rows].double().requires_grad_(True)
    loss = F.cross_entropy(xr, y[rows], reduction="none")
    loss.sum().backward()
    return loss.detach(), xr.grad


def _free():
    gc.collect()
    fastadapt.empty_cache()


def test_cross_entropy_cpu_beyond_int32_offsets():
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    _need_memory(13)
    assert N * C > 2**31
    tl = _patterned_logits(N, C)
    g = torch.Generator().manual_seed(1)
    ty = torch.randint(0, C, (N,), generator=g)
    sl = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    sy = torch.randint(0, 7, (5,), generator=g)
    rows = torch.tensor(ROWS)
    ref_loss, ref_grad = _ref_rows(tl, ty, rows)
    try:
        # reduction none: the forward writes no gradient, backward recomputes it from the saved lse
        tl.requires_grad_(True)
        s_out, t_out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 1.0, reduction="none")
        torch.testing.assert_close(t_out[rows].double(), ref_loss, atol=2e-2, rtol=2e-2)
        t_out.backward(torch.ones_like(t_out))
        torch.testing.assert_close(tl.grad[rows].double(), ref_grad, atol=2e-3, rtol=2e-2)
        # every row: the gradient row of a (shift-invariant) softmax sums to ~0; a row written at a wrong
        # offset, or never written, would not
        row_sums = tl.grad[-200:].float().sum(-1)
        assert row_sums.abs().max() < 5e-2
        per_row = t_out.detach().double()
        tl.grad = None
        del t_out
        _free()
        # reduction mean: the forward writes the gradient in the same pass
        loss = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 1.0, reduction="mean")
        torch.testing.assert_close(loss.double(), per_row.mean(), atol=2e-2, rtol=1e-2)
        loss.backward()
        torch.testing.assert_close(tl.grad[rows].double() * N, ref_grad, atol=2e-3, rtol=2e-2)
    finally:
        del tl
        _free()


def test_mse_cpu_beyond_int32_offsets():
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    _need_memory(13)
    n = 2**31 + 12_345
    B = 1_000_003  # prime period: a wrapped offset lands on a different phase of the pattern
    g = torch.Generator().manual_seed(2)
    bp, bt = torch.randn(B, generator=g).to(torch.bfloat16), torch.randn(B, generator=g).to(torch.bfloat16)
    pred = torch.empty(n, dtype=torch.bfloat16)
    target = torch.empty(n, dtype=torch.bfloat16)
    q, r = divmod(n, B)
    pred[: q * B].view(q, B).copy_(bp.expand(q, B))
    target[: q * B].view(q, B).copy_(bt.expand(q, B))
    pred[q * B:], target[q * B:] = bp[:r], bt[:r]
    d = bp.double() - bt.double()
    expect = q * float((d * d).sum()) + float((d[:r] * d[:r]).sum())
    u, v = torch.zeros(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    try:
        pred.requires_grad_(True)
        loss = fastadapt.alpha_weighted_mse(pred, target, u, v, 0.0, reduction="sum")
        assert abs(float(loss.detach()) - expect) <= 1e-2 * expect
        loss.backward()
        tail = torch.arange(n - 3 * B // 2, n)
        want = 2 * (pred[tail].detach().double() - target[tail].double())
        torch.testing.assert_close(pred.grad[tail].double(), want, atol=1e-2, rtol=1e-2)
    finally:
        del pred, target
        _free()


@pytest.mark.cuda
@pytest.mark.large
def test_mse_cuda_beyond_int32_offsets():
    if not CUDA or not fastadapt.has_cuda_ops():
        pytest.skip("needs a GPU and the CUDA kernels")
    free, _ = torch.cuda.mem_get_info()
    if free < 16 * GiB:
        pytest.skip("needs about 16 GB of free GPU memory")
    n = 2**31 + 12_345
    g = torch.Generator(device="cuda").manual_seed(3)
    pred = torch.randn(n, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    target = torch.randn(n, generator=g, device="cuda", dtype=torch.bfloat16)
    u, v = torch.zeros(3, device="cuda", dtype=torch.bfloat16), torch.ones(3, device="cuda", dtype=torch.bfloat16)
    loss = fastadapt.alpha_weighted_mse(pred, target, u, v, 0.0, reduction="sum")
    expect = 0.0
    for start in range(0, n, 1 << 28):
        dd = pred[start:start + (1 << 28)].detach().double() - target[start:start + (1 << 28)].double()
        expect += float((dd * dd).sum())
    assert abs(float(loss.detach()) - expect) <= 1e-2 * expect
    loss.backward()
    tail = slice(n - 100_000, n)
    want = 2 * (pred[tail].detach().double() - target[tail].double())
    torch.testing.assert_close(pred.grad[tail].double(), want, atol=1e-2, rtol=1e-2)
