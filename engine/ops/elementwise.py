"""Elementwise ops: unary maps, binary arithmetic with broadcasting, and cast.

The Jacobian of an elementwise unary op is diagonal, so its JVP and VJP apply the
same map to the seed: one function `d(s, x, ans)` gives both, and its curvature
differs from another's only in f'' (written from x and ans).
"""

from __future__ import annotations

import math

from math import prod

import numpy as np

from .. import sparsity
from ..errors import DTypeError, RuleError
from ..ir import DTYPES
from ..shapes import lift, unbroadcast
from ..special import erf, erf_cost
from .table import ZERO, AttrSpec, OpDef, broadcast_rule, jvp_sum, row

# --- unary -----------------------------------------------------------------


def _same_shape(shapes, dtypes):
    return shapes[0]


def _unary_curvature(f2):
    """g * f''(x) * t for an elementwise unary op, f'' given from (x, ans)."""
    def rule(i, g, x, ans, t, t_ans):
        if t[0] is None:
            return None
        return g * f2(x[0], ans) * t[0]
    return rule


def unary(name, f, d, saves, f2=None, float_only=True, description="", passes=1, cost=None):
    """A row for y = f(x) with y' applied to a seed by d(s, x, ans) and y'' = f2(x, ans)
    (None: ZERO, the op is linear or piecewise linear); f makes `passes` NumPy passes
    over the elements (its FLOPs), or `cost` declares its costs in full."""
    return row(OpDef(
        name, 1, _same_shape, f,
        jvp=lambda t, x, ans: d(t[0], x[0], ans),
        vjp=lambda i, g, x, ans: d(g, x[0], ans),
        saves=frozenset(saves), float_only=float_only, description=description,
        elementwise=True, curvature=ZERO if f2 is None else _unary_curvature(f2),
        flops=None if passes == 1 else lambda shapes, out: passes * prod(out), cost=cost,
        pattern=sparsity.elementwise))


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


def sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


def _log_f2(x, ans):
    return -1 / (x * x)


def _sqrt_f2(x, ans):
    return -0.25 / (ans * ans * ans)


def _tan_f2(x, ans):
    return 2 * ans * (1 + ans * ans)


def _reciprocal_f2(x, ans):
    return 2 * (ans * ans * ans)


def _tanh_f2(x, ans):
    return -2 * ans * (1 - ans * ans)


def _sigmoid_f2(x, ans):
    return ans * (1 - ans) * (1 - 2 * ans)


def _softplus_f2(x, ans):
    s = sigmoid(x)
    return s * (1 - s)


def _log1p_f2(x, ans):
    d = 1 + x
    return -1 / (d * d)


def _erf_f2(x, ans):
    return -2 * x * (_TWO_OVER_SQRT_PI * np.exp(-(x * x)))


unary("neg", np.negative, lambda s, x, ans: -s, (), float_only=False, description="-x")
unary("sin", np.sin, lambda s, x, ans: s * np.cos(x), "x", lambda x, ans: -ans)
unary("cos", np.cos, lambda s, x, ans: -(s * np.sin(x)), "x", lambda x, ans: -ans)
unary("tan", np.tan, lambda s, x, ans: s * (1 + ans * ans), {"ans"}, _tan_f2)
unary("exp", np.exp, lambda s, x, ans: s * ans, {"ans"}, lambda x, ans: ans)
unary("log", np.log, lambda s, x, ans: s / x, "x", _log_f2)
unary("sqrt", np.sqrt, lambda s, x, ans: s / (ans + ans), {"ans"}, _sqrt_f2)
unary("square", np.square, lambda s, x, ans: s * (x + x), "x", lambda x, ans: 2,
      float_only=False)
unary("reciprocal", np.reciprocal, lambda s, x, ans: -(s * (ans * ans)), {"ans"},
      _reciprocal_f2)
unary("abs", np.abs, lambda s, x, ans: s * np.sign(x), "x", float_only=False,
      description="abs'(0) = 0, as in PyTorch")
unary("tanh", np.tanh, lambda s, x, ans: s * (1 - ans * ans), {"ans"}, _tanh_f2)
unary("sigmoid", sigmoid, lambda s, x, ans: s * (ans * (1 - ans)), {"ans"}, _sigmoid_f2,
      description="1 / (1 + exp(-x)), computed without overflow", passes=3)
unary("relu", lambda x: np.maximum(x, 0), lambda s, x, ans: s * (ans > 0), {"ans"},
      float_only=False, description="relu'(0) = 0, as in PyTorch")
unary("softplus", lambda x: np.logaddexp(0, x), lambda s, x, ans: s * sigmoid(x), "x",
      _softplus_f2, description="log(1 + exp(x)), computed without overflow", passes=3)
unary("log1p", np.log1p, lambda s, x, ans: s / (1 + x), "x", _log1p_f2)
unary("erf", erf, lambda s, x, ans: s * (_TWO_OVER_SQRT_PI * np.exp(-(x * x))), "x",
      _erf_f2, description="the error function: float64 within 2 ulp (W. J. Cody's rational "
      "approximations), float32 within 5e-7 relative", cost=erf_cost)


# --- binary, with broadcasting -------------------------------------------------

def binary(name, f, jvp, vjp, saves, curvature, float_only=True, description="",
           bilinear=False, symmetric=False):
    return row(OpDef(name, 2, broadcast_rule, f, jvp, vjp, saves=frozenset(saves),
                     float_only=float_only, description=description, elementwise=True,
                     curvature=curvature, pattern=sparsity.elementwise, bilinear=bilinear,
                     symmetric=symmetric))


def _lift2(t, x, ans):
    """Tangents lifted to the output's rank (their direction axis stays first)."""
    ta, tb = t
    n = ans.ndim
    if ta is not None and x[0].ndim != n:
        ta = lift(ta, n)
    if tb is not None and x[1].ndim != n:
        tb = lift(tb, n)
    return ta, tb


def _add_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return jvp_sum(ta, tb, ans.shape)


def _sub_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return jvp_sum(ta, None if tb is None else -tb, ans.shape)


def _mul_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return jvp_sum(None if ta is None else ta * x[1], None if tb is None else x[0] * tb,
                    ans.shape)


def _div_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return jvp_sum(None if ta is None else ta / x[1],
                    None if tb is None else -(tb * (ans / x[1])), ans.shape)


def _pow_partials(a, b, ans):
    """d(a**b)/da and d(a**b)/db, with PyTorch's choices where a**b is flat."""
    da = np.where(b == 0, 0, b * np.power(a, b - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        db = np.where((a == 0) & (b >= 0), 0, ans * np.log(a))
    return da.astype(ans.dtype, copy=False), db.astype(ans.dtype, copy=False)


def _pow_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    da, db = _pow_partials(x[0], x[1], ans)
    return jvp_sum(None if ta is None else ta * da, None if tb is None else tb * db, ans.shape)


def _pow_vjp(i, g, x, ans):
    return unbroadcast(g * _pow_partials(x[0], x[1], ans)[i], x[i].shape)


def _tie_weights(a, b, dtype):
    """Where a wins 1, where b wins 0, ties 1/2 (PyTorch splits ties evenly)."""
    return ((a > b) + 0.5 * (a == b)).astype(dtype, copy=False)


def _select_jvp(sign):
    def jvp(t, x, ans):
        ta, tb = _lift2(t, x, ans)
        w = _tie_weights(sign * x[0], sign * x[1], ans.dtype)
        return jvp_sum(None if ta is None else ta * w, None if tb is None else tb * (1 - w),
                        ans.shape)
    return jvp


def _select_vjp(sign):
    def vjp(i, g, x, ans):
        w = _tie_weights(sign * x[0], sign * x[1], ans.dtype)
        return unbroadcast(g * (w if i == 0 else 1 - w), x[i].shape)
    return vjp


def _lifted(t, j, ndim):
    return None if t[j] is None else lift(t[j], ndim)


def _mul_curvature(i, g, x, ans, t, t_ans):
    other = _lifted(t, 1 - i, ans.ndim)
    return None if other is None else unbroadcast(g * other, x[i].shape)


def _div_curvature(i, g, x, ans, t, t_ans):
    """vjp_a = g / b, vjp_b = -g a / b^2 = -g ans / b."""
    ta, tb = _lifted(t, 0, ans.ndim), _lifted(t, 1, ans.ndim)
    b = x[1]
    if i == 0:
        return None if tb is None else unbroadcast(-(g * tb) / (b * b), x[0].shape)
    # d(-g a / b^2) = -g ta / b^2 + 2 g a tb / b^3 = g / b^2 (2 ans tb - ta)
    terms = (None if tb is None else 2 * ans * tb, None if ta is None else -ta)
    inner = terms[0] if terms[1] is None else terms[1] if terms[0] is None else terms[0] + terms[1]
    if inner is None:
        return None
    return unbroadcast(g / (b * b) * inner, x[1].shape)


def _pow_second(a, b, ans):
    """d2/da2, d2/da db (of the a-partial) and d2/db da, d2/db2 (of the b-partial) of
    a ** b. The first derivatives follow PyTorch: where(b == 0, 0, b a^(b-1)) and
    where(a == 0 & b >= 0, 0, ans log a); where a == 0 their masked elements stay 0 in
    the second derivatives (PyTorch's double backward gives NaN there, 0 * inf inside
    its where's gradient). Where a > 0 the values are the true ones, so the Hessian is
    symmetric (PyTorch's gives d2/da db = 0 at b == 0, where the true value is 1/a)."""
    da, _ = _pow_partials(a, b, ans)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        zero = a == 0
        flat = zero & (b >= 0)
        p1 = np.power(a, b - 1)
        log_a = np.log(a)
        d_aa = np.where((b == 0) | (b == 1), 0, b * (b - 1) * np.power(a, b - 2))
        d_ab = np.where(zero & (b == 0), 0,
                        p1 + np.where(b == 0, 0, b * np.where(zero & (b >= 1), 0, p1 * log_a)))
        d_ba = np.where(flat, 0, da * log_a + p1)
        d_bb = np.where(flat, 0, ans * log_a * log_a)
    dtype = ans.dtype
    return tuple(d.astype(dtype, copy=False) for d in (d_aa, d_ab, d_ba, d_bb))


def _pow_curvature(i, g, x, ans, t, t_ans):
    ta, tb = _lifted(t, 0, ans.ndim), _lifted(t, 1, ans.ndim)
    d_aa, d_ab, d_ba, d_bb = _pow_second(x[0], x[1], ans)
    first, second = (d_aa, d_ab) if i == 0 else (d_ba, d_bb)
    # A zero tangent contributes nothing, even where a partial is infinite or NaN (log
    # of a negative base): one input's NaN must not spread into another's products.
    with np.errstate(invalid="ignore"):
        terms = [np.where(s == 0, 0, d * s) for d, s in ((first, ta), (second, tb))
                 if s is not None]
    if not terms:
        return None
    inner = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return unbroadcast(g * inner, x[i].shape)


binary("add", np.add, _add_jvp, lambda i, g, x, ans: unbroadcast(g, x[i].shape), (), ZERO,
       float_only=False, symmetric=True)
binary("sub", np.subtract, _sub_jvp,
       lambda i, g, x, ans: unbroadcast(g if i == 0 else -g, x[i].shape), (), ZERO,
       float_only=False)
binary("mul", np.multiply, _mul_jvp,
       lambda i, g, x, ans: unbroadcast(g * x[1 - i], x[i].shape), "x", _mul_curvature,
       float_only=False, bilinear=True, symmetric=True)
binary("div", np.divide, _div_jvp,
       lambda i, g, x, ans: unbroadcast(g / x[1] if i == 0 else -(g * (ans / x[1])),
                                        x[i].shape), {"x", "ans"}, _div_curvature)
binary("pow", np.power, _pow_jvp, _pow_vjp, {"x", "ans"}, _pow_curvature,
       description="a ** b; d/db taken as 0 where a == 0 and b >= 0, as in PyTorch")
# piecewise linear: the vjp reads x only to pick a side (0 almost everywhere)
binary("maximum", np.maximum, _select_jvp(1), _select_vjp(1), "x", ZERO, float_only=False,
       description="ties split the gradient evenly, as in PyTorch", symmetric=True)
binary("minimum", np.minimum, _select_jvp(-1), _select_vjp(-1), "x", ZERO, float_only=False,
       description="ties split the gradient evenly, as in PyTorch", symmetric=True)


# --- cast ------------------------------------------------------------------------------

def _norm_cast(attrs, shapes):
    if attrs["dtype"] not in DTYPES:
        raise RuleError(f"unknown dtype {attrs['dtype']!r} (supported: {', '.join(DTYPES)})",
                        "attrs.dtype", DTypeError)
    return attrs


def _cast(x, dtype):
    with np.errstate(invalid="ignore"):  # NaN or inf to an integer: NumPy's value, no warning
        return x.astype(dtype, copy=False)


def _floats(*dtypes):
    return all(np.dtype(d).kind == "f" for d in dtypes)


row(OpDef(
    "cast", 1, lambda shapes, dtypes, dtype: shapes[0], _cast,
    lambda t, x, ans, dtype: (
        t[0].astype(dtype, copy=False) if t[0] is not None and _floats(x[0].dtype, dtype)
        else None),
    lambda i, g, x, ans, dtype: (
        g.astype(x[0].dtype, copy=False) if _floats(x[0].dtype, dtype) else None),
    (AttrSpec("dtype", "string", description="the result's dtype: " + ", ".join(DTYPES)),),
    frozenset(), False, _norm_cast,
    "x converted to dtype (as NumPy astype); the derivative passes between floating dtypes, "
    "none flows into or out of integers and bool",
    dtype=lambda names, dtypes, dtype: dtype, curvature=ZERO,
    pattern=sparsity.cast_pattern))

