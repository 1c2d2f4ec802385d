"""One training epoch on digits, end to end, through fastadapt's trainers and through the loops a user
would write by hand (issue 11's targets: the trainer >= 1.3x the DataLoader loop, >= 1.0x the
in-memory slicing loop):

- adaptive (target 5-9, replayed source 0-4, alpha = 0.5, replay memory of 100 samples):
  ``AdaptiveTrainer.fit(..., epochs=1)`` with the evaluations it makes (source before; both sides
  after the epoch as validation, then as the final accuracies), against the same work by hand;
- transfer (fine-tune on 5-9, a 5-way head): ``TransferTrainer.fit(train, val, epochs=1)`` with its
  evaluations (validation after the epoch, then the final accuracy), against the same by hand.

Implementations: ``fastadapt`` (the trainer on the package's MLP: FusedLinearReLU blocks, the fused
loss, fused AdamW); ``fastadapt_compile`` (the same with ``compile=True``); ``eager`` (the hand loop:
``DataLoader(TensorDataset)``, ``nn.Linear`` + ``nn.ReLU``, the ``F.cross_entropy`` formula, AdamW);
``eager_slicing`` (that loop batching by indexing a shuffled permutation); ``compile`` (the eager loop's
model and loss under torch.compile). MLP 64-128-128, batch 32. Data set-up and model construction are
outside the timed region; the optimizer's construction and all batching are inside.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common import BUDGET, first_call_seconds, machine_info, record, run
from fastadapt.apps import workflows
from fastadapt.training import AdaptiveTrainer, TransferTrainer
from fastadapt.training.adaptive import replay_indices
from fastadapt.training.models import MLP

HIDDEN, BATCH, ALPHA, MEMORY = (128, 128), 32, 0.5, 100
IMPLS = ["fastadapt", "eager", "eager_slicing", "compile", "fastadapt_compile"]
_task = {}


def task():
    if "t" not in _task:
        _task["t"] = workflows.prepare("digits:0-4", "digits:5-9", workflows.RunConfig(output="", quiet=True))
    return _task["t"]


def eager_model(classes):
    sizes = (64,) + HIDDEN
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], classes))


def eager_alpha_loss(ls, ys, lt, yt, alpha):
    return alpha * F.cross_entropy(lt, yt) + (1 - alpha) * F.cross_entropy(ls, ys)


def _accuracy(net, X, y):
    with torch.no_grad():
        return (net(X).argmax(-1) == y).float().mean().item()


def loader_batches(X, y):
    return DataLoader(TensorDataset(X, y), batch_size=BATCH, shuffle=True)


def sliced_batches(X, y):
    order = torch.randperm(len(y))
    return [(X[idx], y[idx]) for idx in order.split(BATCH)]


def hand_adaptive_epoch(net, loss_fn, t, batches):
    """Evaluate the source, one epoch of alpha-weighted training with replay, evaluate both sides twice."""
    opt = torch.optim.AdamW(net.parameters())
    Xs, ys = t.source_train
    keep = replay_indices(ys, MEMORY, 0)
    Xm, ym = Xs[keep], ys[keep]
    _accuracy(net, *t.source_test)
    net.train()
    source = iter(batches(Xm, ym))
    for xt, yt in batches(*t.target_train):
        batch = next(source, None)
        if batch is None:
            source = iter(batches(Xm, ym))
            batch = next(source)
        xs, ys_ = batch
        logits = net(torch.cat([xs, xt]))
        loss = loss_fn(logits[: len(ys_)], ys_, logits[len(ys_):], yt, ALPHA)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    _accuracy(net, *t.source_test), _accuracy(net, *t.target_test)
    return _accuracy(net, *t.source_test), _accuracy(net, *t.target_test)


def hand_transfer_epoch(net, loss_fn, t, batches):
    """One epoch of cross-entropy fine-tuning on the target, then its validation and final accuracy."""
    opt = torch.optim.AdamW(net.parameters())
    X, y = t.target_train
    net.train()
    for xb, yb in batches(X, y - 5):
        loss_fn(net(xb), yb).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    net.eval()
    Xv, yv = t.target_test
    _accuracy(net, Xv, yv - 5)
    return _accuracy(net, Xv, yv - 5)


def _setup(impl, kind, compiled_backend):
    """(epoch function, setup function) for one implementation."""
    t = task()
    classes = 10 if kind == "adaptive" else 5
    state = {}
    if impl.startswith("fastadapt"):
        compile_step = impl == "fastadapt_compile"

        def setup():
            torch.manual_seed(0)
            opts = dict(batch_size=BATCH, progress_bar=False, seed=0, device="cpu", compile=compile_step)
            model = MLP(64, HIDDEN, classes)
            state["trainer"] = (AdaptiveTrainer(model, alpha=ALPHA, memory_size=MEMORY, **opts) if kind == "adaptive"
                                else TransferTrainer(model, **opts))

        def epoch():
            if kind == "adaptive":
                state["trainer"].fit(t.target_train, t.source_train, {"source": t.source_test, "target": t.target_test},
                                     epochs=1)
            else:
                state["trainer"].fit((t.target_train[0], t.target_train[1] - 5),
                                     (t.target_test[0], t.target_test[1] - 5), epochs=1)
        return epoch, setup
    model = eager_model(classes)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    ce = eager_alpha_loss if kind == "adaptive" else F.cross_entropy
    loss_fn = ce if impl != "compile" else torch.compile(ce, backend=compiled_backend)
    net = model if impl != "compile" else torch.compile(model, backend=compiled_backend)
    batches = sliced_batches if impl == "eager_slicing" else loader_batches
    hand = hand_adaptive_epoch if kind == "adaptive" else hand_transfer_epoch

    def setup():  # the same weights every round; compiled graphs are kept
        model.load_state_dict(init)

    def epoch():
        hand(net, loss_fn, t, batches)
    return epoch, setup


@pytest.mark.parametrize("kind", ["adaptive", "transfer"])
@pytest.mark.parametrize("impl", IMPLS)
def test_trainer_epoch(benchmark, impl, kind):
    epoch, setup = _setup(impl, kind, "aot_eager" if benchmark.disabled else "inductor")
    if benchmark.disabled:
        setup()
        run(benchmark, epoch, setup, rounds=1, warmup=0)
        return
    setup()
    first = first_call_seconds(epoch)  # for the compiled ones: every graph (full and last partial batch)
    setup()
    second = first_call_seconds(epoch)
    rounds = max(5, min(50, int(2 * BUDGET / max(second, 1e-6))))
    run(benchmark, epoch, setup, rounds=rounds, warmup=1)
    samples = len(task().target_train[1])
    info = dict(impl=impl, mode="epoch", device="cpu", op=f"{kind}_epoch", shape="digits 5-9" + (
        " (+replay 100)" if kind == "adaptive" else ""), rounds=rounds, first_call_s=first, samples=samples,
        samples_per_s=samples / benchmark.stats.stats.median, machine=machine_info())
    if "compile" in impl:
        info["compile_s"] = first
    record(benchmark, **info)
