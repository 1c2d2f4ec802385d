"""Issue 14 groundwork: the causal-LM loss on the fused linear cross-entropy (shifted labels, padding),
the small transformer, LMAdaptiveTrainer, and the stdlib text domains of demo-lm (on Hugging Face models: test_hf.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastadapt.training.lm import (LMAdaptiveTrainer, TinyCausalLM, causal_lm_loss, output_head,
                                   shift_labels)


def _reference_lm_loss(logits_s, labels_s, logits_t, labels_t, alpha):
    """alpha * CE(target) + (1 - alpha) * CE(source) on materialised logits, the shift done by slicing."""
    def ce(logits, labels):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
    return alpha * ce(logits_t, labels_t) + (1 - alpha) * ce(logits_s, labels_s)


def _sequences(n, t, vocab, pad_from=None, generator=None):
    ids = torch.randint(0, vocab, (n, t), generator=generator)
    labels = ids.clone()
    if pad_from is not None:  # the last sequence padded, as lm_data.pack leaves it
        ids[-1, pad_from:] = 0
        labels[-1, pad_from:] = -100
    return ids, labels


def test_shift_labels_moves_left_and_ignores_the_last_position():
    y = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4]])
    assert shift_labels(y).tolist() == [[6, 7, -100, -100], [2, 3, 4, -100]]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_fused_lm_loss_and_gradients_equal_cross_entropy_on_materialised_logits(backend, bias, alpha):
    torch.manual_seed(1)
    V, D = 37, 8
    head = torch.nn.Linear(D, V, bias=bias).double()
    hs = torch.randn(3, 7, D, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 7, D, dtype=torch.float64, requires_grad=True)
    _, ys = _sequences(3, 7, V, pad_from=4)
    _, yt = _sequences(2, 7, V, pad_from=2)
    loss = causal_lm_loss(hs, ys, ht, yt, head, alpha)
    grads = torch.autograd.grad(loss, [hs, ht, *head.parameters()])
    ref = _reference_lm_loss(head(hs), ys, head(ht), yt, alpha)
    ref_grads = torch.autograd.grad(ref, [hs, ht, *head.parameters()])
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # padded positions and each sequence's last position get no gradient
    assert ht.grad is None and grads[1][1, 1:].abs().max() == 0 and grads[1][0, -1].abs().max() == 0
    assert grads[0][:, -1].abs().max() == 0
    if alpha == 1.0:
        assert grads[0].abs().max() == 0


def test_model_step_equals_the_materialised_loss_for_every_parameter():
    torch.manual_seed(2)
    model = TinyCausalLM(41, d_model=16, n_layers=2, n_heads=2, max_len=12, bias=True).double()
    ids_s, ys = _sequences(2, 12, 41, pad_from=5)
    ids_t, yt = _sequences(3, 12, 41, pad_from=9)
    x, y = torch.cat([ids_s, ids_t]), torch.cat([ys, yt])
    trainer = LMAdaptiveTrainer(model, alpha=0.25, device="cpu")
    trainer._set_alpha(0.25)
    loss, metrics = trainer.step((x, y, 2))
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model.logits(x)
    ref = _reference_lm_loss(logits[:2], ys, logits[2:], yt, 0.25)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12, msg=name)
    assert metrics["steps"] == 1 and metrics["loss"].item() == pytest.approx(ref.item())


def test_model_is_causal_and_tied_weights_share_the_embedding():
    torch.manual_seed(3)
    model = TinyCausalLM(30, d_model=16, n_layers=1, n_heads=4, max_len=8, tie_weights=True)
    assert output_head(model) is model.lm_head and model.lm_head.weight is model.embed.weight
    ids = torch.randint(0, 30, (1, 8))
    changed = ids.clone()
    changed[0, 5] = (ids[0, 5] + 1) % 30
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # earlier positions do not see a later token
    assert (a[:, 5:] - b[:, 5:]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="exceed max_len=8"):
        model(torch.zeros(1, 9, dtype=torch.long))


def _two_domains(vocab=24, t=16, n=48):
    """Source: tokens cycle +1 mod vocab; target: tokens cycle +3 mod vocab (both deterministic given the
    first token): a model fits either, and training on the target alone unlearns the source."""
    def cyc(step):
        start = torch.arange(n) % vocab
        ids = (start[:, None] + step * torch.arange(t)[None]) % vocab
        return ids, ids.clone()
    return cyc(1), cyc(3)


def test_evaluate_reports_nats_per_predicted_token_and_perplexity():
    torch.manual_seed(4)
    model = TinyCausalLM(24, d_model=16, n_layers=1, n_heads=2, max_len=16)
    ids, labels = _sequences(5, 16, 24, pad_from=6)
    trainer = LMAdaptiveTrainer(model, alpha=1.0, device="cpu", batch_size=2)
    out = trainer.evaluate((ids, labels))
    with torch.no_grad():
        logits = model.logits(ids)
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, 24), labels[:, 1:].reshape(-1), reduction="sum")
    tokens = 4 * 15 + 5  # 15 predicted tokens per full sequence, 5 in the one padded from position 6
    assert out["loss"] == pytest.approx(ref.item() / tokens, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(out["loss"]))


def test_replay_keeps_the_source_that_naive_finetuning_forgets():
    source, target = _two_domains()
    pre = TinyCausalLM(24, d_model=32, n_layers=1, n_heads=2, max_len=16)
    LMAdaptiveTrainer(pre, alpha=1.0, device="cpu", lr=3e-3, batch_size=8, seed=0).fit(source, epochs=15)
    state = {k: v.clone() for k, v in pre.state_dict().items()}
    results = {}
    for alpha in (1.0, 0.5):
        model = TinyCausalLM(24, d_model=32, n_layers=1, n_heads=2, max_len=16)
        model.load_state_dict(state)
        trainer = LMAdaptiveTrainer(model, alpha=alpha, device="cpu", lr=3e-3, batch_size=8, seed=0)
        hist = trainer.fit(target, source, epochs=15)
        results[alpha] = hist.extra
    naive, replay = results[1.0], results[0.5]
    assert naive["source_loss_before"] == pytest.approx(replay["source_loss_before"])
    assert naive["source_loss_before"] < 0.5  # pretraining learnt the source
    assert naive["target_loss_after"] < 0.5 and replay["target_loss_after"] < 0.5  # both learn the target
    assert naive["forgetting_nats"] > 1.0  # naive fine-tuning forgets
    assert replay["source_loss_after"] < 0.5 and replay["forgetting_nats"] < naive["forgetting_nats"] / 4
    assert naive["forgetting_ppl"] == pytest.approx(math.exp(naive["forgetting_nats"]) - 1)


def test_checkpoint_resume_is_exact(tmp_path):
    source, target = _two_domains(n=24)

    def trainer():
        torch.manual_seed(5)
        model = TinyCausalLM(24, d_model=16, n_layers=1, n_heads=2, max_len=16)
        return LMAdaptiveTrainer(model, alpha=0.5, device="cpu", lr=3e-3, batch_size=8, seed=0, memory_size=16)

    full = trainer()
    full.fit(target, source, epochs=4)
    first = trainer()
    first.fit(target, source, epochs=2)
    first.save_checkpoint(tmp_path / "ck")
    resumed = trainer()
    resumed.fit(target, source, epochs=4, resume_from=tmp_path / "ck")
    assert resumed.history["loss"] == full.history["loss"]
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert resumed.history.extra["source_loss_before"] == full.history.extra["source_loss_before"]
    assert len(resumed.memory.tensors[0]) == 16


def test_bad_lm_data_is_refused():
    model = TinyCausalLM(24, d_model=16, n_layers=1, n_heads=2, max_len=16)
    source, target = _two_domains()
    with pytest.raises(ValueError, match="pass source_data"):
        LMAdaptiveTrainer(model, alpha=0.5, device="cpu").fit(target, epochs=1)
    with pytest.raises(ValueError, match="int64 tensors of one"):
        LMAdaptiveTrainer(model, alpha=1.0, device="cpu").fit((target[0], target[1][:, :3]), epochs=1)
    with pytest.raises(ValueError, match="pack both to one length"):
        LMAdaptiveTrainer(model, alpha=0.5, device="cpu").fit(target, (source[0][:, :8], source[1][:, :8]),
                                                               epochs=1)
    with pytest.raises(ValueError, match="strategy='replay' only"):
        LMAdaptiveTrainer(model, alpha=0.5, strategy="lwf", device="cpu").fit(target, epochs=1)


# ---- the stdlib text domains (fastadapt/apps/lm_data.py) ------------------------------------------

def test_pack_pads_the_last_sequence_with_ignored_labels():
    from fastadapt.apps.lm_data import pack

    ids, labels = pack([[5, 6, 7, 1], [8, 9, 1]], seq_len=3, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [1, 8, 9], [1, 0, 0]]
    assert labels.tolist() == [[5, 6, 7], [1, 8, 9], [1, -100, -100]]


def test_domains_are_deterministic_text_and_split_one_in_ten():
    from fastadapt.apps import lm_data

    prose, code = lm_data.documents("prose"), lm_data.documents("code")
    assert len(prose) > 50 and len(code) > 100
    assert any("statement" in d for d in prose) and all(isinstance(d, str) and d for d in prose)
    assert sum("def " in d for d in code) > len(code) // 2
    train, val = lm_data.split(code)
    assert len(val) == math.ceil(len(code) / 10) and val[0] == code[0] and train[0] == code[1]
    assert lm_data.documents("code") == code  # deterministic
    with pytest.raises(ValueError, match="domain must be one of"):
        lm_data.documents("poetry")


def test_tokenizer_round_trips_and_corpus_is_packed():
    pytest.importorskip("tokenizers")
    from fastadapt.apps import lm_data

    corpus = lm_data.build_corpus(seq_len=64, vocab_size=1024)
    assert corpus.vocab_size == 1024 and corpus.pad_id == 0
    text = lm_data.prose_documents()[3][:500]
    assert corpus.tokenizer.decode(corpus.tokenizer.encode(text).ids) == text
    for domain in lm_data.DOMAINS:
        for part in ("train", "val"):
            ids, labels = corpus.splits[domain][part]
            assert ids.shape[1] == 64 and ids.dtype == torch.long and int(ids.max()) < 1024
            pad = labels == -100
            assert torch.equal(labels[~pad], ids[~pad]) and bool((ids[pad] == 0).all())
            assert pad[:-1].sum() == 0  # only the last sequence is padded
    again = lm_data.build_corpus(seq_len=64, vocab_size=1024)
    assert torch.equal(again.splits["code"]["val"][0], corpus.splits["code"]["val"][0])


def test_bf16_autocast_step_is_close_to_float32_and_returns_float32():
    torch.manual_seed(7)
    model = TinyCausalLM(64, d_model=32, n_layers=1, n_heads=2, max_len=16)
    ids_s, ys = _sequences(2, 16, 64, pad_from=7)
    ids_t, yt = _sequences(2, 16, 64)
    batch = (torch.cat([ids_s, ids_t]), torch.cat([ys, yt]), 2)
    fp32 = LMAdaptiveTrainer(model, alpha=0.5, device="cpu")
    bf16 = LMAdaptiveTrainer(model, alpha=0.5, device="cpu", precision="bf16")
    for t in (fp32, bf16):
        t._set_alpha(0.5)
    ref, _ = fp32.step(batch)
    with bf16._autocast():
        low, _ = bf16.step(batch)
    assert low.dtype == torch.float32
    assert abs(low.item() - ref.item()) < 0.02 * ref.item()
    g_ref = torch.autograd.grad(ref, model.lm_head.weight)[0]
    g_low = torch.autograd.grad(low, model.lm_head.weight)[0]
    assert g_low.dtype == torch.float32
    assert F.cosine_similarity(g_low.flatten(), g_ref.flatten(), dim=0) > 0.99


def test_gradient_accumulation_equals_the_whole_batch_without_padding():
    source, target = _two_domains(n=16)
    states = []
    for batch_size, accum in ((8, 1), (4, 2)):
        torch.manual_seed(9)
        model = TinyCausalLM(24, d_model=16, n_layers=1, n_heads=2, max_len=16)
        tr = LMAdaptiveTrainer(model, alpha=0.5, optimizer=lambda g: torch.optim.SGD(g), lr=0.5, device="cpu",
                               batch_size=batch_size, grad_accum_steps=accum, seed=0)
        tr.fit(target, source, epochs=2)
        assert tr.global_step == 4
        states.append(model.state_dict())
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_replay_memory_in_sequences_or_tokens():
    from fastadapt.training.lm import replay_memory
    labels = torch.arange(6 * 5).view(6, 5)
    labels[2, 3:] = -100                                   # sequence 2 predicts 2 tokens, the others 4
    order = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    assert replay_memory(labels, 3, sequences=4).tolist() == sorted(order[:4].tolist())
    predicted = torch.tensor([2 if i == 2 else 4 for i in order.tolist()]).cumsum(0)
    budget = int(predicted[2])                             # exactly the first three sequences' tokens
    assert replay_memory(labels, 3, tokens=budget).tolist() == sorted(order[:3].tolist())
    assert replay_memory(labels, 3, tokens=budget - 1).tolist() == sorted(order[:2].tolist())
    with pytest.raises(ValueError, match="memory_tokens=1 holds no source sequence"):
        replay_memory(labels, 3, tokens=1)
    with pytest.raises(ValueError, match="memory_size=7 exceeds the 6 sequences"):
        replay_memory(labels, 3, sequences=7)
    source, target = _two_domains(n=16)
    tr = LMAdaptiveTrainer(TinyCausalLM(24, d_model=16, n_layers=1, n_heads=2, max_len=16), alpha=0.5,
                           device="cpu", memory_tokens=50, progress_bar=False)
    tr.fit(target, source, epochs=1)
    kept = tr.memory.tensors[1]
    assert (shift_labels(kept) != -100).sum() <= 50 and len(kept) == 50 // (kept.shape[1] - 1)
    with pytest.raises(ValueError, match="not both"):
        LMAdaptiveTrainer(TinyCausalLM(24), memory_tokens=50, memory_size=2)
