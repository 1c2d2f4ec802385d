"""Learning-without-Forgetting distillation
``alpha * CE(z, y) + (1 - alpha) * T**2 * KL(softmax(t / T) || softmax(z / T))``: fastadapt vs the eager
PyTorch formula vs torch.compile of that formula, forward + backward (the training step's cost).

    pytest benchmarks/bench_alpha_weighted_distillation.py --benchmark-only
    python benchmarks/bench_alpha_weighted_distillation.py --interleaved   # the ratios in BENCHMARKS.md

Traffic floor per call (float32): read the student's and the teacher's logits once and write the
gradient once, 3 * 4 N C bytes; achieved_GBps divides it by the median time. (The CPU kernel moves
just that: the row's exponentials are re-read from L2, not from memory.)
"""
import os
import statistics
import sys
import time

import pytest
import torch
import torch.nn.functional as F

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(_ROOT, "tests"), _ROOT]  # as a script: this checkout's fastadapt
import fastadapt  # noqa: E402
from common import IMPLS, bench_op, fresh_compile  # noqa: E402
from devices import DEVICES  # noqa: E402

SHAPES = {"2048x32000": (2048, 32000)}
ALPHA, T = 0.3, 2.0


def eager_loss(z, y, t, alpha):
    return alpha * F.cross_entropy(z, y) + (1 - alpha) * T * T * F.kl_div(
        F.log_softmax(z / T, -1), F.softmax(t / T, -1), reduction="batchmean")


def fused_loss(z, y, t, alpha):
    return fastadapt.alpha_weighted_distillation(z, y, t, alpha, T)


def make_fn(impl, smoke=False):
    if impl == "eager":
        return eager_loss
    if impl == "fastadapt":
        return fused_loss
    return fresh_compile(eager_loss, smoke=smoke)


def make_args(n, c, device):
    g = torch.Generator(device=device).manual_seed(0)
    z = torch.randn(n, c, device=device, generator=g, requires_grad=True)
    t = torch.randn(n, c, device=device, generator=g)
    y = torch.randint(0, c, (n,), device=device, generator=g)
    return z, y, t, torch.tensor(ALPHA, dtype=torch.float64)


def case(impl, device, n, c, smoke=False):
    """(fn, args) for one implementation and shape: also what the peak-memory probe rebuilds."""
    return make_fn(impl, smoke), make_args(n, c, device)


def floor(n, c):
    return 3 * 4 * n * c


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_distillation(benchmark, impl, shape, device):
    n, c = SHAPES[shape]
    if benchmark.disabled:  # CI smoke mode: same code path, a small shape
        n, c = 64, 300
    fn, args = case(impl, device, n, c, smoke=benchmark.disabled)
    bench_op(benchmark, impl=impl, mode="fwd_bwd", device=device, fn=fn, args=args, case=(__name__, dict(n=n, c=c)),
             memory=n * c >= 1 << 20, floor_bytes=floor(n, c), op="alpha_weighted_distillation", shape=shape, N=n, C=c)


def interleaved(n=2048, c=32000, repeats=7):
    """Forward + backward of the three implementations in turn, `repeats` times in one process (the VM is
    shared and noisy): the median time of each and the median of the per-round ratios."""
    args = make_args(n, c, "cpu")
    fns = {"eager": eager_loss, "fastadapt": fused_loss, "compile": fresh_compile(eager_loss)}

    def step(fn):
        args[0].grad = None
        start = time.perf_counter()
        fn(*args).backward()
        return time.perf_counter() - start

    for fn in fns.values():  # compile, first-touch page faults, the gradient cache
        step(fn), step(fn)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(step(fn))
    fa = times["fastadapt"]
    print(f"N={n} C={c} T={T} alpha={ALPHA} float32 CPU, {torch.get_num_threads()} threads, {repeats} rounds")
    for k, ts in times.items():
        print(f"  {k:9s} median {statistics.median(ts) * 1e3:8.1f} ms")
    for k in ("eager", "compile"):
        print(f"  fastadapt vs {k}: {statistics.median([a / b for a, b in zip(times[k], fa)]):.2f}x (median ratio)")
    print(f"  fastadapt: {floor(n, c) / statistics.median(fa) / 1e9:.2f} GB/s of the {floor(n, c) / 1e6:.0f} MB floor")


if __name__ == "__main__":
    if sys.argv[1:] != ["--interleaved"]:
        sys.exit("usage: bench_alpha_weighted_distillation.py --interleaved")
    interleaved()
