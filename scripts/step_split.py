"""Where a trainer's step time goes: one adaptive epoch on digits (the setting of
benchmarks/bench_trainers.py) run with timers around data, forward, loss, backward and the optimizer;
what is left of the training time is bookkeeping. Works on this tree and on an older one (run it
with PYTHONPATH pointing at that tree), so BENCHMARKS.md can show the split before and after.

    python scripts/step_split.py [--epochs-measured 10]
"""
import argparse
import contextlib
import time

import torch

import fastadapt
from fastadapt.training import AdaptiveTrainer
from fastadapt.training.models import MLP

try:
    from fastadapt.apps import workflows
except ImportError:  # an older tree
    from fastadapt.training import workflows

PHASES = ("data", "forward", "loss", "backward", "optimizer", "evaluation")


class Timers:
    def __init__(self):
        self.t = dict.fromkeys(PHASES, 0.0)
        self.depth = 0  # a phase inside another (the loss inside a forward hook, say) counts once

    @contextlib.contextmanager
    def phase(self, name):
        if self.depth:
            yield
            return
        self.depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            self.t[name] += time.perf_counter() - start
            self.depth -= 1


def wrap(owner, attr, timers, name):
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        with timers.phase(name):
            return fn(*args, **kwargs)

    setattr(owner, attr, timed)
    return lambda: setattr(owner, attr, fn)


def wrap_iterator(owner, attr, timers):
    """Times each next() of the iterator `owner.attr` returns (the batch source)."""
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        it = iter(fn(*args, **kwargs))
        while True:
            with timers.phase("data"):
                try:
                    item = next(it)
                except StopIteration:
                    return
            yield item

    setattr(owner, attr, timed)
    return lambda: setattr(owner, attr, fn)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs-measured", type=int, default=10)
    args = ap.parse_args()
    t = workflows.prepare("digits:0-4", "digits:5-9", workflows.RunConfig(output="", quiet=True))
    timers = Timers()
    undo = [wrap(torch.Tensor, "backward", timers, "backward"),
            wrap(torch.optim.AdamW, "step", timers, "optimizer"),
            wrap(torch.optim.Optimizer, "zero_grad", timers, "optimizer"),
            wrap(AdaptiveTrainer, "evaluate", timers, "evaluation")]
    import fastadapt.training.adaptive as adaptive_module
    if hasattr(adaptive_module, "alpha_weighted_cross_entropy"):  # this tree
        undo.append(wrap(adaptive_module, "alpha_weighted_cross_entropy", timers, "loss"))
        from fastadapt.training.batches import PairedBatches
        undo.append(wrap_iterator(PairedBatches, "epoch", timers))
    else:  # the tree before issue 11: DataLoaders, and the loss through the package attribute
        undo.append(wrap(fastadapt, "alpha_weighted_cross_entropy", timers, "loss"))
        from torch.utils.data.dataloader import _BaseDataLoaderIter
        undo.append(wrap(_BaseDataLoaderIter, "__next__", timers, "data"))

    def fit():
        torch.manual_seed(0)
        model = MLP(64, (128, 128), 10)
        pre, post = [], []
        # training forwards only: evaluate() puts the model in eval mode, and its time is "evaluation"
        def before(m, inputs):
            if m.training:
                pre.append(time.perf_counter())

        def after(m, inputs, output):
            if m.training:
                post.append(time.perf_counter())

        model.register_forward_pre_hook(before)
        model.register_forward_hook(after)
        tr = AdaptiveTrainer(model, alpha=0.5, memory_size=100, batch_size=32, progress_bar=False, seed=0, device="cpu")
        start = time.perf_counter()
        tr.fit(t.target_train, t.source_train, {"source": t.source_test, "target": t.target_test}, epochs=1)
        return time.perf_counter() - start, sum(b - a for a, b in zip(pre, post)), tr.global_step

    for _ in range(2):
        fit()
    for k in timers.t:
        timers.t[k] = 0.0
    total = fwd = steps = 0.0
    for _ in range(args.epochs_measured):
        seconds, forward, n = fit()
        total, fwd, steps = total + seconds, fwd + forward, steps + n
    for fn in undo:
        fn()
    train = total - timers.t["evaluation"]
    per_step = {"data": timers.t["data"] / steps * 1e6, "forward": fwd / steps * 1e6}
    per_step.update({k: timers.t[k] / steps * 1e6 for k in ("loss", "backward", "optimizer")})
    per_step["bookkeeping"] = train / steps * 1e6 - sum(per_step.values())
    print(f"fastadapt at {fastadapt.__file__}")
    print(f"epoch {total / args.epochs_measured * 1e3:.1f} ms: training {train / args.epochs_measured * 1e3:.1f} ms "
          f"({steps / args.epochs_measured:.0f} steps), evaluations {timers.t['evaluation'] / args.epochs_measured * 1e3:.1f} ms")
    print("per step (us): " + ", ".join(f"{k} {v:.0f}" for k, v in per_step.items())
          + f"; total {train / steps * 1e6:.0f}")


if __name__ == "__main__":
    main()
