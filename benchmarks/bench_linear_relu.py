"""Fused Linear + ReLU, forward + backward of one layer: eager F.relu(F.linear) vs fastadapt vs
torch.compile of eager, plus a plain torch.mm of the same size for the machine's GEMM rate.

    pytest benchmarks/bench_linear_relu.py --benchmark-only        # measure (compare within one run)
    pytest benchmarks/bench_linear_relu.py --benchmark-disable     # CI: run each case once
extra_info["gflops"] is the achieved rate: 6*N*K*M flops per forward+backward (three GEMMs, x
requires grad), 2*N*K*M for the torch.mm reference.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from devices import DEVICES

# (rows N, in_features K, out_features M): the MNIST hidden layer and the large GEMM-bound layer
SHAPES = [(64, 784, 128), (4096, 1024, 1024)]
IMPLS = ["eager", "fastadapt", "compile"]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _eager(x, w, b):
    return F.relu(F.linear(x, w, b))


def _record(benchmark, flops):
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["gflops"] = round(flops / stats.stats.min / 1e9, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", IMPLS)
def test_layer_fwd_bwd(benchmark, impl, shape, device):
    if impl == "fastadapt" and not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    torch.manual_seed(0)
    n, k, m = shape
    x = torch.randn(n, k, device=device, requires_grad=True)
    w = (torch.randn(m, k, device=device) / k**0.5).requires_grad_()
    b = torch.randn(m, device=device, requires_grad=True)
    g = torch.randn(n, m, device=device)
    fn = {"eager": _eager, "fastadapt": fastadapt.linear_relu, "compile": None}[impl]
    if impl == "compile":
        torch._dynamo.reset()
        fn = torch.compile(_eager)

    def step():
        x.grad = w.grad = b.grad = None
        fn(x, w, b).backward(g)
        _sync(device)

    for _ in range(3):  # compile and warm-up stay outside the timed region
        step()
    want = torch.autograd.grad(_eager(x, w, b), (x, w, b), g)
    for got, ref in zip((x.grad, w.grad, b.grad), want):  # the timed code computes the right thing
        torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    benchmark.group = f"layer {n}x{k}x{m} {device}"
    benchmark(step)
    _record(benchmark, 6 * n * k * m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_mm_reference(benchmark, shape, device):
    """One plain GEMM of the layer's size: the rate the fused layer's GEMMs can at best reach."""
    n, k, m = shape
    a = torch.randn(n, k, device=device)
    bm = torch.randn(k, m, device=device)
    out = torch.empty(n, m, device=device)

    def step():
        torch.mm(a, bm, out=out)
        _sync(device)

    step()
    benchmark.group = f"layer {n}x{k}x{m} {device}"
    benchmark(step)
    _record(benchmark, 2 * n * k * m)
