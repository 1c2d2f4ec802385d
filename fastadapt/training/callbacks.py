"""Callbacks (Keras/Lightning style). A callback's ``state_dict`` holds plain values, so it is
saved in the trainer checkpoint and a resumed run keeps its patience counters."""
from __future__ import annotations

import copy
import math
import os


class Callback:
    def on_fit_start(self, trainer): ...

    def on_epoch_end(self, trainer, epoch: int, logs: dict): ...

    def on_fit_end(self, trainer): ...

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict): ...


def _mode_for(monitor, mode):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    if mode == "auto":
        return "max" if monitor.endswith(("acc", "accuracy")) else "min"
    return mode


def _monitored(logs, monitor, who):
    if monitor not in logs:
        raise KeyError(f"{who}: monitor={monitor!r} is not a logged metric; available: {sorted(logs)}")
    return float(logs[monitor])


class _Tracker:
    """Best value of one metric under a mode."""

    def __init__(self, monitor, mode, min_delta=0.0):
        self.monitor, self.mode, self.min_delta = monitor, _mode_for(monitor, mode), float(min_delta)
        self.best = math.inf if self.mode == "min" else -math.inf

    def improved(self, value) -> bool:
        if math.isnan(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta


class EarlyStopping(Callback):
    """Stops after ``patience`` epochs without improvement of ``monitor``; with
    ``restore_best_weights`` the model ends with the weights of its best epoch."""

    def __init__(self, monitor="val_loss", patience=0, mode="auto", min_delta=0.0, restore_best_weights=False):
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be a non-negative int, got {patience!r}")
        self.tracker = _Tracker(monitor, mode, min_delta)
        self.monitor, self.patience, self.restore_best_weights = monitor, patience, restore_best_weights
        self.wait = 0
        self.best_epoch = None
        self.stopped_epoch = None
        self._best_weights = None

    def on_fit_start(self, trainer):
        self.stopped_epoch = None

    def on_epoch_end(self, trainer, epoch, logs):
        value = _monitored(logs, self.monitor, "EarlyStopping")
        if self.tracker.improved(value):
            self.tracker.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self._best_weights = copy.deepcopy(trainer.unwrapped_model.state_dict())
            return
        self.wait += 1
        if self.wait > self.patience:
            self.stopped_epoch = epoch
            trainer.stop_training = True

    def on_fit_end(self, trainer):
        if self.restore_best_weights and self._best_weights is not None:
            trainer.unwrapped_model.load_state_dict(self._best_weights)

    def state_dict(self):
        # Best weights are not kept across a resume: they would double the checkpoint size.
        return {"best": self.tracker.best, "wait": self.wait, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.tracker.best, self.wait, self.best_epoch = state["best"], state["wait"], state["best_epoch"]


class ModelCheckpoint(Callback):
    """Saves a trainer checkpoint to ``dirpath/last`` every ``every_n_epochs`` epochs and when fit
    ends, or only to ``dirpath/best`` when ``save_best_only`` and ``monitor`` improved. Checkpoints
    load with ``trainer.load_checkpoint`` or ``fit(..., resume_from=...)``."""

    def __init__(self, dirpath, monitor="val_loss", mode="auto", save_best_only=False, every_n_epochs=1):
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive int, got {every_n_epochs!r}")
        self.dirpath, self.monitor, self.save_best_only = os.fspath(dirpath), monitor, save_best_only
        self.every_n_epochs = every_n_epochs
        self.tracker = _Tracker(monitor, mode)
        self.best_path = None
        self._saved_at = None

    def _save_last(self, trainer):
        trainer.save_checkpoint(os.path.join(self.dirpath, "last"))
        self._saved_at = trainer.epoch

    def on_epoch_end(self, trainer, epoch, logs):
        if not self.save_best_only:
            if (epoch + 1) % self.every_n_epochs == 0:
                self._save_last(trainer)
            return
        value = _monitored(logs, self.monitor, "ModelCheckpoint")
        if self.tracker.improved(value):
            self.tracker.best = value
            self.best_path = os.path.join(self.dirpath, "best")
            trainer.save_checkpoint(self.best_path)

    def on_fit_end(self, trainer):
        if not self.save_best_only and self._saved_at != trainer.epoch and trainer.optimizer is not None:
            self._save_last(trainer)

    def state_dict(self):
        return {"best": self.tracker.best}

    def load_state_dict(self, state):
        self.tracker.best = state["best"]
