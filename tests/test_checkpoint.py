"""Checkpoints: atomic writes (interrupted in-process and by SIGKILL), exact resume, weights_only safety."""
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

from fastadapt import MLP, AdaptiveTrainer, Callback, ModelCheckpoint, TransferTrainer, extend_head
from fastadapt.training import checkpoint
from fastadapt.training.surgery import load_pretrained
from _training_data import blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _filled(value, size=16):
    m = nn.Linear(size, size)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(value)
    return m


def _assert_only_final_names(folder):
    assert sorted(os.listdir(folder)) == [checkpoint.WEIGHTS, checkpoint.STATE]


# ---- interrupted in-process ------------------------------------------------------------------------

@pytest.mark.parametrize("fail_at", range(1, 6))
def test_save_interrupted_by_fsync_failure_keeps_a_loadable_checkpoint(tmp_path, monkeypatch, fail_at):
    checkpoint.save_checkpoint(tmp_path, _filled(1.0), {"epoch": 1})
    calls = {"n": 0}
    real = os.fsync

    def flaky(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("disk full (injected)")
        return real(fd)

    monkeypatch.setattr(os, "fsync", flaky)
    try:
        checkpoint.save_checkpoint(tmp_path, _filled(2.0), {"epoch": 2})
        finished = True
    except OSError:
        finished = False
    monkeypatch.setattr(os, "fsync", real)
    weights, state = checkpoint.load_checkpoint(tmp_path)
    # the pair is consistent: old+old before the commit point, new+new after it
    value = float(weights["weight"][0, 0])
    assert value == state["epoch"]
    if calls["n"] <= 2:  # died before the state file was replaced
        assert state["epoch"] == 1 and not finished
    _assert_only_final_names(tmp_path)


@pytest.mark.parametrize("fail_at, expect", [(1, 1), (2, 2)])
def test_save_interrupted_by_replace_failure(tmp_path, monkeypatch, fail_at, expect):
    checkpoint.save_checkpoint(tmp_path, _filled(1.0), {"epoch": 1})
    calls = {"n": 0}
    real = os.replace

    def flaky(a, b):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError("interrupted (injected)")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save_checkpoint(tmp_path, _filled(2.0), {"epoch": 2})
    monkeypatch.setattr(os, "replace", real)
    # fail_at=1: the state never replaced -> old checkpoint; fail_at=2: state committed, weights
    # still pending -> the reader finishes the move and gets the new checkpoint
    weights, state = checkpoint.load_checkpoint(tmp_path)
    assert state["epoch"] == expect and float(weights["weight"][0, 0]) == expect
    _assert_only_final_names(tmp_path)


def test_atomic_write_failure_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    checkpoint.atomic_write_text(path, "OLD")

    def boom(tmp):
        with open(tmp, "w") as f:
            f.write("PARTIAL")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        checkpoint.atomic_write(path, boom)
    assert path.read_text() == "OLD" and os.listdir(tmp_path) == ["report.json"]


_WRITER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from fastadapt.training import checkpoint
    folder = sys.argv[1]
    m = nn.Linear(1024, 1024)
    for i in range(1, 10**6):
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(float(i))
        checkpoint.save_checkpoint(folder, m, {"epoch": i})
        if i == 1:
            print("first", flush=True)
""")


def test_sigkill_during_saves_leaves_a_consistent_checkpoint(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for delay in (0.05, 0.13, 0.31):
        folder = tmp_path / f"ck{delay}"
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], env=env, stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"first"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        weights, state = checkpoint.load_checkpoint(folder)
        assert state["epoch"] >= 1
        assert torch.all(weights["weight"] == state["epoch"]) and torch.all(weights["bias"] == state["epoch"])
        names = os.listdir(folder)
        assert checkpoint.WEIGHTS in names and checkpoint.STATE in names
        assert all(n in (checkpoint.WEIGHTS, checkpoint.STATE) or n.startswith(".") for n in names)  # leftovers are hidden temps


# ---- exact resume ----------------------------------------------------------------------------------

class _Crash(Exception):
    pass


class _CrashAfter(Callback):
    """Simulates a killed run: raises after the checkpoint of ``epoch`` was written."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.epoch:
            raise _Crash


def _transfer_run(epochs, callbacks=(), resume_from=None):
    X, y = blobs(100)
    torch.manual_seed(123)
    net = MLP(8, (16, 16), 3)
    tr = TransferTrainer(net, lr=1e-2, seed=7, scheduler="cosine", warmup_steps=3, batch_size=16,
                         progress_bar=False, callbacks=list(callbacks))
    hist = tr.fit((X, y), (X[:30], y[:30]), epochs=epochs, resume_from=resume_from)
    return net, hist


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    full, h_full = _transfer_run(4)
    with pytest.raises(_Crash):
        _transfer_run(4, [ModelCheckpoint(tmp_path), _CrashAfter(1)])
    torch.manual_seed(999)  # the resumed process starts from unrelated RNG state
    resumed, h_res = _transfer_run(4, resume_from=tmp_path / "last")
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    assert h_full.history == h_res.history and h_res.epoch == [0, 1, 2, 3]


def _adaptive_run(epochs, resume_from=None, save_to=None, strategy="replay", grow=True):
    Xs, ys = blobs(90, classes=(0, 1, 2), seed=1)
    Xt, yt = blobs(60, classes=(3, 4), seed=2)
    torch.manual_seed(5)
    net = extend_head(MLP(8, (16,), 3), 2) if grow else MLP(8, (16,), 5)
    replays = strategy != "lwf"
    tr = AdaptiveTrainer(net, alpha=lambda s: 0.5 + 0.01 * s, strategy=strategy, memory_size=20 if replays else None,
                         batch_size=16, seed=3, progress_bar=False)
    hist = tr.fit((Xt, yt), (Xs, ys) if replays else None, {"source": (Xs, ys), "target": (Xt, yt)}, epochs=epochs,
                  resume_from=resume_from)
    if save_to is not None:
        tr.save_checkpoint(save_to)
    return net, hist, tr


@pytest.mark.parametrize("strategy", ["replay", "lwf", "replay+lwf"])
def test_adaptive_two_epochs_then_resume_two_is_bitwise_equal_to_four(tmp_path, strategy):
    """Under LwF the resumed run distils from the checkpoint's teacher (the model before adaptation)
    and its 3 old classes, not from the half-adapted model it resumes: here a 5-way model built afresh,
    whose head does not record what it grew from."""
    full, h_full, _ = _adaptive_run(4, strategy=strategy)
    _adaptive_run(2, save_to=tmp_path / "ck", strategy=strategy)
    resumed, h_res, tr = _adaptive_run(4, resume_from=tmp_path / "ck", strategy=strategy, grow=False)
    assert all(torch.equal(v, resumed.state_dict()[k]) for k, v in full.state_dict().items())
    assert h_full.history == h_res.history
    assert h_full.source_acc_before == h_res.source_acc_before and h_full.forgetting == h_res.forgetting
    if strategy != "replay":
        torch.manual_seed(5)
        before = extend_head(MLP(8, (16,), 3), 2)
        assert all(torch.equal(v, tr.teacher.state_dict()[k]) for k, v in before.state_dict().items())
        assert tr._distill_k == 3


def test_resume_with_another_strategy_is_refused(tmp_path):
    _adaptive_run(1, save_to=tmp_path / "replay", strategy="replay")
    _adaptive_run(1, save_to=tmp_path / "lwf", strategy="lwf")
    with pytest.raises(ValueError, match=re.escape("the checkpoint holds no teacher (a replay run) but "
                                                   "strategy='lwf'; resume it with the strategy it was saved with")):
        _adaptive_run(2, resume_from=tmp_path / "replay", strategy="lwf")
    with pytest.raises(ValueError, match=re.escape("the checkpoint holds an LwF teacher but strategy='replay'")):
        _adaptive_run(2, resume_from=tmp_path / "lwf", strategy="replay")


# ---- weights_only ----------------------------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_only_refuses_a_malicious_trainer_state(tmp_path):
    checkpoint.save_checkpoint(tmp_path / "ck", _filled(1.0), {"epoch": 1})
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "payload": _Evil(str(marker))}, tmp_path / "ck" / checkpoint.STATE)
    with pytest.raises(ValueError, match="weights_only=True"):
        TransferTrainer(_filled(1.0), progress_bar=False).load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_weights_only_refuses_a_malicious_pt_weights_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"weight": _Evil(str(marker))}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_pretrained(tmp_path / "m.pt", _filled(1.0))
    assert not marker.exists()


def test_corrupt_and_missing_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot read .*bad.safetensors.* as safetensors"):
        load_pretrained(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="must end in .safetensors, .pt or .pth"):
        load_pretrained(tmp_path / "m.bin")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_writes_give_files_the_users_normal_permissions(tmp_path, umask):
    """0o666 & ~umask, as any new file: not the 0o600 of a temporary file."""
    old = os.umask(umask)
    try:
        checkpoint.atomic_write_text(tmp_path / "report.json", "{}")
        checkpoint.save_weights(MLP(4, (8,), 3), tmp_path / "m.safetensors")
        checkpoint.save_checkpoint(tmp_path / "last", MLP(4, (8,), 3), {"epoch": 1})
    finally:
        os.umask(old)
    paths = [tmp_path / "report.json", tmp_path / "m.safetensors", tmp_path / "last" / checkpoint.WEIGHTS,
             tmp_path / "last" / checkpoint.STATE]
    assert {p.name: os.stat(p).st_mode & 0o777 for p in paths} == {p.name: 0o666 & ~umask for p in paths}
