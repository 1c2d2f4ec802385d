"""Fused linear + alpha-weighted cross-entropy (issue 13, work in progress): forward + backward time and
peak extra memory of fastadapt.alpha_weighted_linear_cross_entropy against

  eager:          F.linear per side + the alpha-weighted formula with F.cross_entropy (the logits exist);
  torch_chunked:  F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()) per side,
                  PyTorch 2.14's own chunked path, weighted by alpha.

    pytest benchmarks/bench_alpha_weighted_linear_cross_entropy.py --benchmark-only       # tiny shape
    BENCH_LCE_LARGE=1 pytest benchmarks/bench_alpha_weighted_linear_cross_entropy.py --benchmark-only

The tiny shape runs always (and under --benchmark-disable, as a smoke test); the issue's shapes
(N rows per side, D, V) only with BENCH_LCE_LARGE=1: eager needs seconds and ~2 GB per call at
2048 x 1024 x 32000. Peak extra memory is measured in a fresh process (peak_extra_bytes): the
resident high-water mark added by one cold step, less the gradients autograd returns.

The floor is the three GEMMs: 3 x 2 N D V flops per side; achieved_GFLOPs divides them by the median.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # as a script
import fastadapt  # noqa: E402
from common import record, run  # noqa: E402

ALPHA = 0.3
SHAPES = {"64x32x500": (64, 32, 500), "2048x1024x32000": (2048, 1024, 32000), "512x1024x128256": (512, 1024, 128256)}
LARGE = os.environ.get("BENCH_LCE_LARGE", "0") == "1"
IMPLS = ["eager", "fastadapt", "torch_chunked"]


def eager_loss(sh, sy, th, ty, w, alpha):
    return (alpha * F.cross_entropy(F.linear(th, w), ty)
            + (1 - alpha) * F.cross_entropy(F.linear(sh, w), sy))


def fused_loss(sh, sy, th, ty, w, alpha):
    return fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, None, alpha)


def torch_chunked_loss(sh, sy, th, ty, w, alpha):
    opts = torch.nn.LinearCrossEntropyOptions()
    return (alpha * F.linear_cross_entropy(th, w, ty, options=opts)
            + (1 - alpha) * F.linear_cross_entropy(sh, w, sy, options=opts))


LOSSES = {"eager": eager_loss, "fastadapt": fused_loss, "torch_chunked": torch_chunked_loss}


def _inputs(n, d, v, frozen, dtype=torch.float32):
    # filled in place: a freed temporary the size of the weight would stay in the setup's ru_maxrss and
    # hide that much of the step's peak (peak_extra_bytes)
    g = torch.Generator().manual_seed(0)
    sh = torch.empty(n, d).normal_(generator=g).to(dtype).requires_grad_()
    th = torch.empty(n, d).normal_(generator=g).to(dtype).requires_grad_()
    w = torch.empty(v, d).normal_(generator=g).mul_(d ** -0.5).to(dtype).requires_grad_(not frozen)
    sy = torch.randint(0, v, (n,), generator=g)
    ty = torch.randint(0, v, (n,), generator=g)
    return sh, sy, th, ty, w


def _shapes():
    return [s for s in SHAPES if LARGE or s == "64x32x500"]


@pytest.mark.parametrize("frozen", [False, True], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", _shapes())
def test_fwd_bwd(benchmark, shape, impl, frozen):
    if impl == "torch_chunked" and not hasattr(F, "linear_cross_entropy"):
        pytest.skip("this PyTorch has no F.linear_cross_entropy")
    n, d, v = SHAPES[shape]
    sh, sy, th, ty, w = _inputs(n, d, v, frozen)
    leaves = [t for t in (sh, th, w) if t.requires_grad]
    loss_fn = LOSSES[impl]

    def setup():
        for t in leaves:
            t.grad = None

    def step():
        loss_fn(sh, sy, th, ty, w, ALPHA).backward()

    run(benchmark, step, setup, rounds=2 if shape != "64x32x500" else 5)
    if shape == "64x32x500":
        _check_against_eager(leaves, step, setup, lambda: eager_loss(sh, sy, th, ty, w, ALPHA).backward())
    flops = 2 * 2 * n * d * v * (3 if not frozen else 2)  # logits, grad_hidden (+ grad_weight) per side
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    info = dict(shape=shape, impl=impl, frozen=frozen)
    if median:
        info["achieved_GFLOPs"] = round(flops / median / 1e9, 1)
    record(benchmark, **info)


def _check_against_eager(leaves, step, setup, eager_step):
    """The gradients an implementation leaves equal eager's (on the smoke shape; tests/ has the parity tests)."""
    setup()
    step()
    got = [t.grad.clone() for t in leaves]
    setup()
    eager_step()
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)


def peak_extra_bytes(impl, n, d, v, chunk_size=None):
    """One cold step's peak resident memory beyond inputs, weight and the gradients autograd returns,
    in a fresh process. Not common.peak_extra_rss: that one measures after a warm-up step, whose own
    high-water mark hides the second step's (ru_maxrss never goes down), and it read 0 here. Here the
    warm-up is a tiny call (code paths, thread pools), and the measured step is the first at this shape:
    the delta includes the gradients themselves (allocated by the step), so their bytes are subtracted."""
    code = textwrap.dedent(f"""
        import json, resource, sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})
        import fastadapt
        from bench_alpha_weighted_linear_cross_entropy import LOSSES, _inputs
        torch.set_num_threads({torch.get_num_threads()})
        LOSSES[{impl!r}](*_inputs(8, 16, 64, False), {ALPHA}).backward()  # code paths and thread pools, tiny
        sh, sy, th, ty, w = _inputs({n}, {d}, {v}, False)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        LOSSES[{impl!r}](sh, sy, th, ty, w, {ALPHA}).backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        grads = sum(t.grad.numel() * t.grad.element_size() for t in (sh, th, w))
        print(json.dumps({{"extra": (after - before) * 1024 - grads}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", _shapes())
def test_peak_extra_memory(benchmark, shape, impl):
    """Not timed: one step's peak extra resident memory in a fresh process, recorded in extra_info (the
    first-touch of the step's own code paths and thread pools is in it too, for every impl alike)."""
    n, d, v = SHAPES[shape]
    extra = peak_extra_bytes(impl, n, d, v)
    benchmark.extra_info.update(shape=shape, impl=impl, peak_extra_MB=round(extra / 2 ** 20, 1),
                                eager_logits_one_side_MB=round(n * v * 4 / 2 ** 20, 1))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert extra > -2 ** 20  # the gradients' bytes are in the delta: never much below 0
