"""TransferTrainer, head surgery, freezing, History and callbacks."""
import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastadapt
from fastadapt import (MLP, AdaptiveTrainer, Callback, EarlyStopping, ModelCheckpoint, TransferTrainer, extend_head, freeze,
                       load_pretrained, replace_head, unfreeze)
from fastadapt.training.checkpoint import save_weights
from _training_data import blobs


def _trainer(model, **kw):
    kw.setdefault("progress_bar", False)
    kw.setdefault("seed", 0)
    return TransferTrainer(model, **kw)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


# ---- freezing --------------------------------------------------------------------------------------

def test_freeze_named_module_keeps_batchnorm_in_eval_through_train():
    net = BNNet()
    freeze(net, ["backbone"])
    assert all(not p.requires_grad for p in net.backbone.parameters())
    assert all(p.requires_grad for p in net.head.parameters())
    net.train()
    bn = net.backbone[1]
    stats = bn.running_mean.clone()
    net(torch.randn(32, 8) + 5)
    assert not bn.training
    assert torch.equal(bn.running_mean, stats)  # frozen statistics did not move

    unfreeze(net, "backbone")
    net.train()
    net(torch.randn(32, 8) + 5)
    assert bn.training and all(p.requires_grad for p in net.backbone.parameters())
    assert not torch.equal(bn.running_mean, stats)


def test_freeze_whole_model_and_bad_module_name():
    net = MLP(4, (8,), 2)
    freeze(net)
    assert not any(p.requires_grad for p in net.parameters())
    with pytest.raises(ValueError, match="no submodule named 'encoder'"):
        freeze(net, ["encoder"])
    with pytest.raises(ValueError, match="no trainable parameters"):
        _trainer(net).fit((torch.randn(4, 4), torch.tensor([0, 1, 0, 1])), epochs=1)


def test_freeze_backbone_trains_only_the_head():
    X, y = blobs()
    net = MLP(8, (16,), 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _trainer(net, freeze_backbone=True, lr=1e-2).fit((X, y), epochs=2)
    after = net.state_dict()
    assert torch.equal(after["backbone.0.weight"], before["backbone.0.weight"])
    assert not torch.equal(after["head.weight"], before["head.weight"])


# ---- head surgery ----------------------------------------------------------------------------------

def test_replace_head_and_extend_head_keeps_old_rows():
    net = MLP(4, (8,), 3)
    w, b = net.head.weight.detach().clone(), net.head.bias.detach().clone()
    extend_head(net, 2)
    assert net.head.out_features == 5 and net.config()["num_classes"] == 5
    assert torch.equal(net.head.weight[:3], w) and torch.equal(net.head.bias[:3], b)
    x = torch.randn(6, 4)
    old = nn.Linear(8, 3)
    old.weight.data, old.bias.data = w, b
    assert torch.allclose(net(x)[:, :3], old(net.backbone(x)))
    replace_head(net, 7)
    assert net.head.out_features == 7 and net.head.in_features == 8
    assert net.head.weight.requires_grad
    with pytest.raises(ValueError, match="num_new_classes must be a positive int, got 0"):
        extend_head(net, 0)


def test_load_pretrained_roundtrip_and_mismatch(tmp_path):
    net = MLP(4, (8, 6), 3)
    save_weights(net, tmp_path / "m.safetensors")
    rebuilt = load_pretrained(tmp_path / "m.safetensors")  # architecture from the file's metadata
    assert rebuilt.config() == net.config()
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), net.state_dict().values()))
    torch.save(net.state_dict(), tmp_path / "m.pt")
    into = load_pretrained(str(tmp_path / "m.pt"), MLP(4, (8, 6), 3))
    assert torch.equal(into.head.weight, net.head.weight)
    with pytest.raises(ValueError, match=r"head.weight: \(3, 6\) vs model \(5, 6\)"):
        load_pretrained(tmp_path / "m.safetensors", MLP(4, (8, 6), 5))
    with pytest.raises(ValueError, match="does not record its architecture"):
        load_pretrained(tmp_path / "m.pt")
    assert load_pretrained(net) is net



def test_pipeline_standardises_raw_features_and_names_the_classes(tmp_path):
    from fastadapt.training import Pipeline

    X, y = blobs(30, features=4, classes=(0, 1, 2))
    raw = 100 + 10 * X  # what a user has; the MLP was trained on (raw - mean) / std
    mean, std = raw.mean(0), raw.std(0)
    net = MLP(4, (8,), 3)
    pipe = Pipeline(net, mean, std, ["setosa", "versicolor", "virginica"])
    expected = [pipe.classes[i] for i in net((raw - mean) / std).argmax(-1).tolist()]
    assert pipe.predict(raw) == expected and len(set(expected)) > 1
    save_weights(pipe, tmp_path / "p.safetensors")
    rebuilt = load_pretrained(tmp_path / "p.safetensors")
    assert isinstance(rebuilt, Pipeline) and rebuilt.classes == pipe.classes
    assert torch.equal(rebuilt.mean, mean) and torch.equal(rebuilt.std, std)
    assert rebuilt.predict(raw.numpy()) == expected
    extend_head(rebuilt, 1)
    with pytest.raises(ValueError, match="the model has 4 outputs but classes names 3; set classes to one label"):
        rebuilt.predict(raw)
    with pytest.raises(ValueError, match=r"mean must hold one value per input feature \(4\), got shape \(5,\)"):
        Pipeline(net, torch.zeros(5), std, [0, 1, 2])

# ---- fit / evaluate / predict ----------------------------------------------------------------------

def test_fit_history_evaluate_predict():
    X, y = blobs(150)
    net = MLP(8, (16,), 3)
    tr = _trainer(net, lr=1e-2)
    hist = tr.fit((X[:100], y[:100]), (X[100:], y[100:]), epochs=3)
    assert hist.epoch == [0, 1, 2]
    assert set(hist.history) == {"loss", "acc", "val_loss", "val_acc", "lr"}
    assert all(len(v) == 3 for v in hist.history.values())
    assert hist["val_acc"][-1] > 0.95 and hist.target_acc == hist["val_acc"][-1]
    assert hist["loss"][-1] < hist["loss"][0]
    ev = tr.evaluate((X[100:], y[100:]))
    assert ev["acc"] == pytest.approx(hist["val_acc"][-1])
    logits = tr.predict(X[100:])
    assert logits.shape == (50, 3)
    assert (logits.argmax(1) == y[100:]).float().mean().item() == pytest.approx(ev["acc"])
    d = json.loads(hist.to_json())
    assert d["history"]["val_acc"] == hist["val_acc"] and d["forgetting"] is None


def test_dataloader_dataset_and_pair_give_identical_training():
    X, y = blobs(64)
    results = []
    for data in ((X, y), TensorDataset(X, y), DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True)):
        torch.manual_seed(0)
        net = MLP(8, (16,), 3)
        _trainer(net).fit(data, epochs=2)
        results.append(net.head.weight.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the learning rates each step uses."""

    def __init__(self, groups):
        super().__init__(groups)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([g["lr"] for g in self.param_groups])
        return super().step(closure)


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_head_lr_mult_and_warmup_schedule(kind):
    """Linear warm-up over 2 steps, then cosine decay to 0 at the last of 8 steps (or constant); the
    head's group at 10x the rate. torch's schedulers, stepped once per optimizer step."""
    X, y = blobs(64)
    tr = _trainer(MLP(8, (16,), 3), optimizer=_RecordingSGD, lr=0.1, head_lr_mult=10.0, scheduler=kind,
                  warmup_steps=2, batch_size=16)
    hist = tr.fit((X, y), epochs=2)  # 4 steps per epoch, 8 in all

    def factor(s):
        if s < 2:
            return (s + 1) / 2
        return 0.5 * (1 + math.cos(math.pi * (s - 2) / 6)) if kind == "cosine" else 1.0

    assert tr.optimizer.seen == [pytest.approx([0.1 * factor(s), 1.0 * factor(s)]) for s in range(8)]
    assert [g["initial_lr"] for g in tr.optimizer.param_groups] == [0.1, 1.0]
    assert hist["lr"][0] == pytest.approx(0.1 * factor(4))


def _sgd(groups):
    return torch.optim.SGD(groups)


def test_grad_accumulation_matches_a_larger_batch():
    X, y = blobs(64)
    weights = []
    for bs, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        net = MLP(8, (16,), 3)
        _trainer(net, optimizer=_sgd, lr=0.1, batch_size=bs, grad_accum_steps=accum).fit((X, y), epochs=2)
        weights.append(net.head.weight.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


def test_gradient_clipping_bounds_the_update():
    X, y = blobs(32)
    net = MLP(8, (16,), 3)
    before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
    _trainer(net, optimizer=_sgd, lr=1.0, max_grad_norm=1e-3, batch_size=32).fit((X, y), epochs=1)
    after = torch.cat([p.detach().flatten() for p in net.parameters()])
    assert (after - before).norm().item() == pytest.approx(1e-3, rel=1e-3)


def test_bf16_autocast_trains():
    X, y = blobs(96)
    net = MLP(8, (16,), 3)
    hist = _trainer(net, precision="bf16", lr=1e-2).fit((X, y), (X, y), epochs=3)
    assert net.head.weight.dtype == torch.float32
    assert all(math.isfinite(v) for v in hist["loss"]) and hist["val_acc"][-1] > 0.9


@pytest.mark.parametrize("kw, msg", [
    ({"lr": -1}, "lr must be a positive finite number, got -1"),
    ({"optimizer": "lbfgs"}, "optimizer must be one of .* got 'lbfgs'"),
    ({"scheduler": "step"}, "scheduler must be None, 'constant' or 'cosine', got 'step'"),
    ({"precision": "fp8"}, r"precision must be one of \('32', 'bf16'\), got 'fp8'"),
    ({"grad_accum_steps": 0}, "grad_accum_steps must be a positive int, got 0"),
    ({"max_grad_norm": -2.0}, "max_grad_norm must be None or > 0, got -2.0"),
])
def test_bad_trainer_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TransferTrainer(MLP(4, (8,), 2), **kw)


# ---- callbacks -------------------------------------------------------------------------------------

class Recorder(Callback):
    def __init__(self):
        self.states = []

    def on_epoch_end(self, trainer, epoch, logs):
        self.states.append({k: v.clone() for k, v in trainer.unwrapped_model.state_dict().items()})


def test_early_stopping_stops_and_restores_best_weights():
    X, y = blobs(64)
    rec = Recorder()
    # lr is constant, so "min lr" improves only at the first epoch
    stop = EarlyStopping(monitor="lr", mode="min", patience=2, restore_best_weights=True)
    net = MLP(8, (16,), 3)
    hist = _trainer(net, callbacks=[rec, stop]).fit((X, y), epochs=10)
    assert hist.epoch == [0, 1, 2, 3] and stop.stopped_epoch == 3 and stop.best_epoch == 0
    assert all(torch.equal(net.state_dict()[k], rec.states[0][k]) for k in rec.states[0])


def test_early_stopping_unknown_monitor():
    X, y = blobs(32)
    with pytest.raises(KeyError, match="monitor='val_f1' is not a logged metric"):
        _trainer(MLP(8, (16,), 3), callbacks=[EarlyStopping("val_f1")]).fit((X, y), epochs=1)


def test_model_checkpoint_save_best_only(tmp_path):
    X, y = blobs(96)
    rec = Recorder()
    cb = ModelCheckpoint(tmp_path, monitor="val_acc", save_best_only=True)
    net = MLP(8, (16,), 3)
    tr = _trainer(net, callbacks=[rec, cb])
    hist = tr.fit((X[:64], y[:64]), (X[64:], y[64:]), epochs=4)
    best = max(range(4), key=lambda e: (hist["val_acc"][e], -e))
    fresh = TransferTrainer(MLP(8, (16,), 3), progress_bar=False)
    fresh.load_checkpoint(tmp_path / "best")
    assert all(torch.equal(fresh.model.state_dict()[k], rec.states[best][k]) for k in rec.states[best])
    assert fresh._pending_state["epoch"] == best + 1


def test_public_names_exported():
    for name in ("TransferTrainer", "AdaptiveTrainer", "History", "EarlyStopping", "ModelCheckpoint",
                 "freeze", "unfreeze", "replace_head", "extend_head", "load_pretrained"):
        assert hasattr(fastadapt, name) and name in fastadapt.__all__


class _ListDataset(torch.utils.data.Dataset):
    """A map-style dataset whose labels cannot be read without indexing it."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], int(self.y[i])


def test_labels_of_a_generic_dataset_are_checked_per_batch():
    X, y = blobs(40)
    y[25] = 9
    tr = _trainer(MLP(8, (16,), 3))
    with pytest.raises(ValueError, match=r"train_data has label 9, outside the model head's range \[0, 2\]"):
        tr.fit(_ListDataset(X, y), epochs=1)
    y[25] = 1
    hist = tr.fit(_ListDataset(X, y), _ListDataset(X, y), epochs=1)
    assert hist.target_acc == pytest.approx(tr.evaluate((X, y))["acc"])


def test_model_checkpoint_every_n_epochs_and_at_the_end(tmp_path, monkeypatch):
    X, y = blobs(32)
    saved = []
    tr = _trainer(MLP(8, (16,), 3), callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=3)])
    real = tr.save_checkpoint
    monkeypatch.setattr(tr, "save_checkpoint", lambda p: (saved.append(tr.epoch), real(p)))
    tr.fit((X, y), epochs=7)
    assert saved == [3, 6, 7]
    with pytest.raises(ValueError, match="every_n_epochs must be a positive int, got 0"):
        ModelCheckpoint(tmp_path, every_n_epochs=0)


# ---- issue 11: one loop, batch sources, no per-step sync, fused optimizers, compile ------------------

def test_in_memory_data_is_batched_without_a_dataloader(monkeypatch):
    """(X, y) pairs and TensorDatasets are gathered batch by batch from a shuffled permutation; a
    DataLoader over the same data gives the same batches (the same global-RNG draws), hence the same
    training, while a user's DataLoader is used as it is."""
    X, y = blobs(96)
    torch.manual_seed(0)
    reference = MLP(8, (16,), 3)
    _trainer(reference).fit(DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True), epochs=2)

    def no_loader(self):
        raise AssertionError("a DataLoader was iterated for in-memory data")

    monkeypatch.setattr(DataLoader, "__iter__", no_loader)
    torch.manual_seed(0)
    net = MLP(8, (16,), 3)
    _trainer(net).fit((X, y), (X[:20], y[:20]), epochs=2)
    assert torch.equal(net.head.weight, reference.head.weight)


def _count_host_reads(monkeypatch):
    calls = {"n": 0}
    for name in ("item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, **k):
            # 0-dim int64 CPU tensors are the batch sources' RNG seed draws (one per pass over the data,
            # from the CPU generator: never a device sync); everything else counts
            if not (self.dtype == torch.int64 and self.dim() == 0 and self.device.type == "cpu"):
                calls["n"] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("trainer", ["transfer", "adaptive"])
def test_no_host_sync_per_step(monkeypatch, trainer):
    """Metric sums stay on the device during an epoch: the number of host reads (item/tolist) does not
    grow with the number of steps. (On CUDA, test_no_device_sync_per_step_cuda checks the same with
    PyTorch's sync debug mode.)"""
    counts = []
    for n in (64, 256):  # 2 and 8 steps per epoch
        X, y = blobs(n, classes=(0, 1, 2))
        calls = _count_host_reads(monkeypatch)
        torch.manual_seed(0)
        if trainer == "transfer":
            _trainer(MLP(8, (16,), 3), batch_size=32).fit((X, y), epochs=2)
        else:
            Xt, yt = blobs(n, classes=(3, 4), seed=2)
            AdaptiveTrainer(MLP(8, (16,), 5), alpha=lambda s: 0.5, memory_size=30, batch_size=32, seed=0,
                            progress_bar=False).fit((Xt, yt), (X, y), epochs=2)
        counts.append(calls["n"])
        monkeypatch.undo()
    assert counts[0] == counts[1], counts


def test_adam_optimizers_are_fused_and_zero_grad_sets_none():
    X, y = blobs(64)
    for name in ("adamw", "adam"):
        tr = _trainer(MLP(8, (16,), 3), optimizer=name)
        tr.fit((X, y), epochs=1)
        assert tr.optimizer.defaults["fused"] is True
        assert all(p.grad is None for p in tr.model.parameters())


def test_compile_step_trains_like_eager():
    X, y = blobs(128)
    results = []
    for compile_step in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        tr = _trainer(MLP(8, (16,), 3), compile=compile_step, optimizer=_sgd, lr=0.1)
        hist = tr.fit((X, y), (X, y), epochs=2)
        results.append((hist["loss"], hist["val_acc"], tr.model.head.weight.detach().clone()))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1] == results[0][1]
    torch.testing.assert_close(results[1][2], results[0][2], rtol=1e-5, atol=1e-6)


def test_options_in_one_config_object():
    cfg = fastadapt.TrainConfig(lr=0.05, batch_size=16, seed=1, progress_bar=False)
    tr = TransferTrainer(MLP(8, (16,), 3), cfg)
    assert tr.config is cfg and tr.config.lr == 0.05
    with pytest.raises(TypeError, match=r"pass either config or keyword options, not both \(got \['lr'\]\)"):
        TransferTrainer(MLP(8, (16,), 3), cfg, lr=0.1)
    with pytest.raises(TypeError, match="config must be a AdaptiveConfig, got TrainConfig"):
        AdaptiveTrainer(MLP(8, (16,), 3), cfg)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        fastadapt.TrainConfig(batch_size=0)


@pytest.mark.cuda
def test_no_device_sync_per_step_cuda():
    X, y = blobs(256)
    tr = TransferTrainer(MLP(8, (16,), 3), device="cuda", batch_size=32, seed=0, progress_bar=False)
    tr.fit((X, y), epochs=1)  # warm-up: first-call syncs (allocator, cuBLAS handles) are not per step
    seen = []
    real = tr._optimizer_step

    def step_with_check():
        torch.cuda.set_sync_debug_mode("error")  # any sync inside a training step raises
        try:
            real()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        seen.append(1)

    tr._optimizer_step = step_with_check
    tr.fit((X, y), epochs=2)
    assert len(seen) == 8
