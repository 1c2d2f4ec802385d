"""torchrun support: process group from the environment, rank helpers, metric reduction, and the
FSDP2 pieces: which modules to shard, sharding, and whole tensors to and from sharded state (so a
sharded run saves and loads the same checkpoint files as an unsharded one)."""
from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as tdist
from torch import nn


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


def check_same_on_every_rank(what: str, value: int, remedy: str):
    """Raises on every rank when the ranks disagree on ``value``: the ranks of DDP and FSDP2 must run as
    many steps as each other (each step's collectives wait for every rank: a rank with one step more
    would wait forever, or be paired with another collective)."""
    if world_size() <= 1:
        return
    values = [None] * world_size()
    tdist.all_gather_object(values, value)
    if len(set(values)) > 1:
        raise ValueError(f"the ranks have {values} {what} (rank r: entry r); every rank needs as many: {remedy}")


def barrier():
    if world_size() > 1:
        tdist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is an FSDP2 (``fully_shard``) unit."""
    if not tdist.is_available():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks a transformer repeats: the children of its largest ``nn.ModuleList`` (by parameter
    count) whose children all have one type: TinyCausalLM's ``blocks``, a Hugging Face model's decoder
    layers (``model.layers``, GPT-2's ``transformer.h``). Empty when there is none."""
    best, size = [], 0
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1:
            n = sum(p.numel() for p in m.parameters())
            if n > size:
                best, size = list(m), n
    return best


def shard(root: nn.Module, blocks) -> nn.Module:
    """FSDP2 on ``root``: ``fully_shard`` of each of ``blocks`` (its own unit: its parameters are
    all-gathered just for its forward and backward), then of ``root`` (everything else: embeddings, final
    norm, head). Rank 0's weights are broadcast first: unlike DDP, ``fully_shard`` keeps each rank's own
    values, and ranks whose models were initialised differently would train one model made of mismatched
    shards."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(blocks)
    inside = {id(m) for m in root.modules()}
    for b in blocks:
        if not isinstance(b, nn.Module) or id(b) not in inside or b is root:
            raise ValueError(f"fsdp_blocks must return submodules of the model, got {type(b).__name__}")
    for t in root.state_dict().values():
        tdist.broadcast(t, src=0)  # in place: state_dict tensors share the parameters' storage
    for b in blocks:
        fully_shard(b)
    fully_shard(root)
    return root


def gather_full(tree):
    """``tree`` (nested dicts and lists of tensors and plain values, as a state_dict) with every DTensor
    (an FSDP2 shard) all-gathered whole: a collective, so every rank calls it on trees of the same
    layout. Rank 0 gets the tensors (on the CPU); the other ranks get None in their place, so no rank
    but the writer ever holds more than one whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        full = tree.full_tensor()
        return full.cpu() if is_main() else None
    if isinstance(tree, dict):
        return {k: gather_full(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(gather_full(v) for v in tree)
    return tree


def shard_like(full: torch.Tensor, like) -> torch.Tensor:
    """A whole tensor (the same on every rank: each read the checkpoint) as the DTensor ``like`` is
    sharded; each rank keeps its own shard, with no communication. Anything else is returned as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or not isinstance(full, torch.Tensor) or full.shape != like.shape:
        return full  # a shape mismatch is reported by whoever loads it, with the key's name
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_state(weights: dict, model: nn.Module) -> dict:
    """A whole state_dict sharded as ``model``'s (FSDP2) parameters and buffers are."""
    current = model.state_dict()
    return {k: shard_like(v, current.get(k)) for k, v in weights.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A whole ``optimizer.state_dict()`` (as :func:`gather_full` made it) sharded as the optimizer's
    parameters are: each per-parameter tensor of the parameter's shape (moments, momentum) becomes the
    matching shard; scalars (``step``) stay as they are."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sharded = {i: {k: shard_like(v, params[int(i)]) for k, v in s.items()} if int(i) < len(params) else s
               for i, s in state["state"].items()}
    return {**state, "state": sharded}
