"""Whole training steps with and without the CPU gradient cache (csrc/cpu/grad_buffer.h): a small
language model (embedding, one MLP block, a large-vocabulary head) runs one forward over the
concatenated source + target batches, the loss reads the two slices of its logits, then backward and an
AdamW step. Three implementations of the loss, each measured in a fresh process, because the cache's
size is read once per process:

- ``eager``: ``alpha * F.cross_entropy(target) + (1 - alpha) * F.cross_entropy(source)``
- ``cache``: ``fastadapt.alpha_weighted_cross_entropy`` with ``FASTADAPT_CPU_CACHE_MB=2048``
- ``nocache``: the same with ``FASTADAPT_CPU_CACHE_MB=0``

Per run: the median wall time and CPU time (user + system, all threads: what a shared machine's other
load disturbs least, and where page faults show) of the timed steps; the step's peak memory (VmHWM
after /proc/self/clear_refs) above what the process held before its first step (model, optimizer
state and inputs excluded: what the loss and its cache add, idle cache blocks included) and above the
memory resident when the step began; and the memory still resident between steps, above what the
process held before its first step. Ratios are what to read: the machines are shared and noisy, so
the runs of one shape are interleaved.

    python benchmarks/bench_train_step_cache.py                 # the table in BENCHMARKS.md (full shapes)
    python benchmarks/bench_train_step_cache.py --repeats 5 --shapes 2x512x32000
    pytest benchmarks/bench_train_step_cache.py --benchmark-disable   # smoke: tiny shape, one run each
    BENCH_TRAIN_STEP_FULL=1 pytest benchmarks/bench_train_step_cache.py --benchmark-only
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import pytest

IMPLS = ["eager", "cache", "nocache"]
# (2 * batch, seq, vocab): logits of the concatenated batches; the hidden size is 64 throughout
SMOKE_SHAPES = ["2x16x1000"]
FULL_SHAPES = ["2x512x32000", "2x4096x32000"]
HIDDEN = 64


def _worker(impl, shape, steps, warmup):
    """One run in this (fresh) process; prints one JSON line."""
    import re
    import time

    import torch
    import torch.nn.functional as F
    from torch import nn

    import fastadapt

    def status(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+)", f.read()).group(1)) * 1024

    rows, seq, vocab = (int(v) for v in shape.split("x"))
    half = rows // 2
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(vocab, HIDDEN)
            self.mlp = nn.Sequential(nn.Linear(HIDDEN, 4 * HIDDEN), nn.GELU(), nn.Linear(4 * HIDDEN, HIDDEN))
            self.norm = nn.LayerNorm(HIDDEN)
            self.head = nn.Linear(HIDDEN, vocab, bias=False)

        def forward(self, tokens):
            h = self.emb(tokens)
            return self.head(self.norm(h + self.mlp(h)))

    model = Block()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, vocab, (rows, seq))
    labels = torch.randint(0, vocab, (rows, seq))  # next-token labels, already shifted
    labels[:, -1] = -100

    def loss_of(logits):
        s, t = logits[:half], logits[half:]  # the source and target slices of one forward
        sy, ty = labels[:half], labels[half:]
        if impl == "eager":
            return (0.3 * F.cross_entropy(t.reshape(-1, vocab), ty.reshape(-1))
                    + 0.7 * F.cross_entropy(s.reshape(-1, vocab), sy.reshape(-1)))
        return fastadapt.alpha_weighted_cross_entropy(s, sy, t, ty, 0.3, class_dim=-1)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model(tokens))
        loss.backward()
        opt.step()
        return float(loss)

    opt.zero_grad(set_to_none=True)
    before_training = status("VmRSS")
    losses, times, cpu, peaks, step_peaks, resident = [], [], [], [], [], []
    for i in range(warmup + steps):
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        elapsed, cpu_elapsed = time.perf_counter() - t0, time.process_time() - c0
        opt.zero_grad(set_to_none=True)  # what stays resident is what the next step starts from
        if i >= warmup:
            times.append(elapsed)
            cpu.append(cpu_elapsed)
            peaks.append(status("VmHWM") - before_training)
            step_peaks.append(status("VmHWM") - before)
            resident.append(status("VmRSS") - before_training)
    cache = getattr(fastadapt.ops._extension._C, "cache_stats", lambda: (0, 0))()
    print(json.dumps(dict(impl=impl, shape=shape, losses=losses, step_s=statistics.median(times),
                          cpu_s=statistics.median(cpu),
                          peak_bytes=max(peaks), peak_step_bytes=max(step_peaks), resident_between_bytes=statistics.median(resident),
                          cache_idle_bytes=cache[0], extension=fastadapt.has_ops(), threads=torch.get_num_threads())))


def measure(impl, shape, steps=5, warmup=2):
    """One run of `impl` at `shape` in a fresh process: the _worker's JSON as a dict."""
    env = dict(os.environ)
    env.pop("FASTADAPT_CPU_CACHE_MB", None)
    if impl != "eager":
        env["FASTADAPT_CPU_CACHE_MB"] = "2048" if impl == "cache" else "0"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, shape, str(steps), str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} at {shape} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(shapes, repeats, steps, warmup, log=print):
    """Interleaved runs (the order rotates each repeat); per shape and impl the median over repeats of each
    run's median step time, its step/eager ratio, peak and resident memory."""
    table = []
    for shape in shapes:
        runs = {impl: [] for impl in IMPLS}
        for r in range(repeats):
            for impl in IMPLS[r % 3:] + IMPLS[:r % 3]:
                runs[impl].append(measure(impl, shape, steps, warmup))
                log(f"  {shape} repeat {r} {impl}: {runs[impl][-1]['step_s'] * 1e3:.0f} ms, "
                    f"cpu {runs[impl][-1]['cpu_s'] * 1e3:.0f} ms")
        for impl in IMPLS:
            ratios = [run["step_s"] / eager["step_s"] for run, eager in zip(runs[impl], runs["eager"])]
            cpu_ratios = [run["cpu_s"] / eager["cpu_s"] for run, eager in zip(runs[impl], runs["eager"])]
            table.append(dict(shape=shape, impl=impl, step_ms=1e3 * statistics.median(r["step_s"] for r in runs[impl]),
                              ratio_to_eager=statistics.median(ratios), ratios=ratios,
                              cpu_ms=1e3 * statistics.median(r["cpu_s"] for r in runs[impl]),
                              cpu_ratio_to_eager=statistics.median(cpu_ratios), cpu_ratios=cpu_ratios,
                              peak_MB=max(r["peak_bytes"] for r in runs[impl]) / 2 ** 20,
                              peak_step_MB=max(r["peak_step_bytes"] for r in runs[impl]) / 2 ** 20,
                              resident_between_MB=statistics.median(r["resident_between_bytes"] for r in runs[impl]) / 2 ** 20,
                              cache_idle_MB=runs[impl][-1]["cache_idle_bytes"] / 2 ** 20))
    return table


def _shapes():
    return FULL_SHAPES if os.environ.get("BENCH_TRAIN_STEP_FULL", "0") == "1" else SMOKE_SHAPES


@pytest.mark.parametrize("shape", _shapes())
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_cache(benchmark, impl, shape):
    import fastadapt
    if impl != "eager" and not fastadapt.has_ops():
        pytest.skip("compiled extension not loaded")
    smoke = benchmark.disabled
    steps, warmup = (2, 1) if smoke else (5, 2)
    result = {}

    def run():
        result.update(measure(impl, shape, steps, warmup))

    # one fresh process per round: the timed region is a whole run, extra_info has the per-step median
    benchmark.pedantic(run, rounds=1, iterations=1)
    assert len(result["losses"]) == steps + warmup and all(v == v for v in result["losses"]), result["losses"]
    if impl == "nocache":
        assert result["cache_idle_bytes"] == 0, result
    benchmark.group = f"train step {shape}"
    benchmark.extra_info.update({k: v for k, v in result.items() if k != "losses"})


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        impl, shape, steps, warmup = sys.argv[2:6]
        _worker(impl, shape, int(steps), int(warmup))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=FULL_SHAPES)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args()
    table = compare(args.shapes, args.repeats, args.steps, args.warmup)
    print("| logits (2B x T x V) | loss | step ms | step / eager (per repeat) | CPU ms | CPU / eager (per repeat) "
          "| peak MB | peak above step start MB | resident between steps MB | idle cache MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in table:
        print(f"| {row['shape']} | {row['impl']} | {row['step_ms']:.0f} | {row['ratio_to_eager']:.2f} "
              f"({', '.join(f'{r:.2f}' for r in row['ratios'])}) | {row['cpu_ms']:.0f} | {row['cpu_ratio_to_eager']:.2f} "
              f"({', '.join(f'{r:.2f}' for r in row['cpu_ratios'])}) | {row['peak_MB']:.0f} | {row['peak_step_MB']:.0f} "
              f"| {row['resident_between_MB']:.0f} | {row['cache_idle_MB']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
