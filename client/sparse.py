"""Sparse Jacobian and Hessian blocks as the Client returns them: a `scipy.sparse`
matrix when scipy is installed (the `sparse` extra), else a plain SparseMatrix
(rows, cols, values, shape). Either way the matrix is the block with its two names'
elements flattened in C order: shape (elements of `of`, elements of `wrt`)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradserve.v1.codec import from_tensor


class SparseMatrix(NamedTuple):
    """A sparse block in COO form, when scipy is not installed."""

    rows: np.ndarray  # int64 row of each nonzero
    cols: np.ndarray  # int64 column of each nonzero
    values: np.ndarray
    shape: tuple  # (rows, columns)

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, self.values.dtype)
        out[self.rows, self.cols] = self.values
        return out


def block_value(block, value):
    """The value of a Jacobian or Hessian block message: its array when dense; when it
    has a `sparse` index, a scipy.sparse CSR matrix (or a SparseMatrix without scipy)."""
    if not block.HasField("sparse"):
        return value
    index = block.sparse
    rows = from_tensor(index.rows, "sparse.rows")
    cols = from_tensor(index.cols, "sparse.cols")
    shape = tuple(int(s) for s in index.shape)
    try:
        from scipy import sparse
    except ImportError:
        return SparseMatrix(rows, cols, value, shape)
    return sparse.csr_matrix((value, (rows, cols)), shape=shape)
