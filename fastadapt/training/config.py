"""The options of a trainer, in one validated object (the messages are rows of docs/ERRORS.md)."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from fastadapt.training import distributed as dist

OPTIMIZERS = ("adamw", "adam", "sgd")
PRECISIONS = ("32", "bf16")
SCHEDULERS = (None, "constant", "cosine")
STRATEGIES = ("replay", "lwf", "replay+lwf")
PARALLELS = ("ddp", "fsdp")


def positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _positive_number(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")


def check_alpha(value, where=""):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {value!r}{where}")


def alpha_at(alpha, step: int) -> float:
    """The value of ``alpha`` (a number, or a schedule: a callable of the optimizer step) at ``step``,
    checked to lie in [0, 1]."""
    if not callable(alpha):
        check_alpha(alpha)
        return float(alpha)
    a = alpha(step)
    check_alpha(a, f" (alpha({step}) of the alpha schedule)")
    return float(a)


@dataclasses.dataclass
class TrainConfig:
    """``optimizer``: "adamw", "adam", "sgd" (PyTorch's fused implementations where the device has
    them) or a callable mapping parameter groups to an optimizer. ``scheduler``: None or "constant"
    (after ``warmup_steps`` of linear warm-up) or "cosine" (decay to 0 at the last step); steps are
    optimizer steps. ``precision="bf16"``: forward passes under bf16 autocast. ``seed`` seeds Python,
    NumPy and torch when ``fit`` starts (not on resume). ``compile=True`` runs each training step's
    forward and loss under ``torch.compile``. ``parallel``: under torchrun (WORLD_SIZE > 1), "ddp"
    replicates the model (DistributedDataParallel) and "fsdp" shards it with FSDP2 (``fully_shard`` of
    each module ``fsdp_blocks(model)`` returns, by default the blocks a transformer repeats, then of the
    whole), for the trainers that support it (LMAdaptiveTrainer); ignored in a single process."""

    lr: float = 1e-3
    optimizer: str | Callable = "adamw"
    weight_decay: float = 0.0
    freeze_backbone: bool = False
    head_lr_mult: float = 1.0
    scheduler: str | None = None
    warmup_steps: int = 0
    grad_accum_steps: int = 1
    max_grad_norm: float | None = None
    precision: str = "32"
    device: str | torch.device | None = None
    seed: int | None = None
    progress_bar: bool | None = None
    batch_size: int = 32
    compile: bool = False
    parallel: str = "ddp"
    fsdp_blocks: Callable | None = None

    def __post_init__(self):
        _positive_number("lr", self.lr)
        _positive_number("head_lr_mult", self.head_lr_mult)
        wd = self.weight_decay
        if isinstance(wd, bool) or not isinstance(wd, (int, float)) or not wd >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {wd!r}")
        if not (callable(self.optimizer) or self.optimizer in OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)} or a callable, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be None, 'constant' or 'cosine', got {self.scheduler!r}")
        w = self.warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {w!r}")
        positive_int("grad_accum_steps", self.grad_accum_steps)
        positive_int("batch_size", self.batch_size)
        m = self.max_grad_norm
        if m is not None and (isinstance(m, bool) or not m > 0):
            raise ValueError(f"max_grad_norm must be None or > 0, got {m!r}")
        self.precision = str(self.precision)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.parallel not in PARALLELS:
            raise ValueError(f"parallel must be one of {list(PARALLELS)}, got {self.parallel!r}")
        if self.fsdp_blocks is not None and not callable(self.fsdp_blocks):
            raise TypeError(f"fsdp_blocks must be None or callable(model) -> modules, got "
                            f"{type(self.fsdp_blocks).__name__}")
        self.device = resolve_device(self.device)
        for name in ("freeze_backbone", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")


@dataclasses.dataclass
class AdaptiveConfig(TrainConfig):
    """``alpha``: the target weight in [0, 1], or ``callable(step) -> float`` evaluated at every
    optimizer step (alpha=1 is naive fine-tuning). ``strategy``: what the source term ``1 - alpha``
    weighs: ``"replay"``, cross-entropy on replayed source samples; ``"lwf"`` (Learning without
    Forgetting), ``T^2 * KL(teacher || model)`` at ``temperature`` T on the target inputs, the teacher
    being the model as it was when ``fit`` started, so no source sample is stored; ``"replay+lwf"``,
    both: the replayed samples' cross-entropy plus the distillation of target and replayed samples
    (weighted ``1 - alpha`` each). ``distill_classes``: how many of the head's first classes the
    teacher knows (default: the head's size before its last ``extend_head`` if no fit has trained it
    since, else all; a resumed run keeps its checkpoint's). ``memory_size``: a replay memory of that
    many class-balanced source samples instead of the whole source stream (None); for token sequences
    (:class:`~fastadapt.training.lm.LMAdaptiveTrainer`) a memory of that many sequences, or with
    ``memory_tokens`` of as many sequences as hold at most that many predicted tokens."""

    alpha: float | Callable = 0.5
    strategy: str = "replay"
    temperature: float = 2.0
    distill_classes: int | None = None
    memory_size: int | None = None
    memory_tokens: int | None = None

    @property
    def distills(self) -> bool:
        return self.strategy != "replay"

    @property
    def replays(self) -> bool:
        return self.strategy != "lwf"

    def __post_init__(self):
        super().__post_init__()
        alpha_at(self.alpha, 0)
        m = self.memory_size
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ValueError(f"memory_size must be None or a positive int, got {m!r}")
        if self.memory_tokens is not None:
            positive_int("memory_tokens", self.memory_tokens)
            if m is not None:
                raise ValueError(f"give memory_size ({m}, sequences) or memory_tokens ({self.memory_tokens}), "
                                 f"not both")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {self.strategy!r}")
        _positive_number("temperature", self.temperature)
        if self.distill_classes is not None:
            positive_int("distill_classes", self.distill_classes)
        if not self.replays and m is not None:
            raise ValueError(f"memory_size={m!r} but strategy='lwf' stores no source samples; use "
                             f"strategy='replay+lwf' to replay a memory as well")


def resolve_device(device) -> torch.device:
    if device is None:
        return dist.default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available")
    return dev
