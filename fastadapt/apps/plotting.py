"""The plots of the end-to-end jobs: accuracy (demo, transfer, adapt) and perplexity (demo-lm, adapt-lm);
matplotlib is imported only when a plot is drawn."""
from __future__ import annotations

import os

from fastadapt.training import checkpoint as ckpt
from fastadapt.training import distributed as dist


def write_plot(folder, rows) -> str:
    """source and target held-out accuracy per epoch, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        h = r.get("history") or {}
        if "val_source_acc" in h:
            ax_s.plot(range(1, len(h["val_source_acc"]) + 1), h["val_source_acc"], label=r["method"])
            ax_t.plot(range(1, len(h["val_target_acc"]) + 1), h["val_target_acc"], label=r["method"])
        elif "val_acc" in h and r["method"] != "pretrain":
            ax_t.plot(range(1, len(h["val_acc"]) + 1), h["val_acc"], "--", label=f"transfer: {r['method']}")
    for ax, title in ((ax_s, "source accuracy (held-out)"), (ax_t, "target accuracy (held-out)")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    ax_s.set_ylabel("accuracy")
    fig.tight_layout()
    path = os.path.join(folder, "accuracy.png")
    if dist.is_main():
        ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def write_lm_plot(folder, report) -> str:
    """``perplexity.png``: the source's validation perplexity during pretraining, then both validation
    perplexities during adaptation, one line per method (step 0: the pretrained model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = {side: report["data"][side]["name"] for side in ("source", "target")}
    pre = report["pretrain"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    h = pre["history"]
    axes[0].plot([0] + h["step"], [pre["source_ppl_before"]] + h["val_source_ppl"], marker=".")
    axes[0].set_title(f"pretraining on {names['source']}: {names['source']} perplexity")
    for r in report["adapt"]:
        h = r["history"]
        for ax, side in zip(axes[1:], ("source", "target")):
            ax.plot([0] + h["step"], [r[f"{side}_ppl_before"]] + h[f"val_{side}_ppl"], marker=".", label=r["method"])
    for ax, side in zip(axes[1:], ("source", "target")):
        ax.set_title(f"adapting to {names['target']}: {names[side]} perplexity")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_yscale("log")
        # labelled ticks at 1, 1.5, 2, 3, 5, 7 x 10^k: a log axis's default labels only powers of ten
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("validation perplexity (log scale)")
    fig.tight_layout()
    path = os.path.join(folder, "perplexity.png")
    if dist.is_main():
        ckpt.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
