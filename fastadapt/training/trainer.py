"""TransferTrainer: fine-tune a (pretrained) classifier on a new task, Keras-style fit/evaluate/predict.
The loop, evaluation and checkpoints are the shared Trainer's (fastadapt/training/loop.py)."""
from __future__ import annotations

import torch.nn.functional as F

from fastadapt.training.loop import Trainer, ValSet, _logits_f32
from fastadapt.training.data import check_labels
from fastadapt.training.surgery import get_head


class TransferTrainer(Trainer):
    """Trains ``model`` with cross-entropy: ``fit(train_data, val_data=None, *, epochs, resume_from=None)``.

    Data may be DataLoaders (iterated as they are), Datasets or (X, y) pairs (held on the device and
    batched by indexing). Options: :class:`~fastadapt.training.config.TrainConfig`, as ``config=`` or
    keyword arguments (``lr``, ``optimizer``, ``scheduler``, ``warmup_steps``, ``freeze_backbone``,
    ``precision``, ``compile``, ...). Under torchrun the model is wrapped in DistributedDataParallel and
    files are written by rank 0 only.
    """

    def prepare(self, train_data, val_data=None):
        ds = self._training_set(train_data, "train_data")
        val = {} if val_data is None else {"": ValSet(val_data, self._checked_dataset(val_data, "val_data"))}
        return self.batches_for(train_data, ds), val

    def step(self, batch):
        x, y = batch
        if self.check_batch_labels:
            check_labels(y, get_head(self.model)[1].out_features, "train_data")
        logits = self._net(x)
        loss = F.cross_entropy(_logits_f32(logits), y)
        return loss, {"loss": loss.detach() * len(y), "correct": (logits.argmax(-1) == y).sum(), "count": len(y)}

    def epoch_logs(self, sums):
        return {"loss": sums["loss"] / sums["count"], "acc": sums["correct"] / sums["count"]}

    def on_fit_end(self):
        if "" in self._val_sets:  # of the returned model, which EarlyStopping may have rolled back
            self.history.target_acc = self._evaluate(self._val_sets[""])["acc"]
