"""One adaptive-training epoch on digits (target 5-9, replayed source 0-4, alpha = 0.5), end to end:

- fastadapt: ``AdaptiveTrainer.fit(..., epochs=1)`` on the package's MLP (FusedLinearReLU blocks, fused
  alpha-weighted cross-entropy), including its evaluations before and after the epoch;
- eager: the same loop written by hand with nn.Linear + ReLU and the F.cross_entropy formula;
- compile: that hand-written loop with the model and the loss under torch.compile.

MLP 64-128-128-10, batch 32, AdamW, replay memory of 100 source samples. Data set-up, model and
optimizer construction are outside the timed region; DataLoader iteration is inside.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import BUDGET, IMPLS, first_call_seconds, machine_info, record, run
from fastadapt.training import AdaptiveTrainer
from fastadapt.training.adaptive import replay_indices
from fastadapt.training.models import MLP
from fastadapt.apps import workflows

HIDDEN, BATCH, ALPHA, MEMORY = (128, 128), 32, 0.5, 100
_task = {}


def task():
    if "t" not in _task:
        _task["t"] = workflows.prepare("digits:0-4", "digits:5-9", workflows.RunConfig(output="", quiet=True))
    return _task["t"]


def eager_model():
    sizes = (64,) + HIDDEN
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], 10))


def eager_loss(ls, ys, lt, yt, alpha):
    return alpha * F.cross_entropy(lt, yt) + (1 - alpha) * F.cross_entropy(ls, ys)


def _accuracy(net, X, y):
    with torch.no_grad():
        return (net(X).argmax(-1) == y).float().mean().item()


def hand_epoch(net, loss_fn, opt, t):
    """Evaluate the source, one epoch of alpha-weighted training with replay, evaluate both sides."""
    Xs, ys = t.source_train
    keep = replay_indices(ys, MEMORY, 0)
    target = DataLoader(TensorDataset(*t.target_train), batch_size=BATCH, shuffle=True)
    source = DataLoader(TensorDataset(Xs[keep], ys[keep]), batch_size=BATCH, shuffle=True)
    _accuracy(net, *t.source_test)
    net.train()
    src = iter(source)
    for xt, yt in target:
        try:
            xs, ys_ = next(src)
        except StopIteration:
            src = iter(source)
            xs, ys_ = next(src)
        logits = net(torch.cat([xs, xt]))
        loss = loss_fn(logits[: len(ys_)], ys_, logits[len(ys_):], yt, ALPHA)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    # as many evaluations as fit(epochs=1) makes: source before; both sides after the epoch, twice
    # (the epoch's validation, then the final accuracies)
    _accuracy(net, *t.source_test), _accuracy(net, *t.target_test)
    return _accuracy(net, *t.source_test), _accuracy(net, *t.target_test)


@pytest.mark.parametrize("impl", IMPLS)
def test_adaptive_epoch(benchmark, impl):
    t = task()
    torch.manual_seed(0)
    state = {}

    if impl == "fastadapt":
        def setup():
            state["trainer"] = AdaptiveTrainer(MLP(64, HIDDEN, 10), alpha=ALPHA, memory_size=MEMORY,
                                               batch_size=BATCH, progress_bar=False, seed=0, device="cpu")

        def epoch():
            state["trainer"].fit(t.target_train, t.source_train,
                                 {"source": t.source_test, "target": t.target_test}, epochs=1)
    else:
        loss_fn = eager_loss if impl == "eager" else torch.compile(
            eager_loss, backend="aot_eager" if benchmark.disabled else "inductor")

        model = eager_model()
        init = {k: v.clone() for k, v in model.state_dict().items()}
        net = model if impl == "eager" else torch.compile(
            model, backend="aot_eager" if benchmark.disabled else "inductor")

        def setup():  # the same weights every round, a fresh optimizer; compiled graphs are kept
            model.load_state_dict(init)
            state["net"], state["opt"] = net, torch.optim.AdamW(model.parameters())

        def epoch():
            hand_epoch(state["net"], loss_fn, state["opt"], t)

    if benchmark.disabled:
        run(benchmark, epoch, setup, rounds=1, warmup=0)
        return
    setup()
    first = first_call_seconds(epoch)  # for compile: every graph (full and last partial batch)
    setup()
    second = first_call_seconds(epoch)
    rounds = max(3, min(50, int(2 * BUDGET / max(second, 1e-6))))
    run(benchmark, epoch, setup, rounds=rounds, warmup=1)
    info = dict(impl=impl, mode="epoch", device="cpu", op="adaptive_epoch", shape="digits 5-9 (+replay 100)",
                rounds=rounds, first_call_s=first, samples=len(t.target_train[1]),
                samples_per_s=len(t.target_train[1]) / benchmark.stats.stats.median, machine=machine_info())
    if impl == "compile":
        info["compile_s"] = first
    record(benchmark, **info)
