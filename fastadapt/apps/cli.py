"""Command-line interface: ``python -m fastadapt <command>`` (also the ``fastadapt`` console script).

  demo      digits, class- and domain-incremental: transfer and adapt, print tables, write reports + plots
  demo-lm   a small language model pretrained on English prose, adapted to Python code (text shipped with
            Python): naive fine-tuning vs alpha=0.5 with replay, perplexity table and plot
  transfer  the transfer workflow on your data (frozen / finetune / scratch)
  adapt     the adaptive workflow on your data (alpha-weighted loss; replay memory or distillation)
  adapt-lm  demo-lm on your own text files: pretrain on --source, adapt to --target
  predict   labels (and accuracy) of a model saved by transfer or adapt on raw data
  info      build information
  bench     quick benchmark of the fused kernels against eager PyTorch
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fastadapt._version import __version__


def _cmd_info(args) -> int:
    import fastadapt

    print(json.dumps(fastadapt.build_info(), indent=2))
    return 0


def _cmd_bench(args) -> int:
    from fastadapt.apps.bench import run

    run(device=args.device, min_run_time=args.min_run_time)
    return 0


def _set_threads(args, default=None):
    import torch

    n = args.threads if args.threads is not None else default
    if n is not None:
        torch.set_num_threads(n)


def _cmd_demo(args) -> int:
    from fastadapt.apps import demo, runs

    _check_run(args)
    # These MLPs are too small for intra-op threads to pay for their synchronisation.
    _set_threads(args, default=1)
    scenarios = tuple(demo.SCENARIOS) if args.scenario == "all" else (args.scenario,)
    runs.start(args)
    if args.seeds:
        demo.run_seeds(args.output, args.seeds, quiet=args.quiet, device=args.device, resume=args.resume,
                       scenarios=scenarios)
    else:
        demo.run(args.output, seed=args.seed, quiet=args.quiet, device=args.device, resume=args.resume,
                 scenarios=scenarios)
    runs.finish(args)
    return 0


def _lm_config(args):
    """The LM commands' configuration, its flags checked against each other (before any work)."""
    from fastadapt.apps.lm_workflows import LMRunConfig

    cfg = LMRunConfig(output=args.output, vocab_size=args.vocab_size, seq_len=args.seq_len, d_model=args.d_model,
                      layers=args.layers, heads=args.heads, batch_size=args.batch_size, lr=args.lr,
                      adapt_lr=args.adapt_lr, pretrain_steps=args.pretrain_steps, steps=args.steps,
                      eval_every=args.eval_every, memory_size=args.memory_size or None, seed=args.seed,
                      device=args.device, quiet=args.quiet, resume=args.resume)
    cfg.check()
    return cfg


def _cmd_demo_lm(args) -> int:
    from fastadapt.apps import demo_lm, runs

    cfg = _lm_config(args)
    _check_run(args)
    _set_threads(args)
    data, seconds = demo_lm.corpus(cfg)
    from fastadapt.apps.lm_workflows import check_memory

    check_memory(cfg, data, "the prose")
    runs.start(args)
    command = " ".join(["fastadapt", args.command] + args.argv)
    say = (lambda *a: None) if args.quiet else print
    if args.seeds:
        demo_lm.run_seeds(data, seconds, cfg, args.seeds, command=command, say=say)
    else:
        demo_lm.run(data, seconds, cfg, command=command, say=say)
    runs.finish(args)
    return 0


def _cmd_adapt_lm(args) -> int:
    import time

    from fastadapt.apps import lm_data, lm_workflows, runs, text_files

    twice = sorted({a for a in args.alpha if args.alpha.count(a) > 1})
    if twice:
        raise ValueError(f"--alpha names {', '.join(f'{a:g}' for a in twice)} more than once")
    cfg = _lm_config(args)
    _check_run(args)
    _set_threads(args)
    start = time.perf_counter()
    paths = {"source": args.source, "target": args.target}
    read = {side: text_files.read_documents(paths[side], f"--{side}", args.glob) for side in paths}
    data = lm_data.corpus_from_documents({side: docs for side, (docs, _) in read.items()}, cfg.seq_len,
                                         cfg.vocab_size)
    for side in paths:
        lm_workflows.check_text(data, side, f"--{side}", _paths(paths[side]))
    lm_workflows.check_memory(cfg, data)
    seconds = time.perf_counter() - start
    runs.start(args)
    say = (lambda *a: None) if args.quiet else print
    report = lm_workflows.run(data, {"source": "source", "target": "target"}, args.alpha, cfg,
                              command=" ".join(["fastadapt", args.command] + args.argv), data_seconds=seconds, say=say)
    for side in paths:
        report["data"][side].update(paths=paths[side], glob=args.glob, **read[side][1])
    say(lm_workflows.format_table(*lm_workflows.table_rows(report)))
    rp, md, pp = lm_workflows.write_report(report, cfg.output)
    runs.finish(args)
    say(f"report: {rp} ({os.path.basename(md)})\nplot:   {pp}\nmodels: {os.path.join(cfg.output, 'models')} "
        f"(tokenizer: {os.path.join(cfg.output, 'tokenizer.json')})\ncheckpoints: {os.path.join(cfg.output, 'runs')}")
    return 0


def _paths(paths) -> str:
    return repr(paths[0]) if len(paths) == 1 else repr(list(paths))


def _check_run(args):
    """The checks of a training command that need no data: --device, --output, and --resume against
    run.json."""
    from fastadapt.apps import runs
    from fastadapt.training.config import resolve_device

    resolve_device(args.device)
    runs.check_output_folder(args.output)
    runs.check_resume(args)


def _config(args):
    from fastadapt.apps.workflows import RunConfig

    return RunConfig(output=args.output, hidden=tuple(args.hidden), pretrain_epochs=args.pretrain_epochs or args.epochs,
                     epochs=args.epochs, transfer_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     seed=args.seed, device=args.device, quiet=args.quiet, resume=args.resume)


def _cmd_transfer(args) -> int:
    from fastadapt.apps import runs, workflows

    _check_run(args)
    _set_threads(args)
    cfg = _config(args)
    task = workflows.prepare(args.source, args.target, cfg, label_column=args.label_column)
    runs.start(args)
    path, pre = workflows.pretrain(task, cfg)
    rows = [workflows.transfer(task, path, m, cfg, shots=args.shots) for m in args.methods]
    _finish(args, cfg, {"pretrain": pre, "transfer": rows, "classes": _classes(task)}, rows)
    return 0


def _cmd_adapt(args) -> int:
    from fastadapt.apps import runs, workflows

    if args.strategy == "lwf" and args.memory_size is not None:
        raise ValueError(f"--memory-size {args.memory_size} but --strategy lwf stores no source samples; use "
                         f"--strategy replay+lwf to replay a memory as well")
    if args.temperature is not None and args.strategy == "replay":
        raise ValueError(f"--temperature {args.temperature:g} applies to distillation: pass --strategy lwf or "
                         f"replay+lwf")
    _check_run(args)
    _set_threads(args)
    cfg = _config(args)
    task = workflows.prepare(args.source, args.target, cfg, label_column=args.label_column)
    # checked before any training
    memory = None if args.strategy == "lwf" else workflows.replay_memory_size(args.memory_size, task, args.source)
    runs.start(args)
    path, pre = workflows.pretrain(task, cfg)
    rows = [workflows.adapt(task, path, a, memory, cfg, strategy=args.strategy,
                            temperature=args.temperature) for a in args.alpha]
    if args.joint:
        rows.append(workflows.adapt(task, path, 0.5, None, cfg, name="joint (all source)"))
    _finish(args, cfg, {"pretrain": pre, "adapt": rows, "classes": _classes(task)}, rows)
    return 0


def workflows_default_memory() -> int:
    from fastadapt.apps.workflows import DEFAULT_MEMORY

    return DEFAULT_MEMORY


def _default_temperature() -> float:
    from fastadapt.training.config import AdaptiveConfig

    return AdaptiveConfig.temperature


def _classes(task):
    return {"source": task.source_classes, "target": task.target_classes}


def _cmd_predict(args) -> int:
    from fastadapt.apps import runs, workflows

    if args.output is not None:
        runs.check_output_file(args.output)
    model = workflows.load_model(args.model)
    X, y = workflows.prediction_data(args.data, model, args.label_column)
    labels, accuracy = workflows.predict(model, X, y)
    if args.output is None:
        print("\n".join(map(str, labels)))
    else:
        workflows.write_predictions(args.output, labels)
        print(f"predictions: {args.output} ({len(labels)} rows)", file=sys.stderr)
    if accuracy is not None:
        # on stderr, so that stdout holds the labels alone
        print(f"accuracy: {100 * accuracy:.2f}% ({round(accuracy * len(labels))} of {len(labels)} rows of --data "
              f"{args.data!r})", file=sys.stderr)
    return 0


def _finish(args, cfg, report, rows):
    from fastadapt.apps import runs, workflows

    report = {"command": " ".join(["fastadapt", args.command] + args.argv), **report,
              "config": {k: v for k, v in vars(cfg).items() if k != "output"}}
    if not args.quiet:
        print(workflows.format_table(rows))
    rp = workflows.write_report(cfg.output, report)
    from fastadapt.apps import plotting

    pp = plotting.write_plot(cfg.output, rows)
    runs.finish(args)
    if not args.quiet:
        print(f"report: {rp}\nplot:   {pp}\nmodels: {os.path.join(cfg.output, 'models')} (fastadapt predict "
              f"--model ...)\ncheckpoints: {os.path.join(cfg.output, 'runs')}")


# ---- argument parsing (each type names the flag and the bad value) --------------------------------

def _bounded(convert, ok, what):
    """An argparse type: `convert`, then `ok`; either failing names the expectation and the text."""
    def parse(text):
        try:
            v = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _bounded(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _bounded(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _bounded(float, lambda v: 0 < v < float("inf"), "a positive number")


def _alphas(text):
    out = []
    for part in text.split(","):
        try:
            a = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"alpha must be a number in [0, 1], got {part!r}") from None
        if not 0.0 <= a <= 1.0:
            raise argparse.ArgumentTypeError(f"alpha must lie in [0, 1], got {part!r}")
        out.append(a)
    return out


def _int_list(text):
    try:
        vals = [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return vals


def _seed_list(text):
    try:
        return [int(p) for p in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None


def _methods(text):
    vals = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in vals if m not in ("frozen", "finetune", "scratch")]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"methods must be from frozen,finetune,scratch; got {text!r}")
    return vals


def _default_glob() -> str:
    from fastadapt.apps.text_files import DEFAULT_GLOB

    return DEFAULT_GLOB


def _glob(text):
    from fastadapt.apps.text_files import patterns

    try:
        patterns(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated file name patterns such as '*.txt,*.md', "
                                         f"got {text!r}") from None
    return text


def _lm_options(p):
    """The language-model commands' model and training options; defaults from LMRunConfig."""
    from fastadapt.apps.lm_workflows import LMRunConfig as D

    p.add_argument("--vocab-size", type=_positive_int, default=D.vocab_size,
                   help="byte-level BPE vocabulary, trained on the training text of both domains")
    p.add_argument("--seq-len", type=_bounded(int, lambda v: v >= 2, "an integer >= 2"), default=D.seq_len,
                   help="tokens per training sequence")
    p.add_argument("--d-model", type=_positive_int, default=D.d_model, help="transformer width")
    p.add_argument("--layers", type=_positive_int, default=D.layers, help="transformer blocks")
    p.add_argument("--heads", type=_positive_int, default=D.heads, help="attention heads (dividing --d-model)")
    p.add_argument("--batch-size", type=_positive_int, default=D.batch_size,
                   help="sequences per step (with replay, as many source sequences again)")
    p.add_argument("--lr", type=_positive_float, default=D.lr, help="peak learning rate of pretraining (AdamW)")
    p.add_argument("--adapt-lr", type=_positive_float, default=D.adapt_lr, help="peak learning rate of adaptation")
    p.add_argument("--pretrain-steps", type=_positive_int, default=D.pretrain_steps,
                   help="optimizer steps of pretraining on the source")
    p.add_argument("--steps", type=_positive_int, default=D.steps, help="optimizer steps of each adaptation")
    p.add_argument("--eval-every", type=_positive_int, default=D.eval_every,
                   help="steps between evaluations of the validation sets (and checkpoints); --steps and "
                        "--pretrain-steps must be multiples of it")
    p.add_argument("--memory-size", type=_non_negative_int, default=None,
                   help="replay memory: this many source training sequences; 0 = all (default: all)")


def _common(p, output, epochs):
    p.add_argument("--output", "-o", default=output, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, the initialisation and the batches")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its checkpoints, with the arguments it was started with")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, no table")
    if epochs is not None:
        p.add_argument("--source", required=True, help="file.npz (X, y), file.csv (label column) or digits:0-4")
        p.add_argument("--target", required=True, help="as --source")
        p.add_argument("--label-column", default="label", help="label column of .csv files")
        p.add_argument("--epochs", type=_positive_int, default=epochs,
                       help="epochs of each transfer or adaptation run")
        p.add_argument("--pretrain-epochs", type=_positive_int, default=None,
                       help="epochs of pretraining (default: --epochs)")
        p.add_argument("--batch-size", type=_positive_int, default=32, help="samples per step")
        p.add_argument("--lr", type=_positive_float, default=1e-3, help="learning rate (AdamW)")
        # a string default goes through `type`, as a typed value would, and --help shows it as typed
        p.add_argument("--hidden", type=_int_list, default="128,128", help="hidden sizes")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help says it already (in words, where the
    default depends on other arguments) or the option is a flag."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default in (None, False, argparse.SUPPRESS)
                or "default" in text):
            return text
        return f"{text} (default: %(default)s)".lstrip()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapt", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastadapt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, **kw):
        return sub.add_parser(name, formatter_class=_HelpFormatter, **kw)

    command("info", help="print what was built and whether it loaded").set_defaults(fn=_cmd_info)

    p = command("bench", help="quick kernel benchmark against eager PyTorch (< 1 min)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--min-run-time", type=_positive_float, default=0.3, help="seconds per measurement")
    p.set_defaults(fn=_cmd_bench)

    p = command("demo", help="digits, class- and domain-incremental: transfer and adaptation, honest tables")
    _common(p, os.path.join("fastadapt_out", "demo"), None)
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="run once per seed (e.g. 0,1,2,3,4) and print mean ± std (default: --seed alone)")
    p.add_argument("--scenario", choices=("all", "class-incremental", "domain-incremental"), default="all",
                   help="class-incremental: digits 0-4 -> 5-9; domain-incremental: digits -> the same digits "
                        "with permuted pixels; all: both")
    p.set_defaults(fn=_cmd_demo)

    p = command("demo-lm", help="a small language model: prose -> Python code, naive fine-tuning vs replay "
                                "(text shipped with Python; about 2 minutes on 2 cores)")
    _common(p, os.path.join("fastadapt_out", "demo-lm"), None)
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="run once per seed (e.g. 0,1,2) and print mean ± std (default: --seed alone)")
    _lm_options(p)
    p.set_defaults(fn=_cmd_demo_lm)

    p = command("adapt-lm", help="pretrain a small language model on --source text, adapt it to --target text")
    _common(p, os.path.join("fastadapt_out", "adapt-lm"), None)
    p.add_argument("--source", nargs="+", required=True, metavar="PATH",
                   help="text files and folders (searched recursively for --glob) of the pretraining domain, "
                        "read as UTF-8")
    p.add_argument("--target", nargs="+", required=True, metavar="PATH", help="as --source, the new domain")
    p.add_argument("--glob", type=_glob, default=_default_glob(),
                   help="comma-separated file name patterns that folders are searched for; files named "
                        "directly are read whatever their name")
    p.add_argument("--alpha", type=_alphas, default="1,0.5",
                   help="one adaptation per alpha: 1 = naive fine-tuning, below 1 with replayed source sequences")
    _lm_options(p)
    p.set_defaults(fn=_cmd_adapt_lm)

    p = command("transfer", help="pretrain on --source, transfer to --target")
    _common(p, os.path.join("fastadapt_out", "transfer"), 30)
    p.add_argument("--methods", type=_methods, default="frozen,finetune,scratch",
                   help="one or more of frozen, finetune, scratch")
    p.add_argument("--shots", type=_positive_int, default=None, help="labels per target class (default: all)")
    p.set_defaults(fn=_cmd_transfer)

    p = command("adapt", help="pretrain on --source, adapt to --target while keeping the source task")
    _common(p, os.path.join("fastadapt_out", "adapt"), 20)
    p.add_argument("--alpha", type=_alphas, default="0.5", help="one or more, e.g. 1,0.75,0.5")
    p.add_argument("--memory-size", type=_non_negative_int, default=None,
                   help=f"replay memory of class-balanced source samples; 0 = all source data (default: "
                        f"{workflows_default_memory()}, or every source training sample when there are fewer)")
    p.add_argument("--strategy", choices=("replay", "lwf", "replay+lwf"), default="replay",
                   help="the source term: replayed source samples (replay), distillation from the pretrained "
                        "model on the target inputs, storing no source sample (lwf), or both")
    p.add_argument("--temperature", type=_positive_float, default=None,
                   help=f"distillation temperature for lwf and replay+lwf (default: {_default_temperature():g})")
    p.add_argument("--joint", action="store_true", help="also train jointly on all source data (upper bound)")
    p.set_defaults(fn=_cmd_adapt)

    p = command("predict", help="labels of raw data from a model saved by transfer or adapt, and the accuracy")
    p.add_argument("--model", required=True,
                   help="a .safetensors saved by transfer or adapt: <output>/models/*.safetensors or "
                        "<output>/pretrained.safetensors")
    p.add_argument("--data", required=True, help="file.csv (features, and the label column if known), file.npz "
                                                 "(X, and y if known) or a bundled data set such as iris:0-1")
    p.add_argument("--label-column", default="label",
                   help="label column of a .csv; when present, the accuracy is printed")
    p.add_argument("--output", "-o", default=None,
                   help="write the predictions to this .csv (one 'prediction' column) instead of stdout")
    p.set_defaults(fn=_cmd_predict)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    try:
        return _run(args) if args.command in _TRAINING else args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        # Bad input is reported as one line naming the argument; a traceback would bury it.
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"fastadapt {args.command}: error: {msg}", file=sys.stderr)
        return 2


_TRAINING = ("demo", "transfer", "adapt", "demo-lm", "adapt-lm")


def _run(args) -> int:
    """A training command; SIGINT or SIGTERM ends it with one line naming its last checkpoint and the
    command that resumes it, and the shell's status for the signal (130, 143)."""
    from fastadapt.apps import runs

    with runs.signals_raise():
        try:
            return args.fn(args)
        except runs.Interrupted as exc:
            print(runs.interrupted_message(args, exc.signum), file=sys.stderr)
            return 128 + exc.signum


if __name__ == "__main__":
    sys.exit(main())
