"""AdaptiveTrainer: learn a target task while rehearsing the source task, with the fused loss
``alpha * CE(target) + (1 - alpha) * CE(source)``; and the class-balanced replay memory."""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from fastadapt.ops.losses import alpha_weighted_cross_entropy
from fastadapt.training.data import as_dataset, check_labels, feature_shape, labels_of, tensors_of, train_loader
from fastadapt.training.surgery import get_head
from fastadapt.training.trainer import TransferTrainer, _positive_int


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


def _check_alpha(value, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {value!r}{where}")


class AdaptiveTrainer(TransferTrainer):
    """Trains on target batches, each paired with a source batch (source batches are cycled).

    ``alpha`` is a float in [0, 1] or ``callable(step) -> float`` evaluated at every optimizer
    step; alpha=1 is naive fine-tuning. ``memory_size`` replaces the source stream with a replay
    memory of that many class-balanced source samples (None: all the source data). Other keyword
    arguments are those of :class:`TransferTrainer`.
    """

    def __init__(self, model, *, alpha=0.5, memory_size=None, **kwargs):
        if callable(alpha):
            _check_alpha(alpha(0), " (alpha(0) of the alpha schedule)")
        else:
            _check_alpha(alpha, "")
        if memory_size is not None and (isinstance(memory_size, bool) or not isinstance(memory_size, int)
                                        or memory_size < 1):
            raise ValueError(f"memory_size must be None or a positive int, got {memory_size!r}")
        super().__init__(model, **kwargs)
        self.alpha, self.memory_size = alpha, memory_size
        self.memory: TensorDataset | None = None

    def alpha_at(self, step: int) -> float:
        if not callable(self.alpha):
            return float(self.alpha)
        a = self.alpha(step)
        _check_alpha(a, f" (alpha({step}) of the alpha schedule)")
        return float(a)

    def fit(self, target_data, source_data, val_data=None, *, epochs, resume_from=None):
        """``val_data={"source": ..., "target": ...}``; both are evaluated every epoch (without it,
        the training sets are). History gets source_acc_before/after, forgetting, bwt, target_acc."""
        _positive_int("epochs", epochs)
        target_ds = as_dataset(target_data, "target_data")
        source_ds = as_dataset(source_data, "source_data")
        val = self._val_sets(val_data, source_data, target_data)
        num_classes = get_head(self.model)[1].out_features
        t_feat = self._check_features(target_ds, "target_data")
        s_feat = feature_shape(source_ds)
        if feature_shape(target_ds) != s_feat:
            raise ValueError(f"source_data has samples of shape {s_feat} but target_data has "
                             f"{feature_shape(target_ds)} ({t_feat} features)")
        self._check_features(source_ds, "source_data")
        for name, ds in (("target_data", target_ds), ("source_data", source_ds)):
            check_labels(labels_of(ds), num_classes, name)
        self._check_batches = labels_of(target_ds) is None or labels_of(source_ds) is None
        for side, (ds, _) in val.items():
            self._check_features(ds, f"val_data[{side!r}]")
            check_labels(labels_of(ds), num_classes, f"val_data[{side!r}]")

        source_stream, source_template = source_ds, source_data
        if self.memory_size is not None:
            if self.memory_size > len(source_ds):
                raise ValueError(f"memory_size={self.memory_size} exceeds the {len(source_ds)} samples of source_data")
            X, y = tensors_of(source_ds)
            keep = replay_indices(y, self.memory_size, self.seed or 0)
            self.memory = source_stream = TensorDataset(X[keep], y[keep])
            source_template = None
        self._setup_distributed()
        target_loader = train_loader(target_ds, target_data, self.batch_size, self.seed or 0)
        bs = target_loader.batch_size or self.batch_size
        source_loader = train_loader(source_stream, source_template, min(bs, len(source_stream)), (self.seed or 0) + 1)
        resuming = resume_from is not None or self._pending_state is not None
        if not resuming:
            before = self.evaluate(val["source"][1])["acc"]
        self._begin(len(target_loader), epochs, resume_from)
        if not resuming:
            self.history.source_acc_before = before

        def run_epoch(epoch, show):
            sampler = getattr(source_loader, "sampler", None)
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            # restarted each epoch, so that a resumed run pairs the same source batches
            source_iter = iter(source_loader)

            def pair(target_batch):
                nonlocal source_iter
                try:
                    source_batch = next(source_iter)
                except StopIteration:
                    source_iter = iter(source_loader)
                    source_batch = next(source_iter)
                return source_batch, target_batch

            return self._train_epoch(target_loader, epoch, show, pair)

        def validate():
            logs = {}
            for side, (_, data) in val.items():
                logs.update({f"val_{side}_{k}": v for k, v in self.evaluate(data).items()})
            return logs

        self._loop(epochs, run_epoch, validate)
        final = {side: self.evaluate(data)["acc"] for side, (_, data) in val.items()}
        self.history.source_acc_after, self.history.target_acc = final["source"], final["target"]
        return self.history

    def _val_sets(self, val_data, source_data, target_data) -> dict:
        if val_data is None:
            val_data = {"source": source_data, "target": target_data}
        if not isinstance(val_data, dict) or set(val_data) != {"source", "target"}:
            got = sorted(val_data) if isinstance(val_data, dict) else type(val_data).__name__
            raise ValueError(f"val_data must be a dict with keys 'source' and 'target', got {got}")
        out = {}
        for side in ("source", "target"):
            ds = as_dataset(val_data[side], f"val_data[{side!r}]")
            out[side] = (ds, val_data[side] if isinstance(val_data[side], DataLoader) else ds)
        return out

    def _forward(self, batch):
        (xs, ys), (xt, yt) = batch
        xs, ys = xs.to(self.device), ys.to(self.device).long()
        xt, yt = xt.to(self.device), yt.to(self.device).long()
        if self._check_batches:
            num_classes = get_head(self.model)[1].out_features
            check_labels(ys, num_classes, "source_data")
            check_labels(yt, num_classes, "target_data")
        # one forward over both batches: one DDP gradient sync and one pass through the layers
        logits = self._net(torch.cat([xs, xt]))
        ls, lt = logits[: len(ys)].float(), logits[len(ys):].float()
        loss = alpha_weighted_cross_entropy(ls, ys, lt, yt, self.alpha_at(self.global_step))
        with torch.no_grad():
            s = torch.tensor([0.0, 0.0, float(len(yt)), 0.0, float(len(ys))], dtype=torch.float64, device=self.device)
            s[0] = loss.detach().double() * len(yt)
            s[1] = (lt.argmax(-1) == yt).sum()
            s[3] = (ls.argmax(-1) == ys).sum()
        return loss, s

    def _logs(self, sums) -> dict:
        loss, ct, nt, cs, ns = sums
        return {"loss": loss / nt, "acc": ct / nt, "source_acc": cs / ns}
