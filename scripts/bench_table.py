#!/usr/bin/env python3
"""Print a pytest-benchmark JSON file as a table: every benchmark's name, median and extra_info, plus
its speed-up over the "eager" and "compile" siblings (same test, same other parameters) and the
throughput (GB/s, GFLOP/s) where extra_info records it.

    python3 scripts/bench_table.py benchmarks/results.json [more.json ...]

Works on the CPU results of `make bench` and on the CUDA results of scripts/gpu_check.sh. The parsing
(implementation, siblings) lives in scripts/benchjson.py, shared with scripts/bench_report.py.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchjson import COMPILE, EAGER, extra_str, fmt_time, load, siblings, throughput  # noqa: E402


def table(path):
    data, benches = load(path)
    machine = data.get("machine_info", {})
    print(f"# {path}: {len(benches)} benchmarks"
          f" ({machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '')})".rstrip())
    if not benches:
        return
    sib = siblings(benches)
    benches.sort(key=lambda b: (b.base, b.key, str(b.impl)))
    header = f"{'benchmark':<62} {'median':>10} {'vs eager':>9} {'vs compile':>10}  throughput / extra_info"
    print(header)
    print("-" * len(header))
    last = None
    for b in benches:
        if last is not None and (b.base, b.key) != last:
            print()
        last = (b.base, b.key)

        def ratio(names):
            r = b.ratio(sib, names)
            return f"{r:.2f}x" if r else ""

        name = b.name if len(b.name) <= 62 else b.name[:59] + "..."
        info = "; ".join(x for x in (throughput(b.extra, b.median), extra_str(b.extra)) if x)
        print(f"{name:<62} {fmt_time(b.median):>10} {ratio(EAGER):>9} {ratio(COMPILE):>10}  {info}")
    print()


def main(argv):
    paths = argv[1:] or ["benchmarks/results.json"]
    rc = 0
    for p in paths:
        try:
            table(p)
        except (OSError, ValueError) as exc:
            print(f"# {p}: cannot read ({exc})")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
