"""The CLI: workflows on synthetic .npz/.csv data and on digits, resume, and every bad input."""
import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastadapt.apps import cli, readers, workflows
from fastadapt.training import checkpoint
from fastadapt.training.surgery import load_pretrained
from _training_data import blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _npz(path, classes, seed, features=6, n=80):
    X, y = blobs(n, features=features, classes=classes, seed=seed)
    np.savez(path, X=X.numpy(), y=y.numpy())
    return str(path)


def _csv(path, classes, seed, features=6, n=80, spread=0.5, name="{}"):
    """Blobs as a .csv; ``name`` formats each class label (``"class_{}"`` for class names)."""
    X, y = blobs(n, features=features, classes=classes, seed=seed, spread=spread)
    _write_csv(path, X.numpy(), [name.format(label) for label in y.tolist()])
    return str(path)


def _write_csv(path, X, labels=None):
    """Each value as repr writes it, so the .csv reads back to the same float32s."""
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(X.shape[1])] + (["label"] if labels is not None else [])) + "\n")
        for i, row in enumerate(X.tolist()):
            f.write(",".join([repr(v) for v in row] + ([str(labels[i])] if labels is not None else [])) + "\n")


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


FAST = ["--epochs", "3", "--batch-size", "16", "--hidden", "16", "--quiet", "--lr", "0.01"]


def test_adapt_on_npz_and_csv(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1), _csv(tmp_path / "t.csv", (2, 3), 2)
    out = tmp_path / "out"
    rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(out), "--alpha", "1,0.5",
                       "--memory-size", "10", "--joint"] + FAST, capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["classes"] == {"source": [0, 1], "target": [2, 3]}
    assert [r["method"] for r in report["adapt"]] == ["alpha=1", "alpha=0.5+replay10", "joint (all source)"]
    for r in report["adapt"]:
        assert r["forgetting"] == pytest.approx(100 * (r["source_acc_before"] - r["source_acc_after"]))
        assert len(r["history"]["val_target_acc"]) == 3 and 0.0 <= r["target_acc"] <= 1.0
    assert report["adapt"][0]["source_acc_before"] > 0.9 and report["adapt"][2]["target_acc"] > 0.9
    assert (out / "accuracy.png").read_bytes()[:8] == PNG
    model = load_pretrained(out / "pretrained.safetensors")
    assert model.config() == {"model": {"in_features": 6, "hidden_sizes": [16], "num_classes": 2}, "classes": [0, 1]}
    assert [r["model"] for r in report["adapt"]] == [str(out / "models" / f"{n}.safetensors")
                                                     for n in ("alpha_1", "alpha_0.5_replay10", "joint__all_source_")]
    assert load_pretrained(report["adapt"][1]["model"]).classes == [0, 1, 2, 3]
    weights, state = checkpoint.load_checkpoint(out / "runs" / "alpha_0.5_replay10" / "last")
    assert state["epoch"] == 3 and weights["head.weight"].shape == (4, 16)


def test_transfer_on_npz(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1, 2), 1), _npz(tmp_path / "t.npz", (5, 7), 2)
    out = tmp_path / "out"
    rc, _, err = _run(["transfer", "--source", src, "--target", tgt, "-o", str(out), "--shots", "4"] + FAST, capsys)
    assert rc == 0, err
    rows = {r["method"]: r for r in json.loads((out / "report.json").read_text())["transfer"]}
    assert set(rows) == {"frozen", "finetune", "scratch"}
    assert all(r["train_samples"] == 8 for r in rows.values())
    assert rows["frozen"]["forgetting"] == 0.0  # frozen backbone + the old head: nothing to forget
    assert "forgetting" not in rows["scratch"]


def test_adapt_on_digits_with_resume(tmp_path, capsys):
    base = ["adapt", "--source", "digits:0-2", "--target", "digits:3-4", "--pretrain-epochs", "2",
            "--batch-size", "64", "--hidden", "32", "--quiet"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli.main(base + ["-o", str(full), "--epochs", "4"]) == 0
    assert cli.main(base + ["-o", str(part), "--epochs", "2"]) == 0
    assert cli.main(base + ["-o", str(part), "--epochs", "4", "--resume"]) == 0
    a = json.loads((full / "report.json").read_text())["adapt"][0]
    b = json.loads((part / "report.json").read_text())["adapt"][0]
    assert a["history"] == b["history"] and a["target_acc"] == b["target_acc"]
    assert json.loads((full / "report.json").read_text())["classes"] == {"source": [0, 1, 2], "target": [3, 4]}


def test_info_and_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastadapt", "info"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0
    info = json.loads(out.stdout)
    assert {"extension_loaded", "torch_runtime", "cpu_kernels"} <= set(info)


def test_bench_prints_a_table(capsys):
    rc, out, _ = _run(["bench", "--min-run-time", "0.01"], capsys)
    assert rc == 0
    lines = out.splitlines()
    assert lines[1].split()[:2] == ["op", "size"]
    assert any(l.startswith("alpha_weighted_cross_entropy") and l.rstrip().endswith("x") for l in lines)
    assert any(l.startswith("linear_relu") for l in lines)


# ---- bad input -------------------------------------------------------------------------------------

def _bad(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text("OLD")
    rc, _, err = _run(argv + ["-o", str(out), "--quiet", "--epochs", "1"], capsys)
    assert rc == 2
    assert message in err, err
    assert (out / "report.json").read_text() == "OLD"  # nothing existing was overwritten
    assert sorted(os.listdir(out)) == ["report.json"]  # failed before training started


def test_feature_sizes_differ(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1, features=5), _csv(tmp_path / "t.csv", (2, 3), 2, features=6)
    _bad(tmp_path, capsys, ["adapt", "--source", src, "--target", tgt],
         f"--source {src!r} has 5 features but --target {tgt!r} has 6")


def test_empty_dataset(tmp_path, capsys):
    (tmp_path / "e.csv").write_text("a,b,label\n")
    _bad(tmp_path, capsys, ["adapt", "--source", str(tmp_path / "e.csv"), "--target", "digits:5-9"],
         f"--source: {str(tmp_path / 'e.csv')!r} is empty (0 samples)")


@pytest.mark.parametrize("content, message", [
    (b"not a zip file", "cannot read"),
    (None, "has arrays ['X'] but needs 'X' and 'y'"),
])
def test_malformed_npz(tmp_path, capsys, content, message):
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, X=np.zeros((3, 2)))
    else:
        path.write_bytes(content)
    _bad(tmp_path, capsys, ["transfer", "--source", str(path), "--target", "digits:5-9"], message)


def test_malformed_csv_and_missing_file(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("a,label\n1.0,0\nhello,1\n")
    _bad(tmp_path, capsys, ["adapt", "--source", str(tmp_path / "m.csv"), "--target", "digits:5-9"],
         "m.csv' line 3, column 'a': 'hello' is not a number")
    (tmp_path / "n.csv").write_text("a,b\n1,2\n")
    _bad(tmp_path, capsys, ["adapt", "--source", str(tmp_path / "n.csv"), "--target", "digits:5-9"],
         "has no label column 'label'")
    _bad(tmp_path, capsys, ["adapt", "--source", str(tmp_path / "missing.npz"), "--target", "digits:5-9"],
         "--source: file not found")


def test_unknown_dataset_name(tmp_path, capsys):
    _bad(tmp_path, capsys, ["adapt", "--source", "mnist:0-4", "--target", "digits:5-9"],
         "--source: unknown dataset 'mnist'")
    _bad(tmp_path, capsys, ["adapt", "--source", "digits:0-4", "--target", "digits:9-5"],
         "--target: bad class range '9-5'")


def test_bad_device(tmp_path, capsys):
    _bad(tmp_path, capsys, ["adapt", "--source", "digits:0-1", "--target", "digits:2-3", "--device", "gpu0"],
         "device must be a torch device such as 'cpu' or 'cuda:0', got 'gpu0'")


def test_alpha_outside_range(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["adapt", "--source", "digits:0-4", "--target", "digits:5-9", "--alpha", "0.5,1.2"])
    assert exc.value.code == 2
    assert "argument --alpha: alpha must lie in [0, 1], got '1.2'" in capsys.readouterr().err


def test_bad_inputs_through_the_api():
    from fastadapt import MLP, AdaptiveTrainer, TransferTrainer

    tr = TransferTrainer(MLP(6, (8,), 3), progress_bar=False)
    X, y = blobs(20, features=6)
    with pytest.raises(ValueError, match=r"train_data has 5 features per sample \(shape \(5,\)\) but the model's "
                                         r"first layer expects 6"):
        tr.fit((X[:, :5], y), epochs=1)
    with pytest.raises(ValueError, match=r"train_data has label 7, outside the model head's range \[0, 2\]"):
        tr.fit((X, torch.full((20,), 7)), epochs=1)
    with pytest.raises(ValueError, match=r"val_data has label -1"):
        tr.fit((X, y), (X, torch.full((20,), -1)), epochs=1)
    with pytest.raises(ValueError, match="train_data is empty"):
        tr.fit((X[:0], y[:0]), epochs=1)
    with pytest.raises(ValueError, match="train_data: X has 20 rows but y has 19"):
        tr.fit((X, y[:19]), epochs=1)
    with pytest.raises(TypeError, match="train_data: y must hold integer class labels"):
        tr.fit((X, y.float()), epochs=1)
    with pytest.raises(TypeError, match="train_data must be a DataLoader, a Dataset or an \\(X, y\\) pair, got str"):
        tr.fit("data.npz", epochs=1)
    ad = AdaptiveTrainer(MLP(6, (8,), 5), progress_bar=False)
    Xs, ys = blobs(20, features=7)
    with pytest.raises(ValueError, match=r"source_data has samples of shape \(7,\) but target_data has \(6,\)"):
        ad.fit((X, y), (Xs, ys), epochs=1)
    with pytest.raises(ValueError, match=r"source_data has label 5, outside the model head's range \[0, 4\]"):
        ad.fit((X, y), (X, torch.full((20,), 5)), epochs=1)


@pytest.mark.slow
def test_demo_meets_the_quality_targets(tmp_path, capsys):
    """Seed 0 of both scenarios; the 5-seed means against the issue's targets are in BENCHMARKS.md."""
    threads = torch.get_num_threads()
    try:
        rc, out, err = _run(["demo", "-o", str(tmp_path / "demo")], capsys)
    finally:
        torch.set_num_threads(threads)  # the demo sets 1
    assert rc == 0, err
    assert "scratch" in out and "alpha=0.2+replay100" in out and "lwf T=2 alpha=0.8" in out
    ci = json.loads((tmp_path / "demo" / "class-incremental" / "report.json").read_text())
    rows = {r["method"]: r for r in ci["adapt"]}
    assert rows["naive (alpha=1)"]["forgetting"] >= 90
    assert rows["alpha=0.2+replay100"]["forgetting"] <= 10 and rows["alpha=0.2+replay100"]["target_acc"] >= 0.95
    assert rows["lwf T=2 alpha=0.8"]["forgetting"] >= 90  # LwF fails class-incrementally, as the literature says
    assert rows["replay+lwf T=2 alpha=0.2+replay100"]["forgetting"] <= 10
    assert rows["joint (all source)"]["forgetting"] <= 3
    assert {r["method"] for r in ci["transfer"]} == {"frozen", "finetune", "scratch"}
    di = json.loads((tmp_path / "demo" / "domain-incremental" / "report.json").read_text())
    rows = {r["method"]: r for r in di["adapt"]}
    assert rows["naive (alpha=1)"]["forgetting"] >= 15
    lwf = rows["lwf T=2 alpha=0.8"]
    assert lwf["forgetting"] <= 4 and lwf["target_acc"] >= 0.85 and lwf["memory_size"] is None
    assert rows["replay+lwf T=2 alpha=0.8+replay100"]["forgetting"] <= 4
    assert di["transfer"] == []
    for scenario in ("class-incremental", "domain-incremental"):
        assert (tmp_path / "demo" / scenario / "accuracy.png").read_bytes()[:8] == PNG


def test_adapt_with_lwf_stores_no_source_sample(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1, 2), 1), _npz(tmp_path / "t.npz", (3, 4), 2)
    rc, out, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(tmp_path / "out"), "--strategy", "lwf",
                         "--temperature", "3", "--alpha", "0.8"] + FAST, capsys)
    assert rc == 0, err
    row = json.loads((tmp_path / "out" / "report.json").read_text())["adapt"][0]
    assert row["method"] == "lwf T=3 alpha=0.8" and row["strategy"] == "lwf" and row["temperature"] == 3
    assert row["memory_size"] is None and row["forgetting"] is not None and "source_acc" not in row["history"]
    for bad, msg in ((["--strategy", "lwf", "--memory-size", "10"], "--memory-size 10 but --strategy lwf stores no"),
                     (["--temperature", "2"], "--temperature 2 applies to distillation: pass --strategy lwf")):
        rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(tmp_path / "bad")] + bad + FAST, capsys)
        assert rc == 2 and msg in err
        assert not (tmp_path / "bad" / "pretrained.safetensors").exists()


def test_adapt_default_memory_on_a_small_source_keeps_what_exists(tmp_path, capsys):
    """90 source samples (67 after the 25% held-out split): the default replay memory of 100, which the
    user did not choose, keeps all 67 and says so in one line; an explicit larger one is an error that
    names the 90 samples the user gave, raised before any training."""
    src, tgt = _npz(tmp_path / "s.npz", (0, 1, 2), 1, n=90), _npz(tmp_path / "t.npz", (3, 4), 2)
    rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(tmp_path / "out")] + FAST, capsys)
    assert rc == 0, err
    assert "has 67 training samples (90 samples, 23 of them held out for evaluation): the replay memory keeps " \
           "all of them (default --memory-size 100)" in err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["adapt"][0]["memory_size"] == 67
    rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(tmp_path / "big"),
                       "--memory-size", "80"] + FAST, capsys)
    assert rc == 2
    assert "--memory-size 80 is more than the 67 training samples of --source" in err and "(90 samples" in err
    assert not (tmp_path / "big" / "pretrained.safetensors").exists()


# ---- first use (issue 15) --------------------------------------------------------------------------

def test_version_and_every_default_in_help(capsys):
    import importlib.metadata

    import fastadapt

    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    version = getattr(fastadapt, "__version__", None) or importlib.metadata.version("fastadapt")
    assert capsys.readouterr().out == f"fastadapt {version}\n"
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == {"info", "bench", "demo", "demo-lm", "transfer", "adapt", "adapt-lm", "predict"}
    for name, sub in commands.items():
        text = " ".join(sub.format_help().split())
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
                shown = ",".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {shown})" in text, (name, action.dest)
    adapt = " ".join(commands["adapt"].format_help().split())
    for shown in ("(default: 128,128)", "(default: 0.5)", "(default: 20)", "(default: 0.001)", "(default: 32)",
                  "(default: replay)", "(default: 100, or every source training sample when there are fewer)",
                  "(default: --epochs)", f"(default: {os.path.join('fastadapt_out', 'adapt')})"):
        assert shown in adapt, shown


# Each bundled data set split into an old task (source) and a new one (target), with the number of
# source training samples the 25% held-out split leaves.
BUNDLED = {"iris": ("iris:0-1", "iris:2", 75), "wine": ("wine:0-1", "wine:2", 97),
           "breast_cancer": ("breast_cancer:0", "breast_cancer:1", 159), "digits": ("digits:0-4", "digits:5-9", 676)}


@pytest.mark.parametrize("name", readers.SKLEARN_DATASETS)
def test_adapt_with_default_settings_on_every_bundled_dataset(tmp_path, capsys, name):
    """The default replay memory (100) fits the source, or keeps all of it when smaller: no failure
    after pretraining."""
    source, target, train = BUNDLED[name]
    rc, _, err = _run(["adapt", "--source", source, "--target", target, "-o", str(tmp_path / "out"), "--epochs", "1",
                       "--quiet"], capsys)
    assert rc == 0, err
    row = json.loads((tmp_path / "out" / "report.json").read_text())["adapt"][0]
    assert row["memory_size"] == min(train, 100)
    assert (f"has {train} training samples" in err) == (train < 100)


def test_adapt_with_default_settings_on_a_90_row_csv(tmp_path, capsys):
    src, tgt = _csv(tmp_path / "s.csv", (0, 1, 2), 1, n=90), _csv(tmp_path / "t.csv", (3, 4), 2)
    rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(tmp_path / "out"), "--epochs", "1",
                       "--quiet"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["adapt"][0]["memory_size"] == 67


def test_output_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1), _npz(tmp_path / "t.npz", (2, 3), 2)
    (tmp_path / "file").write_text("MINE")
    cases = [(tmp_path / "file", f"--output {str(tmp_path / 'file')!r} is a file, not a folder"),
             (tmp_path / "file" / "sub", f"--output {str(tmp_path / 'file' / 'sub')!r}: {str(tmp_path / 'file')!r} "
                                         f"is a file, not a folder")]
    for out, message in cases:
        for command in ("adapt", "transfer"):
            rc, _, err = _run([command, "--source", src, "--target", tgt, "-o", str(out)] + FAST, capsys)
            assert (rc, err) == (2, f"fastadapt {command}: error: {message}\n")
    # a folder this process may not write in (as root every folder is writable, so the check is faked)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(locked) and real_access(p, mode))
    rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(locked / "out")] + FAST, capsys)
    assert (rc, err) == (2, f"fastadapt adapt: error: --output {str(locked / 'out')!r}: no permission to write in "
                            f"{str(locked)!r}\n")
    assert sorted(os.listdir(tmp_path)) == ["file", "locked", "s.npz", "t.npz"] and not os.listdir(locked)
    assert (tmp_path / "file").read_text() == "MINE"


def test_resume_refuses_changed_arguments(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1), _npz(tmp_path / "t.npz", (2, 3), 2)
    out = tmp_path / "out"
    argv = ["adapt", "--source", src, "--target", tgt, "-o", str(out), "--epochs", "2", "--batch-size", "16",
            "--quiet", "--memory-size", "10"]
    assert cli.main(argv + ["--hidden", "16", "--lr", "0.01"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["finished"] and run["arguments"]["hidden"] == [16] and run["arguments"]["pretrain_epochs"] == 2
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for extra, message in [
        (["--hidden", "32", "--lr", "0.1"], f"--resume: the run in {str(out)!r} was started with other arguments: "
                                            f"--lr was 0.01, now 0.1; --hidden was 16, now 32. Resume it with its own"),
        (["--hidden", "16", "--lr", "0.01", "--epochs", "3"], "--pretrain-epochs was 2, now 3; without "
                                                              "--pretrain-epochs it follows --epochs: pass "
                                                              "--pretrain-epochs 2 to keep the pretraining."),
        (["--hidden", "16", "--lr", "0.01", "--joint", "--alpha", "1,0.5"], "--alpha was 0.5, now 1.0,0.5; "
                                                                            "--joint was not given, now given"),
    ]:
        rc, _, err = _run(argv + extra + ["--resume"], capsys)
        assert rc == 2 and message in err, err
    rc, _, err = _run(["transfer"] + argv[1:-2] + ["--resume"], capsys)
    assert (rc, err) == (2, f"fastadapt transfer: error: --resume: --output {str(out)!r} holds a fastadapt adapt "
                            f"run, not transfer\n")
    rc, _, err = _run(argv[:6] + [str(tmp_path / "none")] + argv[7:] + ["--resume"], capsys)
    assert (rc, err) == (2, f"fastadapt adapt: error: --resume: --output {str(tmp_path / 'none')!r} holds no run to "
                            f"resume (no run.json)\n")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same arguments, --epochs longer and --pretrain-epochs kept: resumed
    assert cli.main(argv + ["--hidden", "16", "--lr", "0.01", "--epochs", "3", "--pretrain-epochs", "2",
                            "--resume"]) == 0
    assert len(json.loads((out / "report.json").read_text())["adapt"][0]["history"]["loss"]) == 3


def test_a_new_run_over_a_finished_one_removes_what_resume_would_take_for_its_own(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1), _npz(tmp_path / "t.npz", (2, 3), 2)
    out = tmp_path / "out"
    argv = ["adapt", "--source", src, "--target", tgt, "-o", str(out), "--memory-size", "10"] + FAST
    assert _run(argv + ["--alpha", "1,0.5"], capsys)[0] == 0
    (out / "mine").mkdir()
    (out / "mine" / "pretrained.safetensors").write_text("MINE")  # not where a run writes: kept
    old = (out / "pretrained.safetensors").read_bytes()
    rc, _, err = _run(argv + ["--alpha", "1", "--lr", "0.02"], capsys)
    assert rc == 0, err
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["alpha_1", "pretrain"]
    assert (out / "pretrained.safetensors").read_bytes() != old
    assert (out / "mine" / "pretrained.safetensors").read_text() == "MINE"


def _heldout(path, seed=0):
    """The raw held-out split of a .csv, as workflows.prepare draws it (labels encoded in sorted order)."""
    X, y = readers.load_dataset(path)
    code = {c: i for i, c in enumerate(np.unique(y).tolist())}
    (_, _), (X_te, y_te) = readers.split(X, workflows.encode(y, code), 0.25, seed)
    return X_te, [list(code)[i] for i in y_te]


def test_predict_on_raw_csv_matches_the_workflows_evaluation(tmp_path, capsys):
    """Class names in both .csv files; the saved models standardise raw features themselves and answer in
    the names, with the accuracies the workflow reported on the same held-out rows."""
    src = _csv(tmp_path / "s.csv", (0, 1, 2), 1, n=120, spread=2.5, name="class_{}")
    tgt = _csv(tmp_path / "t.csv", (3, 4), 2, n=120, spread=2.5, name="class_{}")
    out = tmp_path / "out"
    old_umask = os.umask(0o027)
    try:
        rc, _, err = _run(["adapt", "--source", src, "--target", tgt, "-o", str(out), "--memory-size", "20"] + FAST,
                          capsys)
        assert rc == 0, err
        report = json.loads((out / "report.json").read_text())
        assert report["classes"] == {"source": ["class_0", "class_1", "class_2"], "target": ["class_3", "class_4"]}
        row = report["adapt"][0]
        assert 0.5 < row["target_acc"] < 1 and 0.5 < row["source_acc_after"] < 1  # the blobs overlap
        for name, acc, model in ((tgt, row["target_acc"], row["model"]), (src, row["source_acc_after"], row["model"]),
                                 (src, report["pretrain"]["source_acc"], str(out / "pretrained.safetensors"))):
            X, labels = _heldout(name)
            _write_csv(tmp_path / "heldout.csv", X, labels)
            rc, stdout, err = _run(["predict", "--model", model, "--data", str(tmp_path / "heldout.csv")], capsys)
            assert rc == 0, err
            predicted = stdout.split()
            assert len(predicted) == len(labels) and set(predicted) <= {f"class_{c}" for c in range(5)}
            assert np.mean(np.array(predicted) == np.array(labels)) == acc
            correct = sum(p == t for p, t in zip(predicted, labels))
            assert err == (f"accuracy: {100 * acc:.2f}% ({correct} of {len(labels)} rows of --data "
                           f"{str(tmp_path / 'heldout.csv')!r})\n")
        # without labels, into a file
        _write_csv(tmp_path / "raw.csv", X)
        rc, _, err = _run(["predict", "--model", model, "--data", str(tmp_path / "raw.csv"), "-o",
                           str(tmp_path / "p" / "pred.csv")], capsys)
        assert rc == 0 and err == f"predictions: {str(tmp_path / 'p' / 'pred.csv')} ({len(labels)} rows)\n"
        assert (tmp_path / "p" / "pred.csv").read_text().split() == ["prediction"] + predicted
    finally:
        os.umask(old_umask)
    written = [out / "report.json", out / "run.json", out / "pretrained.safetensors", Path(row["model"]),
               tmp_path / "p" / "pred.csv"] + list(out.glob("runs/*/last/*"))
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in written} == {str(p): oct(0o640) for p in written}


def test_predict_bad_inputs(tmp_path, capsys):
    src, tgt = _npz(tmp_path / "s.npz", (0, 1), 1), _npz(tmp_path / "t.npz", (2, 3), 2)
    out = tmp_path / "out"
    assert _run(["adapt", "--source", src, "--target", tgt, "-o", str(out)] + FAST, capsys)[0] == 0
    model = str(out / "pretrained.safetensors")
    bare = str(out / "runs" / "pretrain" / "last" / "model.safetensors")
    _write_csv(tmp_path / "five.csv", np.zeros((3, 5)))
    for argv, message in [
        (["--model", bare, "--data", src], f"--model {bare!r} holds a model without its preprocessing and label "
                                           f"names"),
        (["--model", str(tmp_path / "none.safetensors"), "--data", src], "--model: weights file not found"),
        (["--model", model, "--data", str(tmp_path / "five.csv")],
         f"--data {str(tmp_path / 'five.csv')!r} has 5 features but the model takes 6; without a label column "
         f"'label' every column is a feature"),
        (["--model", model, "--data", src, "-o", str(tmp_path)], f"--output {str(tmp_path)!r} is a folder"),
    ]:
        rc, _, err = _run(["predict"] + argv, capsys)
        assert rc == 2 and err.startswith(f"fastadapt predict: error: {message}"), err


def test_csv_label_values_are_named_not_the_row(tmp_path, capsys):
    for text, message in [("a,label\n1.0,0\n2.0,1.5\n", "line 3, label column 'label': '1.5' is not a class label "
                                                         "(numeric labels must be integers)"),
                          ("a,label\n1.0,0\n\n2.0,\n", "line 4, label column 'label': the label is empty"),
                          ("a,b,label\n1.0,2.0,x\n1.0,n/a,y\n", "line 3, column 'b': 'n/a' is not a number")]:
        (tmp_path / "m.csv").write_text(text)
        _bad(tmp_path, capsys, ["adapt", "--source", str(tmp_path / "m.csv"), "--target", "digits:5-9"],
             f"--source: {str(tmp_path / 'm.csv')!r} {message}")


# SIGINT/SIGTERM: an adaptation long enough that the signal lands mid-way (after the checkpoint of its
# epoch 5, well before its epoch 40); one thread, so that every process computes the same floats.
SIGNALLED = ["--pretrain-epochs", "5", "--epochs", "40", "--hidden", "16", "--batch-size", "16", "--memory-size", "20",
             "--threads", "1", "--quiet"]


def _signal_data(folder):
    return ["--source", _npz(folder / "s.npz", (0, 1, 2), 1, n=160),
            "--target", _npz(folder / "t.npz", (3, 4), 2, n=160)]


@pytest.fixture
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    threads = torch.get_num_threads()
    try:
        assert cli.main(["adapt"] + _signal_data(folder) + ["-o", str(folder / "out")] + SIGNALLED) == 0
    finally:
        torch.set_num_threads(threads)
    return folder / "out"


def _comparable(out):
    """What a run computed: its adaptation rows (less timings and paths) and every weight it saved."""
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "model")}
            for r in json.loads((out / "report.json").read_text())["adapt"]]
    weights = {p.name: checkpoint.read_weights(p)[0] for p in [out / "pretrained.safetensors", *out.glob("models/*")]}
    return rows, weights


def _fastadapt(argv):
    return subprocess.Popen([sys.executable, "-m", "fastadapt", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})


def _interrupt(tmp_path, signum, status):
    """Runs SIGNALLED in a process, sends it ``signum`` mid-adaptation; checks its status and its one
    line. Returns (argv, the --resume command the line gives)."""
    out = tmp_path / "out"
    argv = ["adapt"] + _signal_data(tmp_path) + ["-o", str(out)] + SIGNALLED
    proc = _fastadapt(argv)
    folder = out / "runs" / "alpha_0.5_replay20" / "last"
    deadline = time.monotonic() + 300
    while not (folder / checkpoint.STATE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    head = (f"fastadapt adapt: interrupted by {signal.Signals(signum).name}; the last checkpoint is {folder} "
            f"(epoch ")
    assert err.count("\n") == 1 and err.startswith(head) and "Traceback" not in err, err
    epoch, _, command = err[len(head):].strip().partition("); continue with: ")
    assert int(epoch) in range(5, 40, 5) and checkpoint.load_checkpoint(folder)[1]["epoch"] == int(epoch)
    assert command == shlex.join(["fastadapt"] + argv + ["--resume"])
    return argv, command


def test_sigint_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, uninterrupted):
    argv, command = _interrupt(tmp_path, signal.SIGINT, 130)
    # without --resume, the interrupted run is not overwritten
    rc, _, err = _run(argv, capsys)
    assert (rc, err) == (2, f"fastadapt adapt: error: --output {str(tmp_path / 'out')!r} holds an unfinished run: "
                            f"add --resume to continue it, or pass another --output to start a new one\n")
    resumed = _fastadapt(shlex.split(command)[1:])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    rows, weights = _comparable(tmp_path / "out")
    expected_rows, expected_weights = _comparable(uninterrupted)
    assert rows == expected_rows and weights.keys() == expected_weights.keys()
    for name, tensors in weights.items():
        assert all(torch.equal(tensors[k], expected_weights[name][k]) for k in tensors), name


def test_sigterm_mid_training_exits_143_naming_the_checkpoint(tmp_path):
    _interrupt(tmp_path, signal.SIGTERM, 143)
