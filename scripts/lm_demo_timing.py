"""Issue 14 groundwork: time the demo-lm pipeline end to end (not the demo itself, which is still to write).

Build the stdlib corpus, pretrain TinyCausalLM on the source domain, then adapt it to the target domain
with naive fine-tuning (alpha=1) and alpha=0.5 replay; print source/target perplexity before/after and the
seconds of each phase. Example: ``nice python scripts/lm_demo_timing.py --source prose --target code``.
"""
import argparse
import json
import sys
import time

import torch

from fastadapt.apps import lm_data
from fastadapt.training.lm import LMAdaptiveTrainer, TinyCausalLM


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--source", default="prose")
    p.add_argument("--target", default="code")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pre-epochs", type=int, default=4)
    p.add_argument("--adapt-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--adapt-lr", type=float, default=1e-3)
    p.add_argument("--alphas", default="1.0,0.5")
    p.add_argument("--memory", type=int, default=None)
    p.add_argument("--precision", default="32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    corpus = lm_data.build_corpus(a.seq_len, a.vocab, domains=(a.source, a.target))
    t_data = time.perf_counter() - t0
    S, T = corpus.splits[a.source], corpus.splits[a.target]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"corpus {t_data:.1f}s: {a.source} train {tuple(S['train'][0].shape)} val {tuple(S['val'][0].shape)}; "
          f"{a.target} train {tuple(T['train'][0].shape)} val {tuple(T['val'][0].shape)}")
    common = dict(device="cpu", batch_size=a.batch, seed=a.seed, precision=a.precision, progress_bar=False,
                  scheduler="cosine", warmup_steps=10, max_grad_norm=1.0, weight_decay=0.01)
    torch.manual_seed(a.seed)
    model = TinyCausalLM(corpus.vocab_size, a.d_model, a.layers, a.heads, a.seq_len)
    t0 = time.perf_counter()
    pre = LMAdaptiveTrainer(model, alpha=1.0, lr=a.lr, **common)
    h = pre.fit(S["train"], None, {"target": S["val"]}, epochs=a.pre_epochs)
    t_pre = time.perf_counter() - t0
    print(f"pretrain {a.pre_epochs} epochs {t_pre:.1f}s: {a.source} val ppl "
          f"{h.extra['target_ppl_before']:.1f} -> {h.extra['target_ppl_after']:.2f}; train loss {h['loss']}")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for alpha in (float(x) for x in a.alphas.split(",")):
        m = TinyCausalLM(corpus.vocab_size, a.d_model, a.layers, a.heads, a.seq_len)
        m.load_state_dict(state)
        t0 = time.perf_counter()
        tr = LMAdaptiveTrainer(m, alpha=alpha, lr=a.adapt_lr, memory_size=a.memory if alpha < 1 else None,
                               **common)
        h = tr.fit(T["train"], S["train"], {"source": S["val"], "target": T["val"]},
                   epochs=a.adapt_epochs)
        x = h.extra
        rows.append({"alpha": alpha, "seconds": time.perf_counter() - t0, **x})
        print(f"alpha={alpha}: {rows[-1]['seconds']:.1f}s  source ppl {x['source_ppl_before']:.2f} -> "
              f"{x['source_ppl_after']:.2f} ({100 * x['forgetting_ppl']:+.1f}%, {x['forgetting_nats']:+.3f} nats/tok)"
              f"  target ppl {x['target_ppl_before']:.1f} -> {x['target_ppl_after']:.2f}")
    if len(rows) == 2:
        print(f"target ppl replay/naive: {rows[1]['target_ppl_after'] / rows[0]['target_ppl_after']:.3f}")
    print(json.dumps({"args": vars(a), "data_s": t_data, "pretrain_s": t_pre, "rows": rows}))


if __name__ == "__main__":
    main()
