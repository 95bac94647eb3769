"""Indexing: slice (x[start:stop] along axes) and take (gather along an axis)."""

from __future__ import annotations

from math import prod

import numpy as np

from .. import sparsity
from ..errors import DTypeError, InputError, RuleError
from ..shapes import normalize_axes, normalize_axis
from ..costs import default_cost
from .table import OPS, ZERO, AttrSpec, OpDef, any_dtype, row

def _norm_slice(attrs, shapes):
    ndim = len(shapes[0])
    starts, stops = attrs["starts"], attrs["stops"]
    axes = attrs["axes"] if attrs["axes"] is not None else tuple(range(len(starts)))
    if not len(starts) == len(stops) == len(axes):
        raise RuleError(f"starts, stops and axes differ in length "
                        f"({len(starts)}, {len(stops)}, {len(axes)})", "attrs.starts")
    axes = normalize_axes(axes, ndim, "attrs.axes")
    index = [slice(None)] * ndim
    for a, start, stop in zip(axes, starts, stops):
        index[a] = slice(start, stop)
    return {"index": tuple(index)}


def _slice_rule(shapes, dtypes, index):
    return tuple(None if d is None else len(range(*s.indices(d)))
                 for d, s in zip(shapes[0], index))


def _slice_vjp(i, g, x, ans, index):
    out = np.zeros(g.shape[:1] + x[0].shape, g.dtype)
    out[(slice(None),) + index] = g
    return out


row(OpDef(
    "slice", 1, _slice_rule,
    lambda x, index: x[index],
    lambda t, x, ans, index: t[0][(slice(None),) + index],
    _slice_vjp,
    (AttrSpec("starts", "ints", description="first index per axis (NumPy semantics)"),
     AttrSpec("stops", "ints", description="one past the last index per axis"),
     AttrSpec("axes", "ints", None, "axes the starts and stops refer to; absent: 0, 1, ...")),
    frozenset(), False, _norm_slice, "x[start:stop] along the given axes, step 1",
    dtype=any_dtype, curvature=ZERO,
    pattern=sparsity.moves))



def _take_dtype(names, dtypes, axis):
    if dtypes[1] not in ("int32", "int64"):
        raise RuleError(f"indices '{names[1]}' must be int32 or int64, got {dtypes[1]}",
                        "inputs[1]", DTypeError)
    return dtypes[0]


def _norm_take(attrs, shapes):
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


def _take(data, indices, axis, node=None):
    size = data.shape[axis]
    if indices.size == 1:  # one index (q, k and v from one tensor): no reductions
        low = high = int(indices.reshape(-1)[0])
    elif indices.size:
        low, high = int(indices.min()), int(indices.max())
    if indices.size:
        if low < -size or high >= size:
            bad = low if low < -size else high
            valid = f"valid: {-size} to {size - 1}" if size else "it is empty"
            raise InputError(f"index {bad} is out of range for axis {axis} of size {size} "
                             f"({valid})", node=node, op="take", field="inputs[1]")
    if indices.ndim == 0:  # one index (q, k and v from one tensor): a view, no copy
        return data[(slice(None),) * axis + (low if low >= 0 else low + size,)]
    return np.take(data, indices, axis=axis)


def _take_vjp(i, g, x, ans, axis, node=None):
    """Scatter-add g back along axis: one np.add.at over the flat positions of g's
    elements in the cotangent (its one-dimensional loop, ~3 ns an element here; over
    rows of the 2-D view, or sorting and add.reduceat, ~3x slower for an embedding's
    gather of 112 rows of 32)."""
    if i == 1:
        return None
    data, indices = x
    size = data.shape[axis]
    k = g.shape[0]
    before, after = prod(data.shape[:axis]), prod(data.shape[axis + 1:])
    if indices.size == 1:  # one index (ONNX's Gather of a scalar: q, k, v from one tensor)
        out = np.zeros((k,) + data.shape, g.dtype)
        index = int(indices.reshape(-1)[0])
        # g written straight into its slice (g may be a strided view: no copy of it first)
        out[(slice(None),) * (axis + 1) + (index if index >= 0 else index + size,)] = \
            g.reshape(out.shape[:axis + 1] + out.shape[axis + 2:])
        return out
    out = np.zeros(k * before * size * after, g.dtype)
    if indices.size and out.size:
        flat = indices.reshape(-1).astype(np.intp)
        flat[flat < 0] += size
        # the first element of each row of g in `out`, then one position per element
        rows = (np.arange(0, k * before * size, size, dtype=np.intp)[:, None] + flat) * after
        positions = (rows.reshape(-1, 1) + np.arange(after, dtype=np.intp)).reshape(-1) \
            if after > 1 else rows.reshape(-1)
        np.add.at(out, positions, g.reshape(-1))
    return out.reshape((k,) + data.shape)


def _take_cost(mode, shapes, out, dtype, axis):
    """costs.default_cost's, and in reverse the scatter's own arrays (_take_vjp): the
    flat cotangent, an index per element of g (with one temporary as large) and g
    flattened, per direction (a second-order step runs the VJP too)."""
    cost = default_cost(OPS["take"], mode, shapes, out, dtype, {"axis": axis})
    if mode in ("values", "forward"):
        return cost
    elements = prod(out)
    index = np.dtype(np.intp).itemsize
    return cost._replace(scratch=cost.scratch + prod(shapes[0]) * dtype.itemsize
                         + elements * (2 * index + dtype.itemsize) + prod(shapes[1]) * index)


row(OpDef(
    "take", 2,
    lambda shapes, dtypes, axis, node=None: (
        shapes[0][:axis] + tuple(shapes[1]) + shapes[0][axis + 1:]),
    _take,
    lambda t, x, ans, axis, node=None: (
        None if t[0] is None else np.take(t[0], x[1], axis=axis + 1)),
    _take_vjp,
    (AttrSpec("axis", "int", 0, "the axis of data to pick along"),),
    frozenset({"x"}), False, _norm_take,
    "NumPy take(data, indices, axis) = ONNX Gather: int32 or int64 indices of any shape, "
    "negative ones counted from the end; an index out of range is an error; no derivative "
    "with respect to the indices", dtype=_take_dtype, node_attr=True,
    curvature=ZERO,
    pattern=sparsity.take_pattern, cost=_take_cost))


