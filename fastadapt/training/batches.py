"""Batch sources: what a trainer's loop iterates, one epoch at a time.

In-memory data (tensors, an (X, y) pair, a TensorDataset) lives on the device and is batched by
indexing with a shuffled permutation: one gather per batch, no per-sample collate. A user's own
DataLoader is iterated as it is. Under DDP each rank takes every world_size-th sample of the epoch's
permutation (the same permutation on every rank), so the ranks together cover each sample once.
"""
from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from fastadapt.training import distributed as dist


class TensorBatches:
    """(x, y) batches of in-memory tensors, reshuffled every epoch.

    The permutation is seeded from the global torch RNG, which the trainer checkpoints at every epoch
    boundary (so a resumed run draws the same batches); under DDP from ``seed + epoch``, identical on
    every rank."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, device, seed: int = 0):
        self.X, self.y = X.to(device), y.to(device)
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = dist.rank(), dist.world_size()
        self.n = len(range(self.rank, len(self.y), self.world))

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def indices(self, epoch: int):
        """The epoch's batches as index tensors into X and y (on their device)."""
        n_all = len(self.y)
        if self.world > 1:
            generator = torch.Generator().manual_seed(self.seed + epoch)
        else:
            # the two draws DataLoader(shuffle=True) makes from the global RNG (its workers' base seed,
            # then its sampler's seed): in-memory data and a DataLoader over it see the same batches
            torch.empty((), dtype=torch.int64).random_()
            generator = torch.Generator().manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
        order = torch.randperm(n_all, generator=generator)[self.rank::self.world].to(self.X.device)
        return order.split(self.batch_size)

    def gather(self, idx, x_out, y_out):
        """X[idx] and y[idx] written into the given buffers (views of the right length)."""
        return torch.index_select(self.X, 0, idx, out=x_out), torch.index_select(self.y, 0, idx, out=y_out)

    def epoch(self, epoch: int):
        # Each batch is gathered into the same two buffers: the previous step's graph, which saved
        # its inputs, has run its backward by the time the next batch is drawn.
        xb, yb = _buffers(self, self.batch_size, (self,))
        for idx in self.indices(epoch):
            yield self.gather(idx, xb[:len(idx)], yb[:len(idx)])


def _buffers(owner, rows, sources):
    """One pair of (x, y) batch buffers per owner, made on first use."""
    if getattr(owner, "_buffers", None) is None:
        X, y = sources[0].X, sources[0].y
        owner._buffers = (X.new_empty((rows, *X.shape[1:])), y.new_empty((rows, *y.shape[1:])))
    return owner._buffers


class LoaderBatches:
    """A user's DataLoader, as it is (its sampler's set_epoch called when it has one); batches moved
    to the device."""

    def __init__(self, loader: DataLoader, device):
        self.loader, self.device = loader, device
        self.batch_size = loader.batch_size

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int):
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True).long()


class PairedBatches:
    """Target batches, each with the next source batch before it in one batch: ``(x, y, n_source)``, the
    first ``n_source`` rows from the source. The source side starts over (reshuffled) whenever the
    target side needs more of it, and at every target epoch, so a resumed run pairs the same batches.
    In-memory sides are gathered straight into one buffer (no concatenation per step)."""

    def __init__(self, target, source):
        self.target, self.source = target, source
        self.batch_size = target.batch_size

    def __len__(self) -> int:
        return len(self.target)

    def epoch(self, epoch: int):
        if isinstance(self.target, TensorBatches) and isinstance(self.source, TensorBatches):
            yield from self._in_memory(epoch)
            return
        source = self.source.epoch(epoch)
        for xt, yt in self.target.epoch(epoch):
            batch = next(source, None)
            if batch is None:
                source = self.source.epoch(epoch)
                batch = next(source)
            xs, ys = batch
            yield torch.cat([xs, xt]), torch.cat([ys, yt]), len(ys)

    def _in_memory(self, epoch):
        xb, yb = _buffers(self, self.source.batch_size + self.target.batch_size, (self.target,))
        source = iter(self.source.indices(epoch))
        for t_idx in self.target.indices(epoch):
            s_idx = next(source, None)
            if s_idx is None:
                source = iter(self.source.indices(epoch))
                s_idx = next(source)
            ns, n = len(s_idx), len(s_idx) + len(t_idx)
            self.source.gather(s_idx, xb[:ns], yb[:ns])
            self.target.gather(t_idx, xb[ns:n], yb[ns:n])
            yield xb[:n], yb[:n], ns
