"""alpha-weighted MSE ``alpha * MSE(target) + (1 - alpha) * MSE(source)``: fastadapt vs the eager
formula vs torch.compile of it, forward alone (torch.no_grad) and forward + backward.

Traffic floor per call (float32, per side): forward reads pred and target once (8 n bytes); forward +
backward also writes the gradient once (12 n bytes).
"""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from common import IMPLS, bench_op, fresh_compile
from devices import DEVICES

SIZES = {"64K": 1 << 16, "1M": 1 << 20, "16M": 1 << 24}
MODES = ["fwd", "fwd_bwd"]
ALPHA = 0.3


def eager_loss(sp, st, tp, tt, alpha):
    return alpha * F.mse_loss(tp, tt) + (1 - alpha) * F.mse_loss(sp, st)


def fused_loss(sp, st, tp, tt, alpha):
    return fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha)


def make_args(n, device):
    g = torch.Generator(device=device).manual_seed(0)
    sp = torch.randn(n, device=device, generator=g, requires_grad=True)
    tp = torch.randn(n, device=device, generator=g, requires_grad=True)
    st = torch.randn(n, device=device, generator=g)
    tt = torch.randn(n, device=device, generator=g)
    return sp, st, tp, tt, torch.tensor(ALPHA, dtype=torch.float64)


def case(impl, device, n, smoke=False):
    fn = {"eager": eager_loss, "fastadapt": fused_loss}.get(impl) or fresh_compile(eager_loss, smoke=smoke)
    return fn, make_args(n, device)


def floor(n, mode):
    return 2 * (3 if mode == "fwd_bwd" else 2) * 4 * n


def mse_case(benchmark, impl, mode, device, n, size, memory, **extra):
    fn, args = case(impl, device, n, smoke=benchmark.disabled)
    bench_op(benchmark, impl=impl, mode=mode, device=device, fn=fn, args=args, case=(__name__, dict(n=n)),
             memory=memory, floor_bytes=floor(n, mode), op="alpha_weighted_mse", size=size, n=n, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_mse(benchmark, mode, impl, size, device):
    n = SIZES[size]
    if benchmark.disabled:
        if size != "1M":
            pytest.skip("smoke mode runs one size")
        n = 1000
    mse_case(benchmark, impl, mode, device, n, size, memory=n >= 1 << 20)
