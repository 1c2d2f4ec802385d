"""Training history: Keras-style per-epoch metric lists plus the transfer/continual-learning summary."""
from __future__ import annotations

import json
import math


class History:
    """``history["val_acc"][e]`` is a metric at epoch ``e``; the summary fields are set by the trainers.

    ``forgetting`` is the source accuracy lost, in percentage points; ``bwt`` (backward transfer) is
    ``source_acc_after - source_acc_before`` as a fraction, so negative means forgetting."""

    def __init__(self):
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.source_acc_before: float | None = None
        self.source_acc_after: float | None = None
        self.target_acc: float | None = None
        self.seconds: float = 0.0
        self.extra: dict = {}  # a trainer's own summary fields (JSON values; the LM trainer's perplexities)

    def append(self, epoch: int, logs: dict):
        self.epoch.append(epoch)
        for k, v in logs.items():
            self.history.setdefault(k, []).append(float(v))

    def __getitem__(self, key):
        return self.history[key]

    @property
    def forgetting(self) -> float | None:
        if self.source_acc_before is None or self.source_acc_after is None:
            return None
        return 100.0 * (self.source_acc_before - self.source_acc_after)

    @property
    def bwt(self) -> float | None:
        if self.source_acc_before is None or self.source_acc_after is None:
            return None
        return self.source_acc_after - self.source_acc_before

    def to_dict(self) -> dict:
        d = {"epoch": list(self.epoch), "history": {k: list(v) for k, v in self.history.items()},
                "source_acc_before": self.source_acc_before, "source_acc_after": self.source_acc_after,
                "forgetting": self.forgetting, "bwt": self.bwt, "target_acc": self.target_acc,
                "seconds": self.seconds}
        if self.extra:
            d["extra"] = dict(self.extra)
        return d

    def to_json(self, **kwargs) -> str:
        def clean(v):  # JSON has no NaN
            return None if isinstance(v, float) and not math.isfinite(v) else v

        d = self.to_dict()
        d["history"] = {k: [clean(x) for x in v] for k, v in d["history"].items()}
        return json.dumps(d, **kwargs)

    def load_dict(self, d: dict):
        self.epoch = list(d["epoch"])
        self.history = {k: list(v) for k, v in d["history"].items()}
        self.source_acc_before = d.get("source_acc_before")
        self.source_acc_after = d.get("source_acc_after")
        self.target_acc = d.get("target_acc")
        self.seconds = d.get("seconds", 0.0)
        self.extra = dict(d.get("extra") or {})

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, metrics={sorted(self.history)})"
