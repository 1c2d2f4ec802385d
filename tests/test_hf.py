"""fastadapt.hf (issue 14): the fused-loss forward patch and HFAdaptiveTrainer against Hugging Face's own
loss and gradients, on tiny random Llama / GPT-2 models (no downloads)."""
import copy
import io
import math
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastadapt.hf import (HFAdaptiveTrainer, apply_fused_linear_cross_entropy,  # noqa: E402
                          revert_fused_linear_cross_entropy)
from fastadapt.training.lm import HiddenStates, LMAdaptiveTrainer, causal_lm_loss, output_head  # noqa: E402

VOCAB = 101


def _llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return transformers.LlamaForCausalLM(cfg)


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                  eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)  # its lm_head is tied to the token embedding


MODELS = {"llama": _llama, "gpt2": _gpt2}


def _batch(n, t, seed, pad=True):
    """input_ids, attention_mask (right padding of random length on some rows when ``pad``) and labels
    (the ids, -100 at padding) of n sequences of t tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    if pad:
        for i in range(0, n, 2):
            mask[i, int(torch.randint(t // 2, t, (1,), generator=g)):] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _examples(n, t, seed):
    """The rows of _batch as a list of examples (a map-style dataset for the Trainer)."""
    b = _batch(n, t, seed)
    return [{k: v[i] for k, v in b.items()} for i in range(n)]


def _grads(loss, model):
    return [g if g is not None else torch.zeros_like(p)
            for g, p in zip(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True),
                            model.parameters())]


# ---- apply_fused_linear_cross_entropy ----

@pytest.mark.parametrize("arch", list(MODELS))
def test_patched_forward_equals_hf_loss_and_every_gradient_in_float32(arch):
    hf = MODELS[arch]()
    fused = apply_fused_linear_cross_entropy(copy.deepcopy(hf))
    batch = _batch(4, 12, seed=1)
    ref = hf(**batch)
    out = fused(**batch)
    assert type(out) is type(ref) and out.logits is None and out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for (name, _), g, g_ref in zip(hf.named_parameters(), _grads(out.loss, fused), _grads(ref.loss, hf)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7, msg=name)
    # without labels it is the original forward: the same logits, bit for bit
    no_labels = {k: v for k, v in batch.items() if k != "labels"}
    assert torch.equal(fused(**no_labels).logits, hf(**no_labels).logits)
    # return_dict=False: the tuple starts with the loss, as HF's
    as_tuple = fused(**batch, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.loss)


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_patched_forward_in_bf16_is_no_farther_from_float64_than_hf(arch, mode):
    """Judged as PyTorch judges its low-precision kernels: the error against a float64 reference may not
    exceed that of the eager path (HF's own loss under bf16 autocast, or of a bf16 model) by more than a
    small factor. The loss comes back in float32 either way, as HF's."""
    hf = MODELS[arch]()
    if mode == "bf16-weights":
        hf = hf.to(torch.bfloat16)
    fused = apply_fused_linear_cross_entropy(copy.deepcopy(hf))
    batch = _batch(4, 16, seed=2)
    ref64 = copy.deepcopy(hf).double()
    loss64 = ref64(**batch).loss
    g64 = _grads(loss64, ref64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        ref = hf(**batch).loss
        ours = fused(**batch).loss
    assert ours.dtype == ref.dtype == torch.float32
    err = lambda a, b: (a.double() - b).abs().max().item()  # noqa: E731
    assert err(ours, loss64) <= 2 * err(ref, loss64) + 1e-6
    names = [n for n, _ in hf.named_parameters()]
    for name, g, g_ref, g_ref64 in zip(names, _grads(ours, fused), _grads(ref, hf), g64):
        assert g.dtype == g_ref.dtype
        assert err(g, g_ref64) <= 2 * err(g_ref, g_ref64) + 1e-6 * g_ref64.abs().max().item(), name


def test_num_items_in_batch_and_shift_labels_follow_hf():
    hf = _llama()
    fused = apply_fused_linear_cross_entropy(copy.deepcopy(hf))
    batch = _batch(4, 12, seed=4)
    n = torch.tensor(57)  # e.g. the tokens of all micro-batches of an accumulated step
    ref = hf(**batch, num_items_in_batch=n).loss
    ours = fused(**batch, num_items_in_batch=n).loss
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    tokens = (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(ours * n / tokens, fused(**batch).loss, rtol=1e-6, atol=0)  # sum / n
    torch.testing.assert_close(fused(**batch, num_items_in_batch=57).loss, ref, rtol=1e-6, atol=0)  # an int too
    # pre-shifted labels are used as they are (HF's shift_labels)
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    torch.testing.assert_close(fused(**inputs, shift_labels=shifted).loss, hf(**inputs, labels=batch["labels"]).loss,
                               rtol=1e-6, atol=0)


def test_logits_to_keep_takes_labels_for_the_kept_positions():
    hf = _llama()
    fused = apply_fused_linear_cross_entropy(copy.deepcopy(hf))
    batch = _batch(3, 12, seed=5, pad=False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for keep, labels in ((5, batch["labels"][:, -5:]), (torch.tensor([0, 3, 4, 9]), batch["labels"][:, [0, 3, 4, 9]])):
        ref = hf(**inputs, labels=labels, logits_to_keep=keep)
        out = fused(**inputs, labels=labels, logits_to_keep=keep)
        assert out.logits is None
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.autograd.grad(out.loss, fused.lm_head.weight)[0],
                                   torch.autograd.grad(ref.loss, hf.lm_head.weight)[0], rtol=1e-5, atol=1e-8)
        assert torch.equal(fused(**inputs, logits_to_keep=keep).logits, hf(**inputs, logits_to_keep=keep).logits)
    with pytest.raises(ValueError, match=r"labels of shape \(3, 12\) do not match the 15 positions.*logits_to_keep"):
        fused(**batch, logits_to_keep=5)


def test_final_logit_softcapping_becomes_the_op_softcap():
    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                    final_logit_softcapping=3.0)
    hf = transformers.Gemma2ForCausalLM(cfg)
    fused = apply_fused_linear_cross_entropy(copy.deepcopy(hf))
    batch = _batch(3, 12, seed=6)
    ref, out = hf(**batch), fused(**batch)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=0)
    for (name, _), g, g_ref in zip(hf.named_parameters(), _grads(out.loss, fused), _grads(ref.loss, hf)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7, msg=name)


class _ScaledHead(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class _ScaledLogits(transformers.LlamaForCausalLM):
    """A model that post-processes its logits without declaring it in its config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        return type(out)(logits=out.logits * 2.0)


def test_models_it_cannot_reproduce_are_refused_by_name():
    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match=r"CohereForCausalLM has config.logit_scale=0.0625"):
        apply_fused_linear_cross_entropy(cohere)
    with pytest.raises(ValueError, match=r"model \(LlamaModel\) declares no output head"):
        apply_fused_linear_cross_entropy(_llama().model)
    odd = _llama()
    odd.lm_head = _ScaledHead(32, VOCAB, bias=False)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM's output embeddings are a _ScaledHead, not an nn.Linear"):
        apply_fused_linear_cross_entropy(odd)
    custom = _llama()
    custom.loss_function = lambda logits, labels, **kw: logits.sum()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM.loss_function is <lambda>, not ForCausalLMLoss"):
        apply_fused_linear_cross_entropy(custom)
    scaled = apply_fused_linear_cross_entropy(_ScaledLogits(_llama().config))
    with pytest.raises(RuntimeError, match=r"_ScaledLogits's forward changes its logits after its output embeddings"):
        scaled(**_batch(2, 8, seed=7))


def test_patch_is_idempotent_reversible_and_follows_deepcopy_and_pickle():
    model = _llama()
    patched = apply_fused_linear_cross_entropy(model)
    forward = model.forward
    assert apply_fused_linear_cross_entropy(model) is model and model.forward == forward  # no second layer
    batch = _batch(2, 8, seed=8)
    twin = copy.deepcopy(patched)  # its forward runs the copy's weights, not the original's
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)
    assert twin(**batch).loss.item() != pytest.approx(model(**batch).loss.item())
    (g,) = torch.autograd.grad(twin(**batch).loss, twin.lm_head.weight)
    assert g.abs().sum() > 0
    buffer = io.BytesIO()  # so does pickling the whole model
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    out = loaded(**batch)
    assert out.logits is None and torch.equal(out.loss, model(**batch).loss)
    revert_fused_linear_cross_entropy(model)
    assert "forward" not in model.__dict__ and model(**batch).logits.shape == (2, 8, VOCAB)
    assert revert_fused_linear_cross_entropy(model) is model


def test_patched_model_in_a_plain_trainer_trains_as_the_unpatched_one(tmp_path):
    """The one-line use: HF's own Trainer with gradient accumulation (it passes num_items_in_batch to the
    forward) ends with the unpatched model's weights."""
    pytest.importorskip("accelerate")
    data = _examples(8, 10, seed=9)
    weights = []
    for patch in (False, True):
        model = _llama()
        if patch:
            apply_fused_linear_cross_entropy(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_steps=2,
                                              per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                              optim="sgd", learning_rate=1e-2, seed=0, disable_tqdm=True,
                                              save_strategy="no")
        transformers.Trainer(model, args, train_dataset=data).train()
        weights.append([p.detach().clone() for p in model.parameters()])
    for (name, _), a, b in zip(_llama().named_parameters(), *weights):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_missing_transformers_names_the_extra(monkeypatch):
    for name in [m for m in sys.modules if m == "fastadapt.hf" or m.startswith("fastadapt.hf.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` sees when it is missing
    with pytest.raises(ImportError, match=r"needs Hugging Face transformers .*pip install fastadapt\[hf\]"):
        import fastadapt.hf  # noqa: F401


# ---- HFAdaptiveTrainer ----

def _args(tmp_path, **kw):
    pytest.importorskip("accelerate")  # the Trainer's own requirement
    base = dict(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=4,
                learning_rate=1e-2, max_grad_norm=0.0, save_strategy="no", logging_steps=1, seed=0,
                disable_tqdm=True, lr_scheduler_type="constant", optim="sgd")
    return transformers.TrainingArguments(**{**base, **kw})


class _FirstGradients(transformers.TrainerCallback):
    """The gradients of the first optimizer step, as the optimizer sees them."""

    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.grads is None:
            self.grads = [p.grad.clone() for p in self.model.parameters()]


def _check_first_step(model, target, source, tmp_path, collate=None):
    """Runs one optimizer step (alpha 0.3, the whole target set as the batch, 3 replayed examples) and
    checks its logs and gradients against HF's own losses of the same batches computed by hand (the
    target's order in the batch does not change a mean); returns the number of forward passes."""
    collate = collate or (lambda examples: {k: torch.stack([x[k] for x in examples]) for k in examples[0]})
    initial = copy.deepcopy(model)
    grads = _FirstGradients(model)
    trainer = HFAdaptiveTrainer(model, _args(tmp_path, max_steps=1, per_device_train_batch_size=len(target)),
                                train_dataset=target, source_dataset=source, alpha=0.3, replay_batch_size=3,
                                data_collator=collate, callbacks=[grads])
    passes = []
    model.register_forward_hook(lambda m, args, out: passes.append(1))
    trainer.train()
    t, s = collate(target), collate([source[i] for i in trainer.replay_indices(0)])
    lt, ls = initial(**t).loss, initial(**s).loss
    ref = 0.3 * lt + 0.7 * ls
    log = trainer.state.log_history[0]
    assert log["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert log["target_loss"] == pytest.approx(lt.item(), rel=1e-6)
    assert log["source_loss"] == pytest.approx(ls.item(), rel=1e-6)
    assert log["source_perplexity"] == pytest.approx(math.exp(ls.item()), rel=1e-6) and log["alpha"] == 0.3
    for (name, _), g, g_ref in zip(initial.named_parameters(), grads.grads, _grads(ref, initial)):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7, msg=name)
    return len(passes)


@pytest.mark.parametrize("arch, source_len", [("llama", 12), ("gpt2", 12), ("llama", 8)])
def test_first_step_equals_alpha_mix_of_hf_losses_computed_by_hand(arch, source_len, tmp_path):
    """Source sequences as long as the target's go through the model with them in one forward pass;
    shorter ones (llama, 8) in a pass of their own."""
    passes = _check_first_step(MODELS[arch](), _examples(4, 12, seed=10), _examples(7, source_len, seed=11), tmp_path)
    assert passes == (1 if source_len == 12 else 2)


def test_first_step_with_a_tokenizer_and_a_padding_collator(tmp_path):
    """Texts of different lengths, padded per batch by DataCollatorForLanguageModeling (labels -100 at
    the padding), as in the usage example: still HF's own losses, mixed."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 2)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    g = torch.Generator().manual_seed(25)

    def text():
        length = int(torch.randint(3, 14, (1,), generator=g))
        return " ".join(f"w{int(i)}" for i in torch.randint(0, VOCAB - 2, (length,), generator=g))
    target = [tokenizer(text()) for _ in range(4)]
    source = [tokenizer(text()) for _ in range(7)]
    collate = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    _check_first_step(_llama(), target, source, tmp_path, collate=collate)


def test_alpha_schedule_is_evaluated_every_optimizer_step(tmp_path):
    target, source = _examples(8, 10, seed=12), _examples(8, 10, seed=13)
    trainer = HFAdaptiveTrainer(_llama(), _args(tmp_path, max_steps=3), train_dataset=target, source_dataset=source,
                                alpha=lambda step: 1.0 - 0.25 * step)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "alpha" in h]
    assert [h["alpha"] for h in logs] == [1.0, 0.75, 0.5]
    # alpha=1: the source is measured (logged) but weighs nothing
    assert logs[0]["loss"] == pytest.approx(logs[0]["target_loss"], rel=1e-6) and "source_loss" in logs[0]
    assert logs[1]["loss"] == pytest.approx(0.75 * logs[1]["target_loss"] + 0.25 * logs[1]["source_loss"], rel=1e-6)
    bad = HFAdaptiveTrainer(_llama(), _args(tmp_path, max_steps=3), train_dataset=target, source_dataset=source,
                            alpha=lambda step: 1.0 - 0.75 * step)
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got -0.5 \(alpha\(2\) of the alpha schedule\)"):
        bad.train()


def test_replay_batches_are_a_function_of_seed_and_step(tmp_path):
    source = _examples(10, 6, seed=14)
    make = lambda seed, **kw: HFAdaptiveTrainer(  # noqa: E731
        _llama(), _args(tmp_path, seed=seed, **kw), train_dataset=source, source_dataset=source, replay_batch_size=4)
    a, b, c = make(0), make(0), make(1)
    steps = [a.replay_indices(s) for s in range(5)]
    assert steps == [b.replay_indices(s) for s in range(5)] and steps != [c.replay_indices(s) for s in range(5)]
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # each pass: a permutation
    # two accumulated micro-batches of 2 replay the rows of one batch of 4
    acc = make(0, gradient_accumulation_steps=2)
    acc.replay_batch_size = 2
    assert [acc.replay_indices(s, 0) + acc.replay_indices(s, 1) for s in range(5)] == steps


def _run(tmp_path, model, target, source, resume=None, **kw):
    trainer = HFAdaptiveTrainer(model, _args(tmp_path, **kw), train_dataset=target, source_dataset=source,
                                alpha=0.5, replay_batch_size=3)
    trainer.train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_resume_from_checkpoint_ends_with_the_straight_runs_weights(tmp_path):
    target, source = _examples(12, 10, seed=15), _examples(9, 10, seed=16)
    opts = dict(max_steps=6, gradient_accumulation_steps=2, per_device_train_batch_size=2, optim="adamw_torch",
                learning_rate=1e-3)
    straight = _run(tmp_path / "a", _llama(), target, source, **opts)
    _run(tmp_path / "b", _llama(), target, source, save_strategy="steps", save_steps=3, **opts)
    resumed = _run(tmp_path / "c", _llama(seed=99), target, source, resume=str(tmp_path / "b" / "checkpoint-3"),
                   **opts)
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k  # bit for bit


def test_gradient_accumulation_equals_the_whole_batch_with_uneven_padding(tmp_path):
    """Batch 4 x 2 accumulated == batch 8 (and replay 3 x 2 == 6): each side is a mean over the step's
    tokens, not a mean of micro-batch means (the padding makes the two differ)."""
    target, source = _examples(16, 10, seed=17), _examples(12, 10, seed=18)
    acc = HFAdaptiveTrainer(_llama(), _args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
                            train_dataset=target, source_dataset=source, replay_batch_size=3)
    whole = HFAdaptiveTrainer(_llama(), _args(tmp_path, max_steps=2, per_device_train_batch_size=8),
                              train_dataset=target, source_dataset=source, replay_batch_size=6)
    for t in (acc, whole):
        t.train()
    for (name, p), q in zip(acc.model.named_parameters(), whole.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    def logs(t):
        return [h[k] for h in t.state.log_history if "alpha" in h for k in ("loss", "source_loss", "target_loss")]
    assert logs(acc) == pytest.approx(logs(whole), rel=1e-6)


def test_evaluation_on_a_dict_equals_the_plain_trainer(tmp_path):
    model = _llama()
    sets = {"source": _examples(6, 10, seed=19), "target": _examples(5, 10, seed=20)}
    ours = HFAdaptiveTrainer(model, _args(tmp_path, per_device_eval_batch_size=2), train_dataset=sets["target"],
                             source_dataset=sets["source"], eval_dataset=sets).evaluate()
    plain = transformers.Trainer(model, _args(tmp_path, per_device_eval_batch_size=2), eval_dataset=sets).evaluate()
    for side in sets:
        assert ours[f"eval_{side}_loss"] == pytest.approx(plain[f"eval_{side}_loss"], rel=1e-6)
        assert ours[f"eval_{side}_perplexity"] == pytest.approx(math.exp(ours[f"eval_{side}_loss"]), rel=1e-12)


def test_bad_trainer_inputs_are_refused_before_training(tmp_path):
    data = _examples(4, 8, seed=21)
    args = _args(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"alpha=0.5 weighs replayed source sequences: pass source_dataset"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=data)
    with pytest.raises(ValueError, match=r"weighs replayed source sequences"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=data, alpha=lambda s: 1.0)
    for alpha in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got"):
            HFAdaptiveTrainer(_llama(), args, train_dataset=data, source_dataset=data, alpha=alpha)
    with pytest.raises(ValueError, match=r"replay_batch_size must be a positive int, got 0"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=data, source_dataset=data, replay_batch_size=0)
    with pytest.raises(ValueError, match=r"model \(LlamaModel\) declares no output head"):
        HFAdaptiveTrainer(_llama().model, args, train_dataset=data, source_dataset=data)
    with pytest.raises(ValueError, match=r"source_dataset holds no examples"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=data, source_dataset=[])
    with pytest.raises(ValueError, match=r"compute_loss_func would be ignored"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=data, alpha=1.0, compute_loss_func=lambda *a, **k: 0)
    with pytest.raises(ValueError, match=r"args.label_smoothing_factor=0.1 is not supported"):
        HFAdaptiveTrainer(_llama(), _args(tmp_path, label_smoothing_factor=0.1), train_dataset=data, alpha=1.0)
    no_labels = [{"input_ids": x["input_ids"]} for x in data]
    with pytest.raises(ValueError, match=r"a batch of train_dataset has no 'labels'"):
        HFAdaptiveTrainer(_llama(), args, train_dataset=no_labels, alpha=1.0).train()
    # alpha=1 is plain fine-tuning: no source needed
    HFAdaptiveTrainer(_llama(), args, train_dataset=data, alpha=1.0).train()


# ---- fastadapt.training.lm on Hugging Face models (issue 14 groundwork, moved from test_lm.py) ----

@pytest.mark.parametrize("arch", list(MODELS))
def test_hf_model_loss_equals_the_fused_loss_on_its_last_hidden_state(arch):
    """A tiny random HF causal LM's own `loss` (its ForCausalLMLoss, float32 logits) equals causal_lm_loss
    on base_model's last hidden state through output_head (GPT-2's head is tied to its token embedding)."""
    model = MODELS[arch](seed=6).double().eval()
    batch = _batch(3, 16, seed=22)
    ids, labels = batch["input_ids"], batch["labels"]
    head = output_head(model)
    assert head is model.get_output_embeddings()
    hf = model(input_ids=ids, labels=labels).loss
    hidden = model.base_model(input_ids=ids).last_hidden_state
    ours = causal_lm_loss(hidden[:0], labels[:0], hidden, labels, head, 1.0)
    torch.testing.assert_close(ours.float(), hf.float(), rtol=1e-6, atol=1e-6)
    g_hf = torch.autograd.grad(hf, head.weight)[0]
    g_ours = torch.autograd.grad(ours, head.weight)[0]
    torch.testing.assert_close(g_ours, g_hf.to(g_ours.dtype), rtol=1e-5, atol=1e-7)


def test_lm_trainer_step_on_a_wrapped_hf_model_equals_the_hf_loss():
    hf = _gpt2(seed=8).double()
    wrapped = HiddenStates(hf)
    assert output_head(wrapped) is hf.lm_head
    s, t = _batch(2, 16, seed=23), _batch(3, 16, seed=24, pad=False)
    trainer = LMAdaptiveTrainer(wrapped, alpha=0.4, device="cpu")
    trainer._set_alpha(0.4)
    loss, _ = trainer.step((torch.cat([s["input_ids"], t["input_ids"]]), torch.cat([s["labels"], t["labels"]]), 2))
    ref = 0.4 * hf(input_ids=t["input_ids"], labels=t["labels"]).loss + \
        0.6 * hf(input_ids=s["input_ids"], labels=s["labels"]).loss
    torch.testing.assert_close(loss.float(), ref.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="wraps a Hugging Face causal LM"):
        HiddenStates(torch.nn.Linear(2, 2))


_DDP_WORKER = '''
import os, sys, torch, transformers
from test_hf import _examples, _llama
from fastadapt.hf import HFAdaptiveTrainer

def run(out_dir, batch_size, replay_batch_size):
    ddp = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
    args = transformers.TrainingArguments(
        output_dir=out_dir, use_cpu=True, report_to=[], per_device_train_batch_size=batch_size, learning_rate=1e-2,
        max_grad_norm=0.0, save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True, optim="sgd",
        lr_scheduler_type="constant", max_steps=2, **ddp)
    target, source = _examples(16, 10, seed=17), _examples(12, 10, seed=18)
    tr = HFAdaptiveTrainer(_llama(), args, train_dataset=target, source_dataset=source,
                           replay_batch_size=replay_batch_size)
    tr.train()
    return {"state": {k: v.detach().clone() for k, v in tr.model.state_dict().items()},
            "logs": [[h[k] for k in ("loss", "source_loss", "target_loss")] for h in tr.state.log_history
                     if "alpha" in h],
            "rank": tr.args.process_index}

if __name__ == "__main__":
    r = run(sys.argv[1], 4, 3)
    torch.save(r, os.path.join(sys.argv[1], f"result{r['rank']}.pt"))
'''


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path):
    """2 ranks x (batch 4 + replay 3) == 1 process x (batch 8 + replay 6), with uneven padding: token counts
    are global (average_tokens_across_devices), the loss is scaled by the world size that DDP averages
    over, and rank r replays the stream's batches r, r + 2, ... (together the single process's)."""
    import os
    import subprocess

    pytest.importorskip("accelerate")
    from test_distributed import ROOT, _free_port

    (tmp_path / "hf_worker.py").write_text(_DDP_WORKER)
    port = str(_free_port())
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, tests_dir]), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(tmp_path / "hf_worker.py"), str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out.decode()[-3000:]
    sys.path.insert(0, str(tmp_path))
    try:
        import hf_worker
        single = hf_worker.run(str(tmp_path / "single"), 8, 6)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("hf_worker", None)
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(2))
    for k, v in single["state"].items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-6, atol=1e-7, msg=k)
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    for logs in (r0["logs"], r1["logs"]):  # the per-side logs are reduced over the ranks
        assert sum(logs, []) == pytest.approx(sum(single["logs"], []), rel=1e-6)
