"""AdaptiveTrainer: alpha and its schedules, replay memory, source cycling, History summary."""
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
