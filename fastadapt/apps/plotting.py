"""The accuracy plot of the end-to-end jobs (matplotlib is imported only when a plot is drawn)."""
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
