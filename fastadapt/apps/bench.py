"""``fastadapt bench``: fused ops against their eager PyTorch formulas, forward + backward, with
torch.utils.benchmark. A quick check (well under a minute), not the full benchmark suite."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import fastadapt


def _eager_ce(sl, sy, tl, ty, a):
    return a * F.cross_entropy(tl, ty) + (1 - a) * F.cross_entropy(sl, sy)


def _eager_mse(sp, st, tp, tt, a):
    return a * F.mse_loss(tp, tt) + (1 - a) * F.mse_loss(sp, st)


def _cases(device):
    def leaf(*shape):
        return torch.randn(*shape, device=device, requires_grad=True)

    n, c = 4096, 1000
    ce = (leaf(n, c), torch.randint(0, c, (n,), device=device), leaf(n, c), torch.randint(0, c, (n,), device=device), 0.5)
    mse = (leaf(n, 512), torch.randn(n, 512, device=device), leaf(n, 512), torch.randn(n, 512, device=device), 0.5)
    x, w, b = leaf(1024, 1024), leaf(1024, 1024), leaf(1024)
    return [
        ("alpha_weighted_cross_entropy", f"{n}x{c} per side", fastadapt.alpha_weighted_cross_entropy, _eager_ce, ce),
        ("alpha_weighted_mse", f"{n}x512 per side", fastadapt.alpha_weighted_mse, _eager_mse, mse),
        ("linear_relu", "1024x1024 @ 1024x1024", fastadapt.linear_relu, lambda x, w, b: F.relu(F.linear(x, w, b)), (x, w, b)),
    ]


def _time(fn, args, min_run_time):
    stmt = "fn(*args).sum().backward()"
    return benchmark.Timer(stmt=stmt, globals={"fn": fn, "args": args}).blocked_autorange(min_run_time=min_run_time).median


def run(device=None, min_run_time=0.3) -> list[dict]:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = fastadapt.build_info()
    print(f"device {device}, compiled kernels loaded: {info['extension_loaded']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; forward+backward, median")
    print(f"{'op':<30} {'size':<24} {'fused ms':>9} {'eager ms':>9} {'eager/fused':>11}")
    rows = []
    for name, size, fused, eager, args in _cases(device):
        try:
            tf = _time(fused, args, min_run_time)
        except (NotImplementedError, RuntimeError) as exc:  # a kernel not built for this device yet
            print(f"{name:<30} {size:<24} {'n/a':>9}  ({str(exc).splitlines()[0][:70]})")
            continue
        te = _time(eager, args, min_run_time)
        rows.append({"op": name, "size": size, "fused_ms": 1e3 * tf, "eager_ms": 1e3 * te, "speedup": te / tf})
        print(f"{name:<30} {size:<24} {1e3 * tf:9.3f} {1e3 * te:9.3f} {te / tf:10.2f}x")
    return rows
