"""Normalizations along one axis: softmax, log_softmax, logsumexp."""

from __future__ import annotations

from math import prod

import numpy as np

from .. import sparsity
from ..shapes import fill_seed
from .reductions import KEEPDIMS, normalizing_rule
from .table import AttrSpec, OpDef, norm_axis, row

AXIS = AttrSpec("axis", "int", -1, "the axis the op normalizes over")


def _normalizing_flops(shapes, out, **attrs):
    """A maximum, exp of the shifted values, a sum and a division or log: four passes."""
    return 4 * prod(shapes[0])


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis)


# A last axis at most this long, over at least this many rows, is reduced across rows
# (_reduce_along).
_SHORT_AXIS = 16
_MANY_ROWS = 64


def _reduce_along(ufunc, x, axis):
    """ufunc.reduce(x, axis, keepdims=True). NumPy reduces a short last axis row by row
    (~40 ns a row: 19 us for an attention's 448 rows of 7 in float32); moved to the front
    as one contiguous copy (an array of x's size, within the row's declared temporaries)
    it is reduced across the rows in a few vector passes (~6 us), adding in the same
    order as the row by row loop for under 8 elements (NumPy's pairwise sum starts at 8)."""
    n = x.shape[axis]
    if axis == x.ndim - 1 and 1 < n <= _SHORT_AXIS and x.size >= _MANY_ROWS * n:
        front = x.reshape(-1, n).T.copy()
        return ufunc.reduce(front, axis=0).reshape(x.shape[:-1] + (1,))
    return ufunc.reduce(x, axis=axis, keepdims=True)


def _softmax(x, axis):
    # in place on the one new array (np.max and np.sum's Python wrappers cost more than
    # the passes themselves on an attention's small rows)
    e = x - _reduce_along(np.maximum, x, axis)
    np.exp(e, out=e)
    e /= _reduce_along(np.add, e, axis)
    return e


def _softmax_map(s, ans, axis):
    """The softmax Jacobian (symmetric) applied to a seed: ans s - ans sum(ans s)."""
    out = s * ans
    out -= ans * _reduce_along(np.add, out, axis + 1)
    return out


def _softmax_curvature(i, g, x, ans, t, t_ans, axis):
    """vjp = ans (g - sum(g ans)): its tangent t_ans (g - sum(g ans)) - ans sum(g t_ans)."""
    if t_ans is None:
        return None
    a = axis + 1
    return (t_ans * (g - np.sum(g * ans, axis=a, keepdims=True))
            - ans * np.sum(g * t_ans, axis=a, keepdims=True))


row(OpDef(
    "softmax", 1, normalizing_rule("softmax"), _softmax,
    lambda t, x, ans, axis: _softmax_map(t[0], ans, axis),
    lambda i, g, x, ans, axis: _softmax_map(g, ans, axis),
    (AXIS,), frozenset({"ans"}), True, norm_axis, "exp(x) / sum(exp(x)) along axis",
    flops=_normalizing_flops, curvature=_softmax_curvature,
    pattern=sparsity.along_axis))


def _log_softmax(x, axis):
    # (the methods: the same reductions as np.max and np.sum, without their wrappers)
    z = x - x.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def _log_softmax_jvp(t, x, ans, axis):
    return t[0] - np.sum(t[0] * np.exp(ans), axis=axis + 1, keepdims=True)


def _log_softmax_vjp(i, g, x, ans, axis):
    return g - np.exp(ans) * np.sum(g, axis=axis + 1, keepdims=True)


def _log_softmax_curvature(i, g, x, ans, t, t_ans, axis):
    """vjp = g - exp(ans) sum(g): its tangent -exp(ans) t_ans sum(g)."""
    if t_ans is None:
        return None
    return -(np.exp(ans) * t_ans * np.sum(g, axis=axis + 1, keepdims=True))


row(OpDef(
    "log_softmax", 1, normalizing_rule("log_softmax"),
    _log_softmax, _log_softmax_jvp, _log_softmax_vjp,
    (AXIS,), frozenset({"ans"}), True, norm_axis, "x - logsumexp(x) along axis",
    flops=_normalizing_flops, curvature=_log_softmax_curvature,
    pattern=sparsity.along_axis))


def _lse_weights(x, ans, axis, keepdims):
    return np.exp(x - (ans if keepdims else np.expand_dims(ans, axis)))


def _logsumexp_curvature(i, g, x, ans, t, t_ans, axis, keepdims):
    """vjp = g w with w = exp(x - ans) (the softmax): its tangent g w (t - t_ans)."""
    if t[0] is None:
        return None
    xv = x[0]
    lse = ans if keepdims else np.expand_dims(ans, axis)
    w = np.exp(xv - lse)
    dt = fill_seed(t[0], xv.shape)
    if t_ans is not None:
        dt = dt - (t_ans if keepdims else np.expand_dims(t_ans, axis + 1))
    ge = g if keepdims else np.expand_dims(g, axis + 1)
    return ge * w * dt


row(OpDef(
    "logsumexp", 1, normalizing_rule("logsumexp"),
    _logsumexp,
    lambda t, x, ans, axis, keepdims: np.sum(
        t[0] * _lse_weights(x[0], ans, axis, keepdims), axis=axis + 1, keepdims=keepdims),
    lambda i, g, x, ans, axis, keepdims: (
        (g if keepdims else np.expand_dims(g, axis + 1)) * _lse_weights(x[0], ans, axis, keepdims)),
    (AXIS, KEEPDIMS), frozenset({"x", "ans"}), True, norm_axis,
    "log(sum(exp(x))) along axis, computed without overflow",
    flops=_normalizing_flops, curvature=_logsumexp_curvature,
    pattern=sparsity.logsumexp_pattern))
