"""Hugging Face integration (``pip install fastadapt[hf]``): the fused linear cross-entropy in
``transformers`` causal LMs and their ``Trainer``.

* :func:`apply_fused_linear_cross_entropy` (one line, plain fine-tuning): the model's forward, given
  ``labels``, returns the fused loss and ``logits=None`` (no ``(tokens x vocab)`` logits); without labels
  it is unchanged. :func:`revert_fused_linear_cross_entropy` undoes it.
* :class:`HFAdaptiveTrainer` (adaptive fine-tuning): a ``transformers.Trainer`` whose loss is
  ``alpha * CE(target) + (1 - alpha) * CE(source)``, each target batch paired with replayed source
  sequences, deterministic across ``resume_from_checkpoint``.

Usage::

    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, TrainingArguments
    from fastadapt.hf import HFAdaptiveTrainer, apply_fused_linear_cross_entropy

    model = AutoModelForCausalLM.from_pretrained(path)
    args = TrainingArguments("out", per_device_train_batch_size=8, gradient_accumulation_steps=4, bf16=True)
    trainer = HFAdaptiveTrainer(model, args, train_dataset=target, source_dataset=source, alpha=0.5,
                                eval_dataset={"source": source_val, "target": target_val},
                                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()      # logs loss, source_loss, target_loss, *_perplexity, alpha

    apply_fused_linear_cross_entropy(model)   # plain fine-tuning with any Trainer or loop
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
"""
try:
    import transformers  # noqa: F401
except ImportError as e:  # ModuleNotFoundError, or a transformers that fails to import
    raise ImportError(f"fastadapt.hf needs Hugging Face transformers ({e}): pip install fastadapt[hf]") from e

from fastadapt.hf.patch import apply_fused_linear_cross_entropy, revert_fused_linear_cross_entropy
from fastadapt.hf.trainer import HFAdaptiveTrainer

__all__ = ["HFAdaptiveTrainer", "apply_fused_linear_cross_entropy", "revert_fused_linear_cross_entropy"]
