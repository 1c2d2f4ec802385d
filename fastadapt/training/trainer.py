"""TransferTrainer: fine-tune a (pretrained) classifier on a new task, Keras-style fit/evaluate/predict."""
from __future__ import annotations

import contextlib
import math
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastadapt.training import checkpoint as ckpt
from fastadapt.training.data import as_dataset, check_labels, eval_loader, feature_shape, labels_of, train_loader
from fastadapt.training import distributed as dist
from fastadapt.training.callbacks import Callback
from fastadapt.training.history import History
from fastadapt.training.surgery import freeze, get_head, input_features, load_state, unfreeze

_OPTIMIZERS = {
    "adamw": lambda groups, wd: torch.optim.AdamW(groups, weight_decay=wd),
    "adam": lambda groups, wd: torch.optim.Adam(groups, weight_decay=wd),
    "sgd": lambda groups, wd: torch.optim.SGD(groups, momentum=0.9, weight_decay=wd),
}
_PRECISIONS = ("32", "bf16")


class WarmupCosine:
    """LR factor: linear warmup over ``warmup`` steps, then constant or cosine decay to 0 at ``total``.
    A plain object (not a closure) so LambdaLR can checkpoint it."""

    def __init__(self, warmup: int, total: int, cosine: bool):
        self.warmup, self.total, self.cosine = warmup, total, cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


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


def _positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _device(device) -> torch.device:
    if device is None:
        return dist.default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return dev


class TransferTrainer:
    """Trains ``model`` with cross-entropy. Data may be DataLoaders, Datasets or (X, y) pairs.

    ``freeze_backbone`` trains the head only; ``head_lr_mult`` scales the head's learning rate.
    ``scheduler`` is None (constant) or "cosine", both after ``warmup_steps`` of linear warmup (steps
    are optimizer steps). ``precision="bf16"`` runs forward passes under bf16 autocast. ``optimizer``
    is "adamw", "adam", "sgd" or a callable mapping parameter groups to an optimizer. ``seed`` seeds
    Python, NumPy and torch when ``fit`` starts (not on resume, which restores the saved RNG states);
    the model's own initialisation is up to the caller. Under torchrun
    the model is wrapped in DistributedDataParallel and files are written by rank 0 only.
    """

    def __init__(self, model: nn.Module, *, lr=1e-3, optimizer="adamw", weight_decay=0.0,
                 freeze_backbone=False, head_lr_mult=1.0, scheduler=None, warmup_steps=0,
                 grad_accum_steps=1, max_grad_norm=None, precision="32", device=None,
                 callbacks=(), seed=None, progress_bar=None, batch_size=32):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, v in (("lr", lr), ("head_lr_mult", head_lr_mult)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if not (callable(optimizer) or optimizer in _OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)} or a callable, got {optimizer!r}")
        if scheduler not in (None, "constant", "cosine"):
            raise ValueError(f"scheduler must be None, 'constant' or 'cosine', got {scheduler!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        _positive_int("grad_accum_steps", grad_accum_steps)
        _positive_int("batch_size", batch_size)
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be None or > 0, got {max_grad_norm!r}")
        precision = str(precision)
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        callbacks = list(callbacks or ())
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be fastadapt Callback instances, got {type(cb).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed must be an int or None, got {seed!r}")

        self.device = _device(device)
        self.model = model.to(self.device)
        self.lr, self.optimizer_spec, self.weight_decay = float(lr), optimizer, float(weight_decay)
        self.head_lr_mult, self.scheduler_spec, self.warmup_steps = float(head_lr_mult), scheduler, warmup_steps
        self.grad_accum_steps, self.max_grad_norm, self.precision = grad_accum_steps, max_grad_norm, precision
        self.callbacks, self.seed, self.batch_size = callbacks, seed, batch_size
        self.progress_bar = progress_bar
        if freeze_backbone:
            freeze(self.model)
            unfreeze(self.model, [get_head(self.model)[1]])
        self.optimizer = None
        self.scheduler = None
        self.history = History()
        self.epoch = 0
        self.global_step = 0
        self.stop_training = False
        self._net = self.model  # the DDP wrapper under torchrun
        self._pending_state = None
        self._epoch_rng = None
        self._check_batches = True

    # ---- public API ------------------------------------------------------------------------------

    @property
    def unwrapped_model(self) -> nn.Module:
        return self.model

    def fit(self, train_data, val_data=None, *, epochs, resume_from=None) -> History:
        """Trains until ``epochs`` epochs in total have run (counting those of a resumed checkpoint)."""
        _positive_int("epochs", epochs)
        train_ds = as_dataset(train_data, "train_data")
        val_ds = as_dataset(val_data, "val_data") if val_data is not None else None
        num_classes = get_head(self.model)[1].out_features
        self._check_features(train_ds, "train_data")
        check_labels(labels_of(train_ds), num_classes, "train_data")
        # labels that could not be read up front are checked per batch (a device sync each step)
        self._check_batches = labels_of(train_ds) is None
        if val_ds is not None:
            self._check_features(val_ds, "val_data")
            check_labels(labels_of(val_ds), num_classes, "val_data")
        self._setup_distributed()
        loader = train_loader(train_ds, train_data, self.batch_size, self.seed or 0)
        self._begin(len(loader), epochs, resume_from)

        def run_epoch(epoch, bar):
            return self._train_epoch(loader, epoch, bar, lambda batch: batch)

        def validate():
            if val_ds is None:
                return {}
            return {f"val_{k}": v for k, v in self.evaluate(val_data if isinstance(val_data, DataLoader) else val_ds).items()}

        self._loop(epochs, run_epoch, validate)
        if val_ds is not None:  # of the returned model, which EarlyStopping may have rolled back
            self.history.target_acc = validate()["val_acc"]
        return self.history

    @torch.no_grad()
    def evaluate(self, data) -> dict:
        """{"loss": mean cross-entropy, "acc": accuracy} over ``data`` (summed across ranks under DDP)."""
        ds = as_dataset(data, "data")
        self._check_features(ds, "data")
        loader = eval_loader(ds, data, self.batch_size)
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        num_classes = get_head(self.model)[1].out_features
        per_batch = labels_of(ds) is None
        if not per_batch:
            check_labels(labels_of(ds), num_classes, "data")
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device).long()
            if per_batch:
                check_labels(y, num_classes, "data")
            with self._autocast():
                logits = self.model(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += len(y)
        self.model.train(was_training)
        loss, correct, n = dist.all_reduce_sum(sums).tolist()
        return {"loss": loss / n, "acc": correct / n}

    @torch.no_grad()
    def predict(self, data) -> torch.Tensor:
        """Logits for every sample of ``data`` (a tensor of inputs, an (X, y) pair, a Dataset or a
        DataLoader), in order, on the CPU. Not sharded under DDP: each rank predicts everything."""
        if isinstance(data, torch.Tensor):
            data = TensorDataset(data)
        ds = data.dataset if isinstance(data, DataLoader) else as_dataset(data, "data")
        loader = data if isinstance(data, DataLoader) else DataLoader(ds, batch_size=self.batch_size)
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
        atomically; only rank 0 writes."""
        if dist.is_main():
            ckpt.save_checkpoint(path, self.model, self._trainer_state())
        dist.barrier()

    def load_checkpoint(self, path) -> None:
        """Loads the weights now; optimizer, scheduler, epoch, history and RNG states are restored
        by the next ``fit`` (or now, when the optimizer already exists)."""
        weights, state = ckpt.load_checkpoint(path)
        load_state(self.model, weights, source=str(path))
        self._pending_state = state
        if self.optimizer is not None:
            self._restore(state)

    # ---- the loop --------------------------------------------------------------------------------

    def _begin(self, batches_per_epoch, epochs, resume_from):
        """Fresh optimizer/scheduler/history, then the checkpoint's state on top when resuming."""
        if resume_from is not None:
            weights, state = ckpt.load_checkpoint(resume_from)
            load_state(self.model, weights, source=str(resume_from))
            self._pending_state = state
        if self._pending_state is None and self.seed is not None:
            seed_everything(self.seed)
        self.optimizer = self._build_optimizer()
        steps_per_epoch = math.ceil(batches_per_epoch / self.grad_accum_steps)
        factor = WarmupCosine(self.warmup_steps, steps_per_epoch * epochs, self.scheduler_spec == "cosine")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.history, self.epoch, self.global_step, self.stop_training = History(), 0, 0, False
        self._epoch_rng = None
        if self._pending_state is not None:
            self._restore(self._pending_state)

    def _loop(self, epochs, run_epoch, validate):
        from tqdm.auto import tqdm

        show = self._show_progress()
        start = time.perf_counter()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        bar = tqdm(total=epochs, initial=self.epoch, desc="epochs", unit="epoch", disable=not show,
                   file=sys.stderr)
        while self.epoch < epochs and not self.stop_training:
            epoch = self.epoch
            logs = run_epoch(epoch, show)
            logs.update(validate())
            logs["lr"] = self.optimizer.param_groups[0]["lr"]
            self.history.append(epoch, logs)
            self.epoch = epoch + 1
            # Checkpoints carry the RNG as it was here, at the epoch boundary: anything drawn later
            # (a final evaluation creating DataLoader iterators, say) must not leak into a resume.
            self._epoch_rng = rng_state()
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items() if "acc" in k or k == "loss"})
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, logs)
        bar.close()
        for cb in self.callbacks:
            cb.on_fit_end(self)
        self.history.seconds += time.perf_counter() - start

    def _train_epoch(self, loader, epoch, show, to_batch) -> dict:
        """One pass over ``loader``; ``to_batch`` turns a loader item into what ``_forward`` takes."""
        from tqdm.auto import tqdm

        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self._net.train()
        stats = None
        n = len(loader)
        for i, item in enumerate(tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not show,
                                      file=sys.stderr)):
            stepping = (i + 1) % self.grad_accum_steps == 0 or i + 1 == n
            sync = contextlib.nullcontext() if stepping or self._net is self.model else self._net.no_sync()
            with sync:
                with self._autocast():
                    loss, s = self._forward(to_batch(item))
                (loss / self.grad_accum_steps).backward()
            stats = s if stats is None else stats + s
            if stepping:
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(
                        [p for g in self.optimizer.param_groups for p in g["params"]], self.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.global_step += 1
        return self._logs(dist.all_reduce_sum(stats).tolist())

    def _forward(self, batch):
        """(loss, per-batch metric sums) for one batch; subclasses change the objective."""
        x, y = batch
        x, y = x.to(self.device), y.to(self.device).long()
        if self._check_batches:
            check_labels(y, get_head(self.model)[1].out_features, "train_data")
        logits = self._net(x)
        loss = F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            s = torch.stack([loss.detach().double() * len(y), (logits.argmax(-1) == y).sum().double(),
                             torch.tensor(float(len(y)), dtype=torch.float64, device=self.device)])
        return loss, s

    def _logs(self, sums) -> dict:
        loss, correct, n = sums
        return {"loss": loss / n, "acc": correct / n}

    # ---- pieces ----------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def _show_progress(self) -> bool:
        if not dist.is_main():
            return False
        if self.progress_bar is not None:
            return bool(self.progress_bar)
        return sys.stderr.isatty()

    def _check_features(self, ds, name):
        expected = input_features(self.model)
        shape = feature_shape(ds)
        got = int(np.prod(shape)) if shape else 1
        if expected is not None and got != expected:
            raise ValueError(f"{name} has {got} features per sample (shape {shape}) but the model's first "
                             f"layer expects {expected}")
        return got

    def _setup_distributed(self):
        if dist.init_from_env(self.device) and self._net is self.model:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self._net = DDP(self.model, device_ids=ids)

    def _build_optimizer(self):
        head = get_head(self.model)[1]
        head_ids = {id(p) for p in head.parameters()}
        body = [p for p in self.model.parameters() if p.requires_grad and id(p) not in head_ids]
        top = [p for p in head.parameters() if p.requires_grad]
        if not body and not top:
            raise ValueError("model has no trainable parameters (everything is frozen); unfreeze some")
        groups = [g for g in ({"params": body, "lr": self.lr},
                              {"params": top, "lr": self.lr * self.head_lr_mult}) if g["params"]]
        if callable(self.optimizer_spec):
            return self.optimizer_spec(groups)
        return _OPTIMIZERS[self.optimizer_spec](groups, self.weight_decay)

    def _trainer_state(self) -> dict:
        if self.optimizer is None:
            raise RuntimeError("save_checkpoint needs a trainer that has started fit (no optimizer yet)")
        return {"epoch": self.epoch, "global_step": self.global_step,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": self._epoch_rng if self._epoch_rng is not None else rng_state(), "history": self.history.to_dict(),
                "callbacks": [cb.state_dict() for cb in self.callbacks]}

    def _restore(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        total = self.scheduler.lr_lambdas[0].total
        self.scheduler.load_state_dict(state["scheduler"])
        self.scheduler.lr_lambdas[0].total = total  # the schedule spans this fit call's epochs
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = History()
        self.history.load_dict(state["history"])
        if len(state["callbacks"]) == len(self.callbacks):
            for cb, s in zip(self.callbacks, state["callbacks"]):
                cb.load_state_dict(s)
        set_rng_state(state["rng"])
        self._pending_state = None
