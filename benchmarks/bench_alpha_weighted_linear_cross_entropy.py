"""Fused linear + alpha-weighted cross-entropy: forward + backward time and peak extra memory of
fastadapt.alpha_weighted_linear_cross_entropy against

  eager:          F.linear per side + the alpha-weighted formula with F.cross_entropy (the logits exist);
  compile:        torch.compile of that eager formula;
  torch_chunked:  F.linear_cross_entropy(..., options=torch.nn.LinearCrossEntropyOptions()) per side,
                  PyTorch 2.14's own chunked path, weighted by alpha;
  liger:          Liger-Kernel's LigerFusedLinearCrossEntropyLoss per side, weighted by alpha (CUDA only:
                  Triton; skipped with the reason when it cannot run);
  gemm_floor:     the three GEMMs alone per side (logits, grad_hidden, grad_weight; two for a frozen head)
                  at the same shapes: the floor the issue measures against.

    pytest benchmarks/bench_alpha_weighted_linear_cross_entropy.py --benchmark-only       # tiny shape
    BENCH_LCE_LARGE=1 pytest benchmarks/bench_alpha_weighted_linear_cross_entropy.py --benchmark-only
    python benchmarks/bench_alpha_weighted_linear_cross_entropy.py --interleaved SHAPE DTYPE [frozen]
        # the ratios in BENCHMARKS.md: the implementations in turn, round after round, in one process

The tiny shape runs always (and under --benchmark-disable, as a smoke test); the issue's shapes
(N rows per side, D, V) only with BENCH_LCE_LARGE=1: eager needs seconds and ~2 GB per call at
2048 x 1024 x 32000 on a CPU. Peak extra memory is measured in a fresh process (peak_extra_bytes, CPU):
the resident high-water mark added by one cold step, less the gradients autograd returns; on CUDA,
torch.cuda.max_memory_allocated over the same step.

achieved_GFLOPs divides the GEMM flops (2 N D V per GEMM per side) by the median; vs_gemm_floor in
BENCHMARKS.md is gemm_floor's median over the row's.
"""
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.nn.functional as F

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [os.path.join(_ROOT, "tests"), _ROOT]  # as a script: this checkout's fastadapt
import fastadapt  # noqa: E402
from common import fresh_compile, record, run  # noqa: E402
from devices import DEVICES  # noqa: E402

ALPHA = 0.3
SMOKE = "64x32x500"
SHAPES = {SMOKE: (64, 32, 500), "2048x1024x32000": (2048, 1024, 32000), "512x1024x128256": (512, 1024, 128256)}
LARGE = os.environ.get("BENCH_LCE_LARGE", "0") == "1"
IMPLS = ["eager", "fastadapt", "compile", "torch_chunked", "liger", "gemm_floor"]
DTYPES = [torch.float32, torch.bfloat16]


def eager_loss(sh, sy, th, ty, w, alpha):
    return (alpha * F.cross_entropy(F.linear(th, w), ty)
            + (1 - alpha) * F.cross_entropy(F.linear(sh, w), sy))


def fused_loss(sh, sy, th, ty, w, alpha):
    return fastadapt.alpha_weighted_linear_cross_entropy(sh, sy, th, ty, w, None, alpha)


def torch_chunked_loss(sh, sy, th, ty, w, alpha):
    opts = torch.nn.LinearCrossEntropyOptions()
    return (alpha * F.linear_cross_entropy(th, w, ty, options=opts)
            + (1 - alpha) * F.linear_cross_entropy(sh, w, sy, options=opts))


def liger_loss(sh, sy, th, ty, w, alpha):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fn = LigerFusedLinearCrossEntropyLoss()
    return alpha * fn(w, th, ty) + (1 - alpha) * fn(w, sh, sy)


class GemmFloor(torch.autograd.Function):
    """The GEMMs of the loss and nothing else: logits = h @ W.T forward; backward grad_h = dlogits @ W and
    grad_W = dlogits.T @ h with dlogits the logits themselves (values do not matter for time)."""

    @staticmethod
    def forward(ctx, h, w):
        x = h @ w.t()
        ctx.save_for_backward(h, w, x)
        return x.sum() * 0

    @staticmethod
    def backward(ctx, g):
        h, w, x = ctx.saved_tensors
        return (x @ w if ctx.needs_input_grad[0] else None), (x.t() @ h if ctx.needs_input_grad[1] else None)


def gemm_floor_loss(sh, sy, th, ty, w, alpha):
    return GemmFloor.apply(th, w) + GemmFloor.apply(sh, w)


LOSSES = {"eager": eager_loss, "fastadapt": fused_loss, "torch_chunked": torch_chunked_loss, "liger": liger_loss,
          "gemm_floor": gemm_floor_loss}


def loss_fn(impl, smoke):
    return fresh_compile(eager_loss, smoke=smoke, fullgraph=True) if impl == "compile" else LOSSES[impl]


def _skip_reason(impl, device):
    if impl == "torch_chunked" and not hasattr(F, "linear_cross_entropy"):
        return "this PyTorch has no F.linear_cross_entropy"
    if impl == "liger":
        if device != "cuda":
            return "Liger-Kernel is Triton/CUDA only"
        try:
            import liger_kernel.transformers  # noqa: F401
        except Exception as exc:  # noqa: BLE001  (no wheel, Triton too old, ...)
            return f"Liger-Kernel cannot run here: {type(exc).__name__}: {exc}"[:300]
    return None


def _inputs(n, d, v, frozen, dtype=torch.float32, device="cpu"):
    # filled in place: a freed temporary the size of the weight would stay in the setup's ru_maxrss and
    # hide that much of the step's peak (peak_extra_bytes)
    g = torch.Generator().manual_seed(0)
    sh = torch.empty(n, d).normal_(generator=g).to(device=device, dtype=dtype).requires_grad_()
    th = torch.empty(n, d).normal_(generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = torch.empty(v, d).normal_(generator=g).mul_(d ** -0.5).to(device=device, dtype=dtype)
    w.requires_grad_(not frozen)
    sy = torch.randint(0, v, (n,), generator=g).to(device)
    ty = torch.randint(0, v, (n,), generator=g).to(device)
    return sh, sy, th, ty, w


def _shapes():
    return [s for s in SHAPES if LARGE or s == SMOKE]


@pytest.mark.parametrize("frozen", [False, True], ids=["trained_head", "frozen_head"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("device", DEVICES)
def test_fwd_bwd(benchmark, device, shape, impl, dtype, frozen):
    reason = _skip_reason(impl, device)
    if reason:
        pytest.skip(reason)
    smoke = shape == SMOKE
    if not smoke and dtype == torch.bfloat16 and device == "cpu" and impl in ("torch_chunked", "compile"):
        pytest.skip("bf16 on this CPU: eager and fastadapt only (each of these rows takes minutes)")
    n, d, v = SHAPES[shape]
    sh, sy, th, ty, w = _inputs(n, d, v, frozen, dtype, device)
    leaves = [t for t in (sh, th, w) if t.requires_grad]
    fn = loss_fn(impl, smoke)

    def setup():
        for t in leaves:
            t.grad = None

    def step():
        fn(sh, sy, th, ty, w, ALPHA).backward()

    run(benchmark, step, setup, rounds=5 if smoke or device == "cuda" else 2, device=device)
    if smoke and impl != "gemm_floor":
        _check_against_eager(leaves, step, setup, lambda: eager_loss(sh, sy, th, ty, w, ALPHA).backward(), dtype)
    flops = 2 * 2 * n * d * v * (3 if not frozen else 2)  # logits, grad_hidden (+ grad_weight) per side
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    info = dict(shape=shape, impl=impl, frozen=frozen, dtype=str(dtype), device=device)
    if median:
        info["achieved_GFLOPs"] = round(flops / median / 1e9, 1)
    record(benchmark, **info)


def _check_against_eager(leaves, step, setup, eager_step, dtype):
    """The gradients an implementation leaves equal eager's (on the smoke shape; tests/ has the parity tests)."""
    setup()
    step()
    got = [t.grad.clone() for t in leaves]
    setup()
    eager_step()
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for g, t in zip(got, leaves):
        torch.testing.assert_close(g, t.grad, **tol)


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


def cuda_peak_extra_bytes(impl, n, d, v):
    """The same on CUDA: max_memory_allocated over one step beyond what was allocated before it, less the
    gradients (warm-up on a tiny shape first, as on the CPU)."""
    LOSSES[impl](*_inputs(8, 16, 64, False, device="cuda"), ALPHA).backward()
    sh, sy, th, ty, w = _inputs(n, d, v, False, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    LOSSES[impl](sh, sy, th, ty, w, ALPHA).backward()
    torch.cuda.synchronize()
    grads = sum(t.grad.numel() * t.grad.element_size() for t in (sh, th, w))
    return torch.cuda.max_memory_allocated() - before - grads


@pytest.mark.parametrize("impl", [i for i in IMPLS if i not in ("compile", "gemm_floor")])
@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("device", DEVICES)
def test_peak_extra_memory(benchmark, device, shape, impl):
    """Not timed: one step's peak extra memory (CPU: resident, in a fresh process), recorded in extra_info
    (the first-touch of the step's own code paths and thread pools is in it too, for every impl alike)."""
    reason = _skip_reason(impl, device)
    if reason:
        pytest.skip(reason)
    n, d, v = SHAPES[shape]
    extra = cuda_peak_extra_bytes(impl, n, d, v) if device == "cuda" else peak_extra_bytes(impl, n, d, v)
    benchmark.extra_info.update(shape=shape, impl=impl, device=device, peak_extra_MB=round(extra / 2 ** 20, 1),
                                eager_logits_one_side_MB=round(n * v * 4 / 2 ** 20, 1))
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    assert extra > -2 ** 20  # the gradients' bytes are in the delta: never much below 0


def interleaved(shape, dtype, frozen, impls=("eager", "fastadapt", "compile", "torch_chunked", "gemm_floor"),
                repeats=3):
    """Forward + backward of each implementation in turn, `repeats` rounds in one process (the VM is shared
    and noisy): each one's median time and GFLOP/s, and the median of the per-round ratios to fastadapt."""
    n, d, v = SHAPES[shape]
    sh, sy, th, ty, w = _inputs(n, d, v, frozen, dtype)
    leaves = [t for t in (sh, th, w) if t.requires_grad]
    fns = {k: loss_fn(k, smoke=False) for k in impls if _skip_reason(k, "cpu") is None}

    def step(fn):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn(sh, sy, th, ty, w, ALPHA).backward()
        return time.perf_counter() - start

    for fn in fns.values():  # compile, first-touch page faults
        step(fn)
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(step(fn))
    flops = 2 * 2 * n * d * v * (2 if frozen else 3)
    fa = times["fastadapt"]
    print(f"{shape} {dtype} {'frozen' if frozen else 'trained'} head, alpha={ALPHA}, CPU, "
          f"{torch.get_num_threads()} threads, {repeats} rounds")
    for k, ts in times.items():
        ratio = statistics.median([a / b for a, b in zip(ts, fa)])
        print(f"  {k:13s} median {statistics.median(ts):7.2f} s  {flops / statistics.median(ts) / 1e9:6.1f} GFLOP/s"
              f"  time / fastadapt's {ratio:.2f}")


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] != "--interleaved" or sys.argv[2] not in SHAPES:
        sys.exit(f"usage: {sys.argv[0]} --interleaved {{{','.join(SHAPES)}}} {{float32,bfloat16}} [frozen]")
    interleaved(sys.argv[2], getattr(torch, sys.argv[3]), sys.argv[4:] == ["frozen"])
