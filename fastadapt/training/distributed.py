"""torchrun support: process group from the environment, rank helpers, metric reduction."""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as tdist


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA.
    Returns whether the run is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not tdist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend=backend)
        # The group is ours, so is its teardown: a process that exits with the group alive aborts
        # ("terminate called without an active exception") when gloo's worker threads are destroyed
        # during interpreter finalisation. atexit runs while the interpreter is still whole.
        atexit.register(_destroy)
    return True


def _destroy():
    if tdist.is_initialized():
        tdist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        tdist.all_reduce(values, op=tdist.ReduceOp.SUM)
    return values


def barrier():
    if world_size() > 1:
        tdist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
