"""AdaptiveTrainer: learn a target task while rehearsing the source task, with the fused loss
``alpha * CE(target) + (1 - alpha) * CE(source)``; and the class-balanced replay memory."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from fastadapt.ops.losses import alpha_weighted_cross_entropy
from fastadapt.training.batches import PairedBatches
from fastadapt.training.config import AdaptiveConfig, check_alpha
from fastadapt.training.data import as_dataset, check_labels, feature_shape, tensors_of
from fastadapt.training.loop import Trainer, ValSet, _logits_f32
from fastadapt.training.surgery import get_head


def replay_indices(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` indices into ``labels``, balanced over classes: classes take turns contributing a
    random not-yet-chosen sample, so a class with few samples gives all it has and the rest is
    shared among the others."""
    g = torch.Generator().manual_seed(seed)
    pools = [idx[torch.randperm(len(idx), generator=g)].tolist()
             for idx in (torch.nonzero(labels == c).flatten() for c in torch.unique(labels))]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < size:
        for pool in pools:
            if depth < len(pool) and len(chosen) < size:
                chosen.append(pool[depth])
        depth += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


class AdaptiveTrainer(Trainer):
    """``fit(target_data, source_data, val_data=None, *, epochs, resume_from=None)``: trains on target
    batches, each paired with a source batch (the source side cycles as often as needed).

    Options: :class:`~fastadapt.training.config.AdaptiveConfig` (``alpha``, a float in [0, 1] or
    ``callable(step) -> float`` evaluated at every optimizer step, alpha=1 being naive fine-tuning;
    ``memory_size``, a replay memory of that many class-balanced source samples instead of all the
    source data; and the TransferTrainer options). ``val_data={"source": ..., "target": ...}`` is
    evaluated every epoch (default: the training sets); the History gets source_acc_before/after,
    forgetting, bwt and target_acc.
    """

    Config = AdaptiveConfig

    def __init__(self, model, config=None, *, callbacks=(), **options):
        super().__init__(model, config, callbacks=callbacks, **options)
        self.memory: TensorDataset | None = None
        # alpha for the loss: a float in eager mode (the loss keeps one tensor per value); under
        # compile=True a preallocated 0-dim tensor refilled in place, so a schedule does not recompile
        self._alpha_value = 0.0
        self._alpha = torch.tensor(0.0, dtype=torch.float64)

    @property
    def alpha(self):
        return self.config.alpha

    def alpha_at(self, step: int) -> float:
        if not callable(self.config.alpha):
            return float(self.config.alpha)
        a = self.config.alpha(step)
        check_alpha(a, f" (alpha({step}) of the alpha schedule)")
        return float(a)

    def prepare(self, target_data, source_data, val_data=None):
        target = self._training_set(target_data, "target_data")
        source_shape = feature_shape(as_dataset(source_data, "source_data"))
        if feature_shape(target) != source_shape:
            raise ValueError(f"source_data has samples of shape {source_shape} but target_data has {feature_shape(target)}")
        source = self._training_set(source_data, "source_data")
        if val_data is None:
            val_data = {"source": source_data, "target": target_data}
        if not isinstance(val_data, dict) or set(val_data) != {"source", "target"}:
            got = sorted(val_data) if isinstance(val_data, dict) else type(val_data).__name__
            raise ValueError(f"val_data must be a dict with keys 'source' and 'target', got {got}")
        val = {f"{side}_": ValSet(val_data[side], self._checked_dataset(val_data[side], f"val_data[{side!r}]"))
               for side in ("source", "target")}
        replay, replay_data = source, source_data
        if self.config.memory_size is not None:
            if self.config.memory_size > len(source):
                raise ValueError(f"memory_size={self.config.memory_size} exceeds the {len(source)} samples of "
                                 f"source_data")
            X, y = tensors_of(source)
            keep = replay_indices(y, self.config.memory_size, self.config.seed or 0)
            self.memory = replay = replay_data = TensorDataset(X[keep], y[keep])
        targets = self.batches_for(target_data, target)
        sources = self.batches_for(replay_data, replay, batch_size=min(targets.batch_size or self.config.batch_size,
                                                                       len(replay)))
        return PairedBatches(targets, sources), val

    def step(self, batch):
        x, y, ns = batch  # the source rows first (PairedBatches)
        if self.check_batch_labels:
            num_classes = get_head(self.model)[1].out_features
            check_labels(y[:ns], num_classes, "source_data")
            check_labels(y[ns:], num_classes, "target_data")
        # one forward over both batches: one DDP gradient sync and one pass through the layers
        logits = _logits_f32(self._net(x))
        loss = alpha_weighted_cross_entropy(logits[:ns], y[:ns], logits[ns:], y[ns:],
                                            self._alpha if self.config.compile else self._alpha_value)
        hits = logits.argmax(-1) == y
        nt = len(y) - ns
        return loss, {"loss": loss.detach() * nt, "correct": hits[ns:].sum(), "count": nt,
                      "source_correct": hits[:ns].sum(), "source_count": ns}

    def epoch_logs(self, s):
        return {"loss": s["loss"] / s["count"], "acc": s["correct"] / s["count"],
                "source_acc": s["source_correct"] / s["source_count"]}

    def on_step_start(self):
        if callable(self.config.alpha):
            self._set_alpha(self.alpha_at(self.global_step))

    def _set_alpha(self, value):
        self._alpha_value = value
        if self.config.compile:
            self._alpha.fill_(value)

    def on_fit_start(self, resuming):
        if not callable(self.config.alpha):
            self._set_alpha(float(self.config.alpha))
        if not resuming:
            self.history.source_acc_before = self._evaluate(self._val_sets["source_"])["acc"]

    def on_fit_end(self):
        self.history.source_acc_after = self._evaluate(self._val_sets["source_"])["acc"]
        self.history.target_acc = self._evaluate(self._val_sets["target_"])["acc"]
