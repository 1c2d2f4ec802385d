"""The trainer-epoch comparison of benchmarks/bench_trainers.py with the implementations interleaved
in one process (one epoch of each in turn, `--rounds` times): ratios that a shared, drifting machine
cannot bias toward whichever implementation ran first. BENCHMARKS.md (issue 11) quotes its output.

    python scripts/trainer_interleaved.py [--rounds 25] [--compile]
"""
import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "benchmarks"), os.path.join(HERE, "..", "tests")]
import bench_trainers  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--compile", action="store_true", help="also the trainer with compile=True (inductor)")
    args = ap.parse_args()
    impls = ["fastadapt", "eager", "eager_slicing"] + (["fastadapt_compile"] if args.compile else [])
    for kind in ("adaptive", "transfer"):
        fns = {i: bench_trainers._setup(i, kind, "inductor") for i in impls}
        for epoch, setup in fns.values():  # warm-up, compilation included
            for _ in range(3):
                setup()
                epoch()
        times = {i: [] for i in impls}
        for _ in range(args.rounds):
            for i, (epoch, setup) in fns.items():
                setup()
                start = time.perf_counter()
                epoch()
                times[i].append(time.perf_counter() - start)
        med = {i: statistics.median(v) * 1e3 for i, v in times.items()}
        paired = {i: statistics.median([a / b for a, b in zip(times[i], times["fastadapt"])]) for i in impls[1:]}
        print(f"{kind}: " + ", ".join(f"{i} {m:.1f} ms" for i, m in med.items())
              + "; paired ratio (other / fastadapt): " + ", ".join(f"{i} {r:.2f}x" for i, r in paired.items()))


if __name__ == "__main__":
    main()
