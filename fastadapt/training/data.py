"""User data in, DataLoaders out; and the datasets the CLI reads (.npz, .csv, bundled scikit-learn sets)."""
from __future__ import annotations

import csv
import os
import re

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from fastadapt.training import distributed as dist

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


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


def train_loader(ds: Dataset, template, batch_size: int, seed: int) -> DataLoader:
    """The loader a trainer iterates: the user's own DataLoader when given, resharded under DDP.

    Shuffling draws from the global torch RNG (the trainer checkpoints it), so a resumed run replays
    the same batch order as an uninterrupted one.
    """
    bs = template.batch_size if isinstance(template, DataLoader) and template.batch_size else batch_size
    if dist.world_size() > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=dist.world_size(), rank=dist.rank(), shuffle=True,
                                     seed=seed)
        collate = template.collate_fn if isinstance(template, DataLoader) else None
        return DataLoader(ds, batch_size=bs, sampler=sampler, collate_fn=collate)
    if isinstance(template, DataLoader):
        return template
    return DataLoader(ds, batch_size=bs, shuffle=True)


def eval_loader(ds: Dataset, template, batch_size: int) -> DataLoader:
    """Sequential loader; under DDP each rank takes every world_size-th sample (no padding, so
    the summed metrics count every sample exactly once)."""
    bs = template.batch_size if isinstance(template, DataLoader) and template.batch_size else batch_size
    collate = template.collate_fn if isinstance(template, DataLoader) else None
    if dist.world_size() > 1:
        ds = Subset(ds, range(dist.rank(), len(ds), dist.world_size()))
    return DataLoader(ds, batch_size=bs, shuffle=False, collate_fn=collate)


# ---- datasets for the CLI -------------------------------------------------------------------------

def load_dataset(spec: str, *, arg: str = "dataset", label_column: str = "label"):
    """(X float32 (N, F), y int64 (N,)) from ``path.npz`` (arrays X and y), ``path.csv`` (a header row
    with a label column) or a bundled scikit-learn set with an optional class filter (``digits:0-4``)."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{arg} must be a path or a dataset name, got {spec!r}")
    lower = spec.lower()
    if lower.endswith(".npz"):
        X, y = _read_npz(spec, arg)
    elif lower.endswith(".csv"):
        X, y = _read_csv(spec, arg, label_column)
    else:
        X, y = _read_sklearn(spec, arg)
    return _finish(X, y, spec, arg)


def _read_npz(path, arg):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: file not found: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # not a zip, truncated, pickled object arrays ...
        raise ValueError(f"{arg}: cannot read {path!r} as .npz: {exc}") from None
    if "X" not in arrays or "y" not in arrays:
        raise ValueError(f"{arg}: {path!r} has arrays {sorted(arrays)} but needs 'X' and 'y'")
    return arrays["X"], arrays["y"]


def _read_csv(path, arg, label_column):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: file not found: {path!r}")
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{arg}: cannot read {path!r} as .csv: {exc}") from None
    rows = [r for r in rows if r]
    if not rows:
        raise ValueError(f"{arg}: {path!r} is empty")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        raise ValueError(f"{arg}: {path!r} has no label column {label_column!r} (columns: {header})")
    li = header.index(label_column)
    X, y = [], []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{arg}: {path!r} line {n} has {len(row)} fields, the header has {len(header)}")
        try:
            X.append([float(v) for i, v in enumerate(row) if i != li])
            y.append(float(row[li]))
        except ValueError:
            raise ValueError(f"{arg}: {path!r} line {n} has a non-numeric value: {row}") from None
    return np.asarray(X, dtype=np.float64).reshape(len(X), len(header) - 1), np.asarray(y)


_FILTER = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*$")


def _read_sklearn(spec, arg):
    name, _, classes = spec.partition(":")
    if name not in SKLEARN_DATASETS:
        if os.path.sep in spec or "." in name:
            raise ValueError(f"{arg}: {spec!r} is neither a .npz/.csv file nor a bundled dataset")
        raise ValueError(f"{arg}: unknown dataset {name!r}; expected a .npz or .csv path or one of "
                         f"{', '.join(SKLEARN_DATASETS)} (optionally with a class filter, e.g. digits:0-4)")
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, f"load_{name}")()
    X, y = bunch.data, bunch.target
    if classes:
        keep = _parse_classes(classes, spec, arg)
        mask = np.isin(y, sorted(keep))
        X, y = X[mask], y[mask]
    return X, y


def _parse_classes(text, spec, arg) -> set[int]:
    keep: set[int] = set()
    for part in text.split(","):
        m = _FILTER.match(part)
        if not m:
            raise ValueError(f"{arg}: bad class filter {text!r} in {spec!r}; use e.g. 0-4 or 0,2,5")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise ValueError(f"{arg}: bad class range {part!r} in {spec!r} (end before start)")
        keep.update(range(lo, hi + 1))
    return keep


def _finish(X, y, spec, arg):
    X, y = np.asarray(X), np.asarray(y)
    if X.dtype == object or y.dtype == object:
        raise ValueError(f"{arg}: {spec!r} holds non-numeric data")
    if X.ndim != 2:
        raise ValueError(f"{arg}: X in {spec!r} must be 2-D (samples, features), got shape {X.shape}")
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{arg}: y in {spec!r} must be 1-D with one label per row of X "
                         f"(X {X.shape}, y {y.shape})")
    if len(X) == 0:
        raise ValueError(f"{arg}: {spec!r} is empty (0 samples)")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{arg}: X in {spec!r} contains NaN or infinite values")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{arg}: labels in {spec!r} must be integers")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{arg}: labels in {spec!r} must be integers, got dtype {y.dtype}")
    return X.astype(np.float32), y.astype(np.int64)


def split(X, y, fraction: float, seed: int):
    """Stratified (train, held-out) split."""
    from sklearn.model_selection import train_test_split

    Xa, Xb, ya, yb = train_test_split(X, y, test_size=fraction, random_state=seed, stratify=y)
    return (Xa, ya), (Xb, yb)


def few_shot(X, y, per_class: int, seed: int):
    """The first ``per_class`` samples of each class after a seeded shuffle."""
    order = np.random.default_rng(seed).permutation(len(y))
    keep = np.concatenate([order[y[order] == c][:per_class] for c in np.unique(y)])
    return X[np.sort(keep)], y[np.sort(keep)]


class Standardizer:
    """Per-feature z-scoring, fitted on one split (the source training data) and applied to all."""

    def __init__(self, X):
        self.mean = X.mean(axis=0)
        std = X.std(axis=0)
        self.std = np.where(std > 0, std, 1.0)  # constant pixels (digits' borders) stay finite

    def __call__(self, X):
        return ((X - self.mean) / self.std).astype(np.float32)
