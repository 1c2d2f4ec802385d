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

import fastadapt

IMPLS = ["eager", "fastadapt", "compile"]
THP = os.environ.get("THP_MEM_ALLOC_ENABLE", "0") == "1"

# BENCH_COMPILE selects the torch.compile rows (parameter impl="compile"; each compiles cold, seconds to
# tens of seconds): "1" (default) runs every row, "0" drops the compile rows, "only" runs nothing else.
# benchmarks/conftest.py deselects by it; scripts/gpu_check.sh runs "0" first and "only" if time remains.
BENCH_COMPILE_CHOICES = ("1", "0", "only")


def bench_compile_mode():
    mode = os.environ.get("BENCH_COMPILE", "1").strip() or "1"
    if mode not in BENCH_COMPILE_CHOICES:
        raise ValueError(f"BENCH_COMPILE must be one of {', '.join(BENCH_COMPILE_CHOICES)}, got {mode!r}")
    return mode


def is_compile_row(item):
    """Whether a collected benchmark is a torch.compile row (its impl parameter is "compile")."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and "compile" in str(callspec.params.get("impl", ""))


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


# ---- additions for the full suite (issue 5) ---------------------------------------------------------

import resource  # noqa: E402

SMOKE_NOTE = "smoke mode (--benchmark-disable): small shapes, one call, no timings recorded"


def big_rounds(seconds_per_call, budget=3.0, lo=3, hi=200):
    """Rounds that fit `budget` seconds for a call of `seconds_per_call` (at least `lo`)."""
    return int(max(lo, min(hi, budget / max(seconds_per_call, 1e-9))))


def first_call_seconds(fn, device="cpu"):
    """Wall time of one call including everything a first call pays (for torch.compile: tracing and
    code generation). Reported as extra_info["compile_s"], never mixed into the timed rounds."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def fresh_compile(fn, smoke=False, **kwargs):
    """torch.compile(fn) with dynamo's caches cleared, so that the first call's time is a real
    compile for this shape (inductor's on-disk cache may still be warm: the report says where it is).
    Smoke mode compiles with backend="aot_eager": dynamo and AOTAutograd trace the same graph, but no
    code is generated, which keeps `make test` fast."""
    torch._dynamo.reset()
    if smoke:
        kwargs.setdefault("backend", "aot_eager")
    return torch.compile(fn, dynamic=False, **kwargs)


def inductor_cache_dir():
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
        return cache_dir()
    except Exception:  # noqa: BLE001  (private API; best effort)
        return os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")


def peak_extra_memory(setup_code, step_code, device="cpu"):
    """Peak extra memory of `step_code`, in bytes, in a fresh process (like peak_extra_rss).

    CPU: the kernel's resident high-water mark is reset (/proc/self/clear_refs, "5") after the
    warm-up step, so that a torch.compile warm-up, which needs far more memory than a step, does not
    mask the step's own peak; falls back to ru_maxrss deltas where clear_refs is not writable.
    CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what is allocated
    before the step. The step's outputs (gradients) count: del_grads() must release them, and any
    cache that would keep their memory between steps, so that the step allocates them again.
    """
    code = textwrap.dedent(f"""
        import json, re, resource, torch, fastadapt, torch.nn.functional as F
        torch.set_num_threads({torch.get_num_threads()})
        DEVICE = {device!r}
        {textwrap.indent(textwrap.dedent(setup_code), '        ').strip()}
        def status(key):
            with open('/proc/self/status') as f:
                return int(re.search(key + r':\\s+(\\d+)', f.read()).group(1)) * 1024
        step()  # warm-up: code paths, caches, allocator pools, compilation
        del_grads()
        if DEVICE == 'cuda':
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step(); torch.cuda.synchronize()
            extra, how = torch.cuda.max_memory_allocated() - before, 'cuda max_memory_allocated'
        else:
            try:
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
                before = status('VmRSS'); step(); extra, how = status('VmHWM') - before, 'VmHWM'
            except OSError:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                step()
                extra, how = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, 'ru_maxrss'
        print(json.dumps({{"peak_extra_bytes": extra, "how": how}}))
    """)
    code = code.replace("{STEP}", step_code)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         timeout=900)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


_gemm = {}


def gemm_rate(device="cpu", n=None):
    """FLOP/s of a warm square float32 torch.mm: the GEMM-bound ceiling (2 n^3 flops per call)."""
    n = n or (4096 if device == "cuda" else 1024)
    if (device, n) not in _gemm:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(5 if device == "cpu" else 20):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            sync(device)
            best = min(best, time.perf_counter() - t)
        _gemm[(device, n)] = 2 * n ** 3 / best
    return _gemm[(device, n)]


_machine = {}


def machine_info():
    """What the report's header says about the machine (also stored in every benchmark's extra_info
    via record_machine, so that the JSON alone is enough to rebuild BENCHMARKS.md)."""
    if _machine:
        return dict(_machine)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "thp_mem_alloc": THP}
    try:
        import fastadapt
        bi = fastadapt.build_info()
        info["fastadapt_build"] = {k: v for k, v in bi.items() if isinstance(v, (str, int, float, bool))}
    except Exception as exc:  # noqa: BLE001
        info["fastadapt_build"] = {"error": str(exc)[:200]}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    info["inductor_cache"] = inductor_cache_dir()
    _machine.update(info)
    return dict(info)


def peak_rss_self():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


BUDGET = float(os.environ.get("BENCH_BUDGET", "2.0"))  # seconds of timed rounds per measurement
PEAK_MEMORY = os.environ.get("BENCH_PEAK_MEMORY", "1") != "0"
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.join(BENCH_DIR, "..", "tests")


def _clear_grads(args):
    for a in args:
        if isinstance(a, torch.Tensor) and a.requires_grad:
            a.grad = None


def step_fn(fn, args, mode):
    """The measured step: `fwd` is a torch.no_grad() forward, `fwd_bwd` is forward then backward."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*args)
    else:
        def step():
            fn(*args).backward()
    return step


def _step_stmt(mode):
    return "with torch.no_grad(): fn(*args)" if mode == "fwd" else "fn(*args).backward()"


def bench_op(benchmark, *, impl, mode, device, fn, args, case, memory=False, floor_bytes=None, flops=None,
             budget=None, **info):
    """Times one implementation of one op at one shape, and records everything the report needs.

    fn(*args) is the implementation (already torch.compile'd for impl "compile": its first call,
    which compiles, is timed alone as compile_s). Every first-call cost is paid outside the timed
    rounds; the number of rounds is chosen from one untimed call so that each measurement takes about
    `budget` seconds (BENCH_BUDGET). case = (module, kwargs): `module.case(impl=..., device=...,
    **kwargs)` rebuilds (fn, args) in a fresh process for the CPU peak-memory probe.
    """
    step = step_fn(fn, args, mode)
    if benchmark.disabled:  # smoke mode: one call, the whole code path, no numbers
        run(benchmark, step, lambda: _clear_grads(args), rounds=1, warmup=0, device=device)
        return
    first = first_call_seconds(step, device)
    _clear_grads(args)
    calib = first_call_seconds(step, device)
    rounds = big_rounds(calib, budget or BUDGET, lo=3, hi=500)
    run(benchmark, step, lambda: _clear_grads(args), rounds=rounds, warmup=max(1, min(10, rounds // 10)),
        device=device)
    median = benchmark.stats.stats.median
    out = dict(impl=impl, mode=mode, device=device, rounds=rounds, first_call_s=first, **info)
    if impl == "compile":
        out["compile_s"] = first
    if floor_bytes:
        bw = copy_bandwidth(device)
        out.update(floor_bytes=floor_bytes, achieved_GBps=floor_bytes / median / 1e9, copy_GBps=bw / 1e9,
                   pct_of_limit=100 * floor_bytes / median / bw, limit="copy bandwidth")
    if flops:
        rate = gemm_rate(device)
        out.update(flops=flops, achieved_GFLOPs=flops / median / 1e9, gemm_GFLOPs=rate / 1e9,
                   pct_of_limit=100 * flops / median / rate, limit="torch.mm rate")
    if memory and PEAK_MEMORY:
        try:
            if device == "cuda":
                _clear_grads(args)
                getattr(fastadapt, "empty_cache", lambda: None)()
                sync(device)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                step()
                sync(device)
                out["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - before
                out["peak_how"] = "cuda max_memory_allocated"
            else:
                module, kwargs = case
                setup = f"""
                    import sys
                    sys.path[:0] = [{BENCH_DIR!r}, {TESTS_DIR!r}]
                    from {module} import case
                    fn, args = case(impl={impl!r}, device='cpu', **{kwargs!r})
                    def del_grads():  # and fastadapt's gradient cache: the step must own its memory
                        for a in args:
                            if isinstance(a, torch.Tensor) and a.requires_grad:
                                a.grad = None
                        getattr(fastadapt, 'empty_cache', lambda: None)()
                    def step():
                        {{STEP}}
                """
                out["peak_extra_bytes"] = peak_extra_memory(setup, _step_stmt(mode))
                out["peak_how"] = "fresh process, VmHWM"
        except Exception as exc:  # noqa: BLE001  (a probe failure must not lose the timing)
            out["peak_error"] = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else repr(exc)
    out["machine"] = machine_info()
    record(benchmark, **out)
