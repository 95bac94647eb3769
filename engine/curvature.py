"""Second-order rules: one curvature term per op, beside the op table's vjp.

Forward-over-reverse (engine/second.py) differentiates the reverse sweep along k
tangent directions. For a step with inputs x, output ans, cotangent g and the
tangent ġ of that cotangent, the tangent of the cotangent pulled into input i is

    ġ_i = vjp(i, ġ, x, ans) + curvature(i, g, x, ans, t, t_ans)

where `curvature` is the derivative of vjp(i, g, x, ans) with respect to x (and
ans) along their tangents, g held fixed. Rule signature (the op table's
vocabulary):

    curvature(i, g, x, ans, t, t_ans, **attrs) -> (k,) + x[i].shape, or None

g carries one direction ((1,) + ans.shape), t one tangent per input ((k,) + x[j].shape,
None where none reaches it) and t_ans the output's tangent ((k,) + ans.shape or
None). None means no term.

CURVATURE has one entry per op with a derivative: ZERO where the vjp is locally
constant in x (linear ops, and piecewise-linear ones away from their kinks: their
second derivative is 0 almost everywhere, as in PyTorch), otherwise a rule.
Elementwise unary ops differ only in f'' (written from x and ans), as their first
derivatives do in ops.unary.
"""

from __future__ import annotations

import numpy as np

from .ops import (_TWO_OVER_SQRT_PI, _as_matrices, _conv_vjp, _expand, _pow_partials,
                  _sigmoid, _shift)
from .blocked import matmul as _mm
from .shapes import fill_seed, lift, unbroadcast

ZERO = None  # the vjp is locally constant in x: no curvature term


def _unary(f2):
    """g * f''(x) * t for an elementwise unary op, f'' given from (x, ans)."""
    def rule(i, g, x, ans, t, t_ans):
        if t[0] is None:
            return None
        return g * f2(x[0], ans) * t[0]
    return rule


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
    s = _sigmoid(x)
    return s * (1 - s)


def _log1p_f2(x, ans):
    d = 1 + x
    return -1 / (d * d)


def _erf_f2(x, ans):
    return -2 * x * (_TWO_OVER_SQRT_PI * np.exp(-(x * x)))


# --- binary ------------------------------------------------------------------------------

def _lifted(t, j, ndim):
    return None if t[j] is None else lift(t[j], ndim)


def _mul(i, g, x, ans, t, t_ans):
    other = _lifted(t, 1 - i, ans.ndim)
    return None if other is None else unbroadcast(g * other, x[i].shape)


def _div(i, g, x, ans, t, t_ans):
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


def _pow(i, g, x, ans, t, t_ans):
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


# --- reductions ----------------------------------------------------------------------------

def _prod(i, g, x, ans, t, axes, keepdims):
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
    sa = _shift(axes)
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


# --- matmul and conv (bilinear: the vjp with the other operand replaced by its tangent) -

def _matmul(i, g, x, ans, t, t_ans):
    a, b = x
    other = t[1 - i]
    if other is None:
        return None
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec(i, g, a, b, other)
    ta, tb, g2 = _as_matrices(a.ndim, b.ndim, other if i == 1 else None,
                              other if i == 0 else None, g)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    rank = max(a2.ndim, b2.ndim)
    if i == 0:  # g @ tb^T
        r = _mm(lift(g2, rank), np.swapaxes(lift(tb, rank), -1, -2))
        r = r[..., 0, :] if a.ndim == 1 else r
        return unbroadcast(r, a.shape)
    r = _mm(np.swapaxes(lift(ta, rank), -1, -2), lift(g2, rank))  # ta^T @ g
    r = r[..., 0] if b.ndim == 1 else r
    return unbroadcast(r, b.shape)


def _matvec(i, g, a, b, other):
    """Vector @ matrix or matrix @ vector: outer products by broadcasting and one
    (batched) matrix product, as ops._matvec_vjp (g has one direction)."""
    if a.ndim == 1:  # (K,) @ (K, N), g (1, N)
        if i == 0:  # g @ tb^T: tb (k, K, N)
            return _mm(other, g[0])
        return other[:, :, None] * g[:, None, :]  # ta (k, K) outer g
    # (M, K) @ (K,), g (1, M)
    if i == 0:
        return g[:, :, None] * other[:, None, :]  # g outer tb (k, K)
    return _mm(g[:, None, :], other)[:, 0, :]  # g @ ta: ta (k, M, K)


def _matvec_joint(i, g, gdot, x, ans, t, t_ans):
    """g_i and ġ_i together for the matrix of a matrix @ vector (or vector @ matrix)
    product: each is a sum of outer products, e.g. ġ_W = ġ x^T + g tx^T, and one batched
    product with an inner dimension of 2 writes them (about 2x faster than NumPy's
    broadcast multiply, 6x than a product with an inner dimension of 1). None: not this
    case (the caller uses vjp + curvature)."""
    a, b = x
    if gdot is None or not (a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1)):
        return None
    if (a.ndim == 2) != (i == 0):
        return None  # the vector's position: a plain matrix product already
    tv = t[1] if i == 0 else t[0]  # the vector's tangent (k, K)
    if tv is None or gdot.shape[1:] != g.shape[1:]:
        return None
    k = gdot.shape[0]
    dtype = np.result_type(g, gdot, a, b, tv)
    if i == 0:  # (M, K) @ (K,): rows from the cotangents, columns from the vector
        m, n = a.shape
        left = np.zeros((k + 1, m, 2), dtype)
        left[0, :, 0] = g[0]
        left[1:, :, 0] = gdot
        left[1:, :, 1] = g[0]
        right = np.zeros((k + 1, 2, n), dtype)
        right[:, 0, :] = b
        right[1:, 1, :] = tv
    else:  # (K,) @ (K, N): rows from the vector, columns from the cotangents
        m, n = b.shape
        left = np.zeros((k + 1, m, 2), dtype)
        left[:, :, 0] = a
        left[1:, :, 1] = tv
        right = np.zeros((k + 1, 2, n), dtype)
        right[0, 0] = g[0]
        right[1:, 0] = gdot
        right[1:, 1] = g[0]
    out = _mm(left, right)
    return out[:1], out[1:]


def _conv(i, g, x, ans, t, t_ans, **geometry):
    """One direction at a time: windows.py's transposes take one weight (or input)."""
    xv, wv = x
    other = t[1 - i]
    if other is None:
        return None
    other = fill_seed(other, x[1 - i].shape)
    parts = [_conv_vjp(i, g, (xv, other[j]) if i == 0 else (other[j], wv), ans, **geometry)
             for j in range(other.shape[0])]
    return np.concatenate(parts, axis=0)


# --- nn ------------------------------------------------------------------------------------

def _softmax(i, g, x, ans, t, t_ans, axis):
    """vjp = ans (g - sum(g ans)): its tangent t_ans (g - sum(g ans)) - ans sum(g t_ans)."""
    if t_ans is None:
        return None
    a = axis + 1
    return (t_ans * (g - np.sum(g * ans, axis=a, keepdims=True))
            - ans * np.sum(g * t_ans, axis=a, keepdims=True))


def _log_softmax(i, g, x, ans, t, t_ans, axis):
    """vjp = g - exp(ans) sum(g): its tangent -exp(ans) t_ans sum(g)."""
    if t_ans is None:
        return None
    return -(np.exp(ans) * t_ans * np.sum(g, axis=axis + 1, keepdims=True))


def _logsumexp(i, g, x, ans, t, t_ans, axis, keepdims):
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


# --- the table -----------------------------------------------------------------------------

CURVATURE = {
    # linear: the vjp does not read x
    **{op: ZERO for op in ("neg", "add", "sub", "sum", "mean", "reshape", "transpose",
                           "broadcast_to", "concat", "slice", "pad", "take", "cumsum", "cast",
                           "where", "avg_pool")},
    # piecewise linear: the vjp reads x only to pick a side (0 almost everywhere)
    **{op: ZERO for op in ("relu", "abs", "maximum", "minimum", "max", "min", "clip",
                           "max_pool")},
    "sin": _unary(lambda x, ans: -ans),
    "cos": _unary(lambda x, ans: -ans),
    "tan": _unary(_tan_f2),
    "exp": _unary(lambda x, ans: ans),
    "log": _unary(_log_f2),
    "sqrt": _unary(_sqrt_f2),
    "square": _unary(lambda x, ans: 2),
    "reciprocal": _unary(_reciprocal_f2),
    "tanh": _unary(_tanh_f2),
    "sigmoid": _unary(_sigmoid_f2),
    "softplus": _unary(_softplus_f2),
    "log1p": _unary(_log1p_f2),
    "erf": _unary(_erf_f2),
    "mul": _mul,
    "div": _div,
    "pow": _pow,
    "prod": lambda i, g, x, ans, t, t_ans, axes, keepdims: _prod(i, g, x, ans, t, axes,
                                                                  keepdims),
    "matmul": _matmul,
    "conv": _conv,
    "softmax": _softmax,
    "log_softmax": _log_softmax,
    "logsumexp": _logsumexp,
}


# Optional: an op's g_i and ġ_i computed together where that is cheaper than its vjp
# (on the stacked seed) plus its curvature term; joint(i, g, gdot, x, ans, t, t_ans,
# **attrs) -> (g_i, ġ_i), or None to fall back to them.
JOINT = {"matmul": _matvec_joint}


def missing(ops) -> list[str]:
    """Ops with a derivative (a vjp of their own) but no CURVATURE entry."""
    from .ops import _no_cotangent
    return sorted(name for name, op in ops.items()
                  if op.vjp is not _no_cotangent and name not in CURVATURE)
