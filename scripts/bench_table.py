#!/usr/bin/env python3
"""Print a pytest-benchmark JSON file as a table: every benchmark's name, median and extra_info, plus
its speed-up over the "eager" and "compile" siblings (same test, same other parameters) and the
throughput (GB/s from extra_info "bytes", TFLOP/s from "flops") where those are recorded.

    python3 scripts/bench_table.py benchmarks/results.json [more.json ...]

Works on the CPU results of `make bench` and on the CUDA results of scripts/gpu_check.sh. Benchmark
names look like test_xxx[cuda-fastadapt-2048x32000]; the implementation is the parameter whose value
is one of IMPLS, found in pytest-benchmark's "params" or else among the name's '-'-separated tokens.
"""
from __future__ import annotations

import json
import math
import re
import sys

IMPLS = ("fastadapt", "eager", "compile", "compiled", "torch", "reference", "fallback", "liger", "apex",
         "triton", "ours", "baseline")
EAGER = ("eager", "torch", "baseline")
COMPILE = ("compile", "compiled")


def _split(bench):
    """(test base name, implementation or None, key of the other parameters)."""
    name = bench.get("name") or bench.get("fullname", "?")
    m = re.match(r"^([^\[]*)(?:\[(.*)\])?$", name)
    base, inside = (m.group(1), m.group(2) or "") if m else (name, "")
    params = bench.get("params") or {}
    impl, others = None, []
    if isinstance(params, dict) and params:
        for k, v in sorted(params.items()):
            sv = str(v)
            if impl is None and sv.lower() in IMPLS:
                impl = sv.lower()
            else:
                others.append(f"{k}={sv}")
    else:
        for tok in inside.split("-") if inside else []:
            if impl is None and tok.lower() in IMPLS:
                impl = tok.lower()
            else:
                others.append(tok)
    return base, impl, tuple(others)


def _fmt_time(s):
    if s is None or not math.isfinite(s):
        return "?"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def _throughput(extra, median):
    if not median:
        return ""
    out = []
    for key in ("bytes", "bytes_moved", "nbytes"):
        if isinstance(extra.get(key), (int, float)):
            out.append(f"{extra[key] / median / 1e9:.1f} GB/s")
            break
    for key in ("flops", "flop"):
        if isinstance(extra.get(key), (int, float)):
            out.append(f"{extra[key] / median / 1e12:.2f} TFLOP/s")
            break
    return ", ".join(out)


def _extra_str(extra):
    parts = []
    for k, v in extra.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    s = " ".join(parts)
    return s if len(s) <= 120 else s[:117] + "..."


def table(path):
    with open(path) as f:
        data = json.load(f)
    benches = data.get("benchmarks", [])
    machine = data.get("machine_info", {})
    print(f"# {path}: {len(benches)} benchmarks"
          f" ({machine.get('node', '?')}, {machine.get('cpu', {}).get('brand_raw', '')})".rstrip())
    if not benches:
        return
    rows, medians = [], {}
    for b in benches:
        base, impl, key = _split(b)
        med = (b.get("stats") or {}).get("median")
        medians[(base, key, impl)] = med
        rows.append((base, key, impl, b, med))
    rows.sort(key=lambda r: (r[0], r[1], str(r[2])))
    header = f"{'benchmark':<62} {'median':>10} {'vs eager':>9} {'vs compile':>10}  throughput / extra_info"
    print(header)
    print("-" * len(header))
    last = None
    for base, key, impl, b, med in rows:
        if last is not None and (base, key) != last:
            print()
        last = (base, key)

        def ratio(names):
            for n in names:
                other = medians.get((base, key, n))
                if other and med and n != impl:
                    return f"{other / med:.2f}x"
            return ""

        name = b.get("name", "?")
        if len(name) > 62:
            name = name[:59] + "..."
        extra = b.get("extra_info") or {}
        thr = _throughput(extra, med)
        info = "; ".join(x for x in (thr, _extra_str(extra)) if x)
        print(f"{name:<62} {_fmt_time(med):>10} {ratio(EAGER):>9} {ratio(COMPILE):>10}  {info}")
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
