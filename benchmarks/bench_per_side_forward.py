"""A causal language model's training step with fastadapt.alpha_weighted_cross_entropy, two ways of
producing the logits (the README's Hugging Face section quotes the result):

- ``per_side``: ``model(source_ids)`` and ``model(target_ids)``, two forwards
- ``concat``: one forward over ``torch.cat([source_ids, target_ids])``, the logits sliced per side
- ``concat_pad``: the same forward, the logits not shifted: the labels are shifted left instead, with
  ``-100`` in the last position (``logits[:, :-1]`` of a batch of several sequences is not one strided
  block of rows, so the kernel reads it through a copy; the full logits need none)

The model is a tiny GPT-like stack from plain torch modules (token and position embeddings, pre-norm
``nn.TransformerEncoderLayer`` blocks with a causal mask, a tied head), so no transformers install or
download is needed. Labels are the inputs shifted by one (``logits[:, :-1]`` against ``ids[:, 1:]``),
padding is ``-100``. Each run is a fresh process, the ways take turns, and the ratios to ``per_side`` of
one turn are what to read on a shared machine; CPU time (user + system, all threads) is reported next to
wall time because other load on the machine disturbs it least.

    python benchmarks/bench_per_side_forward.py                  # batch 8 per side, 256 tokens, 8192 vocab
    pytest benchmarks/bench_per_side_forward.py --benchmark-disable   # smoke: tiny model, one step each
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import pytest

WAYS = ["per_side", "concat", "concat_pad"]


def _worker(way, batch, seq, vocab, dim, layers, steps, warmup):
    import time

    import torch
    from torch import nn

    import fastadapt

    torch.manual_seed(0)

    class TinyCausalLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(vocab, dim)
            self.pos = nn.Embedding(seq, dim)
            layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=4 * dim, dropout=0.0, batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.mask = nn.Transformer.generate_square_subsequent_mask(seq)

        def forward(self, ids):
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
            h = self.blocks(h, mask=self.mask, is_causal=True)
            return self.norm(h) @ self.tok.weight.T  # (batch, seq, vocab)

    model = TinyCausalLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src, tgt = torch.randint(0, vocab, (batch, seq)), torch.randint(0, vocab, (batch, seq))
    src_labels, tgt_labels = src.clone(), tgt.clone()
    src_labels[:, -seq // 8:] = -100  # padding at the end of the source sequences

    def shifted(labels):  # position i is scored against token i + 1; the last position against nothing
        return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)

    def step():
        opt.zero_grad(set_to_none=True)
        if way == "per_side":
            s, t = model(src), model(tgt)
        else:
            logits = model(torch.cat([src, tgt]))
            s, t = logits[:batch], logits[batch:]
        if way == "concat_pad":
            loss = fastadapt.alpha_weighted_cross_entropy(s, shifted(src_labels), t, shifted(tgt_labels), alpha=0.5,
                                                          class_dim=-1)
        else:
            loss = fastadapt.alpha_weighted_cross_entropy(s[:, :-1], src_labels[:, 1:], t[:, :-1], tgt_labels[:, 1:],
                                                          alpha=0.5, class_dim=-1)
        loss.backward()
        opt.step()
        return float(loss)

    times, cpu, losses = [], [], []
    for i in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    print(json.dumps(dict(way=way, step_s=statistics.median(times), cpu_s=statistics.median(cpu), losses=losses)))


def measure(way, batch, seq, vocab, dim, layers, steps, warmup):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", way,
           *map(str, (batch, seq, vocab, dim, layers, steps, warmup))]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_per_side_forward(benchmark):
    smoke = benchmark.disabled
    config = (2, 16, 100, 32, 1, 1, 0) if smoke else (8, 256, 8192, 256, 4, 5, 2)
    results = {}

    def run():
        for way in WAYS:
            results[way] = measure(way, *config)

    benchmark.pedantic(run, rounds=1, iterations=1)
    # the same model, data and seed: every way computes the same losses (to float32 rounding)
    for way in WAYS[1:]:
        for a, b in zip(results["per_side"]["losses"], results[way]["losses"]):
            assert abs(a - b) <= 1e-4 * abs(a), (way, results["per_side"]["losses"], results[way]["losses"])
    benchmark.extra_info.update({f"{way}_{k}": r[k] for way, r in results.items() for k in ("step_s", "cpu_s")})


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        way, *nums = sys.argv[2:]
        _worker(way, *map(int, nums))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("batch", 8), ("seq", 256), ("vocab", 8192), ("dim", 256), ("layers", 4), ("steps", 5),
                          ("warmup", 2), ("repeats", 3)):
        p.add_argument("--" + name, type=int, default=default)
    a = p.parse_args()
    runs = {way: [] for way in WAYS}
    for r in range(a.repeats):
        for way in WAYS[r % 3:] + WAYS[:r % 3]:
            runs[way].append(measure(way, a.batch, a.seq, a.vocab, a.dim, a.layers, a.steps, a.warmup))
            print(f"repeat {r} {way}: {runs[way][-1]['step_s'] * 1e3:.0f} ms, cpu {runs[way][-1]['cpu_s'] * 1e3:.0f} ms")
    print("| way | step ms | / per_side (per repeat) | CPU ms | / per_side (per repeat) |")
    print("|---|---|---|---|---|")
    for way in WAYS:
        cells = []
        for k in ("step_s", "cpu_s"):
            ratios = [x[k] / p[k] for x, p in zip(runs[way], runs["per_side"])]
            cells.append(f"{statistics.median(x[k] for x in runs[way]) * 1e3:.0f} | {statistics.median(ratios):.2f} "
                         f"({', '.join(f'{v:.2f}' for v in ratios)})")
        print(f"| {way} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
