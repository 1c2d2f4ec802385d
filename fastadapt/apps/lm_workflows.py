"""The language-model job behind ``fastadapt demo-lm`` and ``adapt-lm``: pretrain a small causal
transformer on a source text domain, then adapt copies of it to a target domain, once per alpha (1 is
naive fine-tuning; below 1 each target batch is paired with replayed source sequences), and report the
source and target validation perplexity before and after each.

Every phase is budgeted in optimizer steps, not epochs (the time of a run is its steps times the cost of
one, whatever the size of the text): the trainer's epochs are *rounds* of ``eval_every`` steps (both
validation sets are evaluated and a checkpoint is written after each) cut from the endless stream of
shuffled epochs of the data (:class:`Rounds`).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
import torch

from fastadapt._version import __version__
from fastadapt.apps import lm_data
from fastadapt.apps.workflows import resume_path, slug
from fastadapt.training import checkpoint as ckpt
from fastadapt.training import distributed as dist
from fastadapt.training.callbacks import Callback, ModelCheckpoint
from fastadapt.training.lm import LMAdaptiveTrainer, TinyCausalLM
from fastadapt.training.loop import seed_everything
from fastadapt.training.surgery import load_state

SIDES = ("source", "target")
WARMUP = 0.1  # of each phase's steps: linear warm-up, then cosine decay to 0 at its last step


@dataclasses.dataclass
class LMRunConfig:
    """The defaults are demo-lm's, chosen on seeds 0-2 of it (docs/demo-lm.md): about 2 minutes on 2 cores,
    and the issue's targets met on each of those seeds (at adapt_lr 1e-3 replay's target perplexity was
    up to 10.8% above naive's, at 2e-3 up to 8.4%, at 3e-3 up to 5.1%)."""

    output: str
    vocab_size: int = 2048
    seq_len: int = 128
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    batch_size: int = 32
    lr: float = 5e-3
    adapt_lr: float = 3e-3
    pretrain_steps: int = 300
    steps: int = 100
    eval_every: int = 20
    memory_size: int | None = None  # replayed source sequences; None: all the source's training sequences
    seed: int = 0
    device: str | None = None
    quiet: bool = False
    resume: bool = False

    def check(self):
        """The step budgets against ``eval_every`` (the flags' names: the CLI reports this message)."""
        for name in ("pretrain_steps", "steps"):
            if getattr(self, name) % self.eval_every:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is not a multiple of --eval-every "
                                 f"{self.eval_every}: each phase trains in rounds of --eval-every steps")
        if self.d_model % self.heads:
            raise ValueError(f"--d-model {self.d_model} is not a multiple of --heads {self.heads}")


def check_text(corpus: lm_data.LMCorpus, side: str, arg: str, spec) -> None:
    """Raises ValueError naming ``arg`` and ``spec`` unless ``side`` of ``corpus`` holds one full training
    sequence and a held-out token to predict."""
    train, val = (lm_data.tokens(corpus.splits[side][s]) for s in ("train", "val"))
    if train < corpus.seq_len or val < 2:
        docs = corpus.documents[side]
        raise ValueError(f"{arg} {spec}: too little text: {train} training and {val} held-out tokens (documents: "
                         f"{docs['train'] + docs['val']}; every {lm_data.VAL_EVERY}th, from the first, is held out); "
                         f"it needs one training sequence of --seq-len {corpus.seq_len} tokens and 2 held-out tokens")


def check_memory(cfg: LMRunConfig, corpus: lm_data.LMCorpus, source: str = "--source"):
    """--memory-size against the training sequences of the source (``source`` names it)."""
    available = len(corpus.splits["source"]["train"][0])
    if cfg.memory_size is not None and cfg.memory_size > available:
        raise ValueError(f"--memory-size {cfg.memory_size} is more than the {available} training sequences of "
                         f"{source}; pass at most {available}, or 0 for all of them")


def describe(corpus: lm_data.LMCorpus, names: dict) -> dict:
    """The data as the report gives it: per side its name, documents, sequences and real tokens."""
    out = {"vocab_size": corpus.vocab_size, "seq_len": corpus.seq_len}
    for side in SIDES:
        parts = corpus.splits[side]
        out[side] = {"name": names[side], "documents": corpus.documents[side],
                     "sequences": {s: len(parts[s][0]) for s in parts},
                     "tokens": {s: lm_data.tokens(parts[s]) for s in parts}}
    return out


# ---- steps, not epochs -------------------------------------------------------------------------

class Rounds:
    """A batch source (the trainer's own) as an endless stream of its epochs, cut into rounds of
    ``steps`` batches: round ``r`` is batches ``r * steps`` to ``(r + 1) * steps - 1`` of the stream. Each
    epoch of the stream draws its shuffles from a torch RNG state seeded by ``(seed, epoch)`` instead of
    the global one, so a round that starts inside an epoch is the same batches whether it follows the
    previous round in this process or starts a resumed run. ``on_step`` is called after each step."""

    def __init__(self, inner, steps: int, seed: int, on_step=None):
        self.inner, self.steps, self.seed, self.on_step = inner, steps, seed, on_step
        self.batch_size = inner.batch_size

    def __len__(self) -> int:
        return self.steps

    def epoch(self, r: int):
        epoch, skip = divmod(r * self.steps, len(self.inner))
        left = self.steps
        while left:
            for i, batch in enumerate(self._seeded(self.inner.epoch(epoch), epoch)):
                if i < skip:
                    continue
                yield batch
                if self.on_step is not None:
                    self.on_step()
                left -= 1
                if not left:
                    return
            epoch, skip = epoch + 1, 0

    def _seeded(self, batches, epoch):
        """``batches`` advanced with the global torch RNG swapped for this epoch's own state."""
        # the CPU generator keeps 32 bits of a seed: (seed, epoch) are mixed into 32 by a SeedSequence
        mixed = int(np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(1)[0])
        state = torch.Generator().manual_seed(mixed).get_state()
        while True:
            outer = torch.get_rng_state()
            torch.set_rng_state(state)
            try:
                batch = next(batches, None)
            finally:
                state = torch.get_rng_state()
                torch.set_rng_state(outer)
            if batch is None:
                return
            yield batch


class _Progress(Callback):
    """One tqdm bar of steps per phase, its postfix the validation perplexities of the last round."""

    def __init__(self, desc: str, total: int, show: bool, labels: dict):
        self.desc, self.total, self.show, self.labels = desc, total, show, labels
        self.bar = None

    def on_fit_start(self, trainer):
        if self.show:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=trainer.global_step, desc=self.desc, unit="step",
                            file=sys.stderr)

    def step(self):
        if self.bar is not None:
            self.bar.update()

    def on_epoch_end(self, trainer, epoch, logs):
        if self.bar is not None:
            self.bar.set_postfix({label: f"{logs[k]:.1f}" for k, label in self.labels.items() if k in logs})

    def on_fit_end(self, trainer):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class RoundsTrainer(LMAdaptiveTrainer):
    """:class:`LMAdaptiveTrainer` trained for ``steps`` optimizer steps in rounds of ``round_steps``
    (:class:`Rounds`), with its own bar of steps (``show_progress``); ``train`` is ``fit`` in steps."""

    def __init__(self, model, *, steps: int, round_steps: int, desc: str, show_progress: bool, labels: dict,
                 callbacks=(), **options):
        self.progress = _Progress(desc, steps, show_progress, labels)
        # the progress callback is always there, so that a checkpoint's callback states line up
        super().__init__(model, callbacks=[*callbacks, self.progress], progress_bar=False, **options)
        self.steps, self.round_steps = steps, round_steps

    def prepare(self, *data):
        batches, val = super().prepare(*data)
        return Rounds(batches, self.round_steps, self.config.seed or 0, self.progress.step), val

    def train(self, *data, resume_from=None):
        return self.fit(*data, epochs=self.steps // self.round_steps, resume_from=resume_from)


# ---- the phases --------------------------------------------------------------------------------

def new_model(vocab_size: int, cfg: LMRunConfig) -> TinyCausalLM:
    return TinyCausalLM(vocab_size, cfg.d_model, cfg.layers, cfg.heads, cfg.seq_len)


def _trainer(model, cfg: LMRunConfig, *, name: str, steps: int, lr: float, alpha: float, labels: dict,
             memory_size=None) -> tuple[RoundsTrainer, str]:
    run_dir = os.path.join(cfg.output, "runs", slug(name))
    show = not cfg.quiet and dist.is_main() and sys.stderr.isatty()
    trainer = RoundsTrainer(model, steps=steps, round_steps=cfg.eval_every, desc=name, show_progress=show,
                            labels=labels, alpha=alpha, memory_size=memory_size, lr=lr, batch_size=cfg.batch_size,
                            seed=cfg.seed, device=cfg.device, scheduler="cosine",
                            warmup_steps=round(WARMUP * steps), max_grad_norm=1.0, weight_decay=0.01,
                            callbacks=[ModelCheckpoint(run_dir, every_n_epochs=1)])
    return trainer, run_dir


def _history(hist, cfg: LMRunConfig, rename=None) -> dict:
    """The per-round logs, keyed as the report names them, with the step each round ends at."""
    out = {"step": [(e + 1) * cfg.eval_every for e in hist.epoch]}
    for k, v in hist.history.items():
        out[rename.get(k, k) if rename else k] = v
    return out


def pretrain(corpus: lm_data.LMCorpus, names: dict, cfg: LMRunConfig) -> tuple[dict, dict]:
    """A TinyCausalLM trained on the source for ``cfg.pretrain_steps`` steps, saved as
    ``pretrained.safetensors``: (its weights, the report's row)."""
    seed_everything(cfg.seed)
    model = new_model(corpus.vocab_size, cfg)
    source = corpus.splits["source"]
    trainer, run_dir = _trainer(model, cfg, name="pretrain", steps=cfg.pretrain_steps, lr=cfg.lr, alpha=1.0,
                                labels={"val_target_ppl": f"{names['source']} ppl"})
    hist = trainer.train(source["train"], None, {"target": source["val"]}, resume_from=resume_path(cfg, run_dir))
    if dist.is_main():
        ckpt.save_weights(model, os.path.join(cfg.output, "pretrained.safetensors"))
    dist.barrier()
    x = hist.extra
    row = {"method": "pretrain", "steps": cfg.pretrain_steps, "lr": cfg.lr, "seconds": hist.seconds,
           **{f"source_{k}_{t}": x[f"target_{k}_{t}"] for k in ("loss", "ppl") for t in ("before", "after")},
           "history": _history(hist, cfg, {"val_target_loss": "val_source_loss", "val_target_ppl": "val_source_ppl"})}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, row


def method_name(alpha: float, memory_size) -> str:
    if alpha == 1.0:
        return "naive (alpha=1)"
    return f"alpha={alpha:g}+replay" + ("" if memory_size is None else str(memory_size))


def adapt(corpus: lm_data.LMCorpus, names: dict, weights: dict, alpha: float, cfg: LMRunConfig) -> dict:
    """A copy of the pretrained model trained on the target for ``cfg.steps`` steps with ``alpha`` (below
    1: with replayed source sequences); its report row, and the model saved in ``models/``."""
    seed_everything(cfg.seed)
    model = new_model(corpus.vocab_size, cfg)
    load_state(model, weights, source="the pretrained model")
    memory = cfg.memory_size if alpha < 1 else None
    name = method_name(alpha, memory)
    s, t = corpus.splits["source"], corpus.splits["target"]
    trainer, run_dir = _trainer(model, cfg, name=name, steps=cfg.steps, lr=cfg.adapt_lr, alpha=alpha,
                                memory_size=memory,
                                labels={"val_source_ppl": f"{names['source']} ppl",
                                        "val_target_ppl": f"{names['target']} ppl"})
    hist = trainer.train(t["train"], s["train"] if alpha < 1 else None, {"source": s["val"], "target": t["val"]},
                         resume_from=resume_path(cfg, run_dir))
    path = os.path.join(cfg.output, "models", f"{slug(name)}.safetensors")
    if dist.is_main():
        ckpt.save_weights(model, path)
    x = hist.extra
    return {"method": name, "alpha": alpha, "memory_size": memory, "steps": cfg.steps, "lr": cfg.adapt_lr,
            **{f"{side}_{k}_{t}": x[f"{side}_{k}_{t}"] for side in SIDES for k in ("loss", "ppl")
               for t in ("before", "after")},
            "forgetting_nats": x["forgetting_nats"], "forgetting_ppl": x["forgetting_ppl"],
            "seconds": hist.seconds, "model": path, "history": _history(hist, cfg)}


def compare(rows: list) -> None:
    """Each replay row's target perplexity relative to naive fine-tuning's (``target_ppl_vs_naive``:
    after/naive's after - 1), when a naive row is there."""
    naive = next((r for r in rows if r["alpha"] == 1.0), None)
    for r in rows:
        r["target_ppl_vs_naive"] = None if naive is None else r["target_ppl_after"] / naive["target_ppl_after"] - 1


def run(corpus: lm_data.LMCorpus, names: dict, alphas, cfg: LMRunConfig, *, command: str, data_seconds: float,
        say=print) -> dict:
    """Pretrain, adapt once per alpha; the tokenizer, the models and checkpoints in ``cfg.output``.
    Returns the report (:func:`write_report` writes it)."""
    start, load = time.perf_counter(), _load()
    os.makedirs(cfg.output, exist_ok=True)
    if dist.is_main():
        corpus.tokenizer.save(os.path.join(cfg.output, "tokenizer.json"))
    weights, pre = pretrain(corpus, names, cfg)
    say(f"pretrained on {names['source']}: {cfg.pretrain_steps} steps in {pre['seconds']:.1f} s, validation ppl "
        f"{pre['source_ppl_before']:.1f} -> {pre['source_ppl_after']:.1f}")
    rows = [adapt(corpus, names, weights, a, cfg) for a in alphas]
    compare(rows)
    model = new_model(corpus.vocab_size, cfg)
    return {"command": command, "python": sys.version, "torch": torch.__version__, "fastadapt": __version__,
            "seed": cfg.seed, "threads": torch.get_num_threads(), "load_average": {"start": load, "end": _load()},
            "data": describe(corpus, names),
            "model": {**model.config(), "parameters": sum(p.numel() for p in model.parameters())},
            "config": {k: v for k, v in vars(cfg).items() if k != "output"}, "pretrain": pre, "adapt": rows,
            "seconds": {"data": data_seconds, "pretrain": pre["seconds"], **{r["method"]: r["seconds"] for r in rows},
                        "total": data_seconds + time.perf_counter() - start}}


def _load():
    """The 1-minute load average (None where the platform has none): the times depend on it, on a shared
    machine more than on anything else."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# ---- the report --------------------------------------------------------------------------------

def _cell(ppl, nats):
    return f"{ppl:.1f} ({nats:.3f})"


def _pct(v):
    return "" if v is None else f"{100 * v:+.1f}%"


def table_rows(report: dict) -> tuple[list, list]:
    """(header, rows) of the results table: per method, perplexity (nats/token) before and after on both
    validation sets, the source's change, the target's against naive fine-tuning, seconds."""
    d = report["data"]
    src, tgt = d["source"]["name"], d["target"]["name"]
    head = ["method", f"{src} ppl before", f"{src} ppl after", "forgetting", f"{tgt} ppl before",
            f"{tgt} ppl after", "vs naive", "seconds"]
    rows = [[r["method"], _cell(r["source_ppl_before"], r["source_loss_before"]),
             _cell(r["source_ppl_after"], r["source_loss_after"]), _pct(r["forgetting_ppl"]),
             _cell(r["target_ppl_before"], r["target_loss_before"]),
             _cell(r["target_ppl_after"], r["target_loss_after"]),
             _pct(r["target_ppl_vs_naive"]) if r["alpha"] < 1 else "", f"{r['seconds']:.1f}"]
            for r in report["adapt"]]
    return head, rows


def format_table(head, rows) -> str:
    """Plain-text columns: the first left-aligned, the numbers right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), "-" * len(line(head))] + [line(r) for r in rows])


def markdown_table(head, rows) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def markdown(report: dict, table: str, notes=()) -> str:
    d, m, pre = report["data"], report["model"], report["pretrain"]
    sides = "; ".join(f"{side} **{d[side]['name']}**: {d[side]['tokens']['train']:,} training / "
                      f"{d[side]['tokens']['val']:,} held-out tokens ({d[side]['sequences']['train']} / "
                      f"{d[side]['sequences']['val']} sequences)" for side in SIDES)
    lines = [f"# `{report['command']}`", "",
             f"Python {report['python'].split()[0]} (`{report['python']}`), torch {report['torch']}, seed "
             f"{report['seed']}.", "",
             f"Data: {sides}; byte-level BPE vocabulary of {d['vocab_size']}, sequences of {d['seq_len']} tokens.",
             f"Model: TinyCausalLM, d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, "
             f"{m['parameters']:,} parameters.", "",
             f"Pretrained on {d['source']['name']} for {pre['steps']} steps ({pre['seconds']:.1f} s): validation "
             f"ppl {pre['source_ppl_before']:.1f} -> {pre['source_ppl_after']:.1f}. Then adapted to "
             f"{d['target']['name']} for {report['config']['steps']} steps per method. Cells: perplexity "
             f"(nats/token) on the held-out text; forgetting: the source perplexity's change; vs naive: the "
             f"target perplexity against naive fine-tuning's.", "", table, ""]
    lines += list(notes)
    load = report["load_average"]
    lines += [f"Seconds: {', '.join(f'{k} {v:.1f}' for k, v in report['seconds'].items())}; {report['threads']} "
              f"torch threads, 1-minute load average {load['start']} at the start, {load['end']} at the end.", ""]
    return "\n".join(lines)


def write_report(report: dict, folder: str, notes=()) -> tuple[str, str, str]:
    """report.json, report.md and perplexity.png in ``folder``; returns their paths."""
    from fastadapt.apps import plotting
    from fastadapt.apps.workflows import write_report as write_json

    head, rows = table_rows(report)
    md = os.path.join(folder, "report.md")
    if dist.is_main():
        ckpt.atomic_write_text(md, markdown(report, markdown_table(head, rows), notes))
    return write_json(folder, report), md, plotting.write_lm_plot(folder, report)
