"""Determinism: ten repeated forward+backward runs are bitwise identical, on CPU and CUDA, and
``torch.use_deterministic_algorithms(True)`` neither raises nor changes a single bit.

No fastadapt kernel has a non-deterministic path: the CPU kernels cut the work into fixed row blocks /
fixed-size chunks and add the partial sums in a fixed order (so the thread count does not matter
either), and the CUDA kernels use no float atomics (one block per row, per-block partials reduced in
a fixed order). So nothing calls ``at::globalContext().alertNotDeterministic``; these tests are what
would catch a change that made a path non-deterministic.
"""
import pytest
import torch

import fastadapt
from devices import DEVICES

RUNS = 10


def _bits(t):
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    return t.view(-1).view(torch.uint8).clone() if t.numel() else t.clone()


def _same_bits(runs):
    first = runs[0]
    for k, run in enumerate(runs[1:], 1):
        for i, (a, b) in enumerate(zip(first, run)):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), f"run {k}, output {i} differs bitwise from run 0"


def _ce_inputs(device, dtype, ns=300, nt=257, cs=1000, ct=10):
    g = torch.Generator().manual_seed(1)
    sl = torch.randn(ns, cs, generator=g).to(device, dtype)
    tl = torch.randn(nt, ct, generator=g).to(device, dtype)
    sy = torch.randint(0, cs, (ns,), generator=g)
    ty = torch.randint(0, ct, (nt,), generator=g)
    sy[::7] = -100
    return sl, sy.to(device), tl, ty.to(device)


def _ce_step(inputs, reduction, eps):
    sl, sy, tl, ty = (t.detach() for t in inputs)
    sl.requires_grad_(True)
    tl.requires_grad_(True)
    out = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, 0.37, label_smoothing=eps, reduction=reduction)
    if reduction == "none":
        (out[0].sum() * 0.5 + out[1].sum() * 1.5).backward()
        outs = out
    else:
        (out * 1.25).backward()  # grad_output != 1: the scaled path
        outs = (out,)
    return tuple(_bits(o) for o in outs) + (_bits(sl.grad), _bits(tl.grad))


def _mse_step(inputs, reduction):
    sp, st, tp, tt = (t.detach().requires_grad_(True) for t in inputs)
    out = fastadapt.alpha_weighted_mse(sp, st, tp, tt, 0.6, reduction=reduction)
    outs = out if reduction == "none" else (out,)
    sum(o.sum() for o in outs).backward()
    return tuple(_bits(o) for o in outs) + tuple(_bits(t.grad) for t in (sp, st, tp, tt))


def _lr_step(inputs):
    x, w, b = (t.detach().requires_grad_(True) for t in inputs)
    y = fastadapt.linear_relu(x, w, b)
    y.backward(torch.ones_like(y))
    return _bits(y), _bits(x.grad), _bits(w.grad), _bits(b.grad)


def _mse_inputs(device, dtype, n=(1 << 18) + 5):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(n if i < 2 else 1000, generator=g).to(device, dtype) for i in range(4))


def _lr_inputs(device, dtype):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(64, 96, generator=g).to(device, dtype), (torch.randn(80, 96, generator=g) / 10).to(device, dtype),
            torch.randn(80, generator=g).to(device, dtype))


CASES = [
    ("ce", "mean", 0.0), ("ce", "sum", 0.1), ("ce", "none", 0.0), ("ce", "none", 0.2),
    ("mse", "mean", None), ("mse", "sum", None), ("mse", "none", None), ("linear_relu", None, None),
]


def _runner(kind, reduction, eps, device, dtype):
    if kind == "ce":
        inputs = _ce_inputs(device, dtype)
        return lambda: _ce_step(inputs, reduction, eps)
    if kind == "mse":
        inputs = _mse_inputs(device, dtype)
        return lambda: _mse_step(inputs, reduction)
    inputs = _lr_inputs(device, dtype)
    return lambda: _lr_step(inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,reduction,eps", CASES)
def test_ten_runs_are_bitwise_identical(backend, device, dtype, kind, reduction, eps):
    step = _runner(kind, reduction, eps, device, dtype)
    _same_bits([step() for _ in range(RUNS)])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,reduction,eps", CASES)
def test_deterministic_algorithms_mode_raises_nothing_and_changes_nothing(backend, device, kind, reduction, eps):
    step = _runner(kind, reduction, eps, device, torch.float32)
    before = step()
    old, old_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        during = [step() for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)
    _same_bits([before] + during)


@pytest.mark.parametrize("kind,reduction,eps", [c for c in CASES if c[0] != "linear_relu"])
def test_cpu_result_does_not_depend_on_the_thread_count(kind, reduction, eps):
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    step = _runner(kind, reduction, eps, "cpu", torch.float32)
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            runs.append(step())
    finally:
        torch.set_num_threads(old)
    _same_bits(runs)


def test_linear_relu_bias_grad_does_not_depend_on_the_thread_count():
    """linear_relu's GEMMs run one BLAS call per slice of features, one slice per thread, so y, grad_x
    and grad_W may differ in the last bits between thread counts (as eager's MKL-threaded GEMMs do). The
    bias gradient is fastadapt's own sum over fixed 64-row blocks: bitwise equal for any thread count."""
    if not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 129, generator=g)
    w = torch.randn(130, 129, generator=g) / 129**0.5
    b = torch.randn(130, generator=g)
    gy = torch.randn(300, 130, generator=g)
    old = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2, 3, 4):
            torch.set_num_threads(n)
            wb = b.clone().requires_grad_(True)
            fastadapt.linear_relu(x, w, wb).backward(gy)
            runs.append(_bits(wb.grad))
    finally:
        torch.set_num_threads(old)
    _same_bits(runs)
