"""alpha-weighted cross-entropy ``alpha * CE(target) + (1 - alpha) * CE(source)``: fastadapt vs the
eager PyTorch formula vs torch.compile of that formula (and, on CUDA, Liger-Kernel's cross-entropy
when it is importable), forward alone (torch.no_grad) and forward + backward.

    make bench                               # the whole suite, then BENCHMARKS.md
    pytest benchmarks/bench_alpha_weighted_cross_entropy.py --benchmark-only

Traffic floor per call (float32, per side): forward reads the logits once (4 N C bytes); forward +
backward also writes their gradient once (8 N C bytes). achieved_GBps divides the floor of both
sides by the median time; pct_of_limit compares it with the measured copy bandwidth.
"""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))  # as a script
import fastadapt  # noqa: E402
from common import IMPLS, bench_op, fresh_compile
from devices import CUDA, DEVICES  # noqa: E402

# small classification up to language-model vocabularies; 4096x128256 needs 8 GB (GPU only), the
# CPU gets 1024x128256 instead (the eager formula takes seconds per call there)
SHAPES = {"128x10": (128, 10), "8192x10": (8192, 10), "2048x1000": (2048, 1000), "2048x32000": (2048, 32000),
          "1024x128256": (1024, 128256), "4096x128256": (4096, 128256)}
CPU_ONLY, CUDA_ONLY = {"1024x128256"}, {"4096x128256"}
ALPHA = 0.3
MODES = ["fwd", "fwd_bwd"]


def eager_loss(sl, sy, tl, ty, alpha):
    return alpha * F.cross_entropy(tl, ty) + (1 - alpha) * F.cross_entropy(sl, sy)


def fused_loss(sl, sy, tl, ty, alpha):
    return fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha)


def liger_available():
    """(True, "") when Liger-Kernel's cross-entropy can run here, else (False, why)."""
    if not CUDA:
        return False, "Liger-Kernel is Triton/CUDA only"
    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction  # noqa: F401
        x = torch.randn(4, 8, device="cuda", requires_grad=True)
        liger_loss(x, torch.zeros(4, dtype=torch.long, device="cuda"), x.detach().clone().requires_grad_(),
                   torch.ones(4, dtype=torch.long, device="cuda"), ALPHA).backward()
    except Exception as exc:  # noqa: BLE001  (no wheel, Triton too old for it, ...)
        return False, f"Liger-Kernel cannot run here: {type(exc).__name__}: {exc}"[:300]
    return True, ""


def _liger_ce(logits, labels):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction, softcap,
    #  return_z_loss, return_token_accuracy, return_predicted_tokens): plain mean cross-entropy
    out = LigerCrossEntropyFunction.apply(logits, labels, None, -100, 0.0, 0.0, "mean", None, False, False, False)
    return out[0] if isinstance(out, tuple) else out


def liger_loss(sl, sy, tl, ty, alpha):
    """The same alpha-weighted loss from two Liger cross-entropies. Liger computes the gradient during
    the forward pass and stores it in the logits' memory (its memory saving), so repeated calls
    overwrite sl / tl, which is harmless for timing; it does so under torch.no_grad too."""
    a = float(alpha)
    return a * _liger_ce(tl, ty) + (1 - a) * _liger_ce(sl, sy)


def make_fn(impl, smoke=False):
    if impl == "eager":
        return eager_loss
    if impl == "fastadapt":
        return fused_loss
    if impl == "liger":
        return liger_loss
    return fresh_compile(eager_loss, smoke=smoke)


def make_args(n, c, device):
    g = torch.Generator(device=device).manual_seed(0)
    sl = torch.randn(n, c, device=device, generator=g, requires_grad=True)
    tl = torch.randn(n, c, device=device, generator=g, requires_grad=True)
    sy = torch.randint(0, c, (n,), device=device, generator=g)
    ty = torch.randint(0, c, (n,), device=device, generator=g)
    return sl, sy, tl, ty, torch.tensor(ALPHA, dtype=torch.float64)


def case(impl, device, n, c, smoke=False):
    """(fn, args) for one implementation and shape: also what the peak-memory probe rebuilds."""
    return make_fn(impl, smoke), make_args(n, c, device)


def floor(n, c, mode):
    return 2 * (2 if mode == "fwd_bwd" else 1) * 4 * n * c


def ce_case(benchmark, impl, mode, device, n, c, shape, memory, **extra):
    if impl == "liger":
        ok, why = liger_available()
        if not ok:
            benchmark.extra_info.update(impl="liger", device=device, shape=shape, mode=mode, unavailable=why)
            pytest.skip(why)
    fn, args = case(impl, device, n, c, smoke=benchmark.disabled)
    bench_op(benchmark, impl=impl, mode=mode, device=device, fn=fn, args=args,
             case=(__name__, dict(n=n, c=c)), memory=memory, floor_bytes=floor(n, c, mode),
             op="alpha_weighted_cross_entropy", shape=shape, N=n, C=c, **extra)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS + ["liger"])
@pytest.mark.parametrize("mode", MODES)
def test_cross_entropy(benchmark, mode, impl, shape, device):
    n, c = SHAPES[shape]
    if impl == "liger" and device != "cuda":
        pytest.skip("Liger-Kernel is Triton/CUDA only")
    if benchmark.disabled:  # CI smoke mode: same code path, small shapes
        if shape not in ("128x10", "2048x32000"):
            pytest.skip("smoke mode runs two shapes")
        n, c = min(n, 64), min(c, 300)
    elif shape in (CUDA_ONLY if device == "cpu" else CPU_ONLY):
        pytest.skip(f"{shape} runs on {'cuda' if device == 'cpu' else 'cpu'} only")
    ce_case(benchmark, impl, mode, device, n, c, shape, memory=n * c >= 1 << 20)


if __name__ == "__main__":  # `python benchmarks/bench_alpha_weighted_cross_entropy.py --liger-status`
    if sys.argv[1:] != ["--liger-status"]:
        sys.exit("usage: bench_alpha_weighted_cross_entropy.py --liger-status")
    ok, why = liger_available()
    try:
        import liger_kernel
        import triton
        where = f"Liger-Kernel {getattr(liger_kernel, '__version__', '')} (Triton {triton.__version__})"
    except Exception:  # noqa: BLE001
        where = "Liger-Kernel"
    print(f"{where}: {'runs here, measured as impl liger' if ok else why}")
