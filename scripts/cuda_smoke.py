#!/usr/bin/env python3
"""Quick, self-contained CUDA smoke check and bandwidth probe (run by scripts/gpu_check.sh before the
test suite, so a broken test collection elsewhere still leaves numbers behind).

Prints, per op and dtype, the max error of the public API (values and autograd gradients) against a
float64 reference, then times the cross-entropy forward+backward (2 reads + 1 write of the logits)
through the internal ops and through autograd, against eager PyTorch and against a plain copy, and
reports the achieved fraction of copy bandwidth. Exit status 1 if any parity check fails.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import fastadapt

ops = torch.ops.fastadapt
DEV = "cuda"
failures = []


def check(name, got, want, atol, rtol):
    got, want = got.double(), want.double()
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    ok = not bool(bad.any()) and bool(torch.isfinite(got).all() == torch.isfinite(want).all())
    print(f"  {'ok ' if ok else 'BAD'} {name:<44} max abs err {err.max().item():.3e}")
    if not ok:
        failures.append(name)


# The internal ops (no autograd) for the bandwidth probe; these two functions are the only places that
# spell their schemas. Forward -> (source_term, target_term, saved, source_grad, target_grad); backward
# scales each side by its own grad_output.
def ce_fwd(sl, sy, tl, ty, a, eps=0.0, reduction=1):
    return ops._alpha_weighted_cross_entropy_forward(sl, sy, tl, ty, a, -100, eps, reduction, None, None,
                                                     [False, False])


def ce_bwd(fwd, g_s, g_t, sl, sy, tl, ty, a, eps=0.0, reduction=1):
    return ops._alpha_weighted_cross_entropy_backward(g_s, g_t, sl, sy, tl, ty, a, fwd[2], -100, eps, reduction,
                                                      None, None, [True, True])


def tolerances(dtype):
    return {torch.float64: (1e-9, 1e-9), torch.float32: (1e-5, 1e-4)}.get(dtype, (5e-3, 2e-2))


def ce_parity(dtype, C, n=257, eps=0.1, alpha=0.3):
    """Public API (autograd included): loss and both gradients against float64 F.cross_entropy."""
    sl = (torch.randn(n, C, device=DEV) * 3).to(dtype).requires_grad_()
    tl = (torch.randn(n // 2, C, device=DEV) * 3).to(dtype).requires_grad_()
    sy = torch.randint(0, C, (n,), device=DEV)
    ty = torch.randint(0, C, (n // 2,), device=DEV)
    sy[::7] = -100
    # a float64 alpha: a float32 0.3 is off by 1e-8, beyond the float64 tolerance
    loss = fastadapt.alpha_weighted_cross_entropy(sl, sy, tl, ty, torch.tensor(alpha, device=DEV, dtype=torch.float64),
                                                  label_smoothing=eps)
    gs, gt = torch.autograd.grad(loss, (sl, tl))
    sld, tld = sl.detach().double().requires_grad_(), tl.detach().double().requires_grad_()
    ref = alpha * F.cross_entropy(tld, ty, label_smoothing=eps) + (1 - alpha) * F.cross_entropy(
        sld, sy, ignore_index=-100, label_smoothing=eps)
    ref.backward()
    t = tolerances(dtype)
    check(f"ce {dtype} C={C} loss", loss.detach(), ref.detach(), *t)
    # gradients of a mean over n rows: tolerances relative to the largest entry
    check(f"ce {dtype} C={C} grad source", gs, sld.grad, t[0] * float(sld.grad.abs().max()), t[1])
    check(f"ce {dtype} C={C} grad target", gt, tld.grad, t[0] * float(tld.grad.abs().max()), t[1])


def mse_parity(dtype, n=10007, alpha=0.7):
    sp, st = torch.randn(n, device=DEV).to(dtype).requires_grad_(), torch.randn(n, device=DEV).to(dtype)
    tp, tt = torch.randn(2, n, device=DEV).to(dtype).requires_grad_(), torch.randn(2, n, device=DEV).to(dtype)
    loss = fastadapt.alpha_weighted_mse(sp, st, tp, tt, torch.tensor(alpha, device=DEV, dtype=torch.float64))
    gs, gt = torch.autograd.grad(loss, (sp, tp))
    ds, dt = sp.detach().double() - st.double(), tp.detach().double() - tt.double()
    ref = alpha * (dt ** 2).mean() + (1 - alpha) * (ds ** 2).mean()
    t = tolerances(dtype)
    check(f"mse {dtype} loss", loss.detach(), ref, *t)
    check(f"mse {dtype} grad source", gs, 2 * (1 - alpha) * ds / n, t[0] / n, t[1])
    check(f"mse {dtype} grad target", gt, 2 * alpha * dt / (2 * n), t[0] / n, t[1])


def linear_relu_parity(dtype):
    x = torch.randn(300, 129, device=DEV).to(dtype)
    w = (torch.randn(257, 129, device=DEV) / 11).to(dtype)
    b = torch.randn(257, device=DEV).to(dtype)
    y = ops.linear_relu(x, w, b)
    ref = torch.relu(F.linear(x.double(), w.double(), b.double()))
    t = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-4)}.get(dtype, (3e-2, 3e-2))
    check(f"linear_relu {dtype} forward", y, ref, *t)
    g = torch.randn_like(y)
    gx, gw, gb = ops._linear_relu_backward(g, x, w, y, [True, True, True])
    gm = g.double() * (y > 0)
    check(f"linear_relu {dtype} grad x", gx, gm @ w.double(), *t)
    check(f"linear_relu {dtype} grad bias", gb, gm.sum(0), t[0] * 10, t[1])


def timeit(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def bandwidth(N=2048, C=32000, dtype=torch.bfloat16, alpha=0.5):
    sl = torch.randn(N, C, device=DEV, dtype=dtype)
    tl = torch.randn(N, C, device=DEV, dtype=dtype)
    sy = torch.randint(0, C, (N,), device=DEV)
    ty = torch.randint(0, C, (N,), device=DEV)
    a = torch.tensor(alpha, device=DEV)
    one = torch.ones((), device=DEV, dtype=dtype)

    def ours():
        fwd = ce_fwd(sl, sy, tl, ty, a)
        ce_bwd(fwd, one, one, sl, sy, tl, ty, a)

    sle, tle = sl.detach().requires_grad_(), tl.detach().requires_grad_()

    def ours_autograd():
        loss = fastadapt.alpha_weighted_cross_entropy(sle, sy, tle, ty, a)
        torch.autograd.grad(loss, (sle, tle))

    def eager():
        loss = alpha * F.cross_entropy(tle, ty) + (1 - alpha) * F.cross_entropy(sle, sy)
        torch.autograd.grad(loss, (sle, tle))

    def fwd_only():
        ce_fwd(sl, sy, tl, ty, a)

    dst = torch.empty_like(sl)
    logits_bytes = 2 * N * C * sl.element_size()
    t_copy = timeit(lambda: dst.copy_(sl))
    copy_bw = 2 * N * C * sl.element_size() / t_copy  # read + write of one side
    t_ours, t_auto, t_eager, t_fwd = timeit(ours), timeit(ours_autograd), timeit(eager), timeit(fwd_only)
    bw = 3 * logits_bytes / t_ours
    print(f"  copy bandwidth              {copy_bw / 1e9:8.0f} GB/s")
    print(f"  CE fwd only  {N}x{C} {dtype}: {t_fwd * 1e6:8.1f} us  {logits_bytes / t_fwd / 1e9:6.0f} GB/s"
          f"  ({logits_bytes / t_fwd / copy_bw:.0%} of copy)")
    print(f"  CE fwd+bwd   {N}x{C} {dtype}: {t_ours * 1e6:8.1f} us  {bw / 1e9:6.0f} GB/s"
          f"  ({bw / copy_bw:.0%} of copy); through autograd {t_auto * 1e6:.1f} us;"
          f" eager {t_eager * 1e6:.1f} us -> {t_eager / t_auto:.2f}x")


def main():
    print(fastadapt.build_info())
    if not (torch.cuda.is_available() and fastadapt.has_cuda_ops()):
        print("no CUDA device or no CUDA kernels")
        return 1
    print(torch.cuda.get_device_name(0))
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        for C in (5, 1000, 32000, 50257):
            ce_parity(dtype, C)
        mse_parity(dtype)
        linear_relu_parity(dtype)
    print("bandwidth:")
    for dtype in (torch.bfloat16, torch.float32):
        bandwidth(dtype=dtype)
    print("FAILED: " + ", ".join(failures) if failures else "all parity checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
