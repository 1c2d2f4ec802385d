"""User data in, DataLoaders out."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fastadapt.training import distributed as dist


def as_dataset(data, name: str) -> Dataset:
    """A Dataset from a DataLoader, a Dataset or an (X, y) pair of tensors/arrays; checked to be non-empty."""
    if isinstance(data, DataLoader):
        ds = data.dataset
    elif isinstance(data, Dataset):
        ds = data
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        ds = _tensor_pair(data, name)
    else:
        raise TypeError(f"{name} must be a DataLoader, a Dataset or an (X, y) pair, got {type(data).__name__}")
    if len(ds) == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    return ds


def _tensor_pair(data, name) -> TensorDataset:
    X, y = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in data)
    if X.dim() < 2:
        raise ValueError(f"{name}: X must have shape (N, features...), got shape {tuple(X.shape)}")
    if y.dim() != 1:
        raise ValueError(f"{name}: y must have shape (N,), got shape {tuple(y.shape)}")
    if len(X) != len(y):
        raise ValueError(f"{name}: X has {len(X)} rows but y has {len(y)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: y must hold integer class labels, got dtype {y.dtype}")
    if not X.is_floating_point():
        X = X.float()
    return TensorDataset(X, y.long())


def feature_shape(ds: Dataset) -> tuple:
    """Shape of one sample's features (read from the first sample)."""
    x = ds.tensors[0][0] if isinstance(ds, TensorDataset) else ds[0][0]
    return tuple(torch.as_tensor(x).shape)


def labels_of(ds: Dataset) -> torch.Tensor | None:
    """All labels when they can be read without iterating the dataset, else None."""
    if isinstance(ds, TensorDataset) and len(ds.tensors) >= 2:
        return ds.tensors[1]
    if isinstance(ds, Subset):
        inner = labels_of(ds.dataset)
        return None if inner is None else inner[torch.as_tensor(ds.indices, dtype=torch.long)]
    return None


def tensors_of(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, y) stacked from any map-style dataset (used to build a replay memory)."""
    if isinstance(ds, TensorDataset):
        return ds.tensors[0], ds.tensors[1].long()
    xs, ys = zip(*(ds[i][:2] for i in range(len(ds))))
    return torch.stack([torch.as_tensor(x) for x in xs]), torch.as_tensor(ys).long()


def check_labels(y: torch.Tensor | None, num_classes: int, name: str):
    if y is None or y.numel() == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} has label {bad}, outside the model head's range [0, {num_classes - 1}] "
                         f"({num_classes} classes); resize the head with replace_head or extend_head")


def eval_loader(ds: Dataset, template, batch_size: int) -> DataLoader:
    """Sequential loader; under DDP each rank takes every world_size-th sample (no padding, so
    the summed metrics count every sample exactly once)."""
    bs = template.batch_size if isinstance(template, DataLoader) and template.batch_size else batch_size
    collate = template.collate_fn if isinstance(template, DataLoader) else None
    if dist.world_size() > 1:
        ds = Subset(ds, range(dist.rank(), len(ds), dist.world_size()))
    return DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=collate)
