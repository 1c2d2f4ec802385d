#!/usr/bin/env python3
"""Write BENCHMARKS.md (and PNG plots) from pytest-benchmark JSON files.

    python scripts/bench_report.py benchmarks/results.json benchmarks/results_thp.json \
        -o BENCHMARKS.md --plots benchmarks/plots --command "make bench"

Only the block between `<!-- generated:start -->` and `<!-- generated:end -->` (or --marker NAME) is
rewritten; the rest of the file (hand-written targets, GPU tables) is kept. A file without the
markers gets the block appended; a missing file is created with a short skeleton.

Tables: one per op, mode and run (file): implementation x shape with median time (and IQR), the
speed-up over the eager and torch.compile siblings measured in the same run (eager median / this
median: > 1 means faster), peak extra memory, achieved bandwidth or FLOP/s and its % of the measured
limit (copy bandwidth or torch.mm rate), and the first-call time of torch.compile (compile_s).
Sweeps (extra_info "sweep" and "x") get a compact table and a plot of time against size.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys
from collections import OrderedDict, defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchjson import COMPILE, EAGER, fmt_bytes, fmt_time, load, siblings, throughput  # noqa: E402

IMPL_ORDER = ["fastadapt", "eager", "compile", "liger", "fastadapt_compile", "eager_slicing"]
MODE_NAMES = {"fwd": "forward (torch.no_grad)", "fwd_bwd": "forward + backward", "epoch": "one epoch",
              "step": "one training step"}
HIDE_PARAMS = ("impl", "mode", "device")
SKELETON = """# Benchmarks

Numbers below the generated marker are written by `scripts/bench_report.py` (run by `make bench`);
everything else in this file is written by hand and kept when the report is regenerated.

## Targets vs measured

(hand-written)

## GPU

(hand-written: paste the tables that scripts/gpu_check.sh writes to $OUT/BENCHMARKS_cuda.md, with the date and the GPU)

"""


def impl_rank(impl):
    return IMPL_ORDER.index(impl) if impl in IMPL_ORDER else len(IMPL_ORDER)


def size_of(text):
    """A sortable, plottable size from a parameter string: 2048x32000 -> 65536000, 1M -> 1048576."""
    total, found = 1, False
    for num, suffix in re.findall(r"(\d+(?:\.\d+)?)([KMG]?)(?![A-Za-z])", str(text)):
        total *= float(num) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[suffix]
        found = True
    return total if found else None


def shape_label(b):
    vals = [v for v in (k.split("=", 1)[-1] if "=" in k else k for k in b.key
                        if not any(k.startswith(h + "=") for h in HIDE_PARAMS)) if v not in ("cpu", "cuda")]
    return " ".join(vals) or b.extra.get("shape", "-")


def mode_of(b):
    mode = b.extra.get("mode") or b.params.get("mode") or b.params.get("pass")
    if mode:
        return str(mode)
    for token in ("epoch", "step"):
        if token in b.base:
            return token
    return "fwd" if any(t in ("fwd", "forward") for t in b.key) else "fwd_bwd"


def device_of(b):
    return b.extra.get("device") or b.params.get("device") or ("cuda" if "cuda" in b.key else "cpu")


def run_label(data, benches):
    """A short name for one JSON file: the device, and for the CPU the allocator setting."""
    devices = {device_of(b) for b in benches}
    m = next((b.extra["machine"] for b in benches if isinstance(b.extra.get("machine"), dict)), {})
    if "cuda" in devices:
        return f"CUDA, {m.get('gpu', 'GPU')}"
    thp = any(b.extra.get("thp_mem_alloc") for b in benches)
    return "CPU, THP_MEM_ALLOC_ENABLE=1" if thp else "CPU, default allocator"


def header(runs, commands, notes):
    lines = []
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"_Generated {now} by `scripts/bench_report.py` from "
                 f"{', '.join(f'`{os.path.relpath(p)}`' for p, _, _, _ in runs)}. Do not edit between the markers._")
    lines.append("")
    for path, data, benches, label in runs:
        mi = data.get("machine_info", {})
        cpu = mi.get("cpu", {})
        m = next((b.extra["machine"] for b in benches if isinstance(b.extra.get("machine"), dict)), {})
        fb = m.get("fastadapt_build", {})
        build = ", ".join(f"{k}={v}" for k, v in fb.items() if k in (
            "fastadapt_version", "cpu_kernels", "cuda_kernels", "cpu_capability", "cuda_archs", "extension_loaded"))
        lines.append(f"**{label}** (`{os.path.relpath(path)}`, {len(benches)} benchmarks, run {data.get('datetime', '?')[:19]})")
        lines.append("")
        lines.append(f"- machine: {cpu.get('brand_raw', mi.get('processor', '?'))}, {cpu.get('count', m.get('cpu_count', '?'))} "
                     f"logical cores, torch threads {m.get('threads', '?')}, {mi.get('system', '')} {mi.get('machine', '')}, "
                     f"node `{mi.get('node', '?')}`" + (f"; GPU {m['gpu']} (CUDA {m.get('cuda')})" if m.get("gpu") else ""))
        lines.append(f"- software: Python {mi.get('python_version', '?')}, torch {m.get('torch', '?')}; fastadapt: {build or '?'}")
        thp = any(b.extra.get("thp_mem_alloc") for b in benches)
        lines.append(f"- THP_MEM_ALLOC_ENABLE={'1' if thp else 'unset/0'}; inductor cache `{m.get('inductor_cache', '?')}` "
                     f"(compile_s is a first call: tracing plus code generation, or a cache hit if that cache is warm)")
        ceil = [(b.extra.get("copy_GBps"), b.extra.get("gemm_GFLOPs")) for b in benches]
        bw = [c for c, _ in ceil if isinstance(c, (int, float))]
        mm = [g for _, g in ceil if isinstance(g, (int, float))]
        if bw or mm:
            lines.append("- measured limits: " + "; ".join(
                x for x in ((f"copy bandwidth {max(bw):.3g} GB/s (read + write, best of 5)" if bw else ""),
                            (f"torch.mm {max(mm):.4g} GFLOP/s" if mm else "")) if x))
        commit = data.get("commit_info", {})
        if commit.get("id"):
            lines.append(f"- commit {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''} on {commit.get('branch', '?')}")
        lines.append("")
    if commands:
        lines.append("Commands:")
        lines.append("")
        lines += [f"    {c}" for c in commands]
        lines.append("")
    for n in notes:
        if not n.strip():
            continue
        lines.append(f"> {n}")
        lines.append("")
    lines.append("How to read: times are medians over the rounds (warm-up rounds excluded; first calls, torch.compile's "
                 "compilation included, are timed separately). **vs eager** and **vs compile** are that sibling's "
                 "median divided by this row's, both measured in the same pytest process: > 1 means this row is "
                 "faster. **peak extra** is the memory a step adds at its peak (CPU: resident high-water mark in a "
                 "fresh process; CUDA: max_memory_allocated delta). **% of limit** divides the achieved traffic floor "
                 "(bytes that must move) by the measured copy bandwidth, or the achieved FLOP/s by the torch.mm rate; operands that fit in the "
                 "caches can exceed 100% of a copy bandwidth measured on 256 MiB buffers.")
    lines.append("")
    return lines


def headline(runs):
    """Per op and run: the range of fastadapt's speed-up over eager and over compile, fwd+bwd."""
    out = []
    for path, data, benches, label in runs:
        sib = siblings(benches)
        per_op = defaultdict(lambda: ([], []))
        for b in benches:
            if b.impl != "fastadapt" or "sweep" in b.extra or mode_of(b) == "fwd":
                continue
            op = b.extra.get("op") or b.base
            e, c = b.ratio(sib, EAGER), b.ratio(sib, COMPILE)
            if e:
                per_op[op][0].append((e, shape_label(b)))
            if c:
                per_op[op][1].append((c, shape_label(b)))
        for op, (e, c) in per_op.items():
            def rng(xs, who):
                if not xs:
                    return ""
                lo, hi = min(xs), max(xs)
                return (f"{who} {lo[0]:.2g}x ({lo[1]}) to {hi[0]:.2g}x ({hi[1]})" if len(xs) > 1
                        else f"{who} {lo[0]:.2g}x ({lo[1]})")
            parts = [p for p in (rng(e, "eager"), rng(c, "torch.compile")) if p]
            if parts:
                out.append(f"- **{op}** ({label}, forward + backward / training), fastadapt's speed-up over "
                           + ", over ".join(parts) + "; > 1x: fastadapt is faster")
    return out


def limit_pct(extra):
    """(% of the machine limit, which limit) from extra_info: recorded, else derived from the usual keys."""
    if isinstance(extra.get("pct_of_limit"), (int, float)):
        return extra["pct_of_limit"], extra.get("limit", "")
    num = lambda *keys: next((extra[k] for k in keys if isinstance(extra.get(k), (int, float))), None)  # noqa: E731
    bw, ceil = num("achieved_GBps"), num("copy_GBps")
    if bw and ceil:
        return 100 * bw / ceil, "copy bandwidth"
    fl = num("achieved_GFLOPs", "achieved_GFLOPS", "GFLOPs", "gflops")
    mm = num("gemm_GFLOPs", "gemm_GFLOPS", "mm_GFLOPs", "mm_GFLOPS", "torch_mm_GFLOPs", "peak_GFLOPs")
    if fl and mm:
        return 100 * fl / mm, "torch.mm"
    return None, ""


def main_table(rows, sib):
    lines = ["| shape | impl | median (IQR) | vs eager | vs compile | peak extra | achieved | % of limit | first call |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in rows:
        e, c = b.ratio(sib, EAGER), b.ratio(sib, COMPILE)
        iqr = b.stats.get("iqr")
        mem = fmt_bytes(b.extra.get("peak_extra_bytes")) if "peak_extra_bytes" in b.extra else (
            "error" if "peak_error" in b.extra else "")
        pct, limit = limit_pct(b.extra)
        first = b.extra.get("compile_s", b.extra.get("first_call_s"))
        first = (f"compile {first:.3g} s" if "compile_s" in b.extra else fmt_time(first)) if isinstance(first, (int, float)) else ""
        lines.append("| " + " | ".join([
            shape_label(b), f"**{b.impl}**" if b.impl == "fastadapt" else str(b.impl),
            f"{fmt_time(b.median)} ({fmt_time(iqr)})" if iqr is not None else fmt_time(b.median),
            f"{e:.2f}x" if e else "", f"{c:.2f}x" if c else "", mem, throughput(b.extra, b.median),
            f"{pct:.1f}% {'copy BW' if 'copy' in limit else 'torch.mm' if 'mm' in limit else limit}" if isinstance(pct, (int, float)) else "",
            first]) + " |")
    return lines


def sweep_table(rows, sib):
    impls = sorted({b.impl for b in rows}, key=impl_rank)
    xs = sorted({b.extra["x"] for b in rows})
    by = {(b.extra["x"], b.impl): b for b in rows}
    lines = ["| x | " + " | ".join(impls) + " | fastadapt vs eager | fastadapt vs compile | fastadapt achieved |",
             "|---|" + "---|" * (len(impls) + 3)]
    for x in xs:
        f = by.get((x, "fastadapt"))
        cells = [fmt_time(by[(x, i)].median) if (x, i) in by else "" for i in impls]
        e = f.ratio(sib, EAGER) if f else None
        c = f.ratio(sib, COMPILE) if f else None
        lines.append(f"| {x} | " + " | ".join(cells) + f" | {f'{e:.2f}x' if e else ''} | {f'{c:.2f}x' if c else ''} | "
                     f"{throughput(f.extra, f.median) if f else ''} |")
    return lines


def plot(rows, title, xlabel, path, xfun):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    by_impl = defaultdict(list)
    for b in rows:
        x = xfun(b)
        if x and b.median:
            by_impl[b.impl].append((x, b.median))
    if sum(len(v) > 1 for v in by_impl.values()) == 0:
        plt.close(fig)
        return False
    for impl in sorted(by_impl, key=impl_rank):
        pts = sorted(by_impl[impl])
        ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("median time (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def slug(*parts):
    return re.sub(r"[^A-Za-z0-9]+", "_", "_".join(str(p) for p in parts)).strip("_").lower()


def body(runs, plots_dir, out_path):
    lines = []
    heads = headline(runs)
    if heads:
        lines += ["### Headline ratios", ""] + heads + [""]
    # main tables: op -> mode -> run
    groups = OrderedDict()
    sweeps = OrderedDict()
    for path, data, benches, label in runs:
        sib = siblings(benches)
        for b in benches:
            op = b.extra.get("op") or b.base
            if "sweep" in b.extra and "x" in b.extra:
                sweeps.setdefault((op, b.extra["sweep"], mode_of(b)), []).append((label, b, sib))
            else:
                groups.setdefault((op, b.base), OrderedDict()).setdefault(mode_of(b), OrderedDict()) \
                    .setdefault((label, device_of(b)), []).append((b, sib))
    rel = lambda p: os.path.relpath(p, os.path.dirname(os.path.abspath(out_path)) or ".")  # noqa: E731
    for (op, base), modes in groups.items():
        lines += [f"### {op}" + (f" (`{base}`)" if base != op else ""), ""]
        for mode, per_run in modes.items():
            for (label, device), items in per_run.items():
                rows = sorted((b for b, _ in items), key=lambda b: (size_of(shape_label(b)) or 0, shape_label(b),
                                                                      impl_rank(b.impl)))
                lines += [f"**{MODE_NAMES.get(mode, mode)}, {label}**", ""]
                lines += main_table(rows, items[0][1]) + [""]
                if plots_dir and len({shape_label(b) for b in rows}) >= 3:
                    png = os.path.join(plots_dir, slug(op, mode, label) + ".png")
                    if plot(rows, f"{op}, {MODE_NAMES.get(mode, mode)}, {label}", "size (elements, product of the shape)",
                            png, lambda b: size_of(shape_label(b))):
                        lines += [f"![{op} {mode} {label}]({rel(png)})", ""]
    if sweeps:
        lines += ["### Scaling sweeps", "",
                  "Forward + backward, one parameter varied at a time; times per implementation, and fastadapt's "
                  "speed-up over its siblings of the same run.", ""]
        for (op, sweep, mode), items in sweeps.items():
            for label in OrderedDict.fromkeys(lab for lab, _, _ in items):
                rows = [b for lab, b, _ in items if lab == label]
                sib = next(s for lab, _, s in items if lab == label)
                lines += [f"**{op} over {sweep}, {MODE_NAMES.get(mode, mode)}, {label}**", ""]
                lines += sweep_table(rows, sib) + [""]
                if plots_dir:
                    png = os.path.join(plots_dir, slug(op, "sweep", sweep, label) + ".png")
                    if plot(rows, f"{op}: time vs {sweep}, {label}", sweep, png, lambda b: b.extra["x"]):
                        lines += [f"![{op} vs {sweep}]({rel(png)})", ""]
    return lines


def splice(text, block, marker):
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    new = f"{start}\n{block.rstrip()}\n{end}"
    if start in text and end in text and text.index(start) < text.index(end):
        return text[: text.index(start)] + new + text[text.index(end) + len(end):]
    return (text.rstrip() + "\n\n" if text.strip() else "") + new + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("-o", "--output", default="BENCHMARKS.md")
    ap.add_argument("--plots", default=None, help="folder for the PNG plots (none without it)")
    ap.add_argument("--command", action="append", default=[], help="a command line to quote (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="a line to add under the header (repeatable)")
    ap.add_argument("--marker", default="generated")
    ap.add_argument("--title", default="Measured results")
    ap.add_argument("--no-skeleton", action="store_true", help="a new output file holds only the generated block")
    args = ap.parse_args(argv)
    runs = []
    for p in args.json:
        try:
            data, benches = load(p)
        except (OSError, ValueError) as exc:
            print(f"bench_report: skipping {p}: {exc}", file=sys.stderr)
            continue
        benches = [b for b in benches if b.median is not None]
        runs.append((p, data, benches, run_label(data, benches)))
    if not runs:
        print("bench_report: no readable benchmark JSON", file=sys.stderr)
        return 1
    block = "\n".join([f"## {args.title}", ""] + header(runs, args.command, args.note)
                      + body(runs, args.plots, args.output))
    text = open(args.output).read() if os.path.exists(args.output) else ("" if args.no_skeleton else SKELETON)
    out = splice(text, block, args.marker)
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(out)
    os.replace(tmp, args.output)
    print(f"bench_report: wrote {args.output} ({sum(len(r[2]) for r in runs)} benchmarks"
          f"{', plots in ' + args.plots if args.plots else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
