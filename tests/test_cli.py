"""The CLI: workflows on synthetic .npz/.csv data and on digits, resume, and every bad input."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastadapt.apps import cli
from fastadapt.training import checkpoint
from fastadapt.training.surgery import load_pretrained
from _training_data import blobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


def _npz(path, classes, seed, features=6, n=80):
    X, y = blobs(n, features=features, classes=classes, seed=seed)
    np.savez(path, X=X.numpy(), y=y.numpy())
    return str(path)


def _csv(path, classes, seed, features=6, n=80):
    X, y = blobs(n, features=features, classes=classes, seed=seed)
    with open(path, "w") as f:
        f.write(",".join([f"f{i}" for i in range(features)] + ["label"]) + "\n")
        for row, label in zip(X.tolist(), y.tolist()):
            f.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    return str(path)


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
    assert model.config() == {"in_features": 6, "hidden_sizes": [16], "num_classes": 2}
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
    assert not (out / "pretrained.safetensors").exists()  # failed before training started


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
         "line 3 has a non-numeric value")
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
