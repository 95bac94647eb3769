"""Shape ops: elements moved, none computed (reshape, transpose, broadcast_to, concat,
pad). Each is linear: ZERO curvature."""

from __future__ import annotations

import functools
from math import prod

import numpy as np

from .. import sparsity
from ..costs import TEMPORARIES, OpCost
from ..errors import GraphError, RuleError
from ..shapes import fill_seed, fmt_shape, normalize_axis, num_elements, unbroadcast
from .table import ZERO, AttrSpec, OpDef, any_dtype, row, shift

def _dims(values, field, allow_minus_one=False):
    low = -1 if allow_minus_one else 0
    for v in values:
        if v < low:
            raise RuleError(f"dimension {v} is negative", field)
    return tuple(values)


def _norm_reshape(attrs, shapes):
    shape = _dims(attrs["shape"], "attrs.shape", allow_minus_one=True)
    if shape.count(-1) > 1:
        raise RuleError(f"more than one -1 in {list(shape)}", "attrs.shape")
    return dict(attrs, shape=shape)


def _reshape_rule(shapes, dtypes, shape):
    size = num_elements(shapes[0])
    known = num_elements(d for d in shape if d != -1)
    if -1 in shape:
        if size is None:
            return tuple(None if d == -1 else d for d in shape)
        if known == 0 or size % known:
            raise RuleError(f"cannot reshape {fmt_shape(shapes[0])} into {fmt_shape(shape)}",
                            "attrs.shape")
        return tuple(size // known if d == -1 else d for d in shape)
    if size is not None and size != known:
        raise RuleError(f"cannot reshape {fmt_shape(shapes[0])} ({size} elements) into "
                        f"{fmt_shape(shape)} ({known} elements)", "attrs.shape")
    return shape


row(OpDef(
    "reshape", 1, _reshape_rule,
    lambda x, shape: np.asarray(x).reshape(shape),
    lambda t, x, ans, shape: t[0].reshape(t[0].shape[:1] + ans.shape),
    lambda i, g, x, ans, shape: g.reshape(g.shape[:1] + x[0].shape),
    (AttrSpec("shape", "ints", description="new shape; one entry may be -1"),),
    frozenset(), False, _norm_reshape, "NumPy reshape (C order)",
    dtype=any_dtype, curvature=ZERO,
    pattern=sparsity.moves))


def _norm_perm(attrs, shapes):
    ndim = len(shapes[0])
    perm = attrs["perm"]
    if perm is None:
        perm = tuple(reversed(range(ndim)))
    if sorted(perm) != list(range(ndim)):
        raise RuleError(f"perm {list(perm)} is not a permutation of the {ndim} axes",
                        "attrs.perm")
    return dict(attrs, perm=tuple(perm))


@functools.lru_cache(maxsize=256)
def _seed_perm(perm: tuple, inverse: bool) -> tuple:
    """A seed's axis order for `perm` (or its inverse): the direction axis stays first.
    Kept: a graph's permutations are few, and argsort per call was most of the VJP."""
    if inverse:
        perm = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    return (0,) + shift(perm)


row(OpDef(
    "transpose", 1, lambda shapes, dtypes, perm: tuple(shapes[0][p] for p in perm),
    lambda x, perm: np.transpose(x, perm),
    lambda t, x, ans, perm: t[0].transpose(_seed_perm(perm, False)),
    lambda i, g, x, ans, perm: g.transpose(_seed_perm(perm, True)),
    (AttrSpec("perm", "ints", None, "axis order; absent: reversed"),),
    frozenset(), False, _norm_perm, "NumPy transpose",
    dtype=any_dtype, curvature=ZERO,
    pattern=sparsity.moves))


def _norm_target(attrs, shapes):
    return dict(attrs, shape=_dims(attrs["shape"], "attrs.shape"))


def _broadcast_to_rule(shapes, dtypes, shape):
    src = shapes[0]
    ok = len(src) <= len(shape) and all(
        d in (1, None) or d == s for d, s in zip(reversed(src), reversed(shape)))
    if not ok:
        raise RuleError(f"cannot broadcast {fmt_shape(src)} to {fmt_shape(shape)}", "attrs.shape")
    return shape


row(OpDef(
    "broadcast_to", 1, _broadcast_to_rule,
    lambda x, shape: np.broadcast_to(x, shape),
    lambda t, x, ans, shape: fill_seed(t[0], shape),
    lambda i, g, x, ans, shape: unbroadcast(g, x[0].shape),
    (AttrSpec("shape", "ints", description="target shape"),),
    frozenset(), False, _norm_target, "NumPy broadcast_to",
    dtype=any_dtype, curvature=ZERO,
    pattern=sparsity.moves))


def _norm_concat(attrs, shapes):
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise RuleError("inputs have different ranks: "
                        + ", ".join(fmt_shape(s) for s in shapes))
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


class Repeats:
    """A concat node's references when some value is read more than once (concat(x, x,
    ..., x, y)), made once per plan: the rules get each distinct value once and gather
    the result from them with one index array, so a call costs O(distinct values) Python
    and vectorized work over the references and the elements produced.

    `refs` holds per reference the position of its value among the distinct ones;
    `order` the references grouped by value (stable), `bounds` each group's range in it.
    With the sizes along the axis known when the plan is made, each reference's start in
    the result (`starts`) is computed then too. A node of many inputs, none repeated, gets
    one as well (table.COMPACT_FROM): its vjp then finds an input's slice at once."""

    def __init__(self, refs, shapes, axis):
        # int32 where it holds them: a plan keeps these per reference (max_references)
        self.refs = _narrow(refs, len(shapes))
        self.counts = np.bincount(refs, minlength=len(shapes))
        self.order = _narrow(np.argsort(refs, kind="stable"), len(refs))
        self.bounds = np.concatenate(([0], np.cumsum(self.counts)))
        self.repeated = len(shapes) < len(refs)  # else: many inputs, each read once
        sizes = [s[axis] for s in shapes]
        self.sizes = None if None in sizes else np.array(sizes, np.int64)
        if self.sizes is not None:
            starts = self._starts(self.sizes)
            self.starts = _narrow(starts, int(starts[-1]) + int(self.sizes[self.refs[-1]]))
        else:
            self.starts = None
        self._last = None  # sizes known only at run time: the last call's (sizes, starts)

    def axis_sizes(self, x, axis) -> np.ndarray:
        """Each distinct value's size along the axis (x: the values, Stubs or shapes)."""
        if self.sizes is not None:
            return self.sizes
        return np.array([getattr(v, "shape", v)[axis] for v in x], np.int64)

    def starts_for(self, sizes) -> np.ndarray:
        """Each reference's start along the result's axis: made with the plan when the
        sizes are static, else once per call (the last call's kept: a vjp asks for every
        input of the node)."""
        if self.starts is not None:
            return self.starts
        key = sizes.tobytes()
        last = self._last
        if last is not None and last[0] == key:
            return last[1]
        starts = self._starts(sizes)
        self._last = (key, starts)
        return starts

    def _starts(self, sizes) -> np.ndarray:
        lengths = sizes[self.refs]
        starts = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        return starts

    def index(self, sizes) -> np.ndarray:
        """Per element of the result along the axis, its position in the distinct values
        concatenated once."""
        starts = self.starts_for(sizes)
        joined = np.zeros(len(sizes), np.int64)
        np.cumsum(sizes[:-1], out=joined[1:])
        lengths = sizes[self.refs]
        return np.repeat(joined[self.refs] - starts, lengths) + np.arange(starts[-1] + lengths[-1])

    def segments(self, i, sizes) -> np.ndarray:
        """The positions along the result's axis that read distinct value i: one row per
        reference to it."""
        starts = self.starts_for(sizes)
        mine = self.order[self.bounds[i]:self.bounds[i + 1]]
        return starts[mine][:, None] + np.arange(sizes[i])


def _narrow(a, largest):
    return a.astype(np.int32) if largest < 2 ** 31 else a


def _concat_references(refs, shapes, axis):
    return Repeats(refs, shapes, axis)


def _concat_rule(shapes, dtypes, axis, refs=None):
    out = list(shapes[0])
    for s in shapes[1:]:
        for j, (a, b) in enumerate(zip(out, s)):
            if j != axis and a is not None and b is not None and a != b:
                raise RuleError("shapes " + ", ".join(fmt_shape(x) for x in shapes)
                                + f" differ outside axis {axis}")
            if j != axis and a is None:
                out[j] = b
    sizes = [s[axis] for s in shapes]
    counts = [1] * len(sizes) if refs is None else refs.counts.tolist()
    out[axis] = None if None in sizes else sum(c * d for c, d in zip(counts, sizes))
    return tuple(out)


def _concat(*x, axis, refs=None):
    joined = np.concatenate(x, axis=axis) if len(x) > 1 or refs is None else x[0]
    if refs is None or not refs.repeated:
        return joined
    return np.take(joined, refs.index(refs.axis_sizes(x, axis)), axis=axis)


def _concat_jvp(t, x, ans, axis, refs=None):
    k = next(s for s in t if s is not None).shape[0]
    parts = [np.zeros((k,) + xi.shape, ans.dtype) if ti is None else fill_seed(ti, xi.shape)
             for ti, xi in zip(t, x)]
    joined = np.concatenate(parts, axis=axis + 1)
    if refs is None or not refs.repeated:
        return joined
    return np.take(joined, refs.index(refs.axis_sizes(x, axis)), axis=axis + 1)


def _concat_vjp(i, g, x, ans, axis, refs=None):
    if refs is None:
        start = sum(xj.shape[axis] for xj in x[:i])
        index = (slice(None),) * (axis + 1) + (slice(start, start + x[i].shape[axis]),)
        return g[index]
    # the references to x[i] each read one slice of g: their sum, gathered in one take
    segments = refs.segments(i, refs.axis_sizes(x, axis))
    uses, size = segments.shape
    if uses == 1:
        start = int(segments[0, 0]) if size else 0
        return g[(slice(None),) * (axis + 1) + (slice(start, start + size),)]
    taken = np.take(g, segments.ravel(), axis=axis + 1)
    return taken.reshape(g.shape[:axis + 1] + (uses, size) + g.shape[axis + 2:]).sum(axis + 1)


def _concat_cost(mode, shapes, out, dtype, axis, refs=None):
    """The default cost (engine/costs.py), plus with repeated references the gather's
    index arrays: a few int64 entries per reference and per element along the axis."""
    size = prod(out)
    scratch = TEMPORARIES * max([size] + [prod(s) for s in shapes]) * dtype.itemsize
    flops = size + sum(prod(s) for s in shapes)
    if refs is not None:
        scratch += 8 * (6 * len(refs.refs) + 4 * out[axis]) + 2 * dtype.itemsize * size
        flops += len(refs.refs) + out[axis] + size
    return OpCost(scratch, flops if mode == "values" else 2 * flops)


row(OpDef(
    "concat", None, _concat_rule, _concat, _concat_jvp, _concat_vjp,
    (AttrSpec("axis", "int", 0, "axis to join along"),),
    frozenset(), False, _norm_concat, "NumPy concatenate of one or more inputs",
    dtype=any_dtype, curvature=ZERO, cost=_concat_cost,
    pattern=sparsity.concat_pattern, references=_concat_references))


def _norm_pad(attrs, shapes):
    ndim, pads = len(shapes[0]), attrs["pads"]
    if len(pads) != 2 * ndim:
        raise RuleError(f"pads has {len(pads)} values, expected {2 * ndim}: a begin value "
                        "for each axis, then an end value for each", "attrs.pads")
    if min(pads, default=0) < 0:
        raise RuleError(f"negative pads in {list(pads)} are not supported (use slice to "
                        "crop)", "attrs.pads")
    return dict(attrs, pads=tuple(zip(pads[:ndim], pads[ndim:])))


def _pad_dtype(names, dtypes, pads, value):
    """Any dtype; an integer input takes only a finite value its dtype holds (NumPy
    would raise at run time, or wrap it)."""
    dtype = any_dtype(names, dtypes)
    kind = np.dtype(dtype).kind
    if kind in "iu":
        info = np.iinfo(dtype)
        if not np.isfinite(value) or not info.min <= value <= info.max:
            raise RuleError(f"value {value!r} cannot be padded into the {dtype} input "
                            f"'{names[0]}' (a finite value from {info.min} to {info.max})",
                            "attrs.value", GraphError)
    elif kind == "b" and value not in (0, 1):
        raise RuleError(f"value {value!r} cannot be padded into the bool input "
                        f"'{names[0]}' (0 or 1)", "attrs.value", GraphError)
    return dtype


def _pad_vjp(i, g, x, ans, pads, value):
    inner = tuple(slice(b, b + d) for (b, _), d in zip(pads, x[0].shape))
    return g[(slice(None),) + inner]


row(OpDef(
    "pad", 1,
    lambda shapes, dtypes, pads, value: tuple(
        None if d is None else d + b + e for d, (b, e) in zip(shapes[0], pads)),
    lambda x, pads, value: np.pad(x, pads, constant_values=value) if pads else x,
    lambda t, x, ans, pads, value: np.pad(t[0], ((0, 0),) + pads),
    _pad_vjp,
    (AttrSpec("pads", "ints", description="begin values for each axis, then end values "
              "(ONNX order), each >= 0"),
     AttrSpec("value", "float", 0.0, "the value padded in")),
    frozenset(), False, _norm_pad, "constant padding (ONNX Pad, mode constant)",
    dtype=_pad_dtype, curvature=ZERO,
    pattern=sparsity.pad_moves))


