"""alpha-weighted cross-entropy, forward + backward: fastadapt vs eager PyTorch vs torch.compile.

    make bench                               # default environment
    THP_MEM_ALLOC_ENABLE=1 make bench        # PyTorch's huge-page CPU allocator

Traffic floor per call (float32): read each logits buffer once and write its gradient once, so
2 x 4 x N x C bytes per side. achieved_GBps below divides that floor by the median time.
"""
import pytest
import torch
import torch.nn.functional as F

import fastadapt
from common import IMPLS, copy_bandwidth, peak_extra_rss, record, run
from devices import DEVICES

SHAPES = {"2048x32000": (2048, 32000), "8192x10": (8192, 10), "4096x128256": (4096, 128256)}
ALPHA = 0.3


def eager_loss(sl, sy, tl, ty, alpha):
    return alpha * F.cross_entropy(tl, ty) + (1 - alpha) * F.cross_entropy(sl, sy)


def fused_loss(sl, sy, tl, ty, alpha):
    return fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha)


_compiled = {}


def make_fn(impl):
    if impl == "eager":
        return eager_loss
    if impl == "fastadapt":
        return fused_loss
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(eager_loss)
    return _compiled["fn"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_cross_entropy_fwd_bwd(benchmark, impl, shape, device):
    n, c = SHAPES[shape]
    if benchmark.disabled:  # CI smoke mode: same code path, small shapes
        n, c = min(n, 64), min(c, 300)
    elif shape == "4096x128256" and device == "cpu":
        pytest.skip("4 GB of logits per side: GPU only")
    sl = torch.randn(n, c, device=device, requires_grad=True)
    tl = torch.randn(n, c, device=device, requires_grad=True)
    sy = torch.randint(0, c, (n,), device=device)
    ty = torch.randint(0, c, (n,), device=device)
    alpha = torch.tensor(ALPHA, dtype=torch.float64)
    fn = make_fn(impl)
    # compile (and every first-call cost) happens here, outside the timed region
    fn(sl, sy, tl, ty, alpha).backward()

    def setup():
        sl.grad = tl.grad = None

    def step():
        fn(sl, sy, tl, ty, alpha).backward()

    big = n * c >= 1 << 24
    run(benchmark, step, setup, rounds=5 if big else 200, warmup=1 if big else 20, device=device)
    if benchmark.disabled:
        return
    floor_bytes = 2 * 2 * n * c * sl.element_size()
    info = dict(impl=impl, shape=shape, device=device, floor_bytes=floor_bytes,
                achieved_GBps=floor_bytes / benchmark.stats.stats.median / 1e9,
                copy_GBps=copy_bandwidth(device) / 1e9)
    if device == "cpu" and big:
        setup_code = f"""
            n, c = {n}, {c}
            sl = torch.randn(n, c, requires_grad=True); tl = torch.randn(n, c, requires_grad=True)
            sy = torch.randint(0, c, (n,)); ty = torch.randint(0, c, (n,)); alpha = torch.tensor({ALPHA}, dtype=torch.float64)
            def del_grads():
                sl.grad = tl.grad = None
            def step():
                {{STEP}}
        """
        stmt = {"eager": "(alpha * F.cross_entropy(tl, ty) + (1 - alpha) * F.cross_entropy(sl, sy)).backward()",
                "fastadapt": "fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, alpha).backward()",
                "compile": None}[impl]
        if stmt:
            extra = peak_extra_rss(setup_code, stmt)
            info["peak_extra_rss_per_logits_buffer"] = extra / (2 * n * c * 4)
    record(benchmark, **info)
