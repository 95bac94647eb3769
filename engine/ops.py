"""The op table: every op in one row with its shape rule, eval, jvp and vjp.

Rule signatures (one vocabulary everywhere):

    shape(shapes, dtypes, **attrs) -> shape          static shapes, None = unknown dim
    eval(*x, **attrs) -> ans
    jvp(t, x, ans, **attrs) -> tangent of ans         t: one tangent or None per input
    vjp(i, g, x, ans, **attrs) -> cotangent of x[i]   called only for inputs that need one

Seeds are batched: a tangent or cotangent of a value of shape S has shape
(k,) + S, so a whole Jacobian is one vectorized sweep. Attributes reach the
rules already checked and normalized (axes non-negative, defaults filled in).
`saves` says which values the vjp reads: "x" (the inputs), "ans" (the output);
values no vjp reads are dropped during a reverse sweep (only their shapes stay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import DTypeError, GraphError, RuleError
from .shapes import (broadcast_shapes, fill_seed, fmt_shape, lift, normalize_axes,
                     normalize_axis, num_elements, unbroadcast)

REQUIRED = object()


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int", "ints", "bool", "float"
    default: Any = REQUIRED
    description: str = ""


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: int | None  # None: one or more inputs
    shape: Callable
    eval: Callable
    jvp: Callable
    vjp: Callable
    attrs: tuple[AttrSpec, ...] = ()
    saves: frozenset = frozenset({"x", "ans"})
    float_only: bool = True
    normalize: Callable | None = None  # (attrs, shapes) -> attrs, raises RuleError
    description: str = ""
    elementwise: bool = False  # each output element depends on the same element of each input


OPS: dict[str, OpDef] = {}


def _row(op: OpDef) -> OpDef:
    OPS[op.name] = op
    return op


# --- elementwise unary -----------------------------------------------------
# The Jacobian of an elementwise unary op is diagonal, so its JVP and VJP apply
# the same map to the seed: one function `d(s, x, ans)` gives both.

def _same_shape(shapes, dtypes):
    return shapes[0]


def unary(name, f, d, saves, float_only=True, description=""):
    return _row(OpDef(
        name, 1, _same_shape, f,
        jvp=lambda t, x, ans: d(t[0], x[0], ans),
        vjp=lambda i, g, x, ans: d(g, x[0], ans),
        saves=frozenset(saves), float_only=float_only, description=description,
        elementwise=True))


def _sigmoid(x):
    return np.exp(-np.logaddexp(0, -x))


unary("neg", np.negative, lambda s, x, ans: -s, (), float_only=False, description="-x")
unary("sin", np.sin, lambda s, x, ans: s * np.cos(x), "x")
unary("cos", np.cos, lambda s, x, ans: -(s * np.sin(x)), "x")
unary("tan", np.tan, lambda s, x, ans: s * (1 + ans * ans), {"ans"})
unary("exp", np.exp, lambda s, x, ans: s * ans, {"ans"})
unary("log", np.log, lambda s, x, ans: s / x, "x")
unary("sqrt", np.sqrt, lambda s, x, ans: s / (ans + ans), {"ans"})
unary("square", np.square, lambda s, x, ans: s * (x + x), "x", float_only=False)
unary("reciprocal", np.reciprocal, lambda s, x, ans: -(s * (ans * ans)), {"ans"})
unary("abs", np.abs, lambda s, x, ans: s * np.sign(x), "x", float_only=False,
      description="abs'(0) = 0, as in PyTorch")
unary("tanh", np.tanh, lambda s, x, ans: s * (1 - ans * ans), {"ans"})
unary("sigmoid", _sigmoid, lambda s, x, ans: s * (ans * (1 - ans)), {"ans"},
      description="1 / (1 + exp(-x)), computed without overflow")
unary("relu", lambda x: np.maximum(x, 0), lambda s, x, ans: s * (ans > 0), {"ans"},
      float_only=False, description="relu'(0) = 0, as in PyTorch")
unary("softplus", lambda x: np.logaddexp(0, x), lambda s, x, ans: s * _sigmoid(x), "x",
      description="log(1 + exp(x)), computed without overflow")
unary("log1p", np.log1p, lambda s, x, ans: s / (1 + x), "x")


# --- elementwise binary ----------------------------------------------------

def _broadcast_rule(shapes, dtypes):
    return broadcast_shapes(*shapes)


def _jvp_sum(a, b, shape):
    """a + b for tangent terms that may be None, filled to (k,) + shape."""
    r = a if b is None else b if a is None else a + b
    return r if r.shape[1:] == shape else fill_seed(r, shape)


def binary(name, f, jvp, vjp, saves, float_only=True, description=""):
    return _row(OpDef(name, 2, _broadcast_rule, f, jvp, vjp, saves=frozenset(saves),
                      float_only=float_only, description=description, elementwise=True))


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
    return _jvp_sum(ta, tb, ans.shape)


def _sub_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return _jvp_sum(ta, None if tb is None else -tb, ans.shape)


def _mul_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return _jvp_sum(None if ta is None else ta * x[1], None if tb is None else x[0] * tb,
                    ans.shape)


def _div_jvp(t, x, ans):
    ta, tb = _lift2(t, x, ans)
    return _jvp_sum(None if ta is None else ta / x[1],
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
    return _jvp_sum(None if ta is None else ta * da, None if tb is None else tb * db, ans.shape)


def _pow_vjp(i, g, x, ans):
    return unbroadcast(g * _pow_partials(x[0], x[1], ans)[i], x[i].shape)


def _tie_weights(a, b, dtype):
    """Where a wins 1, where b wins 0, ties 1/2 (PyTorch splits ties evenly)."""
    return ((a > b) + 0.5 * (a == b)).astype(dtype, copy=False)


def _select_jvp(sign):
    def jvp(t, x, ans):
        ta, tb = _lift2(t, x, ans)
        w = _tie_weights(sign * x[0], sign * x[1], ans.dtype)
        return _jvp_sum(None if ta is None else ta * w, None if tb is None else tb * (1 - w),
                        ans.shape)
    return jvp


def _select_vjp(sign):
    def vjp(i, g, x, ans):
        w = _tie_weights(sign * x[0], sign * x[1], ans.dtype)
        return unbroadcast(g * (w if i == 0 else 1 - w), x[i].shape)
    return vjp


binary("add", np.add, _add_jvp, lambda i, g, x, ans: unbroadcast(g, x[i].shape), (),
       float_only=False)
binary("sub", np.subtract, _sub_jvp,
       lambda i, g, x, ans: unbroadcast(g if i == 0 else -g, x[i].shape), (), float_only=False)
binary("mul", np.multiply, _mul_jvp,
       lambda i, g, x, ans: unbroadcast(g * x[1 - i], x[i].shape), "x", float_only=False)
binary("div", np.divide, _div_jvp,
       lambda i, g, x, ans: unbroadcast(g / x[1] if i == 0 else -(g * (ans / x[1])),
                                        x[i].shape), {"x", "ans"})
binary("pow", np.power, _pow_jvp, _pow_vjp, {"x", "ans"},
       description="a ** b; d/db taken as 0 where a == 0 and b >= 0, as in PyTorch")
binary("maximum", np.maximum, _select_jvp(1), _select_vjp(1), "x", float_only=False,
       description="ties split the gradient evenly, as in PyTorch")
binary("minimum", np.minimum, _select_jvp(-1), _select_vjp(-1), "x", float_only=False,
       description="ties split the gradient evenly, as in PyTorch")


# --- reductions --------------------------------------------------------------

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
                            "attrs.axes" if what == "max" else "attrs.axis")


def _max_rule(shapes, dtypes, axes, keepdims):
    _nonempty(shapes[0], axes, "max")
    return _reduce_rule(shapes, dtypes, axes, keepdims)


def _normalizing_rule(what):
    def rule(shapes, dtypes, axis, keepdims=None):
        _nonempty(shapes[0], (axis,), what)
        if keepdims is None:
            return shapes[0]
        return _reduce_rule(shapes, dtypes, (axis,), keepdims)
    return rule


def _shift(axes):
    return tuple(a + 1 for a in axes)


def _expand(g, axes, keepdims):
    """A reduced cotangent with its reduced axes back (size 1), ready to broadcast."""
    return g if keepdims else np.expand_dims(g, _shift(axes))


def _count(shape, axes):
    n = 1
    for a in axes:
        n *= shape[a]
    return n


def _max_share(x, ans, axes, keepdims):
    """Each element's share of the max's derivative: ties share it evenly."""
    hit = x == (ans if keepdims else np.expand_dims(ans, axes))
    return (hit / hit.sum(axis=axes, keepdims=True)).astype(ans.dtype, copy=False)


def reduction(name, f, jvp, vjp, saves, float_only, description, rule=_reduce_rule):
    return _row(OpDef(name, 1, rule, f, jvp, vjp, (AXES, KEEPDIMS), frozenset(saves),
                      float_only, _norm_axes, description))


reduction(
    "sum", lambda x, axes, keepdims: np.sum(x, axis=axes, keepdims=keepdims),
    lambda t, x, ans, axes, keepdims: np.sum(t[0], axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims), g.shape[:1] + x[0].shape),
    (), False, "sum over axes")
reduction(
    "mean", lambda x, axes, keepdims: np.mean(x, axis=axes, keepdims=keepdims),
    lambda t, x, ans, axes, keepdims: np.mean(t[0], axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims) / _count(x[0].shape, axes), g.shape[:1] + x[0].shape),
    (), True, "mean over axes")
reduction(
    "max", lambda x, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims),
    lambda t, x, ans, axes, keepdims: np.sum(
        t[0] * _max_share(x[0], ans, axes, keepdims), axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: (
        _expand(g, axes, keepdims) * _max_share(x[0], ans, axes, keepdims)),
    {"x", "ans"}, False, "max over axes; tied maxima share the derivative evenly", _max_rule)


# --- shape ops ---------------------------------------------------------------

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


_row(OpDef(
    "reshape", 1, _reshape_rule,
    lambda x, shape: np.reshape(x, shape),
    lambda t, x, ans, shape: np.reshape(t[0], t[0].shape[:1] + ans.shape),
    lambda i, g, x, ans, shape: np.reshape(g, g.shape[:1] + x[0].shape),
    (AttrSpec("shape", "ints", description="new shape; one entry may be -1"),),
    frozenset(), False, _norm_reshape, "NumPy reshape (C order)"))


def _norm_perm(attrs, shapes):
    ndim = len(shapes[0])
    perm = attrs["perm"]
    if perm is None:
        perm = tuple(reversed(range(ndim)))
    if sorted(perm) != list(range(ndim)):
        raise RuleError(f"perm {list(perm)} is not a permutation of the {ndim} axes",
                        "attrs.perm")
    return dict(attrs, perm=tuple(perm))


_row(OpDef(
    "transpose", 1, lambda shapes, dtypes, perm: tuple(shapes[0][p] for p in perm),
    lambda x, perm: np.transpose(x, perm),
    lambda t, x, ans, perm: np.transpose(t[0], (0,) + _shift(perm)),
    lambda i, g, x, ans, perm: np.transpose(g, (0,) + _shift(np.argsort(perm))),
    (AttrSpec("perm", "ints", None, "axis order; absent: reversed"),),
    frozenset(), False, _norm_perm, "NumPy transpose"))


def _norm_target(attrs, shapes):
    return dict(attrs, shape=_dims(attrs["shape"], "attrs.shape"))


def _broadcast_to_rule(shapes, dtypes, shape):
    src = shapes[0]
    ok = len(src) <= len(shape) and all(
        d in (1, None) or d == s for d, s in zip(reversed(src), reversed(shape)))
    if not ok:
        raise RuleError(f"cannot broadcast {fmt_shape(src)} to {fmt_shape(shape)}", "attrs.shape")
    return shape


_row(OpDef(
    "broadcast_to", 1, _broadcast_to_rule,
    lambda x, shape: np.broadcast_to(x, shape),
    lambda t, x, ans, shape: fill_seed(t[0], shape),
    lambda i, g, x, ans, shape: unbroadcast(g, x[0].shape),
    (AttrSpec("shape", "ints", description="target shape"),),
    frozenset(), False, _norm_target, "NumPy broadcast_to"))


def _norm_concat(attrs, shapes):
    ranks = {len(s) for s in shapes}
    if len(ranks) != 1:
        raise RuleError("inputs have different ranks: "
                        + ", ".join(fmt_shape(s) for s in shapes))
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


def _concat_rule(shapes, dtypes, axis):
    out = list(shapes[0])
    for s in shapes[1:]:
        for j, (a, b) in enumerate(zip(out, s)):
            if j != axis and a is not None and b is not None and a != b:
                raise RuleError("shapes " + ", ".join(fmt_shape(x) for x in shapes)
                                + f" differ outside axis {axis}")
            if j != axis and a is None:
                out[j] = b
    sizes = [s[axis] for s in shapes]
    out[axis] = None if None in sizes else sum(sizes)
    return tuple(out)


def _concat_jvp(t, x, ans, axis):
    k = next(s for s in t if s is not None).shape[0]
    parts = [np.zeros((k,) + xi.shape, ans.dtype) if ti is None else fill_seed(ti, xi.shape)
             for ti, xi in zip(t, x)]
    return np.concatenate(parts, axis=axis + 1)


def _concat_vjp(i, g, x, ans, axis):
    start = sum(xj.shape[axis] for xj in x[:i])
    index = (slice(None),) * (axis + 1) + (slice(start, start + x[i].shape[axis]),)
    return g[index]


_row(OpDef(
    "concat", None, _concat_rule,
    lambda *x, axis: np.concatenate(x, axis=axis), _concat_jvp, _concat_vjp,
    (AttrSpec("axis", "int", 0, "axis to join along"),),
    frozenset(), False, _norm_concat, "NumPy concatenate of one or more inputs"))


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


_row(OpDef(
    "slice", 1, _slice_rule,
    lambda x, index: x[index],
    lambda t, x, ans, index: t[0][(slice(None),) + index],
    _slice_vjp,
    (AttrSpec("starts", "ints", description="first index per axis (NumPy semantics)"),
     AttrSpec("stops", "ints", description="one past the last index per axis"),
     AttrSpec("axes", "ints", None, "axes the starts and stops refer to; absent: 0, 1, ...")),
    frozenset(), False, _norm_slice, "x[start:stop] along the given axes, step 1"))


# --- matmul --------------------------------------------------------------------
# NumPy promotes a 1-D operand to a matrix and drops the added axis afterwards.
# With a direction axis in front, that promotion is done by hand so that
# ordinary batched matmul broadcasting carries the directions.

def _matmul_rule(shapes, dtypes):
    a, b = shapes
    if len(a) == 0 or len(b) == 0:
        raise RuleError("matmul needs operands of rank >= 1, got "
                        f"{fmt_shape(a)} and {fmt_shape(b)}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    ka, kb = a2[-1], b2[-2]
    if ka is not None and kb is not None and ka != kb:
        raise RuleError(f"shapes {fmt_shape(a)} and {fmt_shape(b)} do not align: "
                        f"{ka} (dim {len(a) - 1}) != {kb} (dim {max(len(b) - 2, 0)})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    return batch + ((a2[-2],) if len(a) > 1 else ()) + ((b2[-1],) if len(b) > 1 else ())


def _as_matrices(a_ndim, b_ndim, seed_a=None, seed_b=None, seed_out=None):
    """Promote seeds (with their direction axis) the way NumPy promotes 1-D operands."""
    if seed_a is not None and a_ndim == 1:
        seed_a = seed_a[:, None, :]
    if seed_b is not None and b_ndim == 1:
        seed_b = seed_b[..., None]
    if seed_out is not None:
        if a_ndim == 1:
            seed_out = np.expand_dims(seed_out, -1 if b_ndim == 1 else -2)
        if b_ndim == 1:
            seed_out = seed_out[..., None]
    return seed_a, seed_b, seed_out


def _from_matrix(out, a_ndim, b_ndim):
    if b_ndim == 1:
        out = out[..., 0]
    if a_ndim == 1:
        out = out[..., 0, :] if b_ndim > 1 else out[..., 0]
    return out


def _matmul_jvp(t, x, ans):
    a, b = x
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec_jvp(t, a, b)
    ta, tb, _ = _as_matrices(a.ndim, b.ndim, t[0], t[1])
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    rank = max(a2.ndim, b2.ndim)  # the direction axis must sit in front of all batch axes
    terms = []
    if ta is not None:
        terms.append(np.matmul(lift(ta, rank), b2))
    if tb is not None:
        terms.append(np.matmul(a2, lift(tb, rank)))
    out = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return fill_seed(_from_matrix(out, a.ndim, b.ndim), ans.shape)


def _matvec_jvp(t, a, b):
    """Vector @ matrix or matrix @ vector: the k directions of the vector form a
    matrix, so its term is one matrix product rather than k vector products."""
    ta, tb = t
    if a.ndim == 1:  # (K,) @ (K, N): directions (k, K) @ (K, N)
        terms = [ta @ b if ta is not None else None,
                 np.matmul(a, tb) if tb is not None else None]
    else:  # (M, K) @ (K,): directions (k, K) @ (K, M)
        k = ta.shape[0] if ta is not None else None
        terms = [(ta.reshape(-1, ta.shape[-1]) @ b).reshape(k, -1) if ta is not None else None,
                 tb @ a.T if tb is not None else None]
    ta_term, tb_term = terms
    return ta_term if tb_term is None else tb_term if ta_term is None else ta_term + tb_term


def _matmul_vjp(i, g, x, ans):
    a, b = x
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec_vjp(i, g, a, b)
    _, _, g2 = _as_matrices(a.ndim, b.ndim, seed_out=g)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if i == 0:
        ga = np.matmul(g2, np.swapaxes(b2, -1, -2))
        ga = ga[..., 0, :] if a.ndim == 1 else ga
        return unbroadcast(ga, a.shape)
    if b.ndim == 2 and a2.ndim > 2:
        # A weight shared across the batch: fold the batch into one product per direction.
        k, n = g2.shape[0], b2.shape[1]
        rows = a2.reshape(-1, a2.shape[-1])
        return np.matmul(rows.T, g2.reshape(k, -1, n))
    gb = np.matmul(np.swapaxes(a2, -1, -2), g2)
    gb = gb[..., 0] if b.ndim == 1 else gb
    return unbroadcast(gb, b.shape)


def _matvec_vjp(i, g, a, b):
    """Cotangents of a vector @ matrix or matrix @ vector product, k directions at once."""
    if a.ndim == 1:  # g (k, N)
        return g @ b.T if i == 0 else a[None, :, None] * g[:, None, :]
    # a (M, K), b (K,), g (k, M)
    return g[:, :, None] * b[None, None, :] if i == 0 else g @ a


_row(OpDef("matmul", 2, _matmul_rule, np.matmul, _matmul_jvp, _matmul_vjp,
           saves=frozenset({"x"}), float_only=False,
           description="NumPy matmul: 1-D operands promoted, leading axes broadcast"))


# --- nn ------------------------------------------------------------------------

AXIS = AttrSpec("axis", "int", -1, "the axis the op normalizes over")


def _norm_axis(attrs, shapes):
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


def _logsumexp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return out if keepdims else np.squeeze(out, axis)


def _softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _softmax_map(s, ans, axis):
    """The softmax Jacobian (symmetric) applied to a seed."""
    return ans * (s - np.sum(s * ans, axis=axis + 1, keepdims=True))


def _log_softmax_jvp(t, x, ans, axis):
    return t[0] - np.sum(t[0] * np.exp(ans), axis=axis + 1, keepdims=True)


def _log_softmax_vjp(i, g, x, ans, axis):
    return g - np.exp(ans) * np.sum(g, axis=axis + 1, keepdims=True)


def _lse_weights(x, ans, axis, keepdims):
    return np.exp(x - (ans if keepdims else np.expand_dims(ans, axis)))


_row(OpDef(
    "softmax", 1, _normalizing_rule("softmax"), _softmax,
    lambda t, x, ans, axis: _softmax_map(t[0], ans, axis),
    lambda i, g, x, ans, axis: _softmax_map(g, ans, axis),
    (AXIS,), frozenset({"ans"}), True, _norm_axis, "exp(x) / sum(exp(x)) along axis"))
def _log_softmax(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


_row(OpDef(
    "log_softmax", 1, _normalizing_rule("log_softmax"),
    _log_softmax, _log_softmax_jvp, _log_softmax_vjp,
    (AXIS,), frozenset({"ans"}), True, _norm_axis, "x - logsumexp(x) along axis"))
_row(OpDef(
    "logsumexp", 1, _normalizing_rule("logsumexp"),
    _logsumexp,
    lambda t, x, ans, axis, keepdims: np.sum(
        t[0] * _lse_weights(x[0], ans, axis, keepdims), axis=axis + 1, keepdims=keepdims),
    lambda i, g, x, ans, axis, keepdims: (
        (g if keepdims else np.expand_dims(g, axis + 1)) * _lse_weights(x[0], ans, axis, keepdims)),
    (AXIS, KEEPDIMS), frozenset({"x", "ans"}), True, _norm_axis,
    "log(sum(exp(x))) along axis, computed without overflow"))


# --- attribute checking --------------------------------------------------------

_ATTR_CHECKS = {
    "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "float": lambda v: isinstance(v, (int, float, np.integer, np.floating))
    and not isinstance(v, (bool, np.bool_)),
    "ints": lambda v: isinstance(v, (list, tuple, np.ndarray)) and all(
        _ATTR_CHECKS["int"](e) for e in v),
}


def _convert(spec: AttrSpec, value):
    if spec.type == "ints":
        return tuple(int(e) for e in value)
    if spec.type == "int":
        return int(value)
    if spec.type == "bool":
        return bool(value)
    return float(value)


def check_attrs(op: OpDef, attrs, shapes) -> dict:
    """Known names, right types, defaults filled in, then the op's own normalization."""
    specs = {s.name: s for s in op.attrs}
    for name in attrs:
        if name not in specs:
            expected = ", ".join(specs) or "none"
            raise RuleError(f"unknown attribute '{name}' (expected: {expected})",
                            f"attrs.{name}", GraphError)
    out = {}
    for spec in op.attrs:
        if spec.name not in attrs or attrs[spec.name] is None:
            if spec.default is REQUIRED:
                raise RuleError(f"missing attribute '{spec.name}' ({spec.type})",
                                f"attrs.{spec.name}", GraphError)
            out[spec.name] = spec.default
            continue
        value = attrs[spec.name]
        if not _ATTR_CHECKS[spec.type](value):
            raise RuleError(f"attribute '{spec.name}' must be {spec.type}, got {value!r}",
                            f"attrs.{spec.name}", GraphError)
        out[spec.name] = _convert(spec, value)
    return op.normalize(out, shapes) if op.normalize else out


def check_dtypes(op: OpDef, names, dtypes) -> str:
    """The op's result dtype: operands share one dtype; float-only ops refuse ints."""
    for name, dtype in zip(names[1:], dtypes[1:]):
        if dtype != dtypes[0]:
            raise RuleError(f"dtype mismatch: '{names[0]}' is {dtypes[0]}, "
                            f"'{name}' is {dtype}", "inputs", DTypeError)
    if op.float_only and not dtypes[0].startswith("float"):
        raise RuleError(f"needs floating inputs; '{names[0]}' is {dtypes[0]}", "inputs",
                        DTypeError)
    return dtypes[0]
