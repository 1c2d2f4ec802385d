"""Faults in the training loop, beyond tests/test_checkpoint.py (which kills a bare save loop at random
times and interrupts saves in-process):

- a training process (TransferTrainer.fit with ModelCheckpoint) is SIGKILLed *inside* a checkpoint save,
  at each of its three stages (pending weights written / new state written but not yet committed /
  state committed but weights not yet moved); the previous or the new checkpoint loads, no partial
  file carries a final name, and resuming from it gives bitwise the result of an uninterrupted run;
- every truncation and a bit flip of a checkpoint file gives a clear ValueError, never a crash or a
  silent partial load.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastadapt import MLP, ModelCheckpoint
from fastadapt.training import checkpoint
from fastadapt.training.surgery import load_pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 4

# The run, shared by the killed child process and the in-process runs below.
RUN = textwrap.dedent("""
    import torch
    from fastadapt import MLP, ModelCheckpoint, TransferTrainer

    def data():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(96, 8, generator=g)
        y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
        return X, y

    def run(epochs, callbacks=(), resume_from=None):
        X, y = data()
        torch.manual_seed(123)
        net = MLP(8, (16, 16), 3)
        tr = TransferTrainer(net, lr=1e-2, seed=7, scheduler="cosine", warmup_steps=3, batch_size=16,
                             progress_bar=False, callbacks=list(callbacks))
        hist = tr.fit((X, y), (X[:32], y[:32]), epochs=epochs, resume_from=resume_from)
        return net, hist
""")

# The child: trains with a checkpoint every epoch and, in the save of epoch `kill_epoch`, stops at
# `stage` and tells the parent, which SIGKILLs it there.
CHILD = RUN + textwrap.dedent("""
    import os, sys, time
    from fastadapt.training import checkpoint
    folder, stage, kill_epoch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    saves = {"n": 0}
    real_fsync_file, real_fsync_dir, real_replace = checkpoint._fsync_file, checkpoint._fsync_dir, checkpoint.os.replace

    def stop(where):
        print("stopped", where, flush=True)
        time.sleep(60)  # the parent kills us here

    def fsync_file(path):
        real_fsync_file(path)
        if saves["n"] == kill_epoch:
            if stage == "pending" and ".pending-" in path:
                stop(path)
            if stage == "state_tmp" and path.endswith(".tmp"):
                stop(path)

    def replace(src, dst):
        real_replace(src, dst)
        if saves["n"] == kill_epoch and stage == "committed" and dst.endswith(checkpoint.STATE):
            stop(dst)

    real_save = checkpoint.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        saves["n"] += 1
        return real_save(*args, **kwargs)

    checkpoint._fsync_file, checkpoint.os.replace, checkpoint.save_checkpoint = fsync_file, replace, save_checkpoint
    run(%d, [ModelCheckpoint(folder)])
    print("finished", flush=True)
""" % EPOCHS)

_ns = {}
exec(compile(RUN, "<run>", "exec"), _ns)
run = _ns["run"]


@pytest.fixture(scope="module")
def uninterrupted():
    net, hist = run(EPOCHS)
    return {k: v.clone() for k, v in net.state_dict().items()}, hist.history


@pytest.mark.parametrize("stage,survivor", [("pending", 1), ("state_tmp", 1), ("committed", 2)])
def test_sigkill_inside_a_training_checkpoint_save_then_resume(tmp_path, uninterrupted, stage, survivor):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "ck"), stage, "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline().decode()
        assert line.startswith("stopped"), (line, proc.stderr.read().decode()[-3000:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    folder = tmp_path / "ck" / "last"
    # no partial file carries a final name: everything but the two final files is a hidden temp/pending
    names = os.listdir(folder)
    assert checkpoint.WEIGHTS in names and checkpoint.STATE in names
    assert all(n in (checkpoint.WEIGHTS, checkpoint.STATE) or n.startswith(".") for n in names), names
    # the checkpoint that survives: epoch 1's before the commit point, epoch 2's after it
    weights, state = checkpoint.load_checkpoint(folder)
    assert state["epoch"] == survivor, state.get("epoch")
    # resume and finish: bitwise the uninterrupted run
    torch.manual_seed(999)
    net, hist = run(EPOCHS, resume_from=folder)
    ref_state, ref_hist = uninterrupted
    for k, v in ref_state.items():
        assert torch.equal(v, net.state_dict()[k]), k
    assert hist.history == ref_hist


# ---- corrupted and truncated files -----------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good") / "last"
    run(1, [ModelCheckpoint(folder.parent)])
    return folder


def _copy(src, dst):
    dst.mkdir()
    for name in (checkpoint.WEIGHTS, checkpoint.STATE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _cut_points(size):
    return sorted({0, 1, 7, 8, 9, size // 4, size // 2, size - 100, size - 9, size - 1} - {size})


@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.STATE])
def test_truncated_checkpoint_file_is_a_clear_error(tmp_path, good_checkpoint, name):
    size = (good_checkpoint / name).stat().st_size
    for cut in _cut_points(size):
        folder = _copy(good_checkpoint, tmp_path / f"cut{cut}")
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:cut])
        # a damaged weights file no longer carries the state's checkpoint id: "inconsistent"
        with pytest.raises(ValueError, match=r"cannot (read|load) .*(safetensors|trainer_state\.pt)|is inconsistent"):
            checkpoint.load_checkpoint(folder)
        with pytest.raises(ValueError):
            run(2, resume_from=folder)


@pytest.mark.parametrize("name", [checkpoint.WEIGHTS, checkpoint.STATE])
def test_bit_flipped_checkpoint_file_never_loads_silently(tmp_path, good_checkpoint, name):
    """A flipped byte either makes loading fail with a ValueError, or loads a checkpoint that differs only
    in the value of that byte; it never crashes the interpreter or drops part of the state."""
    weights0, state0 = checkpoint.load_checkpoint(good_checkpoint)
    size = (good_checkpoint / name).stat().st_size
    for pos in sorted({0, 4, 8, 12, size // 3, size // 2, size - 200, size - 5}):
        folder = _copy(good_checkpoint, tmp_path / f"flip{pos}")
        data = bytearray((folder / name).read_bytes())
        data[pos] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
        try:
            weights, state = checkpoint.load_checkpoint(folder)
        except (ValueError, FileNotFoundError):
            continue
        assert sorted(weights) == sorted(weights0) and all(weights[k].shape == weights0[k].shape for k in weights)
        assert set(state) == set(state0)


def test_truncated_pretrained_weights_are_a_clear_error(tmp_path, good_checkpoint):
    data = (good_checkpoint / checkpoint.WEIGHTS).read_bytes()
    for cut in _cut_points(len(data)):
        p = tmp_path / f"w{cut}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="cannot read .* as safetensors"):
            load_pretrained(p, MLP(8, (16, 16), 3))
    net = MLP(8, (16, 16), 3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    pt = (tmp_path / "w.pt").read_bytes()
    for cut in _cut_points(len(pt)):
        p = tmp_path / f"w{cut}.pt"
        p.write_bytes(pt[:cut])
        with pytest.raises(ValueError, match="cannot load .* with weights_only=True"):
            load_pretrained(p, MLP(8, (16, 16), 3))


def test_unpickling_code_is_refused_and_never_runs(tmp_path, good_checkpoint):
    """A trainer state whose pickle would call os.system is refused by weights_only loading, and the
    command never runs (test_checkpoint.py covers open(); this one uses a shell command)."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = _copy(good_checkpoint, tmp_path / "evil")
    state = torch.load(folder / checkpoint.STATE, weights_only=True)
    torch.save({**state, "extra": Evil()}, folder / checkpoint.STATE)
    with pytest.raises(ValueError, match="weights_only=True"):
        checkpoint.load_checkpoint(folder)
    with pytest.raises(ValueError, match="weights_only=True"):
        run(2, resume_from=folder)
    assert not marker.exists()
