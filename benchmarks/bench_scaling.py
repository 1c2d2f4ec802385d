"""Size sweeps for the plots of BENCHMARKS.md: how each implementation's cost grows with N and C.

Forward + backward only, about one second of rounds per point (BENCH_BUDGET / 2), no memory probes.
torch.compile is compiled once per sweep (dynamic shapes after the first recompile), so compile
times are not reported here: bench_alpha_weighted_*.py report them per shape.
Each benchmark records sweep (the varied quantity) and x (its value) in extra_info.
"""
import pytest
import torch
import torch.nn.functional as F

import bench_alpha_weighted_cross_entropy as ce
import bench_alpha_weighted_mse as mse
import fastadapt
from common import BUDGET, IMPLS, bench_op
from devices import DEVICES

CE_C = [10, 1000, 8000, 32000]  # N = 1024
CE_N = [256, 1024, 4096]        # C = 8000
MSE_N = [1 << k for k in range(14, 25, 2)]
LR_WIDTH = [128, 256, 512, 1024, 2048, 4096]  # batch 256, square layers
LR_BATCH = 256
SWEEP_BUDGET = BUDGET / 2
_compiled = {}


def compiled(key, fn, smoke):
    if key not in _compiled:
        _compiled[key] = torch.compile(fn, backend="aot_eager" if smoke else "inductor")
    return _compiled[key]


def _impl_fn(impl, eager, fused, key, smoke):
    return {"eager": eager, "fastadapt": fused}.get(impl) or compiled((key, smoke), eager, smoke)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("point", [f"C={c}" for c in CE_C] + [f"N={n}" for n in CE_N])
@pytest.mark.parametrize("impl", IMPLS)
def test_ce_sweep(benchmark, impl, point, device):
    axis, value = point.split("=")
    n, c = (1024, int(value)) if axis == "C" else (int(value), 8000)
    if benchmark.disabled:
        if point != "C=1000":
            pytest.skip("smoke mode runs one point")
        n, c = 32, 100
    fn = _impl_fn(impl, ce.eager_loss, ce.fused_loss, "ce", benchmark.disabled)
    bench_op(benchmark, impl=impl, mode="fwd_bwd", device=device, fn=fn, args=ce.make_args(n, c, device), case=None,
             floor_bytes=ce.floor(n, c, "fwd_bwd"), budget=SWEEP_BUDGET, op="alpha_weighted_cross_entropy",
             shape=f"{n}x{c}", N=n, C=c, sweep=f"{axis} ({'N=1024' if axis == 'C' else 'C=8000'})", x=int(value))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", MSE_N)
@pytest.mark.parametrize("impl", IMPLS)
def test_mse_sweep(benchmark, impl, n, device):
    if benchmark.disabled:
        if n != MSE_N[0]:
            pytest.skip("smoke mode runs one point")
        n = 1000
    fn = _impl_fn(impl, mse.eager_loss, mse.fused_loss, "mse", benchmark.disabled)
    bench_op(benchmark, impl=impl, mode="fwd_bwd", device=device, fn=fn, args=mse.make_args(n, device), case=None,
             floor_bytes=mse.floor(n, "fwd_bwd"), budget=SWEEP_BUDGET, op="alpha_weighted_mse", n=n,
             sweep="n", x=n)


def _eager_lr(x, w, b):
    return F.relu(F.linear(x, w, b)).sum()


def _fused_lr(x, w, b):
    return fastadapt.linear_relu(x, w, b).sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("width", LR_WIDTH)
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_relu_sweep(benchmark, impl, width, device):
    """One square layer, batch 256, forward + backward (3 GEMMs: 6 B W^2 flops)."""
    if benchmark.disabled:
        if width != LR_WIDTH[0]:
            pytest.skip("smoke mode runs one point")
    b = LR_BATCH if not benchmark.disabled else 8
    g = torch.Generator(device=device).manual_seed(0)
    args = tuple(torch.randn(*s, device=device, generator=g, requires_grad=True)
                 for s in ((b, width), (width, width), (width,)))
    fn = _impl_fn(impl, _eager_lr, _fused_lr, "linear_relu", benchmark.disabled)
    bench_op(benchmark, impl=impl, mode="fwd_bwd", device=device, fn=fn, args=args, case=None,
             flops=6 * b * width * width, budget=SWEEP_BUDGET, op="linear_relu", shape=f"{b}x{width}x{width}",
             width=width, sweep="width (batch 256)", x=width)
