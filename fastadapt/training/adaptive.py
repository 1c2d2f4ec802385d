"""AdaptiveTrainer: learn a target task while keeping the source task, with the fused loss
``alpha * loss_target + (1 - alpha) * loss_source``, the source term being cross-entropy on replayed
source samples, distillation from the model as it was before (LwF), or both; and the class-balanced
replay memory."""
from __future__ import annotations

import copy

import torch
from torch.utils.data import TensorDataset

from fastadapt.ops import alpha_weighted_cross_entropy, alpha_weighted_distillation
from fastadapt.training.batches import PairedBatches
from fastadapt.training.config import AdaptiveConfig, alpha_at
from fastadapt.training.data import as_dataset, check_labels, feature_shape, tensors_of
from fastadapt.training.loop import Trainer, ValSet, _logits_f32
from fastadapt.training.surgery import forget_growth, get_head, load_state


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
    """``fit(target_data, source_data=None, val_data=None, *, epochs, resume_from=None)``: trains on
    target batches with the source term of ``config.strategy``. Replay pairs each target batch with a
    source batch (the source side cycles as often as needed); LwF needs no source data: its teacher is
    a frozen copy of the model taken when ``fit`` starts (kept in checkpoints, so a resume distils from
    the same teacher).

    Options: :class:`~fastadapt.training.config.AdaptiveConfig` (``alpha``, a float in [0, 1] or
    ``callable(step) -> float`` evaluated at every optimizer step, alpha=1 being naive fine-tuning;
    ``strategy``, ``temperature``, ``distill_classes``; ``memory_size``, a replay memory of that many
    class-balanced source samples instead of all the source data; and the TransferTrainer options).
    ``val_data={"source": ..., "target": ...}`` is evaluated every epoch (default: the training sets;
    under LwF the target set alone, unless a source set is given there); with a source set the History
    gets source_acc_before/after, forgetting and bwt, and always target_acc.
    """

    Config = AdaptiveConfig

    def __init__(self, model, config=None, *, callbacks=(), **options):
        super().__init__(model, config, callbacks=callbacks, **options)
        self.memory: TensorDataset | None = None
        self.teacher: torch.nn.Module | None = None
        self._teacher_state = None  # a checkpoint's (teacher weights, distill_classes), until on_fit_start
        self._distill_k = 0
        # alpha for the loss: a float in eager mode (the loss keeps one tensor per value); under
        # compile=True a preallocated 0-dim tensor refilled in place, so a schedule does not recompile
        self._alpha_value = 0.0
        self._alpha = torch.tensor(0.0, dtype=torch.float64)

    @property
    def alpha(self):
        return self.config.alpha

    def alpha_at(self, step: int) -> float:
        return alpha_at(self.config.alpha, step)

    @property
    def distill_classes(self) -> int:
        """The head's first classes the teacher knows (AdaptiveConfig.distill_classes)."""
        head = get_head(self.model)[1]
        k = self.config.distill_classes or getattr(head, "grown_from", head.out_features)
        if k > head.out_features:
            raise ValueError(f"distill_classes={k} exceeds the {head.out_features} classes of the model's head")
        return k

    def prepare(self, target_data, source_data=None, val_data=None):
        cfg = self.config
        target = self._training_set(target_data, "target_data")
        if cfg.replays and source_data is None:
            raise ValueError(f"strategy={cfg.strategy!r} replays source samples: pass source_data (or use "
                             f"strategy='lwf', which needs none)")
        if not cfg.replays and source_data is not None:
            raise ValueError("strategy='lwf' trains on the target data alone and takes no source_data; to measure "
                             "forgetting pass the source set as val_data={'source': ..., 'target': ...}")
        if cfg.replays:
            source_shape = feature_shape(as_dataset(source_data, "source_data"))
            if feature_shape(target) != source_shape:
                raise ValueError(f"source_data has samples of shape {source_shape} but target_data has "
                                 f"{feature_shape(target)}")
            source = self._training_set(source_data, "source_data")
        if cfg.distills:
            _ = self.distill_classes  # checked before any training
        if val_data is None:
            val_data = {"target": target_data} if source_data is None else {"source": source_data, "target": target_data}
        sides = ({"source", "target"},) if cfg.replays else ({"source", "target"}, {"target"})
        if not isinstance(val_data, dict) or set(val_data) not in sides:
            got = sorted(val_data) if isinstance(val_data, dict) else type(val_data).__name__
            alone = "" if cfg.replays else " (or 'target' alone)"
            raise ValueError(f"val_data must be a dict with keys 'source' and 'target'{alone}, got {got}")
        val = {f"{side}_": ValSet(val_data[side], self._checked_dataset(val_data[side], f"val_data[{side!r}]"))
               for side in ("source", "target") if side in val_data}
        targets = self.batches_for(target_data, target)
        if not cfg.replays:
            return targets, val
        replay, replay_data = source, source_data
        if cfg.memory_tokens is not None:
            raise ValueError("memory_tokens sizes a memory of token sequences (LMAdaptiveTrainer); use memory_size")
        if cfg.memory_size is not None:
            if cfg.memory_size > len(source):
                raise ValueError(f"memory_size={cfg.memory_size} exceeds the {len(source)} samples of source_data")
            X, y = tensors_of(source)
            keep = replay_indices(y, cfg.memory_size, cfg.seed or 0)
            self.memory = replay = replay_data = TensorDataset(X[keep], y[keep])
        sources = self.batches_for(replay_data, replay, batch_size=min(targets.batch_size or cfg.batch_size,
                                                                       len(replay)))
        return PairedBatches(targets, sources), val

    def step(self, batch):
        x, y, ns = batch if len(batch) == 3 else (*batch, 0)  # replayed source rows first (PairedBatches)
        if self.check_batch_labels:
            num_classes = get_head(self.model)[1].out_features
            check_labels(y[:ns], num_classes, "source_data")
            check_labels(y[ns:], num_classes, "target_data")
        # one forward over both batches: one DDP gradient sync and one pass through the layers
        logits = _logits_f32(self._net(x))
        cfg = self.config
        alpha = self._alpha if cfg.compile else self._alpha_value
        # alpha = 1 weighs the distillation 0: in eager mode the teacher's forward is skipped too
        if not cfg.distills or (not cfg.compile and alpha == 1.0):
            loss = alpha_weighted_cross_entropy(logits[:ns], y[:ns], logits[ns:], y[ns:], alpha)
        elif not cfg.replays:
            loss = alpha_weighted_distillation(logits, y, self._teacher_logits(x), alpha, cfg.temperature)
        else:
            # the source term is the replayed rows' cross-entropy plus the distillation of every row
            # (alpha=0: the distillation op evaluates its distillation term alone)
            distill = alpha_weighted_distillation(logits, y, self._teacher_logits(x), 0.0, cfg.temperature)
            source_weight = (1.0 - alpha).to(distill.dtype) if isinstance(alpha, torch.Tensor) else 1.0 - alpha
            loss = alpha_weighted_cross_entropy(logits[:ns], y[:ns], logits[ns:], y[ns:], alpha) + source_weight * distill
        hits = logits.argmax(-1) == y
        nt = len(y) - ns
        metrics = {"loss": loss.detach() * nt, "correct": hits[ns:].sum(), "count": nt}
        if ns:
            metrics.update(source_correct=hits[:ns].sum(), source_count=ns)
        return loss, metrics

    @torch.no_grad()
    def _teacher_logits(self, x):
        """The frozen teacher's logits of the classes it knows."""
        teacher = _logits_f32(self.teacher(x))
        return teacher if self._distill_k == teacher.shape[-1] else teacher[:, :self._distill_k]

    def epoch_logs(self, s):
        logs = {"loss": s["loss"] / s["count"], "acc": s["correct"] / s["count"]}
        if "source_count" in s:
            logs["source_acc"] = s["source_correct"] / s["source_count"]
        return logs

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
        if self.config.distills:
            self._make_teacher()
        if not resuming and "source_" in self._val_sets:
            self.history.source_acc_before = self._evaluate(self._val_sets["source_"])["acc"]

    def _make_teacher(self):
        """The frozen teacher: the model as it is now, or as it was when a resumed run started."""
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        if self._teacher_state is None:
            self._distill_k = self.distill_classes
            return
        weights, self._distill_k = self._teacher_state
        load_state(self.teacher, weights, source="the checkpoint's teacher")
        self._teacher_state = None

    def on_fit_end(self):
        forget_growth(self.model)  # the grown head's new classes are trained now: a next teacher knows them all
        if "source_" in self._val_sets:
            self.history.source_acc_after = self._evaluate(self._val_sets["source_"])["acc"]
        self.history.target_acc = self._evaluate(self._val_sets["target_"])["acc"]

    def _trainer_state(self) -> dict:
        state = super()._trainer_state()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
            state["distill_classes"] = self._distill_k
        return state

    def _restore(self, state):
        # a resumed run distils from the teacher it started with, or from none: a checkpoint of another
        # strategy would silently change what the run learns
        if self.config.distills != ("teacher" in state):
            saved = "an LwF teacher" if "teacher" in state else "no teacher (a replay run)"
            raise ValueError(f"the checkpoint holds {saved} but strategy={self.config.strategy!r}; resume it with "
                             f"the strategy it was saved with")
        self._teacher_state = (state["teacher"], int(state["distill_classes"])) if "teacher" in state else None
        super()._restore(state)
