"""The datasets the CLI reads: .npz, .csv and the bundled scikit-learn sets, plus the splits and the
standardisation the end-to-end jobs apply to them."""
from __future__ import annotations

import csv
import os
import re

import numpy as np

SKLEARN_DATASETS = ("digits", "iris", "wine", "breast_cancer")


def load_dataset(spec: str, *, arg: str = "dataset", label_column: str = "label", labels_required: bool = True):
    """(X float32 (N, F), y (N,)) from ``path.npz`` (arrays X and y), ``path.csv`` (a header row with a
    label column) or a bundled scikit-learn set with an optional class filter (``digits:0-4``).

    y holds int64 class labels, or text (a numpy str array) where a .csv or .npz labels its classes
    with names such as ``class_0``. With ``labels_required=False`` a .csv without the label column or
    a .npz without y reads as (X, None): data to predict."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"{arg} must be a path or a dataset name, got {spec!r}")
    lower = spec.lower()
    if lower.endswith(".npz"):
        X, y = _read_npz(spec, arg, labels_required)
    elif lower.endswith(".csv"):
        X, y = _read_csv(spec, arg, label_column, labels_required)
    else:
        X, y = _read_sklearn(spec, arg)
    return _finish(X, y, spec, arg)


def _read_npz(path, arg, labels_required):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: file not found: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # not a zip, truncated, pickled object arrays ...
        raise ValueError(f"{arg}: cannot read {path!r} as .npz: {exc}") from None
    needed = ("X", "y") if labels_required else ("X",)
    if any(k not in arrays for k in needed):
        raise ValueError(f"{arg}: {path!r} has arrays {sorted(arrays)} but needs {' and '.join(map(repr, needed))}")
    return arrays["X"], arrays.get("y")


def _read_csv(path, arg, label_column, labels_required):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{arg}: file not found: {path!r}")
    try:
        with open(path, newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, r) for r in reader if r]  # line numbers as an editor shows them
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{arg}: cannot read {path!r} as .csv: {exc}") from None
    if not rows:
        raise ValueError(f"{arg}: {path!r} is empty")
    header = [h.strip() for h in rows[0][1]]
    if label_column not in header and labels_required:
        raise ValueError(f"{arg}: {path!r} has no label column {label_column!r} (columns: {header})")
    li = header.index(label_column) if label_column in header else None
    X, labels = [], []
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise ValueError(f"{arg}: {path!r} line {line} has {len(row)} fields, the header has {len(header)}")
        X.append([_number(v, f"{arg}: {path!r} line {line}, column {header[i]!r}") for i, v in enumerate(row)
                  if i != li])
        if li is not None:
            labels.append((line, row[li].strip()))
    features = len(header) - (li is not None)
    y = None if li is None else _labels(labels, f"{arg}: {path!r}", label_column)
    return np.asarray(X, dtype=np.float64).reshape(len(X), features), y


def _number(text, where):
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{where}: {text!r} is not a number") from None


def _labels(labels, where, column):
    """Integer class labels when every label is a number, else every label as text (class names)."""
    for line, text in labels:
        if not text:
            raise ValueError(f"{where} line {line}, label column {column!r}: the label is empty")
    try:
        numbers = [(line, text, float(text)) for line, text in labels]
    except ValueError:
        return np.asarray([text for _, text in labels], dtype=str)
    for line, text, v in numbers:
        if not (np.isfinite(v) and v == round(v)):
            raise ValueError(f"{where} line {line}, label column {column!r}: {text!r} is not a class label "
                             f"(numeric labels must be integers)")
    return np.asarray([v for _, _, v in numbers], dtype=np.int64)


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
    X, y = np.asarray(X), None if y is None else np.asarray(y)
    if X.dtype == object or (y is not None and y.dtype == object):
        raise ValueError(f"{arg}: {spec!r} holds non-numeric data")
    if X.ndim != 2:
        raise ValueError(f"{arg}: X in {spec!r} must be 2-D (samples, features), got shape {X.shape}")
    if len(X) == 0:
        raise ValueError(f"{arg}: {spec!r} is empty (0 samples)")
    if not np.all(np.isfinite(X)):
        raise ValueError(f"{arg}: X in {spec!r} contains NaN or infinite values")
    if y is None:
        return X.astype(np.float32), None
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"{arg}: y in {spec!r} must be 1-D with one label per row of X "
                         f"(X {X.shape}, y {y.shape})")
    if y.dtype.kind == "U":
        return X.astype(np.float32), y  # class names
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise ValueError(f"{arg}: labels in {spec!r} must be integers or class names")
    elif y.dtype.kind not in "iu":
        raise ValueError(f"{arg}: labels in {spec!r} must be integers or class names, got dtype {y.dtype}")
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
