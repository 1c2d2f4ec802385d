"""``fastadapt demo-lm`` and ``adapt-lm`` (issue 14): the step-budget batch source, the user's text
files and their errors, and both commands end to end on tiny settings (values, files, resume)."""
import json
import math
import shlex
import signal
import sys

import pytest
import torch

pytest.importorskip("tokenizers")

from fastadapt.apps import cli, lm_data, lm_workflows, runs, text_files  # noqa: E402
from fastadapt.training import checkpoint  # noqa: E402
from fastadapt.training.batches import PairedBatches, TensorBatches  # noqa: E402
from fastadapt.training.lm import LMAdaptiveTrainer  # noqa: E402

# seconds, not minutes: a model of 16 wide, steps in rounds of 2
TINY = ["--vocab-size", "300", "--seq-len", "32", "--d-model", "16", "--layers", "1", "--heads", "2",
        "--batch-size", "16", "--pretrain-steps", "4", "--steps", "4", "--eval-every", "2", "--threads", "1", "--quiet"]
# the demo's text is larger: fewer, longer sequences and one evaluation per phase
DEMO_TINY = TINY + ["--seq-len", "64", "--batch-size", "32", "--eval-every", "4"]


@pytest.fixture(autouse=True)
def _threads():
    threads = torch.get_num_threads()  # --threads sets them for the whole process
    yield
    torch.set_num_threads(threads)


def _run(argv, capsys):
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _prose(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = "the a model learns text from every word it reads and keeps what it knew before".split()
    paragraphs = []
    for _ in range(n):
        idx = torch.randint(len(words), (int(torch.randint(8, 20, (1,), generator=g)),), generator=g)
        paragraphs.append(" ".join(words[i] for i in idx).capitalize() + ".")
    return "\n\n".join(paragraphs) + "\n"


def _code(n=60):
    return "".join(f"def f{i}(x, y={i}):\n    return x * y + {i % 7}\n\n" for i in range(n))


@pytest.fixture
def texts(tmp_path):
    src = tmp_path / "prose"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(_prose(80, 0))
    (src / "sub" / "b.md").write_text(_prose(80, 1))
    (src / "sub" / "skipped.csv").write_text("not,matched\n" * 100)
    (src / "sub" / "empty.txt").write_text("")  # empty files inside a folder are skipped
    (src / ".hidden").mkdir()
    (src / ".hidden" / "c.txt").write_bytes(b"\0 hidden folders are not searched")
    tgt = tmp_path / "code.py"
    tgt.write_text(_code(150))
    return src, tgt


# ---- the step budget -------------------------------------------------------------------------------

def _rows(batch):
    return batch[0][:, 0].tolist()  # row i of the data holds i in its first column


def test_rounds_cut_one_stream_of_epochs_the_same_from_any_round():
    X = torch.arange(10).repeat_interleave(3).view(10, 3)
    inner = TensorBatches(X, X.clone(), 3, "cpu")  # 4 batches per epoch (3, 3, 3, 1 rows)
    rng = torch.get_rng_state()
    straight = [[_rows(b) for b in lm_workflows.Rounds(inner, 3, seed=7).epoch(r)] for r in range(4)]
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is neither read nor advanced
    stream = [rows for r in straight for rows in r]
    assert [len(r) for r in straight] == [3, 3, 3, 3]
    # epochs 0, 1 and 2 of the stream: each a permutation of the 10 rows
    for e in range(3):
        assert sorted(sum(stream[4 * e:4 * e + 4], [])) == list(range(10))
    assert stream[:4] != stream[4:8]  # reshuffled each epoch
    # a fresh batch source (a resumed run) gives round 2, which starts inside epoch 1, unchanged
    assert [_rows(b) for b in lm_workflows.Rounds(inner, 3, seed=7).epoch(2)] == straight[2]
    assert [_rows(b) for b in lm_workflows.Rounds(inner, 3, seed=8).epoch(0)] != straight[0]
    # paired (replay) batches, the source rows first: the same properties
    def paired():
        return lm_workflows.Rounds(PairedBatches(inner, TensorBatches(X + 100, X.clone(), 2, "cpu")), 3, seed=7)

    straight = [[(b[0][:, 0].tolist(), b[2]) for b in paired().epoch(r)] for r in range(4)]
    assert all(ns == 2 and all(r >= 100 for r in rows[:2]) for batches in straight for rows, ns in batches)
    targets = [rows[2:] for batches in straight for rows, _ in batches]
    for e in range(3):
        assert sorted(sum(targets[4 * e:4 * e + 4], [])) == list(range(10))
    assert [(b[0][:, 0].tolist(), b[2]) for b in paired().epoch(2)] == straight[2]
    assert torch.equal(torch.get_rng_state(), rng)


def test_the_step_budget_must_be_whole_rounds(tmp_path, capsys):
    out = tmp_path / "out"
    for extra, message in [(["--steps", "5"], "--steps 5 is not a multiple of --eval-every 2: each phase trains in "
                                              "rounds of --eval-every steps"),
                           (["--pretrain-steps", "3"], "--pretrain-steps 3 is not a multiple of --eval-every 2"),
                           (["--d-model", "15"], "--d-model 15 is not a multiple of --heads 2")]:
        rc, _, err = _run(["demo-lm", "-o", str(out)] + TINY + extra, capsys)
        assert rc == 2 and err.startswith(f"fastadapt demo-lm: error: {message}"), err
    assert not out.exists()  # checked before any work


# ---- the user's text files -------------------------------------------------------------------------

def test_cut_keeps_every_line_in_pieces_that_end_at_blank_lines():
    text = _prose(200, 3)
    docs = text_files.cut(text)
    assert "".join(docs) == text and len(docs) > 3
    assert all(d.endswith("\n\n") and len(d) >= text_files.DOC_CHARS for d in docs[:-1])
    long_line = "x" * 100 + "\n"
    docs = text_files.cut(long_line * 200)  # no blank line: cut after MAX_DOC_CHARS
    assert "".join(docs) == long_line * 200 and max(map(len, docs)) <= text_files.MAX_DOC_CHARS + 101


def test_read_documents_searches_folders_for_the_patterns(texts):
    src, tgt = texts
    docs, info = text_files.read_documents([str(src), str(tgt)], "--source")
    assert info == {"files": 3, "characters": len(_prose(80, 0)) + len(_prose(80, 1)) + len(_code(150))}
    assert "".join(docs) == _prose(80, 0) + _prose(80, 1) + _code(150)  # sorted paths, nothing hidden
    docs, info = text_files.read_documents([str(src)], "--source", glob="*.csv")
    assert info["files"] == 1 and "".join(docs) == "not,matched\n" * 100
    crlf = src / "crlf.txt"
    crlf.write_bytes(b"\xef\xbb\xbfone\r\ntwo\rthree\n")  # BOM and Windows/old Mac line ends
    assert text_files.read_documents([str(crlf)], "--source")[0] == ["one\ntwo\nthree\n"]


def _corpus(src, tgt):
    """What adapt-lm makes of the two paths with TINY's tokenizer and sequence length."""
    docs = {"source": text_files.read_documents([str(src)], "--source")[0],
            "target": text_files.read_documents([str(tgt)], "--target")[0]}
    return lm_data.corpus_from_documents(docs, 32, 300)


def _bad(argv, capsys, message, out):
    rc, _, err = _run(["adapt-lm", "-o", str(out)] + argv + TINY, capsys)
    assert (rc, err) == (2, f"fastadapt adapt-lm: error: {message}\n")
    assert not out.exists()  # refused before any work


def test_unusable_text_is_refused_naming_the_path(tmp_path, texts, capsys, monkeypatch):
    src, tgt = texts
    out = tmp_path / "out"
    good = ["--target", str(tgt)]
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\n\t\n")
    (tmp_path / "nul.txt").write_bytes(b"text\0more")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "data.bin").write_bytes(b"\x01\x02")
    (tmp_path / "empties").mkdir()
    (tmp_path / "empties" / "__init__.py").write_text("")
    (tmp_path / "short.txt").write_text("a few words\n")
    p = lambda name: str(tmp_path / name)  # noqa: E731
    cases = [
        (["--source", p("none.txt")], f"--source {p('none.txt')!r} does not exist"),
        (["--source", str(src), p("empty.txt")], f"--source {p('empty.txt')!r} is empty"),
        (["--source", p("blank.txt")], f"--source {p('blank.txt')!r} is empty (only white space)"),
        (["--source", p("nul.txt")], f"--source {p('nul.txt')!r} is not a text file: it holds a NUL byte (at byte 4)"),
        (["--source", p("latin1.txt")], f"--source {p('latin1.txt')!r} is not UTF-8 text: byte 0xe9 at byte 3 "
                                        f"(invalid continuation byte)"),
        (["--source", p("nothing")], f"--source {p('nothing')!r}: no file matching *.txt,*.md,*.rst,*.py in it "
                                     f"(searched recursively, hidden files and folders skipped; --glob sets the "
                                     f"patterns)"),
        (["--source", p("empties")], f"--source {p('empties')!r}: 1 matching files, all empty *.txt,*.md,*.rst,*.py"
                                     f" in it (searched recursively, hidden files and folders skipped; --glob sets "
                                     f"the patterns)"),
        (["--source", p("short.txt")], f"--source {p('short.txt')!r}: too little text: 0 training and 12 held-out "
                                       f"tokens (documents: 1; every 10th, from the first, is held out); it needs one "
                                       f"training sequence of --seq-len 32 tokens and 2 held-out tokens"),
    ]
    for argv, message in cases:
        _bad(argv + good, capsys, message, out)
    _bad(["--source", str(src), "--target", str(tgt), p("nul.txt")], capsys,
         f"--target {p('nul.txt')!r} is not a text file: it holds a NUL byte (at byte 4)", out)
    _bad(["--source", str(src), "--target", str(tgt), "--alpha", "1,0.5,1"], capsys, "--alpha names 1 more than once",
         out)
    n = len(_corpus(src, tgt).splits["source"]["train"][0])
    _bad(["--source", str(src), "--target", str(tgt), "--memory-size", "100000"], capsys,
         f"--memory-size 100000 is more than the {n} training sequences of --source; pass at most {n}, or 0 for all "
         f"of them", out)
    # a file this process may not read (as root every file is readable, so the failure is faked)
    locked = p("locked.txt")
    (tmp_path / "locked.txt").write_text(_prose(20))
    real_open = open
    monkeypatch.setattr(text_files, "open", lambda f, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission "
                        "denied", f)) if f == locked else real_open(f, *a, **k), raising=False)
    _bad(["--source", locked] + good, capsys, f"--source {locked!r} cannot be read: Permission denied", out)
    with pytest.raises(SystemExit) as exc:
        cli.main(["adapt-lm", "--source", str(src), "--target", str(tgt), "--glob", " , "])
    assert exc.value.code == 2 and capsys.readouterr().err.endswith(
        "argument --glob: expected comma-separated file name patterns such as '*.txt,*.md', got ' , '\n")


# ---- end to end ------------------------------------------------------------------------------------

def _check_report(report, steps=4, eval_every=2):
    """Every number of a report consistent with the others."""
    rows = report["adapt"]
    pre = report["pretrain"]
    assert pre["history"]["step"] == list(range(eval_every, report["config"]["pretrain_steps"] + 1, eval_every))
    assert math.isclose(pre["source_ppl_after"], math.exp(pre["source_loss_after"]), rel_tol=1e-12)
    assert pre["source_loss_after"] == pre["history"]["val_source_loss"][-1]
    for r in rows:
        for side in ("source", "target"):
            for t in ("before", "after"):
                assert math.isclose(r[f"{side}_ppl_{t}"], math.exp(r[f"{side}_loss_{t}"]), rel_tol=1e-12)
            # the last round's evaluation is the "after" value; both from the same weights
            assert r[f"{side}_loss_after"] == r["history"][f"val_{side}_loss"][-1]
            # every method starts from the same pretrained model
            assert r[f"{side}_loss_before"] == rows[0][f"{side}_loss_before"]
        assert r["source_loss_before"] == pre["source_loss_after"]
        assert math.isclose(r["forgetting_nats"], r["source_loss_after"] - r["source_loss_before"], rel_tol=1e-12)
        assert math.isclose(r["forgetting_ppl"], r["source_ppl_after"] / r["source_ppl_before"] - 1, rel_tol=1e-9)
        assert r["history"]["step"] == list(range(eval_every, steps + 1, eval_every))
    naive = next(r for r in rows if r["alpha"] == 1.0)
    for r in rows:
        assert math.isclose(r["target_ppl_vs_naive"], r["target_ppl_after"] / naive["target_ppl_after"] - 1)
    assert report["python"] == sys.version and report["torch"] == torch.__version__ and report["threads"] == 1
    assert set(report["load_average"]) == {"start", "end"}
    assert math.isclose(report["seconds"]["total"], max(report["seconds"].values()))


def _comparable(out):
    report = json.loads((out / "report.json").read_text())
    rows = [{k: v for k, v in r.items() if k not in ("seconds", "model")}
            for r in [report["pretrain"], *report["adapt"]]]
    weights = {p.name: checkpoint.read_weights(p)[0] for p in [out / "pretrained.safetensors", *out.glob("models/*")]}
    return rows, weights


def test_adapt_lm_end_to_end(tmp_path, texts, capsys):
    src, tgt = texts
    out = tmp_path / "out"
    argv = ["adapt-lm", "--source", str(src), "--target", str(tgt), "-o", str(out), "--memory-size", "20"] + TINY
    rc, stdout, err = _run(argv, capsys)
    assert rc == 0, err
    assert stdout == "" and err == ""  # --quiet
    report = json.loads((out / "report.json").read_text())
    _check_report(report)
    assert [r["method"] for r in report["adapt"]] == ["naive (alpha=1)", "alpha=0.5+replay20"]
    assert report["adapt"][1]["memory_size"] == 20 and report["adapt"][0]["memory_size"] is None
    d = report["data"]
    assert d["source"]["files"] == 2 and d["target"]["files"] == 1 and d["source"]["paths"] == [str(src)]
    assert sorted(p.name for p in out.iterdir()) == ["models", "perplexity.png", "pretrained.safetensors",
                                                     "report.json", "report.md", "run.json", "runs", "tokenizer.json"]
    assert sorted(p.name for p in (out / "models").iterdir()) == ["alpha_0.5_replay20.safetensors",
                                                                  "naive__alpha_1_.safetensors"]
    assert json.loads((out / "run.json").read_text())["finished"]
    md = (out / "report.md").read_text()
    assert f"| naive (alpha=1) | {report['adapt'][0]['source_ppl_before']:.1f} (" in md
    assert (out / "perplexity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the saved model is the adapted one: its loss on the target's held-out text is the report's
    cfg = lm_workflows.LMRunConfig(output="", vocab_size=300, seq_len=32, d_model=16, layers=1, heads=2)
    data = _corpus(src, tgt)
    assert d["source"]["sequences"] == {"train": len(data.splits["source"]["train"][0]),
                                        "val": len(data.splits["source"]["val"][0])}
    model = lm_workflows.new_model(data.vocab_size, cfg)
    model.load_state_dict(checkpoint.read_weights(out / "models" / "naive__alpha_1_.safetensors")[0])
    loss = LMAdaptiveTrainer(model, alpha=1.0, device="cpu", progress_bar=False).evaluate(data.splits["target"]["val"])
    assert math.isclose(loss["loss"], report["adapt"][0]["target_loss_after"], rel_tol=1e-6)


def test_adapt_lm_interrupted_then_resumed_equals_a_straight_run(tmp_path, texts, capsys, monkeypatch):
    src, tgt = texts
    argv = lambda out: ["adapt-lm", "--source", str(src), "--target", str(tgt), "-o", str(out)] + TINY  # noqa: E731
    assert cli.main(argv(tmp_path / "straight")) == 0
    out = tmp_path / "out"
    epoch = lm_workflows.Rounds.epoch

    def interrupt_replay_at_round_1(self, r):
        if isinstance(self.inner, PairedBatches) and r == 1:
            raise runs.Interrupted(signal.SIGINT)
        return epoch(self, r)

    monkeypatch.setattr(lm_workflows.Rounds, "epoch", interrupt_replay_at_round_1)
    rc, _, err = _run(argv(out), capsys)
    folder = out / "runs" / "alpha_0.5_replay" / "last"
    assert (rc, err) == (130, f"fastadapt adapt-lm: interrupted by SIGINT; the last checkpoint is {folder} (step 2); "
                              f"continue with: {shlex.join(['fastadapt', *argv(out), '--resume'])}\n")
    monkeypatch.setattr(lm_workflows.Rounds, "epoch", epoch)
    rc, _, err = _run(argv(out) + ["--resume"], capsys)
    assert rc == 0, err
    rows, weights = _comparable(out)
    expected_rows, expected_weights = _comparable(tmp_path / "straight")
    assert rows == expected_rows and weights.keys() == expected_weights.keys()
    for name, tensors in weights.items():
        assert all(torch.equal(tensors[k], expected_weights[name][k]) for k in tensors), name
    # the step budget defines the run: --resume refuses another
    rc, _, err = _run(argv(out) + ["--resume", "--steps", "6"], capsys)
    assert rc == 2 and "--steps was 4, now 6" in err


def test_demo_lm_seeds_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc, stdout, err = _run(["demo-lm", "-o", str(out), "--seeds", "0,1"] + DEMO_TINY, capsys)
    assert rc == 0, err
    reports = [json.loads((out / f"seed{s}" / "report.json").read_text()) for s in (0, 1)]
    for s, report in enumerate(reports):
        _check_report(report, eval_every=4)
        assert report["seed"] == s and report["data"]["source"]["name"] == "prose"
        assert report["data"]["target"]["name"] == "code" and report["command"].startswith("fastadapt demo-lm")
        rows = {r["method"]: r for r in report["adapt"]}
        assert set(rows) == {"naive (alpha=1)", "alpha=0.5+replay"}
        t = report["targets"]
        assert t["naive forgetting >= +30%"] == {"method": "naive (alpha=1)",
                                                 "value": rows["naive (alpha=1)"]["forgetting_ppl"],
                                                 "met": rows["naive (alpha=1)"]["forgetting_ppl"] >= 0.3}
        assert t["replay target ppl within 10% of naive"]["value"] == rows["alpha=0.5+replay"]["target_ppl_vs_naive"]
        assert (out / f"seed{s}" / "perplexity.png").is_file() and (out / f"seed{s}" / "report.md").is_file()
    assert reports[0]["adapt"][0]["source_loss_after"] != reports[1]["adapt"][0]["source_loss_after"]
    # the data do not depend on the seed
    assert reports[0]["data"] == reports[1]["data"]
    summary = json.loads((out / "summary.json").read_text())
    forgetting = [r["adapt"][1]["forgetting_ppl"] for r in reports]
    mean, std = summary["methods"]["alpha=0.5+replay"]["forgetting_ppl"]
    assert math.isclose(mean, sum(forgetting) / 2) and math.isclose(std, abs(forgetting[0] - forgetting[1]) / 2 ** 0.5)
    assert summary["targets"]["replay forgetting <= +10%"]["values"] == forgetting
    assert (out / "summary.md").read_text().startswith("# `fastadapt demo-lm")
