"""alpha-weighted MSE, forward + backward, 1M elements per side: fastadapt vs eager vs torch.compile.

Traffic floor per call (float32): read pred and target once, write the gradient once:
3 x 4 x n bytes per side.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from common import IMPLS, copy_bandwidth, record, run
from devices import DEVICES

SIZES = {"1M": 1 << 20, "16M": 1 << 24}


def eager_loss(sp, st, tp, tt, alpha):
    return alpha * F.mse_loss(tp, tt) + (1 - alpha) * F.mse_loss(sp, st)


def fused_loss(sp, st, tp, tt, alpha):
    return fastadapt.alpha_weighted_mse(sp, st, tp, tt, alpha)


_compiled = {}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("impl", IMPLS)
def test_mse_fwd_bwd(benchmark, impl, size, device):
    n = SIZES[size] if not benchmark.disabled else 1000
    sp = torch.randn(n, device=device, requires_grad=True)
    tp = torch.randn(n, device=device, requires_grad=True)
    st = torch.randn(n, device=device)
    tt = torch.randn(n, device=device)
    alpha = torch.tensor(0.3, dtype=torch.float64)
    if impl == "compile":
        fn = _compiled.setdefault("fn", torch.compile(eager_loss))
    else:
        fn = eager_loss if impl == "eager" else fused_loss
    fn(sp, st, tp, tt, alpha).backward()

    def setup():
        sp.grad = tp.grad = None

    run(benchmark, lambda: fn(sp, st, tp, tt, alpha).backward(), setup, rounds=50 if n > 1 << 22 else 300,
        warmup=5, device=device)
    if not benchmark.disabled:
        floor = 2 * 3 * n * 4
        record(benchmark, impl=impl, size=size, device=device, floor_bytes=floor,
               achieved_GBps=floor / benchmark.stats.stats.median / 1e9, copy_GBps=copy_bandwidth(device) / 1e9)
