"""Helpers shared by the benchmarks: device sync, peak-memory probes and machine ceilings.

Ratios are what these benchmarks report: the machines are shared and noisy, so every
implementation of one shape runs in the same pytest session, back to back.
"""
import json
import os
import subprocess
import sys
import textwrap
import time

import torch

IMPLS = ["eager", "fastadapt", "compile"]
THP = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, setup, rounds, warmup=1, device="cpu"):
    """Times fn() after setup() (untimed) with pytest-benchmark; syncs CUDA inside the timed region."""
    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, setup=setup, rounds=rounds, warmup_rounds=warmup, iterations=1)


def record(benchmark, **info):
    benchmark.extra_info.update(info)
    benchmark.extra_info["thp_mem_alloc"] = THP


def peak_extra_rss(setup_code, step_code):
    """Peak resident memory added by `step_code`, in bytes, measured in a fresh CPU process.

    ru_maxrss is a high-water mark, so the delta between after-setup and after-step is the peak
    extra memory the step needed (temporaries plus what it returns).
    """
    code = textwrap.dedent(f"""
        import json, resource, torch, fastadapt, torch.nn.functional as F
        torch.set_num_threads({torch.get_num_threads()})
        {textwrap.indent(textwrap.dedent(setup_code), '        ').strip()}
        step()  # warm-up: code paths, caches and allocator pools
        del_grads()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        step()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"peak_extra_bytes": (after - before) * 1024}}))
    """)
    code = code.replace("{STEP}", step_code)
    env = dict(os.environ)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


_ceilings = {}


def copy_bandwidth(device="cpu", nbytes=256 << 20):
    """Bytes read plus bytes written per second by a warm tensor copy: the memory-bound ceiling."""
    key = (device, nbytes)
    if key not in _ceilings:
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        best = float("inf")
        for _ in range(5):
            sync(device)
            t = time.perf_counter()
            dst.copy_(src)
            sync(device)
            best = min(best, time.perf_counter() - t)
        _ceilings[key] = 2 * nbytes / best
    return _ceilings[key]
