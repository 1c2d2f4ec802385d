"""``fastadapt demo``: pretrain on digits 0-4, transfer and adapt to digits 5-9, print an honest table.

Uses scikit-learn's bundled digits (1797 real 8x8 images; nothing is downloaded)."""
from __future__ import annotations

import json
import os
import statistics
import time

from fastadapt.apps import plotting, workflows

SOURCE, TARGET = "digits:0-4", "digits:5-9"
ALPHAS = (1.0, 0.75, 0.5)
MEMORY = 100
SHOTS = 5  # labels per class for the transfer comparison: where pretraining is supposed to help most


def run(output: str, *, seed: int = 0, quiet: bool = False, device=None, resume: bool = False) -> dict:
    start = time.perf_counter()
    cfg = workflows.RunConfig(output=output, seed=seed, quiet=quiet, device=device, resume=resume)
    os.makedirs(output, exist_ok=True)
    task = workflows.prepare(SOURCE, TARGET, cfg)
    say = (lambda *a: None) if quiet else print
    say(f"digits: source {SOURCE} ({len(task.source_train[1])} train / {len(task.source_test[1])} held out), "
        f"target {TARGET} ({len(task.target_train[1])} / {len(task.target_test[1])}); MLP 64-"
        f"{'-'.join(map(str, cfg.hidden))}, seed {seed}")
    path, pre = workflows.pretrain(task, cfg)
    say(f"1-2. pretrained on {SOURCE}: held-out accuracy {_pct(pre.get('source_acc'))}; saved and reloaded {path}")

    transfer_rows = [workflows.transfer(task, path, m, cfg, shots=SHOTS) for m in ("frozen", "finetune", "scratch")]
    say(f"\n3. transfer to {TARGET} with {SHOTS} labels per class (new 5-way head; source accuracy "
        f"uses the old head on the transferred backbone)")
    say(workflows.format_table(transfer_rows))
    scratch = next(r for r in transfer_rows if r["method"] == "scratch")["target_acc"]
    best = max((r for r in transfer_rows if r["method"] != "scratch"), key=lambda r: r["target_acc"])
    say(f"   {'pretraining helped' if best['target_acc'] > scratch else 'pretraining did NOT beat the scratch baseline'}"
        f" here: best transfer ({best['method']}) {_pct(best['target_acc'])} vs scratch {_pct(scratch)}.")

    adapt_rows = [workflows.adapt(task, path, a, MEMORY, cfg) for a in ALPHAS]
    adapt_rows.append(workflows.adapt(task, path, 0.5, None, cfg, name="joint (all source)"))
    say(f"\n4. adapt to {TARGET} with a class-incremental 10-way head (extend_head 5 -> 10), "
        f"replay memory of {MEMORY} source samples")
    say(workflows.format_table(adapt_rows))

    report = {"command": "fastadapt demo", "seed": seed, "source": SOURCE, "target": TARGET,
              "config": {k: v for k, v in vars(cfg).items() if k != "output"},
              "pretrain": pre, "transfer": transfer_rows, "adapt": adapt_rows,
              "seconds": time.perf_counter() - start}
    rp = workflows.write_report(output, report)
    pp = plotting.write_plot(output, adapt_rows + transfer_rows)
    say(f"\nreport: {rp}\nplot:   {pp}\ntotal:  {report['seconds']:.1f} s")
    return report


def run_seeds(output: str, seeds, *, quiet=False, device=None) -> dict:
    """The demo once per seed, then mean ± std of forgetting and target accuracy per adapt method."""
    per_seed = [run(os.path.join(output, f"seed{s}"), seed=s, quiet=True, device=device) for s in seeds]
    summary = {}
    for i, row in enumerate(per_seed[0]["adapt"]):
        rows = [r["adapt"][i] for r in per_seed]
        summary[row["method"]] = {k: _mean_std([r[k] for r in rows])
                                  for k in ("forgetting", "target_acc", "source_acc_after")}
    for method in ("finetune", "scratch"):
        accs = [next(r for r in s["transfer"] if r["method"] == method)["target_acc"] for s in per_seed]
        summary[f"transfer {method} ({SHOTS}/class)"] = {"target_acc": _mean_std(accs)}
    lines = [f"{len(seeds)} seeds ({', '.join(map(str, seeds))}): mean ± std",
             f"{'method':<28} {'forgetting (pts)':>18} {'target acc (%)':>16}"]
    for method, m in summary.items():
        f = m.get("forgetting")
        t = m["target_acc"]
        lines.append(f"{method:<28} {'—' if f is None else f'{f[0]:.1f} ± {f[1]:.1f}':>18} "
                     f"{f'{100 * t[0]:.1f} ± {100 * t[1]:.1f}':>16}")
    table = "\n".join(lines)
    print(table)
    workflows.ckpt.atomic_write_text(os.path.join(output, "summary.json"),
                             json.dumps({"seeds": list(seeds), "summary": summary, "table": table}, indent=2))
    return summary


def _mean_std(values):
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def _pct(v):
    return "—" if v is None else f"{100 * v:.1f}%"
