"""One training step of the MNIST MLP 784 -> 128 -> ReLU -> 10 (forward, cross-entropy, backward,
SGD step): eager nn.Sequential vs fastadapt.fuse_linear_relu of it vs torch.compile of it.

    pytest benchmarks/bench_mlp_step.py --benchmark-only
Targets (CPU): fastadapt >= 1.05x eager at batch 64, not slower at batch 256.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastadapt
from devices import DEVICES

BATCHES = [64, 256]
IMPLS = ["eager", "fastadapt", "compile"]


def _mlp(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_mlp_train_step(benchmark, impl, batch, device):
    if impl == "fastadapt" and not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    model = _mlp(device)
    if impl == "fastadapt":
        model = fastadapt.fuse_linear_relu(model)
        assert isinstance(model[0], fastadapt.FusedLinearReLU)
    fwd = model
    if impl == "compile":
        torch._dynamo.reset()
        fwd = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(batch, 784, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(fwd(x), y).backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):  # compile and warm-up stay outside the timed region
        step()
    benchmark.group = f"mlp step batch {batch} {device}"
    benchmark(step)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        flops = 2 * batch * (2 * 784 * 128 + 3 * 128 * 10)
        benchmark.extra_info["gflops"] = round(flops / stats.stats.min / 1e9, 1)
