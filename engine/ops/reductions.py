"""Reductions over axes (sum, mean, max, min, prod) and the running sum (cumsum)."""

from __future__ import annotations

from math import prod

import numpy as np

from .. import sparsity
from ..errors import RuleError
from ..shapes import fill_seed, fmt_shape, normalize_axes
from ..costs import OpCost
from .table import ZERO, AttrSpec, OpDef, norm_axis, row, shift

AXES = AttrSpec("axes", "ints", None, "axes to reduce (negative counts from the end); "
                "absent: all axes")
KEEPDIMS = AttrSpec("keepdims", "bool", False, "keep reduced axes with size 1")


def _norm_axes(attrs, shapes):
    return dict(attrs, axes=normalize_axes(attrs["axes"], len(shapes[0]), "attrs.axes"))


def _reduce_rule(shapes, dtypes, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shapes[0]))
    return tuple(d for i, d in enumerate(shapes[0]) if i not in axes)


def _nonempty(shape, axes, what):
    """max-like ops have no value over an empty axis (NumPy raises; so do we, earlier)."""
    for a in axes:
        if shape[a] == 0:
            raise RuleError(f"axis {a} of {fmt_shape(shape)} is empty: {what} has no value",
                            "attrs.axes" if what in ("max", "min") else "attrs.axis")


def _extreme_rule(what):
    def rule(shapes, dtypes, axes, keepdims):
        _nonempty(shapes[0], axes, what)
        return _reduce_rule(shapes, dtypes, axes, keepdims)
    return rule


def normalizing_rule(what):
    def rule(shapes, dtypes, axis, keepdims=None):
        _nonempty(shapes[0], (axis,), what)
        if keepdims is None:
            return shapes[0]
        return _reduce_rule(shapes, dtypes, (axis,), keepdims)
    return rule


def _expand(g, axes, keepdims):
    """A reduced cotangent with its reduced axes back (size 1), ready to broadcast (a
    reshape: np.expand_dims's own checks cost more than the rest of a small vjp)."""
    if keepdims or not axes:
        return g
    shape = list(g.shape)
    for a in sorted(axes):
        shape.insert(a + 1, 1)
    return g.reshape(shape)


def _mean(x, axes, keepdims):
    """np.mean's own arithmetic, a sum then a division by the count as intp, without its
    Python wrapper (which costs several times the sum of a small array)."""
    n = _count(x.shape, axes)
    if n == 0:
        return np.mean(x, axis=axes, keepdims=keepdims)  # nan, with numpy's warning
    total = np.add.reduce(x, axis=axes, keepdims=keepdims)
    if isinstance(total, np.ndarray):
        return np.true_divide(total, np.intp(n), out=total, casting="unsafe")
    return total.dtype.type(total / np.intp(n))


def _count(shape, axes):
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def _extreme_share(x, ans, axes, keepdims):
    """Each element's share of the max's (or min's) derivative: ties share it evenly."""
    hit = x == (ans if keepdims else np.expand_dims(ans, axes))
    return (hit / hit.sum(axis=axes, keepdims=True)).astype(ans.dtype, copy=False)


def reduction(name, f, jvp, vjp, saves, float_only, description, curvature,
              rule=_reduce_rule, cost=None):
    return row(OpDef(name, 1, rule, f, jvp, vjp, (AXES, KEEPDIMS), frozenset(saves),
                     float_only, _norm_axes, description, curvature=curvature, cost=cost,
                     pattern=sparsity.reduction))


reduction(
    "sum", lambda x, axes, keepdims: np.add.reduce(x, axis=axes, keepdims=keepdims,
                                                   dtype=x.dtype),  # (np.sum, unwrapped)
    lambda t, x, ans, axes, keepdims: np.sum(t[0], axis=shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims), g.shape[:1] + x[0].shape),
    (), False, "sum over axes, in the input's dtype", ZERO)
reduction(
    "mean", _mean,
    lambda t, x, ans, axes, keepdims: np.mean(t[0], axis=shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims) / _count(x[0].shape, axes), g.shape[:1] + x[0].shape),
    (), True, "mean over axes", ZERO)


def _extreme_jvp(t, x, ans, axes, keepdims):
    return np.sum(t[0] * _extreme_share(x[0], ans, axes, keepdims), axis=shift(axes),
                  keepdims=keepdims)


def _extreme_vjp(i, g, x, ans, axes, keepdims):
    return _expand(g, axes, keepdims) * _extreme_share(x[0], ans, axes, keepdims)


reduction(
    "max", lambda x, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims),
    _extreme_jvp, _extreme_vjp, {"x", "ans"}, False,
    "max over axes; tied maxima share the derivative evenly", ZERO, _extreme_rule("max"))
reduction(
    "min", lambda x, axes, keepdims: np.min(x, axis=axes, keepdims=keepdims),
    _extreme_jvp, _extreme_vjp, {"x", "ans"}, False,
    "min over axes; tied minima share the derivative evenly", ZERO, _extreme_rule("min"))


def _prod_partials(x, axes):
    """d prod / d x_i, the product of the other elements, exact where x has zeros: a
    reduced slice with one zero gives the zero the product of the rest and the other
    elements 0; with two or more zeros every partial is 0."""
    zero = x == 0
    zeros = np.sum(zero, axis=axes, keepdims=True)
    rest = np.where(zero, 1, x)
    others = np.prod(rest, axis=axes, keepdims=True)
    return np.where(zeros == 0, others / rest,
                    np.where(zero & (zeros == 1), others, 0)).astype(x.dtype, copy=False)





def _prod_curvature(i, g, x, ans, t, axes, keepdims):
    """The tangent of d prod / d x_i (the product of the other elements), exact where x
    has zeros: with R the product of a slice's non-zero elements, z its zeros,
    S = sum of t_j / x_j over its non-zero elements and T = sum of the zeros' tangents,
    z = 0: R / x_i (S - t_i / x_i);
    z = 1: the zero gets R S, the others R / x_i T;
    z = 2: each zero gets R times the other zero's tangent, the others 0;
    z > 2: 0."""
    ti = t[0]
    if ti is None:
        return None
    xv = x[0]
    ti = fill_seed(ti, xv.shape)
    sa = shift(axes)
    zero = xv == 0
    rest = np.where(zero, 1, xv)
    zeros = np.sum(zero, axis=axes, keepdims=True)
    r = np.prod(rest, axis=axes, keepdims=True)
    ratio = np.where(zero, 0, ti / rest)
    s = np.sum(ratio, axis=sa, keepdims=True)
    tz = np.where(zero, ti, 0)
    tzs = np.sum(tz, axis=sa, keepdims=True)
    d = np.where(zeros == 0, r / rest * (s - ratio),
                 np.where(zeros == 1, np.where(zero, r * s, r / rest * tzs),
                          np.where(zeros == 2, np.where(zero, r * (tzs - tz), 0), 0)))
    return _expand(g, axes, keepdims) * d.astype(xv.dtype, copy=False)


def _prod_cost(mode, shapes, out, dtype, axes, keepdims):
    """prod's partials hold about four arrays of x's size and two masks; its curvature
    term evaluates every branch of its zero cases, about ten arrays of x's size per
    tangent direction at once, declared per seed direction (a second-order request
    counts 2k + 1 of them for k tangents). Was: estimated from the output's size, and
    a Hessian peaked at 3.5x the estimate."""
    size = prod(shapes[0])
    isz = dtype.itemsize
    if mode == "values":
        return OpCost(size * isz + prod(out) * isz, size + prod(out))
    if mode in ("forward", "reverse"):
        return OpCost(4 * size * isz + 2 * size, 8 * size + prod(out))
    return OpCost(5 * size * isz + 2 * size, 12 * size + prod(out))


reduction(
    "prod", lambda x, axes, keepdims: np.prod(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
    lambda t, x, ans, axes, keepdims: np.sum(
        t[0] * _prod_partials(x[0], axes), axis=shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: _expand(g, axes, keepdims) * _prod_partials(x[0], axes),
    "x", False, "product over axes, in the input's dtype; exact derivative where inputs are 0",
    lambda i, g, x, ans, t, t_ans, axes, keepdims: _prod_curvature(i, g, x, ans, t, axes,
                                                                   keepdims),
    cost=_prod_cost)


# --- running sum -----------------------------------------------------------------------

def _cumsum(x, axis, reverse, exclusive):
    if reverse:
        x = np.flip(x, axis)
    out = np.cumsum(x, axis=axis, dtype=x.dtype)
    if exclusive:
        shifted = np.zeros_like(out)
        dst, src = [slice(None)] * out.ndim, [slice(None)] * out.ndim
        dst[axis], src[axis] = slice(1, None), slice(None, -1)
        shifted[tuple(dst)] = out[tuple(src)]
        out = shifted
    return np.flip(out, axis) if reverse else out


row(OpDef(
    "cumsum", 1, lambda shapes, dtypes, axis, reverse, exclusive: shapes[0],
    _cumsum,
    lambda t, x, ans, axis, reverse, exclusive: _cumsum(t[0], axis + 1, reverse, exclusive),
    # the transpose of a running sum is the running sum the other way
    lambda i, g, x, ans, axis, reverse, exclusive: _cumsum(g, axis + 1, not reverse,
                                                           exclusive),
    (AttrSpec("axis", "int", description="the axis to sum along"),
     AttrSpec("reverse", "bool", False, "sum from the end of the axis"),
     AttrSpec("exclusive", "bool", False, "leave each element out of its own sum (ONNX)")),
    frozenset(), False, norm_axis, "running sum along axis, in the input's dtype",
    curvature=ZERO,
    pattern=sparsity.cumsum_pattern))

