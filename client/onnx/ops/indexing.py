"""Indexing by index tuples: GatherND and ScatterND, GatherElements and ScatterElements.

No engine op of their own: the index tuples become flat positions into the leading
axes of the data (reshaped to one axis), and
- a gather is a `take` at those positions (its derivative: take's),
- a scatter with known indices is a `where` between the data and a `take` of the updates
  (reduction "add": the data plus a 0/1 matrix of positions times the updates),
so gradients reach both the data and the updates through ops the engine has.
"""

from __future__ import annotations

import numpy as np

from ..registry import _out, converts
from ..values import Dim, Dyn, _FoldError, _dtype_of, _norm_axis, _prod, _shape_of


def _fixed(shape, what):
    if any(isinstance(d, Dim) for d in shape):
        raise _FoldError(f"{what} has a dynamic dimension {tuple(shape)}: give the inputs "
                         "fixed sizes (input_shapes=...)")
    return [int(d) for d in shape]


def _flat_positions(imp, indices, dims):
    """Index tuples (..., k) into axes of sizes `dims` (negative indices count from the
    end) as flat positions (...): known indices in numpy, else graph ops."""
    e = imp.e
    k = len(dims)
    strides = [_prod(dims[j + 1:]) for j in range(k)]
    if not isinstance(indices, Dyn):
        idx = np.asarray(imp.static(indices, "indices"), dtype=np.int64)
        size = np.asarray(dims, dtype=np.int64)
        if np.any(idx < -size) or np.any(idx >= size):
            raise _FoldError(f"an index is out of range for axes of sizes {tuple(dims)}")
        return ((idx % size) * np.asarray(strides, dtype=np.int64)).sum(-1) if k else \
            np.zeros(idx.shape[:-1], np.int64)
    idx = e.cast(indices, "int64")
    lead = list(_shape_of(idx))[:-1]
    flat = None
    for j in range(k):
        col = e.reshape(e.slice(idx, [j], [j + 1], [-1]), lead)
        col = e.where(e.binary("less", col, np.asarray(0, np.int64)),
                      e.add(col, np.asarray(dims[j], np.int64)), col)
        term = e.mul(col, np.asarray(strides[j], np.int64)) if strides[j] != 1 else col
        flat = term if flat is None else e.add(flat, term)
    return flat if flat is not None else np.zeros(lead, np.int64)


@converts("GatherND")
def _gather_nd(imp, node, x, attrs):
    data, indices = x
    b = int(attrs.get("batch_dims", 0))
    shape = list(_shape_of(data))
    ishape = list(_shape_of(indices))
    k = _fixed(ishape[-1:], "GatherND's index depth")[0]
    if b + k > len(shape):
        raise _FoldError(f"index tuples of length {k} after {b} batch axes for rank "
                         f"{len(shape)} data")
    batch = _fixed(shape[:b], "GatherND's batch axes")
    inner = _fixed(shape[b:b + k], "GatherND's indexed axes")
    rest = shape[b + k:]
    e = imp.e
    flat = _flat_positions(imp, indices, inner)
    if b:
        mid = ishape[b:-1]
        offsets = (np.arange(_prod(batch), dtype=np.int64) * _prod(inner)).reshape(
            batch + [1] * len(mid))
        flat = e.add(flat, offsets)
    table = e.reshape(data, [_prod(batch) * _prod(inner)] + rest)
    return e.take(table, flat, 0, name=_out(node))


@converts("ScatterND")
def _scatter_nd(imp, node, x, attrs):
    data, indices, updates = x
    reduction = attrs.get("reduction", "none")
    if reduction not in ("none", "add"):
        raise _FoldError(f"reduction {reduction!r} is not supported (none and add are)")
    if isinstance(indices, Dyn) and indices.array is None:
        raise _FoldError("ScatterND's indices must be known at import time (a constant, an "
                         "initializer or computed from shapes), but they depend on the "
                         "graph's inputs")
    shape = _fixed(_shape_of(data), "ScatterND's data")
    idx = np.asarray(imp.static(indices, "indices"), dtype=np.int64)
    k = idx.shape[-1]
    if k > len(shape):
        raise _FoldError(f"index tuples of length {k} for rank {len(shape)} data")
    prefix, rest = shape[:k], shape[k:]
    positions = np.asarray(_flat_positions(imp, idx, prefix)).ravel()
    e = imp.e
    p, m = _prod(prefix), positions.size
    table = e.reshape(data, [p] + rest)
    rows = e.reshape(updates, [m] + rest)
    column = [p] + [1] * len(rest)
    if reduction == "add":
        e.charge([p, m], _dtype_of(data), "ScatterND's position matrix")
        hits = np.zeros((p, m), dtype=_dtype_of(data))
        hits[positions, np.arange(m)] = 1
        flat_rows = e.reshape(rows, [m, _prod(rest)])
        added = e.reshape(e.matmul(hits, flat_rows), [p] + rest)
        return e.reshape(e.add(table, added), shape, name=_out(node))
    source = np.zeros(p, np.int64)
    source[positions] = np.arange(m)  # the last write wins, as numpy's (and ONNX's) order
    written = np.zeros(p, bool)
    written[positions] = True
    out = e.where(written.reshape(column), e.take(rows, source, 0), table)
    return e.reshape(out, shape, name=_out(node))


@converts("GatherElements")
def _gather_elements(imp, node, x, attrs):
    data, indices = x
    shape = _fixed(_shape_of(data), "GatherElements' data")
    ishape = _fixed(_shape_of(indices), "GatherElements' indices")
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    # a full index tuple per element: the given index on `axis`, its own position elsewhere
    grid = np.indices(ishape, dtype=np.int64)
    e = imp.e
    parts = []
    for a in range(len(shape)):
        if a == axis:
            parts.append(e.reshape(indices, ishape + [1]))
        else:
            parts.append(grid[a].reshape(ishape + [1]))
    tuples = e.concat(parts, -1) if isinstance(indices, Dyn) else np.concatenate(
        [np.asarray(imp.static(indices, "indices"), np.int64).reshape(ishape + [1])
         if a == axis else grid[a].reshape(ishape + [1]) for a in range(len(shape))], -1)
    flat = _flat_positions(imp, tuples, shape)
    return e.take(e.reshape(data, [_prod(shape)]), flat, 0, name=_out(node))


@converts("ScatterElements")
def _scatter_elements(imp, node, x, attrs):
    data, indices, updates = x
    shape = _fixed(_shape_of(data), "ScatterElements' data")
    idx = np.asarray(imp.static(indices, "indices"), dtype=np.int64)
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    grid = np.indices(idx.shape, dtype=np.int64)
    grid[axis] = idx
    tuples = np.stack(list(grid), -1)
    return _scatter_nd(imp, node, [imp.e.reshape(data, shape), tuples,
                                   imp.e.reshape(updates, list(idx.shape))],
                       {"reduction": attrs.get("reduction", "none")})
