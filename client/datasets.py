"""Classification data sets for the SGD worker: `digits`, or a user's .npz or .csv file.

    data = load_dataset("digits", test_fraction=0.2, seed=0)
    data.X_train  # float32 [n, features];  data.y_train  # int64 class indices

- `digits`: the 8x8 handwritten digits bundled with scikit-learn (an optional
  extra: pip install 'gradserve[train]'); read from disk, never downloaded;
  pixels scaled from 0..16 to [0, 1].
- `PATH.npz`: arrays `X` [n, features] and `y` [n].
- `PATH.csv`: one sample per row, the label in the last column; an optional
  header row is skipped.

User features are used as given: scale them first (SGD diverges on raw
features in the thousands). Labels may be any values (ints, strings); they are
numbered in sorted order and the names kept in `classes`. The train/test split
is stratified (each class split in the same proportion) and seeded.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .extras import import_optional


class DatasetError(ValueError):
    """A data set that cannot be loaded; the message says which file and what is wrong."""


@dataclass(frozen=True)
class Dataset:
    name: str
    X_train: np.ndarray  # float32 [n_train, features]
    y_train: np.ndarray  # int64 [n_train], values in 0..num_classes-1
    X_test: np.ndarray
    y_test: np.ndarray
    classes: tuple  # the original label of each class index

    @property
    def num_features(self) -> int:
        return self.X_train.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def description(self) -> str:
        return (f"{self.name} ({len(self.y_train)} train, {len(self.y_test)} test, "
                f"{self.num_features} features, {self.num_classes} classes)")


def load_dataset(spec: str, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """`digits`, a path to a .npz file (arrays X, y) or to a .csv file (label last)."""
    if spec == "digits":
        X, y = _digits()
    else:
        path = Path(spec)
        if path.suffix not in (".npz", ".csv"):
            raise DatasetError(f"dataset {spec!r}: expected 'digits', a .npz file (arrays X, y) "
                               "or a .csv file (one sample per row, label last)")
        if not path.is_file():
            raise DatasetError(f"dataset file {spec} does not exist")
        X, y = _npz(path) if path.suffix == ".npz" else _csv(path)
    return _labelled(Path(spec).name, X, y, test_fraction, seed)


def stratified_split(y: np.ndarray, test_fraction: float, seed: int):
    """(train indices, test indices): each class shuffled with `seed` and split
    in the proportion test_fraction (at least one sample of each side per class
    with two or more samples)."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test fraction must be between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * len(members)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# --- sources ------------------------------------------------------------------------

def _digits():
    datasets = import_optional("sklearn.datasets", "scikit-learn", "the digits dataset")
    bunch = datasets.load_digits()
    return bunch.data / 16.0, bunch.target


def _npz(path: Path):
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable .npz file ({err})") from err
    with archive:
        missing = {"X", "y"} - set(archive.files)
        if missing:
            raise DatasetError(f"{path}: needs arrays X (features) and y (labels); "
                               f"missing {sorted(missing)}, found {sorted(archive.files)}")
        return archive["X"], archive["y"]


def _csv(path: Path):
    with open(path, newline="") as f:
        rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    if rows and not _is_number(rows[0][0]):
        rows = rows[1:]  # a header row
    if not rows:
        raise DatasetError(f"{path}: no data rows")
    width = len(rows[0])
    if width < 2:
        raise DatasetError(f"{path}: each row needs at least one feature and a label (last column)")
    features = []
    for line, row in enumerate(rows, start=1):
        if len(row) != width:
            raise DatasetError(f"{path}: data row {line} has {len(row)} columns, "
                               f"the first has {width}")
        try:
            features.append([float(cell) for cell in row[:-1]])
        except ValueError as err:
            raise DatasetError(f"{path}: data row {line}: features must be numbers ({err})")
    labels = [row[-1].strip() for row in rows]
    if all(_is_number(label) for label in labels):
        as_float = np.array(labels, dtype=float)
        if np.all(as_float == np.round(as_float)):
            return np.array(features), as_float.astype(np.int64)
    return np.array(features), np.array(labels)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _labelled(name, X, y, test_fraction, seed) -> Dataset:
    X, y = np.asarray(X), np.asarray(y)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise DatasetError(f"{name}: X must be [samples, features] and y [samples]; "
                           f"got X {list(X.shape)} and y {list(y.shape)}")
    if X.dtype.kind not in "biuf":
        raise DatasetError(f"{name}: features must be numbers, got dtype {X.dtype}")
    X = X.astype(np.float32)
    if not np.all(np.isfinite(X)):
        raise DatasetError(f"{name}: features contain NaN or infinite values")
    classes, y_index = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise DatasetError(f"{name}: needs at least 2 classes, found {len(classes)}")
    train, test = stratified_split(y_index, test_fraction, seed)
    return Dataset(name, X[train], y_index[train].astype(np.int64), X[test],
                   y_index[test].astype(np.int64), tuple(classes.tolist()))
