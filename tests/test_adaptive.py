"""AdaptiveTrainer: alpha and its schedules, replay memory, source cycling, History summary."""
import re

import pytest
import torch

from fastadapt import MLP, AdaptiveTrainer, extend_head
from fastadapt.training.adaptive import replay_indices
from _training_data import blobs


def _data():
    Xs, ys = blobs(90, classes=(0, 1, 2), seed=1)
    Xt, yt = blobs(60, classes=(3, 4), seed=2)
    return (Xs, ys), (Xt, yt)


def _pretrained(src):
    from fastadapt import TransferTrainer

    net = MLP(8, (16,), 3)
    TransferTrainer(net, lr=1e-2, seed=0, progress_bar=False).fit(src, epochs=3)
    return extend_head(net, 2)


def test_replay_memory_is_class_balanced_and_seeded():
    y = torch.tensor([0] * 50 + [1] * 50 + [2] * 3 + [3] * 40)
    idx = replay_indices(y, 43, seed=0)
    counts = torch.bincount(y[idx], minlength=4).tolist()
    assert counts == [14, 13, 3, 13]  # the small class gives all it has; the rest is shared
    assert len(set(idx.tolist())) == 43
    assert torch.equal(idx, replay_indices(y, 43, seed=0))
    assert not torch.equal(idx, replay_indices(y, 43, seed=1))


def test_history_summary_and_per_epoch_metrics():
    src, tgt = _data()
    net = _pretrained(src)
    tr = AdaptiveTrainer(net, alpha=0.5, memory_size=30, lr=1e-2, seed=0, progress_bar=False)
    before = tr.evaluate(src)["acc"]
    hist = tr.fit(tgt, src, {"source": src, "target": tgt}, epochs=3)
    assert tr.memory is not None and len(tr.memory) == 30
    assert torch.bincount(tr.memory.tensors[1]).tolist() == [10, 10, 10]
    for key in ("loss", "acc", "source_acc", "val_source_acc", "val_source_loss", "val_target_acc", "val_target_loss"):
        assert len(hist[key]) == 3
    assert hist.source_acc_before == pytest.approx(before)
    assert hist.source_acc_after == pytest.approx(hist["val_source_acc"][-1])
    assert hist.target_acc == pytest.approx(hist["val_target_acc"][-1]) and hist.target_acc > 0.9
    assert hist.forgetting == pytest.approx(100 * (hist.source_acc_before - hist.source_acc_after))
    assert hist.bwt == pytest.approx(hist.source_acc_after - hist.source_acc_before)


def test_naive_finetuning_forgets_and_replay_does_not():
    src, tgt = _data()
    out = {}
    for alpha in (1.0, 0.5):
        net = _pretrained(src)
        h = AdaptiveTrainer(net, alpha=alpha, memory_size=30, lr=1e-2, seed=0, progress_bar=False).fit(
            tgt, src, {"source": src, "target": tgt}, epochs=4)
        out[alpha] = h
    assert out[1.0].forgetting > 50 and out[0.5].forgetting < 10
    assert out[1.0].target_acc > 0.9 and out[0.5].target_acc > 0.9


def test_alpha_schedule_is_called_with_the_optimizer_step():
    src, tgt = _data()
    seen = []

    def alpha(step):
        seen.append(step)
        return min(1.0, 0.1 * step)

    tr = AdaptiveTrainer(_pretrained(src), alpha=alpha, batch_size=20, seed=0, progress_bar=False)
    assert tr.alpha_at(3) == pytest.approx(0.3) and tr.alpha_at(50) == 1.0
    seen.clear()
    tr.fit(tgt, src, epochs=2)  # 3 target batches per epoch
    assert seen == [0, 1, 2, 3, 4, 5]


def test_alpha_zero_trains_only_the_source_task():
    src, tgt = _data()
    net = _pretrained(src)
    new_rows = net.head.weight[3:].detach().clone()
    AdaptiveTrainer(net, alpha=0.0, optimizer=lambda g: torch.optim.SGD(g), lr=0.1, seed=0,
                    progress_bar=False).fit(tgt, src, epochs=1)
    # no target term: the new classes only get pushed down (their rows move), and the source task stays learned
    assert not torch.equal(net.head.weight[3:], new_rows)
    assert (net(src[0]).argmax(1) == src[1]).float().mean() > 0.95


@pytest.mark.parametrize("alpha, msg", [
    (1.5, r"alpha must lie in \[0, 1\], got 1.5"),
    (-0.1, r"alpha must lie in \[0, 1\], got -0.1"),
    (float("nan"), r"alpha must lie in \[0, 1\], got nan"),
    ("0.5", r"alpha must lie in \[0, 1\], got '0.5'"),
    (lambda step: 2.0, r"alpha must lie in \[0, 1\], got 2.0 \(alpha\(0\) of the alpha schedule\)"),
])
def test_bad_alpha_is_refused_before_training(alpha, msg):
    with pytest.raises(ValueError, match=msg):
        AdaptiveTrainer(MLP(8, (16,), 5), alpha=alpha)


def test_alpha_schedule_leaving_the_range_names_the_step():
    src, tgt = _data()
    tr = AdaptiveTrainer(_pretrained(src), alpha=lambda s: 0.5 if s < 2 else 1.5, batch_size=20, progress_bar=False)
    with pytest.raises(ValueError, match=r"got 1.5 \(alpha\(2\) of the alpha schedule\)"):
        tr.fit(tgt, src, epochs=1)


def test_bad_memory_and_val_data():
    src, tgt = _data()
    with pytest.raises(ValueError, match="memory_size must be None or a positive int, got 0"):
        AdaptiveTrainer(MLP(8, (16,), 5), memory_size=0)
    tr = AdaptiveTrainer(MLP(8, (16,), 5), memory_size=500, progress_bar=False)
    with pytest.raises(ValueError, match="memory_size=500 exceeds the 90 samples of source_data"):
        tr.fit(tgt, src, epochs=1)
    with pytest.raises(ValueError, match=r"val_data must be a dict with keys 'source' and 'target', got \['target'\]"):
        tr.fit(tgt, src, {"target": tgt}, epochs=1)


# ---- Learning without Forgetting -------------------------------------------------------------------

def test_lwf_teacher_is_the_model_before_adaptation_frozen_and_never_updated():
    src, tgt = _data()
    net = _pretrained(src)
    snapshot = {k: v.clone() for k, v in net.state_dict().items()}
    tr = AdaptiveTrainer(net, alpha=0.5, strategy="lwf", temperature=2.0, lr=1e-2, seed=0, progress_bar=False)
    hist = tr.fit(tgt, None, {"source": src, "target": tgt}, epochs=3)
    teacher = tr.teacher
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in snapshot.items())  # never updated
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    trained = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert trained == {id(p) for p in net.parameters()}  # the optimizer holds the model's, not the teacher's
    assert not torch.equal(net.state_dict()["head.weight"], snapshot["head.weight"])  # the model did train
    assert tr._distill_k == 3  # the head's size before extend_head
    # trained now: a next LwF fit's teacher knows all 5 classes
    assert not hasattr(net.head, "grown_from") and tr.distill_classes == 5
    assert tr.memory is None and "source_acc" not in hist.history  # no source sample stored or seen
    assert hist.forgetting is not None and hist.target_acc is not None


def test_lwf_step_is_alpha_ce_plus_distillation_of_the_old_classes():
    """The step's loss is alpha * CE(target) + (1 - alpha) * T^2 * KL over the teacher's 3 old classes,
    against a float64 reference from F.cross_entropy and F.kl_div."""
    import torch.nn.functional as F

    src, tgt = _data()
    net = _pretrained(src)
    tr = AdaptiveTrainer(net, alpha=0.3, strategy="lwf", temperature=3.0, seed=0, progress_bar=False)
    tr.fit(tgt, epochs=1)
    x, y = tgt[0][:16], tgt[1][:16]
    loss, metrics = tr.step((x, y))
    with torch.no_grad():
        z, t = net.double()(x.double()), tr.teacher.double()(x.double())[:, :3]
    T = 3.0
    kl = F.kl_div(F.log_softmax(z[:, :3] / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="batchmean")
    expected = 0.3 * F.cross_entropy(z, y) + 0.7 * T * T * kl
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["count"] == 16 and "source_count" not in metrics


def test_replay_plus_lwf_is_replay_plus_distillation_of_every_row():
    """alpha * CE(target rows) + (1 - alpha) * (CE(replayed rows) + T^2 * KL(all rows, old classes)),
    against a float64 reference."""
    import torch.nn.functional as F

    src, tgt = _data()
    net = _pretrained(src)
    tr = AdaptiveTrainer(net, alpha=0.4, strategy="replay+lwf", temperature=2.0, memory_size=30, seed=0,
                         progress_bar=False)
    hist = tr.fit(tgt, src, epochs=2)
    assert tr.teacher is not None and len(tr.memory) == 30
    assert len(hist["source_acc"]) == 2 and hist.forgetting is not None
    x, y, ns = torch.cat([src[0][:8], tgt[0][:16]]), torch.cat([src[1][:8], tgt[1][:16]]), 8
    loss, metrics = tr.step((x, y, ns))
    with torch.no_grad():
        z, t = net.double()(x.double()), tr.teacher.double()(x.double())[:, :3]
    kl = F.kl_div(F.log_softmax(z[:, :3] / 2, -1), F.log_softmax(t / 2, -1), log_target=True, reduction="batchmean")
    expected = 0.4 * F.cross_entropy(z[ns:], y[ns:]) + 0.6 * (F.cross_entropy(z[:ns], y[:ns]) + 4 * kl)
    assert torch.allclose(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert metrics["count"] == 16 and metrics["source_count"] == 8


@pytest.mark.parametrize("options, data, msg", [
    ({"strategy": "ewc"}, None, "strategy must be one of ['replay', 'lwf', 'replay+lwf'], got 'ewc'"),
    ({"strategy": "lwf", "temperature": 0.0}, None, "temperature must be a positive finite number, got 0.0"),
    ({"strategy": "lwf", "temperature": float("nan")}, None, "temperature must be a positive finite number, got nan"),
    ({"strategy": "lwf", "memory_size": 10}, None, "memory_size=10 but strategy='lwf' stores no source samples"),
    ({"strategy": "lwf", "distill_classes": 0}, None, "distill_classes must be a positive int, got 0"),
    ({"strategy": "lwf", "distill_classes": 6}, "fit", "distill_classes=6 exceeds the 5 classes of the model's head"),
    ({"strategy": "lwf"}, "fit_source", "strategy='lwf' trains on the target data alone and takes no source_data"),
    ({"strategy": "replay"}, "fit_no_source", "strategy='replay' replays source samples: pass source_data"),
])
def test_bad_strategy_options_are_refused_before_training(options, data, msg):
    src, tgt = _data()
    net = _pretrained(src)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(msg)):
        tr = AdaptiveTrainer(net, progress_bar=False, **options)
        tr.fit(tgt, None if data in ("fit", "fit_no_source") else src, epochs=1)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("strategy", ["lwf", "replay+lwf"])
def test_distilling_step_compiles_and_trains_like_eager(strategy):
    """compile=True runs the teacher's forward and the fused distillation inside the compiled step,
    with alpha a tensor refilled by the schedule: the same losses and weights as eager."""
    src, tgt = _data()
    results = []
    for compile_step in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        net = _pretrained(src)
        tr = AdaptiveTrainer(net, alpha=lambda s: 0.5 + 0.01 * s, strategy=strategy, compile=compile_step,
                             memory_size=30 if strategy != "lwf" else None, lr=1e-2, seed=0, progress_bar=False,
                             optimizer=lambda groups: torch.optim.SGD(groups))
        hist = tr.fit(tgt, src if strategy != "lwf" else None, epochs=2)
        results.append((hist["loss"], net.head.weight.detach().clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
