"""Parsing of pytest-benchmark JSON shared by scripts/bench_table.py and scripts/bench_report.py.

A benchmark's name looks like test_xxx[fwd-cuda-fastadapt-2048x32000]. Its implementation is the
parameter whose value is one of IMPLS, found in pytest-benchmark's "params" or else among the name's
'-'-separated tokens; the other parameters form its key. Two benchmarks of the same test function
with the same key are siblings: ratios are only ever taken between siblings of one file (one run).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re

IMPLS = ("fastadapt", "eager", "compile", "compiled", "torch", "reference", "fallback", "liger", "apex",
         "triton", "ours", "baseline", "eager_slicing", "fastadapt_compile")
EAGER = ("eager", "torch", "baseline")
COMPILE = ("compile", "compiled")


@dataclasses.dataclass
class Bench:
    path: str             # the JSON file it came from
    name: str             # test_xxx[...]
    base: str             # test function
    impl: str | None
    key: tuple            # the other parameters, "k=v" strings (or name tokens)
    params: dict
    median: float | None
    stats: dict
    extra: dict

    def ratio(self, siblings: dict, names) -> float | None:
        """other / self for the first sibling implementation in `names`: > 1 means self is faster."""
        for n in names:
            other = siblings.get((self.base, self.key, n))
            if other is not None and other.median and self.median and n != self.impl:
                return other.median / self.median
        return None


def split(bench: dict):
    """(test base name, implementation or None, key of the other parameters, params)."""
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
        params = {}
        for tok in inside.split("-") if inside else []:
            if impl is None and tok.lower() in IMPLS:
                impl = tok.lower()
            else:
                others.append(tok)
    return base, impl, tuple(others), params


def load(path: str) -> tuple[dict, list[Bench]]:
    """(the file's top-level JSON, its benchmarks)."""
    with open(path) as f:
        data = json.load(f)
    out = []
    for b in data.get("benchmarks", []):
        base, impl, key, params = split(b)
        stats = b.get("stats") or {}
        out.append(Bench(path, b.get("name", "?"), base, impl, key, params, stats.get("median"), stats,
                         b.get("extra_info") or {}))
    return data, out


def siblings(benches) -> dict:
    return {(b.base, b.key, b.impl): b for b in benches}


def fmt_time(s):
    if s is None or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "?"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= f:
            return f"{s / f:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(n):
    if not isinstance(n, (int, float)):
        return ""
    sign, n = ("-" if n < 0 else ""), abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.3g} {unit}" if unit != "B" else f"{sign}{int(n)} B"
        n /= 1024


def throughput(extra: dict, median) -> str:
    """GB/s and GFLOP/s from extra_info: the recorded achieved_* values, else bytes / flops over median."""
    out = []
    if isinstance(extra.get("achieved_GBps"), (int, float)):
        out.append(f"{extra['achieved_GBps']:.3g} GB/s")
    elif median:
        for key in ("bytes", "bytes_moved", "nbytes", "floor_bytes"):
            if isinstance(extra.get(key), (int, float)):
                out.append(f"{extra[key] / median / 1e9:.3g} GB/s")
                break
    for key in ("achieved_GFLOPs", "achieved_GFLOPS", "GFLOPs", "gflops"):
        if isinstance(extra.get(key), (int, float)):
            out.append(f"{extra[key]:.3g} GFLOP/s")
            break
    else:
        if median:
            for key in ("flops", "flop"):
                if isinstance(extra.get(key), (int, float)):
                    out.append(f"{extra[key] / median / 1e9:.3g} GFLOP/s")
                    break
    return ", ".join(out)


HIDDEN_EXTRA = ("machine",)


def extra_str(extra: dict, limit=120):
    parts = []
    for k, v in extra.items():
        if k in HIDDEN_EXTRA or isinstance(v, dict):
            continue
        if isinstance(v, float):
            v = f"{v:.4g}"
        parts.append(f"{k}={v}")
    s = " ".join(parts)
    return s if len(s) <= limit else s[: limit - 3] + "..."
