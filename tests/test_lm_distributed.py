"""LMAdaptiveTrainer under torchrun: DDP and FSDP2 (``parallel="fsdp"``) in two CPU processes over gloo
(torchrun's environment variables set by hand, as tests/test_distributed.py does) against one process
with the global batch, on sequences padded unevenly, so the ranks hold different token counts; the
per-side global token mean (also over an accumulation window); FSDP2 checkpoints.

This file is also the workers' script: ``python tests/test_lm_distributed.py OUT`` runs every scenario
on its rank (one launch: starting the processes costs more than the scenarios) and saves the results
to ``OUT/rank{r}.pt``; the tests run the same functions in one process for the reference. (It
replaces tests/test_lm.py's DDP test, whose sequences had no padding.)
"""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastadapt.training import Callback
from fastadapt.training import distributed as dist
from fastadapt.training.lm import (HiddenStates, LMAdaptiveTrainer, TinyCausalLM, causal_lm_loss,
                                   predicted_tokens, token_mean_weights)
from test_distributed import ROOT, _free_port

V, T, N = 24, 12, 16  # vocabulary, sequence length, sequences per domain
RANK_BATCH = 8  # per rank: 2 ranks x 8 = the whole 16 sequences, one optimizer step per epoch


def sequences(step, seed, n=N):
    """Token cycles ``start + step * t (mod V)``, each sequence padded from a random position (its ids 0,
    its labels -100): between 1 and T - 1 predicted tokens per sequence."""
    g = torch.Generator().manual_seed(seed)
    ids = (torch.randint(0, V, (n, 1), generator=g) + step * torch.arange(T)) % V
    pad = torch.arange(T) >= torch.randint(2, T + 1, (n, 1), generator=g)
    return ids.masked_fill(pad, 0), ids.masked_fill(pad, -100)


SOURCE, TARGET = sequences(1, seed=1), sequences(3, seed=2)
# 15 sequences: the second rank evaluates 7 and one stand-in row without labels
VAL = {"source": (SOURCE[0][:15], SOURCE[1][:15]), "target": (TARGET[0][:15], TARGET[1][:15])}
OPTIMIZERS = {"sgd": {"optimizer": "sgd", "lr": 0.2},
              "adamw": {"optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 0.5,
                        "warmup_steps": 1, "scheduler": "cosine"}}


class _Recording(LMAdaptiveTrainer):
    """Records each window's token counts on this rank (to show the padding is uneven across ranks)."""

    def on_window_start(self, batches):
        self.local_tokens = getattr(self, "local_tokens", []) + [
            sum(predicted_tokens(b[1], b[2]) for b in batches).tolist()]
        super().on_window_start(batches)


def make_trainer(batch_size, optimizer="sgd", hf=None, **options):
    """A TinyCausalLM, or the Hugging Face model ``hf`` (:func:`hf_model`), in a trainer."""
    torch.manual_seed(0)
    model = TinyCausalLM(V, d_model=16, n_layers=2, n_heads=2, max_len=T) if hf is None else HiddenStates(hf_model(hf))
    return _Recording(model, alpha=0.3, batch_size=batch_size, seed=0, device="cpu", progress_bar=False,
                      **OPTIMIZERS[optimizer], **options)


def weights(tr):
    """The trainer's model's weights (FSDP2's shards gathered whole)."""
    sharded = dist.is_sharded(tr._net)
    return {k: (v.full_tensor() if sharded else v).detach().clone() for k, v in tr.model.state_dict().items()}


def hf_model(arch):
    """A tiny random Hugging Face causal LM: GPT-2 (its head tied to its token embedding) or Llama."""
    import transformers

    torch.manual_seed(0)
    if arch == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=T, bos_token_id=0, eos_token_id=0,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))


def train(batch_size, optimizer, epochs=3, **options):
    tr = make_trainer(batch_size, optimizer, **options)
    tr.fit(TARGET, SOURCE, VAL, epochs=epochs)
    return {"state": weights(tr), "history": tr.history.history, "extra": tr.history.extra,
            "tokens": tr.local_tokens}


def one_step_gradients(batch_size, **options):
    """Every parameter's gradient after one forward and backward of the first batch, gathered whole."""
    tr = make_trainer(batch_size, **options)
    tr._setup_distributed()
    batches, _ = tr.prepare(TARGET, SOURCE)
    batch = next(iter(batches.epoch(0)))
    tr._set_alpha(0.3)
    tr.on_window_start([batch])
    loss, _ = tr.step(batch)
    loss.backward()
    return {name: (p.grad.full_tensor() if dist.is_sharded(tr._net) else p.grad).clone()
            for name, p in tr.model.named_parameters()}


class _SaveAt(Callback):
    def __init__(self, epoch, path):
        self.epoch, self.path = epoch, path

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch + 1 == self.epoch:
            trainer.save_checkpoint(self.path)


def checkpoint_resume(folder):
    """4 epochs under FSDP2 (AdamW, a cosine schedule over the 4) saving a checkpoint after the 2nd, and a
    resume from it to 4: weights and histories of both."""
    straight = train(RANK_BATCH, "adamw", epochs=4, parallel="fsdp",
                     callbacks=[_SaveAt(2, os.path.join(folder, "ck"))])
    resumed = make_trainer(RANK_BATCH, "adamw", parallel="fsdp")
    resumed.fit(TARGET, SOURCE, VAL, epochs=4, resume_from=os.path.join(folder, "ck"))
    return {"straight": straight, "resumed": {"state": weights(resumed), "history": resumed.history.history,
                                              "extra": resumed.history.extra}}


def run_rank(out):
    """Every scenario on this rank (under torchrun's variables); the results to ``out/rank{r}.pt``."""
    results = {f"{parallel}_{opt}": train(RANK_BATCH, opt, parallel=parallel)
               for parallel in ("ddp", "fsdp") for opt in ("sgd", "adamw")}
    results["fsdp_grads"] = one_step_gradients(RANK_BATCH, parallel="fsdp")
    results["fsdp_checkpoint"] = checkpoint_resume(out)
    try:  # 17 sequences in batches of 8: 9 for rank 0 (2 batches), 8 for rank 1 (1 batch)
        make_trainer(RANK_BATCH).fit(tuple(torch.cat([t, t[:1]]) for t in TARGET), SOURCE, epochs=1)
    except ValueError as e:
        results["uneven_batches"] = str(e)
    if importlib.util.find_spec("transformers") is not None:
        results["hf"] = {arch: train(RANK_BATCH, "sgd", epochs=2, hf=arch, parallel="fsdp")
                         for arch in ("gpt2", "llama")}
    torch.save(results, os.path.join(out, f"rank{dist.rank()}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' results (one launch for every test of this module that reads them)."""
    out = tmp_path_factory.mktemp("lm_ranks")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": ROOT, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log.decode()[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)], out


def _assert_same_run(got, want, what):
    """Weights to 1e-6, but the attention's key biases to 1e-5: their gradient is 0 in exact arithmetic
    (the softmax ignores a score added to every key alike), and Adam scales the rounding noise that stands
    in for it to steps of the learning rate's size."""
    for k, v in want["state"].items():
        a, b = got["state"][k], v
        if k.endswith("qkv.bias"):
            d = len(v) // 3
            torch.testing.assert_close(a[d:2 * d], b[d:2 * d], rtol=0, atol=1e-5, msg=f"{what}: {k} (keys)")
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"{what}: {k}")
    assert got["history"].keys() == want["history"].keys()
    for key, values in want["history"].items():
        assert got["history"][key] == pytest.approx(values, rel=1e-6, abs=1e-9), (what, key)
    for key, value in want["extra"].items():
        assert got["extra"][key] == pytest.approx(value, rel=1e-6, abs=1e-6), (what, key)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_two_ranks_equal_one_process_with_the_global_batch(ranks, parallel, optimizer):
    """3 steps (SGD; AdamW with weight decay, clipping, warm-up and cosine) on sequences padded unevenly:
    the weights, the epoch losses and the evaluations (15 sequences: one rank evaluates a stand-in row)
    of two ranks of 8 sequences equal one process's of 16."""
    (r0, r1), _ = ranks
    name = f"{parallel}_{optimizer}"
    single = train(2 * RANK_BATCH, optimizer)
    _assert_same_run(r0[name], single, name)
    for k, v in r0[name]["state"].items():
        assert torch.equal(v, r1[name]["state"][k]), k  # the replicas (or gathered shards) agree exactly
    assert r0[name]["history"] == r1[name]["history"] and r0[name]["extra"] == r1[name]["extra"]
    # the padding fell unevenly: the ranks predicted different numbers of tokens in every step, per side
    for (s0, t0), (s1, t1), (s, t) in zip(r0[name]["tokens"], r1[name]["tokens"], single["tokens"]):
        assert s0 != s1 and t0 != t1 and (s0 + s1, t0 + t1) == (s, t)
    assert single["extra"]["target_loss_after"] < single["extra"]["target_loss_before"]


@pytest.mark.slow
def test_fsdp_sharded_head_gradient_equals_one_process(ranks):
    """After one forward and backward, each gradient FSDP2 reduce-scattered (the head's among them: the
    fused op ran inside the root unit's forward, on the gathered weight), gathered whole, equals one
    process's gradient of the global batch."""
    (r0, r1), _ = ranks
    single = one_step_gradients(2 * RANK_BATCH)
    assert set(r0["fsdp_grads"]) == set(single)
    for name, g in single.items():
        torch.testing.assert_close(r0["fsdp_grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)
        assert torch.equal(r0["fsdp_grads"][name], r1["fsdp_grads"][name])
    assert single["lm_head.weight"].abs().max() > 1e-3


@pytest.mark.slow
def test_fsdp_checkpoint_resume_equals_a_straight_run_and_loads_in_one_process(ranks):
    """Under FSDP2, a checkpoint after 2 of 4 epochs + a resume to 4 equals the 4 epochs exactly; the
    checkpoint holds the whole weights and an unsharded optimizer state: one process resumes it too and
    ends where 4 epochs in one process do."""
    (r0, r1), out = ranks
    ck = r0["fsdp_checkpoint"]
    for k, v in ck["straight"]["state"].items():
        assert torch.equal(ck["resumed"]["state"][k], v), k
    assert ck["resumed"]["history"] == ck["straight"]["history"]
    assert ck["resumed"]["extra"] == ck["straight"]["extra"]
    assert sorted(os.listdir(out / "ck")) == ["model.safetensors", "trainer_state.pt"]
    single = make_trainer(2 * RANK_BATCH, "adamw")
    single.fit(TARGET, SOURCE, VAL, epochs=4, resume_from=out / "ck")
    straight = train(2 * RANK_BATCH, "adamw", epochs=4)
    _assert_same_run({"state": weights(single), "history": single.history.history,
                      "extra": single.history.extra}, straight, "one process resuming the FSDP2 checkpoint")


@pytest.mark.slow
def test_ranks_with_different_numbers_of_batches_are_refused(ranks):
    """17 sequences, batches of 8: the ranks would run 2 and 1 steps, and the first would wait forever on
    its second step's collectives; both ranks raise before training instead."""
    (r0, r1), _ = ranks
    for r in (r0, r1):
        assert r["uneven_batches"] == ("the ranks have [2, 1] batches per epoch (rank r: entry r); every rank "
                                       "needs as many: make the number of training samples a multiple of the "
                                       "number of ranks")


@pytest.mark.slow
def test_fsdp_shards_hugging_face_decoder_layers_and_equals_one_process(ranks):
    """HiddenStates(GPT-2) (its head tied to the token embedding, both in the root unit) and
    HiddenStates(Llama) (rotary embeddings passed to each layer) under FSDP2, their decoder layers
    found by the default rule: 2 SGD steps on uneven padding equal one process's."""
    pytest.importorskip("transformers")
    (r0, r1), _ = ranks
    for arch in ("gpt2", "llama"):
        _assert_same_run(r0["hf"][arch], train(2 * RANK_BATCH, "sgd", epochs=2, hf=arch), arch)
        assert r0["hf"][arch]["history"] == r1["hf"][arch]["history"]


# ---- one process (the default run) ------------------------------------------------------------------

def test_rank_losses_over_global_token_counts_average_to_the_global_token_mean(monkeypatch):
    """What DDP and FSDP2 compute, simulated in one process: each rank's step loss over the global token
    counts (times 2 ranks), its gradients averaged over the ranks, equals the step of one process on both
    ranks' sequences; the average of per-rank token means (the loss before) does not."""
    batch0 = (torch.cat([SOURCE[0][:8], TARGET[0][:8]]), torch.cat([SOURCE[1][:8], TARGET[1][:8]]), 8)
    batch1 = (torch.cat([SOURCE[0][8:], TARGET[0][8:]]), torch.cat([SOURCE[1][8:], TARGET[1][8:]]), 8)
    whole = (torch.cat([SOURCE[0], TARGET[0]]), torch.cat([SOURCE[1], TARGET[1]]), N)
    tr = make_trainer(N)
    tr._set_alpha(0.3)
    params = list(tr.model.parameters())
    ref_loss, _ = tr.step(whole)
    ref = torch.autograd.grad(ref_loss, params)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce_sum", lambda v: v)
    tr.on_window_start([batch0, batch1])  # the two ranks' counts summed: what the all-reduce makes
    losses = [tr.step(b)[0] for b in (batch0, batch1)]
    grads = [torch.autograd.grad(loss, params) for loss in losses]
    torch.testing.assert_close((losses[0] + losses[1]) / 2, ref_loss, rtol=1e-6, atol=0)
    for g0, g1, r in zip(*grads, ref):
        torch.testing.assert_close((g0 + g1) / 2, r, rtol=1e-5, atol=1e-7)
    # the per-rank means averaged: a token of the rank with fewer tokens weighs more
    hidden = [tr.model(b[0]) for b in (batch0, batch1)]
    per_rank = [causal_lm_loss(h[:8], b[1][:8], h[8:], b[1][8:], tr.model.lm_head, 0.3)
                for h, b in zip(hidden, (batch0, batch1))]
    assert abs((per_rank[0] + per_rank[1]).item() / 2 - ref_loss.item()) > 1e-3


def test_gradient_accumulation_over_uneven_padding_equals_the_whole_batch():
    """Batch 4 x 2 accumulated micro-batches equals batch 8 (SGD, replay, 2 epochs, weights to 1e-6): each
    side's mean over the predicted tokens of the whole window, though the micro-batches hold different
    token counts."""
    states, losses = [], []
    for batch_size, accum in ((8, 1), (4, 2)):
        tr = make_trainer(batch_size, "sgd", grad_accum_steps=accum)
        tr.fit((TARGET[0][:8], TARGET[1][:8]), (SOURCE[0][:8], SOURCE[1][:8]), epochs=2)
        assert tr.global_step == 2
        states.append(weights(tr))
        losses.append(tr.history["loss"])
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=0, atol=1e-6, msg=k)
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_token_mean_weights_recombine_the_two_sides():
    s, t = torch.tensor(5.0, dtype=torch.float64), torch.tensor(7.0, dtype=torch.float64)
    w, scale = token_mean_weights(0.3, torch.tensor([4.0, 10.0], dtype=torch.float64))
    assert (scale * (w * t + (1 - w) * s)).item() == pytest.approx(0.3 * 7 / 10 + 0.7 * 5 / 4, rel=1e-15)
    w, scale = token_mean_weights(1.0, torch.tensor([0.0, 10.0], dtype=torch.float64))  # naive: no source
    assert w.item() == 1.0 and scale.item() == pytest.approx(0.1)
    w, scale = token_mean_weights(torch.tensor(0.5, dtype=torch.float64), torch.tensor([0.0, 4.0]))
    assert (scale * (w * t + (1 - w) * 0)).item() == pytest.approx(0.5 * 7 / 4)  # a side without tokens adds 0


def test_fsdp_units_are_the_repeated_blocks():
    model = TinyCausalLM(V, d_model=16, n_layers=3, n_heads=2, max_len=T)
    assert dist.repeated_blocks(model) == list(model.blocks)
    assert dist.repeated_blocks(torch.nn.Linear(2, 2)) == []


def test_fsdp_units_of_hugging_face_models_are_their_decoder_layers():
    transformers = pytest.importorskip("transformers")
    from fastadapt.training.lm import HiddenStates

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2,
                                                                 n_positions=16))
    assert dist.repeated_blocks(HiddenStates(llama)) == list(llama.model.layers)
    assert dist.repeated_blocks(HiddenStates(gpt2)) == list(gpt2.transformer.h)


def test_parallel_options_are_checked():
    from fastadapt import TransferTrainer

    model = TinyCausalLM(V, d_model=16, n_layers=1, n_heads=2, max_len=T)
    with pytest.raises(ValueError, match="parallel must be one of"):
        LMAdaptiveTrainer(model, parallel="zero3", device="cpu")
    with pytest.raises(TypeError, match="fsdp_blocks must be None or callable"):
        LMAdaptiveTrainer(model, parallel="fsdp", fsdp_blocks=["blocks"], device="cpu")
    with pytest.raises(ValueError, match="parallel='fsdp' is not supported by TransferTrainer"):
        TransferTrainer(torch.nn.Linear(2, 2), parallel="fsdp", device="cpu")
    with pytest.raises(ValueError, match="fsdp_blocks must return submodules of the model"):
        dist.shard(model, [torch.nn.Linear(2, 2)])


if __name__ == "__main__":
    run_rank(sys.argv[1])
