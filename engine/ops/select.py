"""Comparison and selection: the six comparisons (bool, no derivative), where, clip."""

from __future__ import annotations

import math

import numpy as np

from .. import sparsity
from ..errors import DTypeError, RuleError
from ..shapes import lift, unbroadcast
from .table import (ZERO, AttrSpec, OpDef, broadcast_rule, jvp_sum, no_cotangent, no_tangent,
                    row, shared_dtype)

def _compare_dtype(names, dtypes, **attrs):
    shared_dtype(names, dtypes, bool_ok=True)
    return "bool"


def comparison(name, f, symbol):
    return row(OpDef(name, 2, broadcast_rule, f, no_tangent, no_cotangent,
                     saves=frozenset(), float_only=False, dtype=_compare_dtype,
                     description=f"a {symbol} b, elementwise with broadcasting; bool "
                     "result, no derivative", pattern=sparsity.no_derivative))


comparison("equal", np.equal, "==")
comparison("not_equal", np.not_equal, "!=")
comparison("less", np.less, "<")
comparison("less_equal", np.less_equal, "<=")
comparison("greater", np.greater, ">")
comparison("greater_equal", np.greater_equal, ">=")


def _where_dtype(names, dtypes):
    if dtypes[0] != "bool":
        raise RuleError(f"the condition '{names[0]}' must be bool, got {dtypes[0]}",
                        "inputs[0]", DTypeError)
    return shared_dtype(names[1:], dtypes[1:], bool_ok=True)


def _where_jvp(t, x, ans):
    _, ta, tb = t
    if ta is None and tb is None:
        return None
    cond, n = x[0], ans.ndim
    return jvp_sum(None if ta is None else np.where(cond, lift(ta, n), 0),
                    None if tb is None else np.where(cond, 0, lift(tb, n)), ans.shape)


def _where_vjp(i, g, x, ans):
    if i == 0:
        return None
    picked = np.where(x[0], g, 0) if i == 1 else np.where(x[0], 0, g)
    return unbroadcast(picked, x[i].shape)


row(OpDef(
    "where", 3, broadcast_rule, np.where, _where_jvp, _where_vjp, saves=frozenset({"x"}),
    float_only=False, dtype=_where_dtype, curvature=ZERO,
    description="where(cond, a, b): a where cond is true, else b (bool cond, broadcasting); "
    "the derivative goes to a where cond holds, to b elsewhere, none to cond",
    pattern=sparsity.where_pattern))


def _norm_clip(attrs, shapes):
    for name in ("min", "max"):
        if attrs[name] is not None and math.isnan(attrs[name]):
            raise RuleError(f"{name} is NaN", f"attrs.{name}")
    return attrs


def _clip_bounds(dtype, low, high):
    """The bounds as values of `dtype`: integers rounded inwards and kept within the
    type's range, floats rounded to the dtype (float32: beyond its range, infinite)."""
    if dtype.kind in "iu":
        info = np.iinfo(dtype)

        def fit(v, rounded):
            return info.min if v < info.min else info.max if v > info.max else rounded(v)
        return (None if low is None else fit(low, math.ceil),
                None if high is None else fit(high, math.floor))
    with np.errstate(over="ignore"):
        return (None if low is None else dtype.type(low),
                None if high is None else dtype.type(high))


def _clip(x, min, max):
    low, high = _clip_bounds(x.dtype, min, max)
    if low is None and high is None:
        return x
    return np.clip(x, low, high)


def _clip_mask(x, min, max):
    """Where the derivative passes: min <= x <= max, bounds included (as PyTorch)."""
    low, high = _clip_bounds(x.dtype, min, max)
    mask = True
    if low is not None:
        mask = x >= low
    if high is not None:
        mask = mask & (x <= high)
    return mask


row(OpDef(
    "clip", 1, lambda shapes, dtypes, min, max: shapes[0], _clip,
    lambda t, x, ans, min, max: t[0] * _clip_mask(x[0], min, max),
    lambda i, g, x, ans, min, max: g * _clip_mask(x[0], min, max),
    (AttrSpec("min", "float", None, "lower bound; absent: none"),
     AttrSpec("max", "float", None, "upper bound; absent: none")),
    frozenset({"x"}), False, _norm_clip,
    "x limited to [min, max]; the derivative is 1 where min <= x <= max (bounds included, "
    "as in PyTorch), else 0", elementwise=True, curvature=ZERO,
    pattern=sparsity.elementwise))


