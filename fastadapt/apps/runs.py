"""A training command's run in its ``--output``: the checks before it starts (the folder can be written;
``--resume`` continues a run of the same arguments, recorded in ``run.json``), and what it says when
SIGINT or SIGTERM stops it (where the last checkpoint is, and the command that resumes it)."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import threading

from fastadapt.training import checkpoint as ckpt

RUN_FILE = "run.json"

# What --resume may change: how long the stages train (a resumed stage trains on to the new total of
# --epochs) and where and how the run is shown; every other argument defines what the run computes.
_MAY_CHANGE = frozenset({"epochs", "device", "threads", "quiet", "resume", "output"})
_NOT_ARGUMENTS = frozenset({"fn", "command", "argv"})


# ---- output paths ------------------------------------------------------------------------------

def check_output_folder(path: str, arg: str = "--output") -> None:
    """Raises ValueError naming ``arg`` unless ``path`` is a folder this process may write in, or one it
    may create: checked before any work, since the first file is written after pretraining."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{arg} {path!r} is a file, not a folder")
    _check_writable(path, arg, path)


def check_output_file(path: str, arg: str = "--output") -> None:
    """As :func:`check_output_folder`, for a file to be written (atomically, in its folder)."""
    if os.path.isdir(path):
        raise ValueError(f"{arg} {path!r} is a folder; name the file to write")
    _check_writable(os.path.dirname(os.path.abspath(path)), arg, path)


def _check_writable(folder, arg, path):
    """The nearest existing folder at or above ``folder`` must be one this process may write in."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{arg} {path!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{arg} {path!r}: no permission to write in {existing!r}")


# ---- run.json ----------------------------------------------------------------------------------

def defining_arguments(args) -> dict:
    """The arguments that define what the run computes, as they read back from JSON."""
    defining = {k: v for k, v in vars(args).items() if k not in _MAY_CHANGE | _NOT_ARGUMENTS}
    if "pretrain_epochs" in defining:
        # what pretraining runs: a finished pretraining is reused by --resume, never trained on
        defining["pretrain_epochs"] = args.pretrain_epochs or args.epochs
    return json.loads(json.dumps(defining))


def _run_file(args) -> str:
    return os.path.join(args.output, RUN_FILE)


def _saved(args) -> dict | None:
    path = _run_file(args)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--output {args.output!r}: cannot read {path!r}: {exc}") from None


def check_resume(args) -> None:
    """With ``--resume``, ``--output`` must hold a run of this command with the same defining arguments
    (each difference named); without it, not an unfinished run (interrupted, or stopped by an error),
    whose checkpoints a new run would overwrite."""
    saved = _saved(args)
    if not args.resume:
        # rank 0 alone: under torchrun, the others could read the run.json its start() just wrote
        if saved is not None and not saved["finished"] and _main_process():
            raise ValueError(f"--output {args.output!r} holds an unfinished run: add --resume to continue it, "
                             f"or pass another --output to start a new one")
        return
    if saved is None:
        raise ValueError(f"--resume: --output {args.output!r} holds no run to resume (no {RUN_FILE})")
    if saved["command"] != args.command:
        raise ValueError(f"--resume: --output {args.output!r} holds a fastadapt {saved['command']} run, "
                         f"not {args.command}")
    old, now = saved["arguments"], defining_arguments(args)
    changed = [f"{_option(k)} was {_show(old.get(k))}, now {_show(v)}" for k, v in now.items() if old.get(k) != v]
    if "pretrain_epochs" in now and old.get("pretrain_epochs") != now["pretrain_epochs"] and not args.pretrain_epochs:
        changed.append(f"without --pretrain-epochs it follows --epochs: pass --pretrain-epochs "
                       f"{old.get('pretrain_epochs')} to keep the pretraining")
    if changed:
        raise ValueError(f"--resume: the run in {args.output!r} was started with other arguments: "
                         f"{'; '.join(changed)}. Resume it with its own, or pass another --output to start a new "
                         f"run (--epochs may change: resumed stages train on to the new total)")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _show(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "given" if value else "not given"
    return "not given" if value is None else str(value)


def start(args) -> None:
    """Records the run in ``--output/run.json``, unfinished until :func:`finish`. A new run (no
    ``--resume``) first removes the finished run's pretrained model and checkpoints, which a later
    ``--resume`` of this one would otherwise take for its own."""
    if not _main_process():
        return
    if not args.resume and _saved(args) is not None:
        for path in _resumable_files(args.output):
            _remove(path)
    _write(args, finished=False)


def _remove(path):
    """A pretrained model, or a checkpoint folder and its run's folder once that is empty."""
    if not os.path.isdir(path):
        os.unlink(path)
        return
    shutil.rmtree(path)
    with contextlib.suppress(OSError):  # not empty: it holds more than the checkpoint
        os.rmdir(os.path.dirname(path))


def finish(args) -> None:
    if _main_process():
        _write(args, finished=True)


def _main_process() -> bool:
    # torchrun's RANK: the process group is only set up once training starts
    return int(os.environ.get("RANK", "0")) == 0


def _write(args, finished: bool):
    run = {"command": args.command, "arguments": defining_arguments(args), "finished": finished}
    ckpt.atomic_write_text(_run_file(args), json.dumps(run, indent=2))


def _run_folders(output: str) -> list[str]:
    """The folders a run writes models and checkpoints in: ``output``, the demo's folder per scenario
    (and per seed), demo-lm's per seed; nothing deeper, where a user's own files may lie."""
    from fastadapt.apps.demo import SCENARIOS

    root = glob.escape(output)
    return [output] + [p for pattern in ("seed*", *SCENARIOS, *(os.path.join("seed*", s) for s in SCENARIOS))
                       for p in glob.glob(os.path.join(root, pattern)) if os.path.isdir(p)]


def _checkpoints(output: str) -> list[str]:
    """Every trainer checkpoint folder of the run in ``output``."""
    return [os.path.dirname(p) for folder in _run_folders(output)
            for p in glob.glob(os.path.join(glob.escape(folder), "runs", "*", "last", ckpt.STATE))]


def _resumable_files(output: str) -> list[str]:
    pretrained = [p for f in _run_folders(output) if os.path.isfile(p := os.path.join(f, "pretrained.safetensors"))]
    return pretrained + _checkpoints(output)


# ---- SIGINT and SIGTERM ------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGINT or SIGTERM, raised wherever the main thread is: a BaseException, as KeyboardInterrupt is,
    so that no ``except Exception`` swallows it. The checkpoints need no cleanup: each is written
    atomically, so the last one is the previous save or the next one, never half of either."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_raise():
    """Inside, the first SIGINT or SIGTERM raises :class:`Interrupted`; later ones are ignored, so the
    shutdown that reports the checkpoint is not cut short. The previous handlers come back on exit."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    signums = (signal.SIGINT, signal.SIGTERM)

    def handle(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, handle) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def interrupted_message(args, signum: int) -> str:
    """One line: where the interrupted run's last checkpoint is, and the exact command resuming it."""
    head = f"fastadapt {args.command}: interrupted by {signal.Signals(signum).name}"
    saved = _saved(args)
    started = (saved is not None and not saved["finished"] and saved["command"] == args.command
               and saved["arguments"] == defining_arguments(args))
    if not started:
        return f"{head} before training started; nothing to resume"
    last = last_checkpoint(args.output)
    # the language-model commands train in optimizer steps (their epochs are rounds of --eval-every steps)
    at = (f"step {last[2]}" if args.command in STEP_COMMANDS else f"epoch {last[1]}") if last else ""
    where = f"the last checkpoint is {last[0]} ({at})" if last else "no checkpoint was written yet"
    return f"{head}; {where}; continue with: {resume_command(args)}"


STEP_COMMANDS = ("demo-lm", "adapt-lm")


def last_checkpoint(output: str) -> tuple[str, int, int] | None:
    """(folder, epoch, optimizer step) of the newest trainer checkpoint under ``output``, None when there
    is none."""
    folders = _checkpoints(output)
    if not folders:
        return None
    newest = max(folders, key=lambda f: os.path.getmtime(os.path.join(f, ckpt.STATE)))
    _, state = ckpt.load_checkpoint(newest)  # also completes a save the signal stopped at its last rename
    return newest, int(state["epoch"]), int(state["global_step"])


def resume_command(args) -> str:
    return shlex.join(["fastadapt", args.command, *args.argv] + ([] if args.resume else ["--resume"]))
