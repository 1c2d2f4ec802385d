"""fastadapt against Avalanche (avalanche-lib 0.6.0) on the demo's two digits scenarios.

Not part of `make test` (Avalanche is not a dependency): ``pip install avalanche-lib`` first, then

    python benchmarks/compare_avalanche.py --seeds 0,1,2,3,4 --json benchmarks/avalanche.json

Both libraries see the same data (the splits and standardisation of ``fastadapt demo``, built by
fastadapt.apps.workflows for each seed), the same model (MLP 64-128-128-10: Linear+ReLU), optimizer
(Adam, lr 1e-3, no weight decay), batch size (32), epochs (20 on the source, then 20 on the target) and
seeds, on one CPU thread. Avalanche trains the source experience itself (its replay memory and LwF
teacher come from that experience); fastadapt pretrains, then adapts. Avalanche's
``LwF(alpha=a, temperature=T)`` minimises ``CE + a * KL_T`` and fastadapt's ``alpha * CE + (1 - alpha)
* T^2 * KL_T``: the same loss up to scale for ``alpha = T^2 / (T^2 + a)`` (0.8 for a=1, T=2).
Avalanche's Replay concatenates memory samples into each minibatch, like fastadapt's alpha=0.5 replay.

Time per epoch is the adaptation phase's wall time divided by its epochs: for Avalanche the target
experience's ``train`` call (it evaluates nothing during training), for fastadapt ``fit`` as
``fastadapt adapt`` runs it minus the checkpoint callback (Avalanche writes no checkpoint); ``fit``
still evaluates the source and target held-out sets after every epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

from fastadapt import AdaptiveTrainer, extend_head, load_pretrained
from fastadapt.apps import demo, workflows
from fastadapt.training.loop import seed_everything

EPOCHS, BATCH, LR = 20, 32, 1e-3


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _task(scenario, seed, folder):
    cfg = workflows.RunConfig(output=folder, seed=seed, quiet=True, device="cpu", epochs=EPOCHS,
                              pretrain_epochs=EPOCHS, batch_size=BATCH, lr=LR)
    if scenario == "class-incremental":
        return workflows.prepare(demo.SOURCE, demo.TARGET, cfg), cfg
    return workflows.permuted_task("digits", cfg), cfg


def avalanche_runs(task, seed):
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import EWC, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    bench = tensors_benchmark(train_tensors=[task.source_train, task.target_train],
                              test_tensors=[task.source_test, task.target_test], task_labels=[0, 0])
    strategies = {"naive": (Naive, {}), "replay (mem 100)": (Replay, {"mem_size": 100}),
                  "lwf (alpha=1, T=2)": (LwF, {"alpha": 1.0, "temperature": 2.0}),
                  "ewc (lambda=100)": (EWC, {"ewc_lambda": 100.0})}
    rows = {}
    for name, (cls, kw) in strategies.items():
        model = _mlp(seed)
        evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
        strategy = cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=LR),
                       criterion=nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=EPOCHS,
                       eval_mb_size=4096, device="cpu", evaluator=evaluator, **kw)
        source_exp, target_exp = bench.train_stream
        strategy.train(source_exp)
        before = _accuracy(model, task.source_test)
        start = time.perf_counter()
        strategy.train(target_exp)
        seconds = time.perf_counter() - start
        after, target = _accuracy(model, task.source_test), _accuracy(model, task.target_test)
        rows[name] = {"forgetting": 100 * (before - after), "target_acc": 100 * target,
                      "seconds_per_epoch": seconds / EPOCHS}
    return rows


@torch.no_grad()
def _accuracy(model, data):
    model.eval()
    X, y = data
    return (model(X).argmax(-1) == y).float().mean().item()


def fastadapt_runs(task, path, seed, scenario):
    """What ``workflows.adapt`` does, without its checkpoint callback (Avalanche writes none)."""
    alphas = demo.SCENARIOS[scenario]["alphas"]
    runs = {"naive": dict(alpha=1.0),
            "replay (mem 100, alpha=0.5)": dict(alpha=0.5, memory_size=100),
            f"replay (mem 100, alpha={alphas['replay']:g})": dict(alpha=alphas["replay"], memory_size=100),
            "lwf (alpha=0.8, T=2)": dict(alpha=0.8, strategy="lwf", temperature=2.0),
            f"replay+lwf (mem 100, alpha={alphas['replay+lwf']:g}, T=2)":
                dict(alpha=alphas["replay+lwf"], memory_size=100, strategy="replay+lwf", temperature=2.0)}
    new_classes = len(set(task.target_classes) - set(task.source_classes))
    rows = {}
    for name, options in runs.items():
        seed_everything(seed)
        model = load_pretrained(path)
        if new_classes:
            extend_head(model, new_classes)
        trainer = AdaptiveTrainer(model, lr=LR, batch_size=BATCH, seed=seed, device="cpu", progress_bar=False,
                                  **options)
        source = task.source_train if trainer.config.replays else None
        hist = trainer.fit(task.target_train, source, {"source": task.source_test, "target": task.target_test},
                           epochs=EPOCHS)
        rows[name] = {"forgetting": hist.forgetting, "target_acc": 100 * hist.target_acc,
                      "seconds_per_epoch": hist.seconds / EPOCHS}
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--scenarios", default="class-incremental,domain-incremental")
    parser.add_argument("--json", default=None, help="write the per-seed results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scenario in args.scenarios.split(","):
            for seed in seeds:
                task, cfg = _task(scenario, seed, os.path.join(tmp, scenario, str(seed)))
                path, _ = workflows.pretrain(task, cfg)
                for lib, rows in (("fastadapt", fastadapt_runs(task, path, seed, scenario)),
                                  ("avalanche", avalanche_runs(task, seed))):
                    for name, row in rows.items():
                        results.setdefault(scenario, {}).setdefault(f"{lib}: {name}", []).append(row)
    print(f"| scenario | library: strategy | forgetting (points) | target accuracy (%) | s / epoch |")
    print("|---|---|---|---|---|")
    for scenario, methods in results.items():
        for method, rows in methods.items():
            cells = [_mean_std([r[k] for r in rows]) for k in ("forgetting", "target_acc")]
            spe = statistics.median(r["seconds_per_epoch"] for r in rows)
            print(f"| {scenario} | {method} | {cells[0]} | {cells[1]} | {spe:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seeds": seeds, "results": results}, f, indent=1)


def _mean_std(values):
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


if __name__ == "__main__":
    main()
