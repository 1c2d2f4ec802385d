"""``HFAdaptiveTrainer``: a ``transformers.Trainer`` that fine-tunes a causal LM on a target data set
while replaying source sequences, with the loss ``alpha * CE(target) + (1 - alpha) * CE(source)`` on the
fused linear cross-entropy (the logits are never materialised).

Normalisation. Each side's cross-entropy is a mean over its predicted tokens (labels != -100 after the
shift) in the whole optimizer step: the step's loss is ``alpha * S_t / N_t + (1 - alpha) * S_s / N_s``,
``S`` a side's summed token cross-entropy and ``N`` its token count over all the step's micro-batches
(and all processes when ``average_tokens_across_devices``, the default, as the Trainer does for its
``num_items_in_batch``). Every micro-batch contributes its sums over the step's counts, so the
accumulated gradient is that of the step's loss however the tokens fall into micro-batches (the
Trainer's own fix for gradient accumulation, on both sides); the loss is returned already scaled for
accumulation (``loss_is_scaled_for_ga = True``). A side with no predicted token in the step adds 0.
Positions whose ``attention_mask`` is 0 are ignored (labels set to -100) whether or not the collator
did it.

Replay. Micro-batch ``i`` of optimizer step ``s`` on process ``r`` of ``w`` replays batch
``(s * gradient_accumulation_steps + i) * w + r`` of a :class:`~fastadapt.hf.replay.ReplayStream`
seeded with ``args.seed``: a function of the step alone, so ``resume_from_checkpoint`` replays the
same source batches without any saved iterator state.
"""
from __future__ import annotations

import math

import torch
import transformers
from transformers.utils import is_datasets_available

from fastadapt.hf.head import FusedHead
from fastadapt.hf.replay import ReplayStream
from fastadapt.training.config import alpha_at, positive_int
from fastadapt.training.lm import IGNORE_INDEX, shift_labels

_SIDES = ("source", "target")


class HFAdaptiveTrainer(transformers.Trainer):
    """``HFAdaptiveTrainer(model, args, train_dataset=target, source_dataset=source, alpha=0.5,
    replay_batch_size=None, **trainer_kwargs)``: ``transformers.Trainer`` (every other argument is its
    own) whose training loss pairs each target batch with a batch of ``replay_batch_size`` (default
    ``args.per_device_train_batch_size``) source examples, drawn from ``source_dataset`` and collated by
    the Trainer's data collator, and weighs them ``alpha`` and ``1 - alpha``.

    ``alpha``: a float in [0, 1] or ``callable(step) -> float`` evaluated at every optimizer step
    (``step`` = optimizer steps done), as ``fastadapt.AdaptiveConfig`` takes it; ``alpha=1`` is plain
    fine-tuning and needs no source. Both batches go through the model in one forward pass when their
    tensors have the same shapes (else one pass each); the loss takes the hidden states entering the
    model's head (see ``fastadapt/hf/head.py``) into the fused op. Training logs add ``source_loss``,
    ``target_loss`` (nats per predicted token over the logging window) with their ``*_perplexity`` and
    ``alpha``; every ``eval*_loss`` gets its ``eval*_perplexity``. Evaluation without ``compute_metrics``
    uses the fused loss (the target side alone: the batch's mean token cross-entropy, as the model's own
    loss); with ``compute_metrics`` it is the Trainer's (logits materialised). ``eval_dataset`` may be a
    dict, e.g. ``{"source": ..., "target": ...}``, as for any Trainer.
    """

    loss_is_scaled_for_ga = True  # see the module docstring

    def __init__(self, model, args=None, *, source_dataset=None, alpha=0.5, replay_batch_size=None,
                 **trainer_kwargs):
        if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
            raise ImportError(f"HFAdaptiveTrainer needs a transformers whose Trainer has loss_is_scaled_for_ga "
                              f"(5.x; installed: {transformers.__version__}): pip install -U 'fastadapt[hf]'")
        alpha_at(alpha, 0)
        if source_dataset is None and (callable(alpha) or float(alpha) != 1.0):
            raise ValueError(f"alpha={alpha!r} weighs replayed source sequences: pass source_dataset (or alpha=1 "
                             f"for plain fine-tuning)")
        if replay_batch_size is not None:
            positive_int("replay_batch_size", replay_batch_size)
        if model is None:
            raise ValueError("HFAdaptiveTrainer needs a model (model_init is not supported)")
        if trainer_kwargs.get("compute_loss_func") is not None:
            raise ValueError("HFAdaptiveTrainer computes its own loss (alpha-weighted replay): compute_loss_func "
                             "would be ignored; subclass it and override compute_loss instead")
        if args is not None and args.label_smoothing_factor:
            raise ValueError(f"args.label_smoothing_factor={args.label_smoothing_factor} is not supported by "
                             f"HFAdaptiveTrainer (its loss is the plain token cross-entropy)")
        self.head = FusedHead(model)
        self.alpha = alpha
        super().__init__(model=model, args=args, **trainer_kwargs)
        self._stream = None if source_dataset is None else ReplayStream(len(source_dataset), self.args.seed)
        self.replay_batch_size = replay_batch_size or self.args.per_device_train_batch_size
        # the source goes through the Trainer's own column removal and collator, as the target does
        if source_dataset is not None and is_datasets_available():
            import datasets
            if isinstance(source_dataset, datasets.Dataset):
                source_dataset = self._remove_unused_columns(source_dataset, description="source")
                self._source_collator = self.data_collator
        if source_dataset is not None and not hasattr(self, "_source_collator"):
            self._source_collator = self._get_collator_with_removed_columns(self.data_collator, description="source")
        self.source_dataset = source_dataset
        self._plan: list[tuple] = []  # what each remaining micro-batch of the step pairs with
        self._window = {side: [0.0, 0] for side in _SIDES}  # (summed nats, tokens) since the last log
        self._last_alpha = self.alpha_at(0)

    def alpha_at(self, step: int) -> float:
        """alpha at optimizer step ``step`` (checked to lie in [0, 1])."""
        return alpha_at(self.alpha, step)

    def replay_indices(self, step: int, micro_batch: int = 0) -> list[int]:
        """The ``source_dataset`` indices replayed with micro-batch ``micro_batch`` of optimizer step
        ``step`` on this process."""
        a = self.args
        b = (step * a.gradient_accumulation_steps + micro_batch) * a.world_size + a.process_index
        return self._stream.batch(b, self.replay_batch_size)

    # ---- the step: plan (source batches and token counts), then one loss per micro-batch ----

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        batches = [_masked(b, "train_dataset") for b in batches]
        self._plan = self._step_plan(batches)
        return batches, (self._plan[0][2] if self._plan else None)

    def _step_plan(self, batches) -> list[tuple]:
        """``(source batch or None, alpha, N_t, N_s, scale)`` for each micro-batch of the step."""
        step = self.state.global_step
        alpha = self._last_alpha = self.alpha_at(step)
        replay = self._stream is not None and (callable(self.alpha) or alpha != 1.0)
        sources = [self._source_batch(step, i) if replay else None for i in range(len(batches))]
        n_t = sum(_tokens(b) for b in batches)
        n_s = sum(_tokens(b) for b in sources) if replay else torch.zeros((), dtype=torch.long)
        scale = 1
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # the Trainer's rule: global token counts, and the loss times the processes that DDP averages over
            counts = self.accelerator.gather(torch.stack([n_t, n_s]).to(self.args.device)[None]).sum(0)
            n_t, n_s = counts[0], counts[1]
            scale = self.accelerator.num_processes
        return [(s, alpha, n_t, n_s, scale) for s in sources]

    def _source_batch(self, step, i):
        features = [self.source_dataset[j] for j in self.replay_indices(step, i)]
        return _masked(self._source_collator(features), "source_dataset")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:  # evaluation with compute_metrics: the Trainer's own loss and logits
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        target = _masked(inputs, "train_dataset")
        if not self._plan:  # called outside the Trainer's loop: this batch is the whole step
            self._plan = self._step_plan([target])
        source, alpha, n_t, n_s, scale = self._plan.pop(0)
        source = None if source is None else self._prepare_inputs(source)
        (h_s, h_t), out = self._hidden_states(model, source, target)
        loss = 0.0
        with self.accelerator.autocast():  # as the model's own loss, computed inside its (autocast) forward
            for side, h, batch, w, n in (("target", h_t, target, alpha, n_t), ("source", h_s, source, 1 - alpha, n_s)):
                if batch is None:
                    continue
                y = shift_labels(batch["labels"])
                with torch.set_grad_enabled(w > 0 and torch.is_grad_enabled()):  # weight 0: measured only
                    nats = self.head.loss(h, y, reduction="sum")
                if w > 0:
                    loss = loss + nats * (w / n.to(nats.device).clamp_min(1))
                self._window[side][0] += nats.detach()
                self._window[side][1] += (y != IGNORE_INDEX).sum()
        loss = loss * scale
        return (loss, out) if return_outputs else loss

    def _hidden_states(self, model, source, target):
        """((source hidden or None, target hidden), the output of the forward that saw the target): one
        forward over both batches when their tensors stack, else one each."""
        if source is None:
            h, out = self._forward(model, target)
            return (None, h), out
        if _stackable(source, target):
            both = {k: torch.cat([v, target[k]]) for k, v in source.items()}
            h, out = self._forward(model, both)
            ns = len(source["labels"])
            return (h[:ns], h[ns:]), out
        h_s, _ = self._forward(model, source)
        h_t, out = self._forward(model, target)
        return (h_s, h_t), out

    def _forward(self, model, batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}  # no labels: the model computes no loss
        with self.head.capture() as calls:
            out = model(**inputs, return_dict=True)
        return self.head.hidden_of(calls, out), out

    # ---- evaluation and logs ----

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if not prediction_loss_only or "labels" not in inputs:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        batch = _masked(self._prepare_inputs(inputs), "eval_dataset")
        with torch.no_grad(), self.compute_loss_context_manager():
            h, _ = self._forward(model, batch)
            with self.accelerator.autocast():
                loss = self.head.loss(h, shift_labels(batch["labels"]))
        return loss.detach(), None, None

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # a training log (on every process): the per-side token means since the last one
            for side in _SIDES:
                sums = torch.tensor([float(x) for x in self._window[side]], dtype=torch.float64)
                if self.args.world_size > 1:
                    sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum").cpu()
                nats, tokens = sums.tolist()
                if tokens:
                    logs[f"{side}_loss"] = nats / tokens
                    logs[f"{side}_perplexity"] = _exp(nats / tokens)
                self._window[side] = [0.0, 0]
            logs["alpha"] = self._last_alpha
        for key in [k for k in logs if k.startswith("eval") and k.endswith("_loss")]:
            logs[key[:-len("_loss")] + "_perplexity"] = _exp(logs[key])
        super().log(logs, *args, **kwargs)


def _masked(batch, name):
    """The batch with labels -100 where its attention_mask is 0 (a copy; the batch is not changed)."""
    if "labels" not in batch:
        raise ValueError(f"a batch of {name} has no 'labels' (keys {sorted(batch)}): HFAdaptiveTrainer trains on "
                         f"next-token labels, e.g. from DataCollatorForLanguageModeling(tokenizer, mlm=False)")
    mask = batch.get("attention_mask")
    labels = batch["labels"]
    if not isinstance(mask, torch.Tensor) or mask.shape != labels.shape:
        return batch
    return {**batch, "labels": labels.masked_fill(mask == 0, IGNORE_INDEX)}


def _stackable(source, target) -> bool:
    """Whether the two batches hold the same keys, all tensors of the same shape but for their rows."""
    return source.keys() == target.keys() and all(
        isinstance(v, torch.Tensor) and isinstance(target[k], torch.Tensor) and v.shape[1:] == target[k].shape[1:]
        for k, v in source.items())


def _tokens(batch) -> torch.Tensor:
    return (shift_labels(batch["labels"]) != IGNORE_INDEX).sum()


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf
