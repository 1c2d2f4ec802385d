"""The training loop every trainer shares: one ``fit`` that iterates a batch source and calls the
trainer's ``step`` on each batch; Keras-style ``evaluate`` and ``predict``; checkpoints with exact
resume.

A trainer supplies ``prepare(*data) -> (batches, validation sets)``, ``step(batch) -> (loss, {metric:
sum})`` and ``epoch_logs(sums) -> logs``; the hooks ``on_fit_start``/``on_fit_end`` let it add summary
fields to the History, ``on_step_start`` per-step state. Metric sums stay on the device during an epoch and are read once at its end,
so a step never waits for the host; the optimizers are PyTorch's fused implementations where the
device has them.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, TensorDataset

from fastadapt.training import checkpoint as ckpt
from fastadapt.training import distributed as dist
from fastadapt.training.batches import LoaderBatches, TensorBatches
from fastadapt.training.callbacks import Callback
from fastadapt.training.config import TrainConfig, positive_int
from fastadapt.training.data import as_dataset, check_labels, eval_loader, feature_shape, labels_of
from fastadapt.training.history import History
from fastadapt.training.surgery import freeze, get_head, input_features, load_state, unfreeze

# Rows per forward pass when evaluating in-memory data: large enough that the per-call cost vanishes.
EVAL_ROWS = 4096


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG the loop touches, as tensors and plain values (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "python": {"version": version, "state": torch.tensor(pystate, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricSums:
    """Named sums over an epoch: tensors accumulate in place on the device, Python numbers (batch
    sizes) on the host; ``read`` syncs once."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.numbers: dict[str, float] = {}

    def add(self, values: dict):
        for name, v in values.items():
            if isinstance(v, torch.Tensor):
                acc = self.tensors.get(name)
                if acc is None:
                    self.tensors[name] = v.detach().to(torch.float64, copy=True)
                else:
                    acc.add_(v.detach())
            else:
                self.numbers[name] = self.numbers.get(name, 0.0) + v

    def read(self, device) -> dict:
        """Every sum as a float, summed over the ranks under DDP."""
        names = list(self.tensors) + list(self.numbers)
        values = list(self.tensors.values()) + [torch.tensor(float(v), dtype=torch.float64, device=device)
                                                for v in self.numbers.values()]
        if not values:
            return {}
        return dict(zip(names, dist.all_reduce_sum(torch.stack([v.to(device) for v in values])).tolist()))


@dataclasses.dataclass(frozen=True)
class ValSet:
    """A validation set as the user gave it and as a checked Dataset."""
    data: object
    ds: Dataset


def _logits_f32(logits):
    return logits if logits.dtype == torch.float32 else logits.float()


class Trainer:
    """The loop shared by the trainers (see the module docstring): ``model`` trained with the options
    of ``config`` (a :class:`TrainConfig`) or of keyword arguments that build one."""

    Config = TrainConfig
    # Trainers whose every collective call (forward passes included: FSDP2 all-gathers in each) is made
    # by all ranks alike, evaluation included, and whose model runs only through self._net.
    supports_fsdp = False
    # True: the loop hands the trainer each accumulation window's batches before their steps
    # (on_window_start) and backpropagates each step's loss as it is, the trainer normalising it over the
    # whole window itself; False: each step's loss is divided by grad_accum_steps.
    normalises_over_window = False

    def __init__(self, model: nn.Module, config: TrainConfig | None = None, *, callbacks=(), **options):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if config is not None and options:
            raise TypeError(f"pass either config or keyword options, not both (got {sorted(options)})")
        self.config = self.Config(**options) if config is None else config
        if not isinstance(self.config, self.Config):
            raise TypeError(f"config must be a {self.Config.__name__}, got {type(self.config).__name__}")
        self.callbacks = list(callbacks or ())
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastadapt Callback instances, got {type(cb).__name__}")
        if self.config.parallel == "fsdp" and not self.supports_fsdp:
            raise ValueError(f"parallel='fsdp' is not supported by {type(self).__name__} (LMAdaptiveTrainer "
                             f"supports it); use parallel='ddp'")
        self.device = self.config.device
        self.model = model.to(self.device)
        if self.config.freeze_backbone:
            freeze(self.model)
            unfreeze(self.model, [get_head(self.model)[1]])
        self.optimizer = self.scheduler = None
        self.history = History()
        self.epoch = self.global_step = 0
        self.stop_training = False
        self.check_batch_labels = False  # per-batch label checks, for datasets whose labels cannot be read up front
        self._net = self.model  # what a step runs; under torchrun wrapped in DDP or sharded with FSDP2
        self._forward = self.step  # torch.compile of it with config.compile
        self._val_sets: dict = {}
        self._pending_state = None
        self._epoch_rng = None

    # ---- what a trainer supplies -------------------------------------------------------------------

    def prepare(self, *data):
        """(training batch source, {log-name prefix: ValSet}) for ``fit``'s arguments."""
        raise NotImplementedError

    def step(self, batch) -> tuple[torch.Tensor, dict]:
        """(loss, {metric name: sum over the batch}) for one batch."""
        raise NotImplementedError

    def epoch_logs(self, sums: dict) -> dict:
        raise NotImplementedError

    def on_fit_start(self, resuming: bool):
        """After the optimizer and the History are set up (restored, when resuming), before the first epoch."""

    def on_fit_end(self):
        """After the last epoch and the callbacks' on_fit_end."""

    def on_step_start(self):
        """Before each batch's forward (outside a compiled step): per-step state such as a scheduled weight."""

    def on_window_start(self, batches: list):
        """With ``normalises_over_window``: the batches of one optimizer step (``grad_accum_steps`` of them,
        fewer at an epoch's end), before the first one's forward."""

    # ---- public API --------------------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model

    def fit(self, *data, epochs, resume_from=None) -> History:
        """Trains until ``epochs`` epochs in total have run (counting those of a resumed checkpoint).
        ``data`` is what the trainer's ``prepare`` takes."""
        positive_int("epochs", epochs)
        self._setup_distributed()  # before prepare: batch sources shard by rank
        self.check_batch_labels = False  # set by prepare for training sets whose labels it cannot read
        batches, self._val_sets = self.prepare(*data)
        dist.check_same_on_every_rank("batches per epoch", len(batches),
                                      "make the number of training samples a multiple of the number of ranks")
        resuming = resume_from is not None or self._pending_state is not None
        self._begin(len(batches), epochs, resume_from)
        self.on_fit_start(resuming)
        show = self._show_progress()
        start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        bar = None
        if show:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, initial=self.epoch, desc="epochs", unit="epoch", file=sys.stderr)
        while self.epoch < epochs and not self.stop_training:
            epoch = self.epoch
            logs = self._train_epoch(batches, epoch, show)
            logs.update(self._validate())
            logs["lr"] = self.optimizer.param_groups[0]["lr"]
            self.history.append(epoch, logs)
            self.epoch = epoch + 1
            # Checkpoints carry the RNG as it was here, at the epoch boundary: anything drawn later
            # (a final evaluation, say) must not leak into a resume.
            self._epoch_rng = rng_state()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if "acc" in k or k == "loss"})
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, logs)
        if bar is not None:
            bar.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        self.history.seconds += time.perf_counter() - start
        self.on_fit_end()
        return self.history

    def evaluate(self, data) -> dict:
        """{"loss": mean cross-entropy, "acc": accuracy} over ``data`` (summed across ranks under DDP)."""
        return self._evaluate(ValSet(data, self._checked_dataset(data, "data")))

    @torch.no_grad()
    def _evaluate(self, val: ValSet) -> dict:
        """evaluate() of a data set whose features and (readable) labels were checked already."""
        per_batch_labels = labels_of(val.ds) is None
        num_classes = get_head(self.model)[1].out_features
        was_training = self.model.training
        self.model.eval()
        sums = MetricSums()
        for x, y in self._eval_batches(val.data, val.ds):
            if per_batch_labels:
                check_labels(y, num_classes, "data")
            with self._autocast():
                logits = self.model(x)
            sums.add({"loss": F.cross_entropy(_logits_f32(logits), y, reduction="sum"),
                      "correct": (logits.argmax(-1) == y).sum(), "count": len(y)})
        self.model.train(was_training)
        s = sums.read(self.device)
        return {"loss": s["loss"] / s["count"], "acc": s["correct"] / s["count"]}

    @torch.no_grad()
    def predict(self, data) -> torch.Tensor:
        """Logits for every sample of ``data`` (a tensor of inputs, an (X, y) pair, a Dataset or a
        DataLoader), in order, on the CPU. Not sharded under DDP: each rank predicts everything."""
        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        ds = data.dataset if isinstance(data, DataLoader) else as_dataset(data, "data")
        loader = data if isinstance(data, DataLoader) else DataLoader(ds, batch_size=EVAL_ROWS)
        was_training = self.model.training
        self.model.eval()
        outs = []
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            with self._autocast():
                outs.append(self.model(x.to(self.device)).float().cpu())
        self.model.train(was_training)
        return torch.cat(outs)

    def save_checkpoint(self, path) -> None:
        """Weights (safetensors) and trainer state (weights_only-loadable) into folder ``path``,
        atomically; only rank 0 writes. Under FSDP2 the whole weights and optimizer state are gathered
        first, so the files are those of an unsharded run (every rank must call this)."""
        state = self._trainer_state()
        weights = dist.gather_full(self.model.state_dict()) if dist.is_sharded(self._net) else None
        if dist.is_main():
            ckpt.save_checkpoint(path, self.model, state, weights=weights)
        dist.barrier()

    def load_checkpoint(self, path) -> None:
        """Loads the weights now; optimizer, schedule, epoch, history and RNG states are restored by
        the next ``fit`` (or now, when the optimizer already exists)."""
        weights, state = ckpt.load_checkpoint(path)
        self._load_weights(weights, str(path))
        self._pending_state = state
        if self.optimizer is not None:
            self._restore(state)

    # ---- the loop's pieces -------------------------------------------------------------------------

    def _train_epoch(self, batches, epoch, show) -> dict:
        self._net.train()
        sums = MetricSums()
        n, accum = len(batches), self.config.grad_accum_steps
        items = batches.epoch(epoch)
        if show:
            from tqdm.auto import tqdm

            items = tqdm(items, total=n, desc=f"epoch {epoch + 1}", leave=False, file=sys.stderr)
        divide = accum > 1 and not self.normalises_over_window
        for batch, stepping in self._micro_batches(items, n, accum):
            # DDP syncs gradients at the window's last backward only; FSDP2 reduce-scatters at every
            # backward (keeping unsharded gradients across the window would cost a whole model per rank)
            no_sync = not stepping and isinstance(self._net, DistributedDataParallel)
            self.on_step_start()
            with self._net.no_sync() if no_sync else contextlib.nullcontext():
                with self._autocast():
                    loss, metrics = self._forward(batch)
                (loss / accum if divide else loss).backward()
            sums.add(metrics)
            if stepping:
                self._optimizer_step()
        return self.epoch_logs(sums.read(self.device))

    def _micro_batches(self, items, n, accum):
        """(batch, whether the optimizer steps after it); with ``normalises_over_window`` each window's
        batches are read (and shown to on_window_start) before the first one runs. Batch sources reuse
        their buffers, so a window of more than one batch holds copies."""
        if not self.normalises_over_window:
            for i, batch in enumerate(items):
                yield batch, (i + 1) % accum == 0 or i + 1 == n
            return
        items = iter(items)
        while window := [b if accum == 1 else _copy(b) for b in itertools.islice(items, accum)]:
            self.on_window_start(window)
            for j, batch in enumerate(window):
                yield batch, j + 1 == len(window)

    def _optimizer_step(self):
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.config.max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def _validate(self) -> dict:
        return {f"val_{prefix}{k}": v for prefix, val in self._val_sets.items() for k, v in self._evaluate(val).items()}

    def _eval_batches(self, data, ds):
        if isinstance(data, DataLoader) or not (isinstance(ds, TensorDataset) and len(ds.tensors) == 2):
            loader = eval_loader(ds, data, self.config.batch_size)
            return LoaderBatches(loader, self.device).epoch(0)
        X, y = ds.tensors
        rows = range(dist.rank(), len(y), dist.world_size())  # each rank its share, no padding
        idx = torch.as_tensor(rows) if dist.world_size() > 1 else None
        X, y = (X, y) if idx is None else (X[idx], y[idx])
        return ((X[i:i + EVAL_ROWS].to(self.device), y[i:i + EVAL_ROWS].to(self.device).long())
                for i in range(0, len(y), EVAL_ROWS))

    def batches_for(self, data, ds, batch_size=None):
        """The batch source of a training set: in memory when it is tensors, else its DataLoader."""
        bs = batch_size or self.config.batch_size
        seed = self.config.seed or 0
        if isinstance(data, DataLoader):
            return LoaderBatches(_sharded(data, seed), self.device)
        if isinstance(ds, TensorDataset) and len(ds.tensors) == 2:
            return TensorBatches(ds.tensors[0], ds.tensors[1].long(), bs, self.device, seed)
        return LoaderBatches(_sharded(DataLoader(ds, batch_size=bs, shuffle=True), seed), self.device)

    def _begin(self, batches_per_epoch, epochs, resume_from):
        """Fresh optimizer, schedule and History, then the checkpoint's state on top when resuming."""
        if resume_from is not None:
            weights, state = ckpt.load_checkpoint(resume_from)
            self._load_weights(weights, str(resume_from))
            self._pending_state = state
        if self._pending_state is None and self.config.seed is not None:
            seed_everything(self.config.seed)
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler(math.ceil(batches_per_epoch / self.config.grad_accum_steps) * epochs)
        self.history, self.epoch, self.global_step, self.stop_training = History(), 0, 0, False
        self._epoch_rng = None
        if self.config.compile and self._forward == self.step:
            self._forward = torch.compile(self.step)
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _build_optimizer(self):
        head = get_head(self.model)[1]
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        top = [p for p in head.parameters() if p.requires_grad]
        if not body and not top:
            raise ValueError("model has no trainable parameters (everything is frozen); unfreeze some")
        lr = self.config.lr
        if self.config.head_lr_mult == 1.0:  # one group: the optimizer's per-group work once per step
            groups = [{"params": body + top, "lr": lr}]
        else:
            groups = [g for g in ({"params": body, "lr": lr}, {"params": top, "lr": lr * self.config.head_lr_mult})
                      if g["params"]]
        spec, wd = self.config.optimizer, self.config.weight_decay
        if callable(spec):
            return spec(groups)
        if spec == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=wd, foreach=True)
        # one fused kernel over all parameters instead of a loop of small ops per tensor
        cls = torch.optim.AdamW if spec == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, weight_decay=wd, fused=True)

    def _build_scheduler(self, total_steps):
        """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at the last step:
        torch's own schedulers, stepped once per optimizer step (None when the rate is constant)."""
        warmup, kind, opt = self.config.warmup_steps, self.config.scheduler, self.optimizer
        S = torch.optim.lr_scheduler
        main = S.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup)) if kind == "cosine" else None
        if warmup == 0:
            return main
        warm = S.LinearLR(opt, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup - 1)
        return S.SequentialLR(opt, [warm, main or S.ConstantLR(opt, factor=1.0, total_iters=0)], milestones=[warmup])

    def _trainer_state(self) -> dict:
        if self.optimizer is None:
            raise RuntimeError("save_checkpoint needs a trainer that has started fit (no optimizer yet)")
        optimizer = self.optimizer.state_dict()
        if dist.is_sharded(self._net):
            optimizer = dist.gather_full(optimizer)  # a collective: every rank gets here
        return {"epoch": self.epoch, "global_step": self.global_step, "optimizer": optimizer,
                "rng": self._epoch_rng if self._epoch_rng is not None else rng_state(),
                "history": self.history.to_dict(), "callbacks": [cb.state_dict() for cb in self.callbacks]}

    def _restore(self, state):
        # The schedule is a function of the step: replayed (it spans this fit's epochs) before the
        # optimizer's saved state, learning rates included, is loaded on top.
        self.global_step = int(state["global_step"])
        if self.scheduler is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                for _ in range(self.global_step):
                    self.scheduler.step()
        optimizer = state["optimizer"]
        if dist.is_sharded(self._net):
            optimizer = dist.shard_optimizer_state(self.optimizer, optimizer)
        self.optimizer.load_state_dict(optimizer)
        self.epoch = int(state["epoch"])
        self.history = History()
        self.history.load_dict(state["history"])
        if len(state["callbacks"]) == len(self.callbacks):
            for cb, s in zip(self.callbacks, state["callbacks"]):
                cb.load_state_dict(s)
        set_rng_state(state["rng"])
        self._pending_state = None

    def _load_weights(self, weights: dict, source: str):
        """A checkpoint's whole weights into the model (each rank taking its shards under FSDP2)."""
        if dist.is_sharded(self._net):
            weights = dist.shard_state(weights, self.model)
        load_state(self.model, weights, source=source)

    def _autocast(self):
        if self.config.precision != "bf16":
            return contextlib.nullcontext()  # a disabled torch.autocast still costs its enter and exit
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _show_progress(self) -> bool:
        if not dist.is_main():
            return False
        if self.config.progress_bar is not None:
            return bool(self.config.progress_bar)
        return sys.stderr.isatty()

    def _check_features(self, ds, name):
        expected = input_features(self.model)
        shape = feature_shape(ds)
        got = int(np.prod(shape)) if shape else 1
        if expected is not None and got != expected:
            raise ValueError(f"{name} has {got} features per sample (shape {shape}) but the model's first "
                             f"layer expects {expected}")
        return got

    def _checked_dataset(self, data, name):
        """``data`` as a Dataset whose features fit the model and whose labels, where they can be read
        up front, fit its head (the others are checked batch by batch)."""
        ds = as_dataset(data, name)
        self._check_features(ds, name)
        check_labels(labels_of(ds), get_head(self.model)[1].out_features, name)
        return ds

    def _training_set(self, data, name):
        """A checked training set; labels that cannot be read up front make every step check its batch
        (a host sync each step)."""
        ds = self._checked_dataset(data, name)
        self.check_batch_labels |= labels_of(ds) is None
        return ds

    def _setup_distributed(self):
        """Under torchrun, ``self._net`` (the model, or the module a trainer's step runs) wrapped in DDP or
        sharded with FSDP2 (``config.parallel``), once."""
        if not dist.init_from_env(self.device) or isinstance(self._net, DistributedDataParallel) \
                or dist.is_sharded(self._net):
            return
        if self.config.parallel == "fsdp":
            self._net = dist.shard(self._net, (self.config.fsdp_blocks or dist.repeated_blocks)(self.model))
        else:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._net = DistributedDataParallel(self._net, device_ids=ids)


def _copy(batch):
    return tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in batch)


def _sharded(loader: DataLoader, seed: int) -> DataLoader:
    """Under DDP, a user's loader resharded with a DistributedSampler (its batch size and collate kept)."""
    if dist.world_size() <= 1:
        return loader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(loader.dataset, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                 seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, collate_fn=loader.collate_fn)
