"""The end-to-end jobs behind ``fastadapt demo|transfer|adapt``: pretrain on a source task, save and
reload it, then transfer or adapt to a target task, and report per-method accuracies."""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import sys

import numpy as np
import torch

from fastadapt.training import checkpoint as ckpt
from fastadapt.apps import readers
from fastadapt.training.adaptive import AdaptiveTrainer
from fastadapt.training.callbacks import ModelCheckpoint
from fastadapt.training.config import AdaptiveConfig
from fastadapt.training.models import MLP, Pipeline
from fastadapt.training import distributed as dist
from fastadapt.training.surgery import extend_head, load_pretrained, replace_head
from fastadapt.training.loop import seed_everything
from fastadapt.training.trainer import TransferTrainer


@dataclasses.dataclass
class RunConfig:
    output: str
    hidden: tuple = (128, 128)
    pretrain_epochs: int = 20
    epochs: int = 20
    transfer_epochs: int = 60
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    device: str | None = None
    quiet: bool = False
    resume: bool = False
    holdout: float = 0.25


@dataclasses.dataclass
class Task:
    """Standardised train/held-out tensors of the source and target tasks, labels already encoded: label
    ``classes[i]`` (the user's, an int or a class name) is class ``i``, the source's first."""
    source_train: tuple
    source_test: tuple
    target_train: tuple
    target_test: tuple
    source_classes: list
    target_classes: list
    source_samples: int  # in the --source the user gave, before the held-out split
    classes: list
    scale: readers.Standardizer  # fitted on the source training split; the saved models apply it


def prepare(source_spec: str, target_spec: str, cfg: RunConfig, label_column="label") -> Task:
    """Loads both datasets, splits each, standardises with statistics of the source training split.

    Source classes become 0..S-1; target classes not in the source take the next indices (class-
    incremental), so one head of S+T' outputs serves both tasks."""
    Xs, ys = readers.load_dataset(source_spec, arg="--source", label_column=label_column)
    Xt, yt = readers.load_dataset(target_spec, arg="--target", label_column=label_column)
    if Xs.shape[1] != Xt.shape[1]:
        raise ValueError(f"--source {source_spec!r} has {Xs.shape[1]} features but --target "
                         f"{target_spec!r} has {Xt.shape[1]}")
    ys, yt = same_label_type(ys, yt)
    s_classes, t_classes = np.unique(ys).tolist(), np.unique(yt).tolist()
    code = {c: i for i, c in enumerate(s_classes)}
    for c in t_classes:
        code.setdefault(c, len(code))
    parts = []
    for name, X, y in (("--source", Xs, ys), ("--target", Xt, yt)):
        labels, counts = np.unique(y, return_counts=True)
        if len(y) < 4 or counts.min() < 2:
            raise ValueError(f"{name} needs at least 2 samples of every class to split off a held-out set "
                             f"(class counts: {dict(zip(labels.tolist(), counts.tolist()))})")
        parts.append(readers.split(X, encode(y, code), cfg.holdout, cfg.seed))
    (s_tr, s_te), (t_tr, t_te) = parts
    scale = readers.Standardizer(s_tr[0])

    def tensors(pair):
        return torch.from_numpy(scale(pair[0])), torch.from_numpy(pair[1].astype(np.int64))

    return Task(tensors(s_tr), tensors(s_te), tensors(t_tr), tensors(t_te), s_classes, t_classes, len(ys),
                list(code), scale)


def same_label_type(*labels):
    """The label arrays with one type: all as text when any of them names its classes (``3`` and
    ``"3"`` are then one class), else as they are."""
    if any(y.dtype.kind == "U" for y in labels):
        return tuple(y.astype(str) for y in labels)
    return labels


def encode(y, code: dict) -> np.ndarray:
    """The class index ``code[label]`` of every label in ``y``."""
    return np.fromiter((code[v] for v in y.tolist()), dtype=np.int64, count=len(y))


def permuted_task(spec: str, cfg: RunConfig, permutation_seed: int = 0) -> Task:
    """Domain-incremental: the same classes and images on both sides, the target's pixels (features)
    shuffled by one fixed permutation (seeded by ``permutation_seed``, not by the run's seed). The
    permutation follows the standardisation, so the saved models standardise raw images in the
    source's pixel order."""
    task = prepare(spec, spec, cfg)
    perm = torch.from_numpy(np.random.default_rng(permutation_seed).permutation(task.source_train[0].shape[1]))
    (Xtr, ytr), (Xte, yte) = task.source_train, task.source_test
    return dataclasses.replace(task, target_train=(Xtr[:, perm], ytr.clone()), target_test=(Xte[:, perm], yte.clone()))


# The replay memory `fastadapt adapt` keeps when --memory-size is not given.
DEFAULT_MEMORY = 100


def replay_memory_size(requested: int | None, task: Task, source_spec: str) -> int | None:
    """The replay memory for ``--memory-size``: 0 keeps all the source data (None); without the flag,
    DEFAULT_MEMORY samples, or every source training sample when there are fewer (said in one line);
    an explicit size larger than the training samples is an error naming what the user gave."""
    available, given = len(task.source_train[1]), task.source_samples
    held_out = f"{given} samples, {given - available} of them held out for evaluation"
    if requested == 0:
        return None
    if requested is None:
        if available >= DEFAULT_MEMORY:
            return DEFAULT_MEMORY
        if dist.is_main():
            print(f"fastadapt adapt: --source {source_spec!r} has {available} training samples ({held_out}): "
                  f"the replay memory keeps all of them (default --memory-size {DEFAULT_MEMORY})", file=sys.stderr)
        return available
    if requested > available:
        raise ValueError(f"--memory-size {requested} is more than the {available} training samples of --source "
                         f"{source_spec!r} ({held_out}); pass at most {available}, or 0 for all of them")
    return requested


def _trainer_kwargs(cfg: RunConfig, run_dir: str):
    # each save fsyncs twice; every 5 epochs keeps resume useful without dominating these short runs
    cbs = [ModelCheckpoint(run_dir, every_n_epochs=5)]
    return dict(lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed, device=cfg.device,
                progress_bar=False if cfg.quiet else None, callbacks=cbs)


def resume_path(cfg, run_dir):
    last = os.path.join(run_dir, "last")
    return last if cfg.resume and os.path.isfile(os.path.join(last, ckpt.STATE)) else None


def pretrain(task: Task, cfg: RunConfig) -> tuple[str, dict]:
    """Trains an MLP on the source task; saves it as ``pretrained.safetensors`` (a :class:`Pipeline`
    with the standardisation and the source's labels). Returns its path and a report row."""
    path = os.path.join(cfg.output, "pretrained.safetensors")
    if cfg.resume and os.path.isfile(path):
        return path, {"method": "pretrain", "resumed": True}
    seed_everything(cfg.seed)
    model = MLP(task.source_train[0].shape[1], cfg.hidden, len(task.source_classes))
    run_dir = os.path.join(cfg.output, "runs", "pretrain")
    trainer = TransferTrainer(model, **_trainer_kwargs(cfg, run_dir))
    hist = trainer.fit(task.source_train, task.source_test, epochs=cfg.pretrain_epochs,
                       resume_from=resume_path(cfg, run_dir))
    save_model(model, task.source_classes, task, path)
    dist.barrier()  # the other ranks read it next
    return path, {"method": "pretrain", "source_acc": hist.target_acc, "seconds": hist.seconds,
                  "history": hist.history}


def transfer(task: Task, pretrained: str, method: str, cfg: RunConfig, shots: int | None = None) -> dict:
    """``frozen`` (new head on the frozen backbone), ``finetune`` (new head, everything trains) or
    ``scratch`` (a fresh MLP on the target alone). The target head has one output per target class.

    Source accuracy after transfer is measured with the original source head put back on the
    transferred backbone; the scratch model has no source head."""
    if method not in ("frozen", "finetune", "scratch"):
        raise ValueError(f"transfer method must be frozen, finetune or scratch, got {method!r}")
    remap = _contiguous(task.target_classes, task.source_classes)
    Xt, yt = task.target_train
    if shots is not None:
        Xn, yn = readers.few_shot(Xt.numpy(), yt.numpy(), shots, cfg.seed)
        Xt, yt = torch.from_numpy(Xn), torch.from_numpy(yn)
    train, test = (Xt, remap[yt]), (task.target_test[0], remap[task.target_test[1]])
    seed_everything(cfg.seed)
    source_model = load_pretrained(pretrained).model  # the tensors are standardised already
    if method == "scratch":
        model = MLP(Xt.shape[1], cfg.hidden, len(task.target_classes))
    else:
        model = replace_head(copy.deepcopy(source_model), len(task.target_classes))
    run_dir = os.path.join(cfg.output, "runs", method)
    trainer = TransferTrainer(model, freeze_backbone=method == "frozen", **_trainer_kwargs(cfg, run_dir))
    hist = trainer.fit(train, test, epochs=cfg.transfer_epochs, resume_from=resume_path(cfg, run_dir))
    row = {"method": method, "target_acc": hist.target_acc, "seconds": hist.seconds,
           "train_samples": len(yt), "history": hist.history,
           "model": save_model(model, task.target_classes, task, _model_path(cfg, method))}
    if method != "scratch":
        probe = copy.deepcopy(model)
        probe.head = source_model.head
        before = TransferTrainer(source_model, device=cfg.device, progress_bar=False).evaluate(task.source_test)["acc"]
        after = TransferTrainer(probe, device=cfg.device, progress_bar=False).evaluate(task.source_test)["acc"]
        row.update(source_acc_before=before, source_acc_after=after, forgetting=100.0 * (before - after))
    return row


def _contiguous(target_classes, source_classes) -> torch.Tensor:
    """Encoded label -> 0..T-1 for a target-only head."""
    n = len(source_classes) + len([c for c in target_classes if c not in source_classes])
    lut = torch.full((n,), -1, dtype=torch.long)
    codes = {c: i for i, c in enumerate(source_classes)}
    for c in target_classes:
        codes.setdefault(c, len(codes))
    for i, c in enumerate(target_classes):
        lut[codes[c]] = i
    return lut


def adapt(task: Task, pretrained: str, alpha: float, memory_size: int | None, cfg: RunConfig,
          name: str | None = None, strategy: str = "replay", temperature: float | None = None) -> dict:
    """Adaptation to the target task: the source head is extended to the target's new classes (class-
    incremental; none when the target has the source's classes), then trained with the alpha-weighted
    loss whose source term is ``strategy``'s (replayed source batches and/or distillation from the
    pretrained model)."""
    replays = strategy != "lwf"
    temperature = AdaptiveConfig.temperature if temperature is None else temperature
    if name is None:
        name = f"alpha={alpha:g}" if strategy == "replay" else f"{strategy} T={temperature:g} alpha={alpha:g}"
        if replays and memory_size and alpha < 1:
            name += f"+replay{memory_size}"
    seed_everything(cfg.seed)
    model = load_pretrained(pretrained).model  # the tensors are standardised already
    new = len([c for c in task.target_classes if c not in task.source_classes])
    if new:
        extend_head(model, new)
    run_dir = os.path.join(cfg.output, "runs", slug(name))
    trainer = AdaptiveTrainer(model, alpha=alpha, strategy=strategy, temperature=temperature,
                              memory_size=memory_size if replays else None, **_trainer_kwargs(cfg, run_dir))
    hist = trainer.fit(task.target_train, task.source_train if replays else None,
                       {"source": task.source_test, "target": task.target_test}, epochs=cfg.epochs,
                       resume_from=resume_path(cfg, run_dir))
    return {"method": name, "alpha": alpha, "strategy": strategy, "memory_size": memory_size if replays else None,
            "temperature": temperature if strategy != "replay" else None,
            "source_acc_before": hist.source_acc_before, "source_acc_after": hist.source_acc_after,
            "forgetting": hist.forgetting, "bwt": hist.bwt, "target_acc": hist.target_acc,
            "seconds": hist.seconds, "history": hist.history,
            "model": save_model(model, task.classes, task, _model_path(cfg, name))}


def _model_path(cfg: RunConfig, name: str) -> str:
    return os.path.join(cfg.output, "models", f"{slug(name)}.safetensors")


def save_model(model: MLP, classes: list, task: Task, path: str) -> str:
    """Saves ``model`` as a :class:`Pipeline` that takes raw features (``task``'s standardisation) and
    names output ``i`` ``classes[i]``; returns ``path``. Only rank 0 writes."""
    if dist.is_main():
        ckpt.save_weights(Pipeline(model, task.scale.mean, task.scale.std, classes), path)
    return path


def load_model(path: str) -> Pipeline:
    """The model ``fastadapt predict --model`` names: a Pipeline saved by pretrain, transfer or adapt."""
    try:
        model = load_pretrained(path)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"--model: {exc}") from None
    if not isinstance(model, Pipeline):
        raise ValueError(f"--model {path!r} holds a model without its preprocessing and label names; predict "
                         f"takes the models that fastadapt transfer and adapt save (pretrained.safetensors and "
                         f"models/*.safetensors in their --output)")
    return model


def prediction_data(spec: str, model: Pipeline, label_column: str = "label"):
    """(raw features, labels or None) of ``--data``, its feature count checked against ``model``."""
    X, y = readers.load_dataset(spec, arg="--data", label_column=label_column, labels_required=False)
    expected = model.model.in_features
    if X.shape[1] != expected:
        hint = "" if y is not None else f"; without a label column {label_column!r} every column is a feature"
        raise ValueError(f"--data {spec!r} has {X.shape[1]} features but the model takes {expected}{hint}")
    return X, y


def predict(model: Pipeline, X: np.ndarray, y: np.ndarray | None = None) -> tuple[list, float | None]:
    """The predicted label of every row of raw features ``X``, and the accuracy against ``y`` when given."""
    labels = model.predict(torch.from_numpy(X))
    if y is None:
        return labels, None
    truth, guess = same_label_type(y, np.asarray(labels))
    return labels, float(np.mean(truth == guess))


def write_predictions(path: str, labels: list) -> None:
    """A .csv with one ``prediction`` per input row, in order."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prediction"])
            w.writerows([label] for label in labels)

    ckpt.atomic_write(path, write)


def slug(name):
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def format_table(rows) -> str:
    def pct(v):
        return "     —" if v is None else f"{100 * v:6.1f}"

    w = max([22] + [len(r["method"]) for r in rows])
    head = f"{'method':<{w}} {'src before':>10} {'src after':>10} {'forgetting':>10} {'target acc':>10} {'seconds':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        f = r.get("forgetting")
        lines.append(f"{r['method']:<{w}} {pct(r.get('source_acc_before')):>10} {pct(r.get('source_acc_after')):>10} "
                     f"{'—' if f is None else f'{f:.1f}':>10} {pct(r.get('target_acc')):>10} {r.get('seconds', 0):8.2f}")
    return "\n".join(lines)


def write_report(folder, report: dict) -> str:
    path = os.path.join(folder, "report.json")
    if dist.is_main():
        ckpt.atomic_write_text(path, json.dumps(report, indent=2, default=float))
    return path
