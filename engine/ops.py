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

Only floating values have derivatives. A jvp returns None when its result has
none (comparisons, a cast to an integer or bool); a vjp returns None for an
input that has none (indices, a condition, an integer cast to a float). Integer
and bool values therefore never carry a tangent or a cotangent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod
from typing import Any, Callable

import numpy as np

from .errors import DTypeError, GraphError, InputError, RuleError
from .ir import DTYPES, FLOAT_DTYPES
from .shapes import (broadcast_shapes, fill_seed, fmt_shape, lift, normalize_axes,
                     normalize_axis, num_elements, unbroadcast)
from .special import erf
from .blocked import matmul as _mm
from .windows import (Window, avg_pool, avg_pool_scratch, avg_pool_vjp, conv,
                      conv_input_grad, conv_scratch, conv_weight_grad, max_pool, max_pool_jvp,
                      max_pool_scratch, max_pool_vjp)

REQUIRED = object()


@dataclass(frozen=True)
class AttrSpec:
    name: str
    type: str  # "int", "ints", "bool", "float", "string"
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
    # (names, dtypes, **attrs) -> the result's dtype, raising RuleError; None: the operands
    # share one numeric dtype (floating if float_only), which the result keeps.
    dtype: Callable | None = None
    # (shapes, **attrs) -> elements of scratch memory the op allocates beyond its output,
    # per seed direction (the values-only pass counts as one direction); None: none to speak
    # of. For memory estimates made before anything runs.
    scratch: Callable | None = None
    # (shapes, out_shape, **attrs) -> floating-point operations of eval (a jvp or vjp
    # costs about as much per direction); None: about one per element read or written.
    # For the work bound checked before anything runs.
    flops: Callable | None = None
    node_attr: bool = False  # the rules also get the node's name as `node` (run-time errors)


OPS: dict[str, OpDef] = {}


def _row(op: OpDef) -> OpDef:
    OPS[op.name] = op
    return op


def shared_dtype(names, dtypes, float_only=False, bool_ok=False) -> str:
    """The one dtype all operands share: float_only refuses integers and bool, and bool
    is refused unless bool_ok (arithmetic has no meaning for it)."""
    for name, dtype in zip(names[1:], dtypes[1:]):
        if dtype != dtypes[0]:
            raise RuleError(f"dtype mismatch: '{names[0]}' is {dtypes[0]}, "
                            f"'{name}' is {dtype}", "inputs", DTypeError)
    if float_only and dtypes[0] not in FLOAT_DTYPES:
        raise RuleError(f"needs floating inputs; '{names[0]}' is {dtypes[0]}", "inputs",
                        DTypeError)
    if dtypes[0] == "bool" and not bool_ok:
        raise RuleError(f"needs numeric inputs; '{names[0]}' is bool", "inputs", DTypeError)
    return dtypes[0]


def _any_dtype(names, dtypes, **attrs):
    """Ops that move elements without arithmetic take any dtype, bool included."""
    return shared_dtype(names, dtypes, bool_ok=True)


def _no_tangent(t, x, ans, **attrs):
    return None


def _no_cotangent(i, g, x, ans, **attrs):
    return None


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


_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


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
unary("erf", erf, lambda s, x, ans: s * (_TWO_OVER_SQRT_PI * np.exp(-(x * x))), "x",
      description="the error function: float64 within 2 ulp (W. J. Cody's rational "
      "approximations), float32 within 5e-7 relative")


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
                            "attrs.axes" if what in ("max", "min") else "attrs.axis")


def _extreme_rule(what):
    def rule(shapes, dtypes, axes, keepdims):
        _nonempty(shapes[0], axes, what)
        return _reduce_rule(shapes, dtypes, axes, keepdims)
    return rule


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


def _extreme_share(x, ans, axes, keepdims):
    """Each element's share of the max's (or min's) derivative: ties share it evenly."""
    hit = x == (ans if keepdims else np.expand_dims(ans, axes))
    return (hit / hit.sum(axis=axes, keepdims=True)).astype(ans.dtype, copy=False)


def reduction(name, f, jvp, vjp, saves, float_only, description, rule=_reduce_rule):
    return _row(OpDef(name, 1, rule, f, jvp, vjp, (AXES, KEEPDIMS), frozenset(saves),
                      float_only, _norm_axes, description))


reduction(
    "sum", lambda x, axes, keepdims: np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
    lambda t, x, ans, axes, keepdims: np.sum(t[0], axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims), g.shape[:1] + x[0].shape),
    (), False, "sum over axes, in the input's dtype")
reduction(
    "mean", lambda x, axes, keepdims: np.mean(x, axis=axes, keepdims=keepdims),
    lambda t, x, ans, axes, keepdims: np.mean(t[0], axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: np.broadcast_to(
        _expand(g, axes, keepdims) / _count(x[0].shape, axes), g.shape[:1] + x[0].shape),
    (), True, "mean over axes")


def _extreme_jvp(t, x, ans, axes, keepdims):
    return np.sum(t[0] * _extreme_share(x[0], ans, axes, keepdims), axis=_shift(axes),
                  keepdims=keepdims)


def _extreme_vjp(i, g, x, ans, axes, keepdims):
    return _expand(g, axes, keepdims) * _extreme_share(x[0], ans, axes, keepdims)


reduction(
    "max", lambda x, axes, keepdims: np.max(x, axis=axes, keepdims=keepdims),
    _extreme_jvp, _extreme_vjp, {"x", "ans"}, False,
    "max over axes; tied maxima share the derivative evenly", _extreme_rule("max"))
reduction(
    "min", lambda x, axes, keepdims: np.min(x, axis=axes, keepdims=keepdims),
    _extreme_jvp, _extreme_vjp, {"x", "ans"}, False,
    "min over axes; tied minima share the derivative evenly", _extreme_rule("min"))


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


reduction(
    "prod", lambda x, axes, keepdims: np.prod(x, axis=axes, keepdims=keepdims, dtype=x.dtype),
    lambda t, x, ans, axes, keepdims: np.sum(
        t[0] * _prod_partials(x[0], axes), axis=_shift(axes), keepdims=keepdims),
    lambda i, g, x, ans, axes, keepdims: _expand(g, axes, keepdims) * _prod_partials(x[0], axes),
    "x", False, "product over axes, in the input's dtype; exact derivative where inputs are 0")


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
    frozenset(), False, _norm_reshape, "NumPy reshape (C order)",
    dtype=_any_dtype))


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
    frozenset(), False, _norm_perm, "NumPy transpose",
    dtype=_any_dtype))


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
    frozenset(), False, _norm_target, "NumPy broadcast_to",
    dtype=_any_dtype))


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
    frozenset(), False, _norm_concat, "NumPy concatenate of one or more inputs",
    dtype=_any_dtype))


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
    frozenset(), False, _norm_slice, "x[start:stop] along the given axes, step 1",
    dtype=_any_dtype))


# --- matmul --------------------------------------------------------------------
# NumPy promotes a 1-D operand to a matrix and drops the added axis afterwards.
# With a direction axis in front, that promotion is done by hand so that
# ordinary batched matmul broadcasting carries the directions.

def _matmul_flops(shapes, out, **_):
    a = shapes[0]
    return 2 * num_elements(out) * (a[-1] or 1)


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
        terms.append(_mm(lift(ta, rank), b2))
    if tb is not None:
        terms.append(_mm(a2, lift(tb, rank)))
    out = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return fill_seed(_from_matrix(out, a.ndim, b.ndim), ans.shape)


def _matvec_jvp(t, a, b):
    """Vector @ matrix or matrix @ vector: the k directions of the vector form a
    matrix, so its term is one matrix product rather than k vector products."""
    ta, tb = t
    if a.ndim == 1:  # (K,) @ (K, N): directions (k, K) @ (K, N)
        terms = [_mm(ta, b) if ta is not None else None,
                 _mm(a, tb) if tb is not None else None]
    else:  # (M, K) @ (K,): directions (k, K) @ (K, M)
        # explicit sizes, not -1: a zero-size operand leaves -1 undetermined
        m, kk = a.shape
        terms = [_mm(ta.reshape(ta.shape[0] * m, kk), b).reshape(ta.shape[0], m)
                 if ta is not None else None,
                 _mm(tb, a.T) if tb is not None else None]
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
        ga = _mm(g2, np.swapaxes(b2, -1, -2))
        ga = ga[..., 0, :] if a.ndim == 1 else ga
        return unbroadcast(ga, a.shape)
    if b.ndim == 2 and a2.ndim > 2:
        # A weight shared across the batch: fold the batch into one product per direction.
        k, n = g2.shape[0], b2.shape[1]
        rows = a2.reshape(prod(a2.shape[:-1]), a2.shape[-1])
        return _mm(rows.T, g2.reshape(k, rows.shape[0], n))
    gb = _mm(np.swapaxes(a2, -1, -2), g2)
    gb = gb[..., 0] if b.ndim == 1 else gb
    return unbroadcast(gb, b.shape)


def _matvec_vjp(i, g, a, b):
    """Cotangents of a vector @ matrix or matrix @ vector product, k directions at once."""
    if a.ndim == 1:  # g (k, N)
        return _mm(g, b.T) if i == 0 else a[None, :, None] * g[:, None, :]
    # a (M, K), b (K,), g (k, M)
    return g[:, :, None] * b[None, None, :] if i == 0 else _mm(g, a)


_row(OpDef("matmul", 2, _matmul_rule, _mm, _matmul_jvp, _matmul_vjp,
           saves=frozenset({"x"}), float_only=False, flops=_matmul_flops,
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


# --- compare and select ------------------------------------------------------------

def _compare_dtype(names, dtypes, **attrs):
    shared_dtype(names, dtypes, bool_ok=True)
    return "bool"


def comparison(name, f, symbol):
    return _row(OpDef(name, 2, _broadcast_rule, f, _no_tangent, _no_cotangent,
                      saves=frozenset(), float_only=False, dtype=_compare_dtype,
                      description=f"a {symbol} b, elementwise with broadcasting; bool "
                      "result, no derivative"))


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
    return _jvp_sum(None if ta is None else np.where(cond, lift(ta, n), 0),
                    None if tb is None else np.where(cond, 0, lift(tb, n)), ans.shape)


def _where_vjp(i, g, x, ans):
    if i == 0:
        return None
    picked = np.where(x[0], g, 0) if i == 1 else np.where(x[0], 0, g)
    return unbroadcast(picked, x[i].shape)


_row(OpDef(
    "where", 3, _broadcast_rule, np.where, _where_jvp, _where_vjp, saves=frozenset({"x"}),
    float_only=False, dtype=_where_dtype,
    description="where(cond, a, b): a where cond is true, else b (bool cond, broadcasting); "
    "the derivative goes to a where cond holds, to b elsewhere, none to cond"))


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


_row(OpDef(
    "clip", 1, lambda shapes, dtypes, min, max: shapes[0], _clip,
    lambda t, x, ans, min, max: t[0] * _clip_mask(x[0], min, max),
    lambda i, g, x, ans, min, max: g * _clip_mask(x[0], min, max),
    (AttrSpec("min", "float", None, "lower bound; absent: none"),
     AttrSpec("max", "float", None, "upper bound; absent: none")),
    frozenset({"x"}), False, _norm_clip,
    "x limited to [min, max]; the derivative is 1 where min <= x <= max (bounds included, "
    "as in PyTorch), else 0", elementwise=True))


# --- cumsum, pad, take, cast ---------------------------------------------------------

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


_row(OpDef(
    "cumsum", 1, lambda shapes, dtypes, axis, reverse, exclusive: shapes[0],
    _cumsum,
    lambda t, x, ans, axis, reverse, exclusive: _cumsum(t[0], axis + 1, reverse, exclusive),
    # the transpose of a running sum is the running sum the other way
    lambda i, g, x, ans, axis, reverse, exclusive: _cumsum(g, axis + 1, not reverse,
                                                           exclusive),
    (AttrSpec("axis", "int", description="the axis to sum along"),
     AttrSpec("reverse", "bool", False, "sum from the end of the axis"),
     AttrSpec("exclusive", "bool", False, "leave each element out of its own sum (ONNX)")),
    frozenset(), False, _norm_axis, "running sum along axis, in the input's dtype"))


def _norm_pad(attrs, shapes):
    ndim, pads = len(shapes[0]), attrs["pads"]
    if len(pads) != 2 * ndim:
        raise RuleError(f"pads has {len(pads)} values, expected {2 * ndim}: a begin value "
                        "for each axis, then an end value for each", "attrs.pads")
    if min(pads, default=0) < 0:
        raise RuleError(f"negative pads in {list(pads)} are not supported (use slice to "
                        "crop)", "attrs.pads")
    return dict(attrs, pads=tuple(zip(pads[:ndim], pads[ndim:])))


def _pad_vjp(i, g, x, ans, pads, value):
    inner = tuple(slice(b, b + d) for (b, _), d in zip(pads, x[0].shape))
    return g[(slice(None),) + inner]


_row(OpDef(
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
    dtype=_any_dtype))


def _take_dtype(names, dtypes, axis):
    if dtypes[1] not in ("int32", "int64"):
        raise RuleError(f"indices '{names[1]}' must be int32 or int64, got {dtypes[1]}",
                        "inputs[1]", DTypeError)
    return dtypes[0]


def _norm_take(attrs, shapes):
    return dict(attrs, axis=normalize_axis(attrs["axis"], len(shapes[0]), "attrs.axis"))


def _take(data, indices, axis, node=None):
    size = data.shape[axis]
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < -size or high >= size:
            bad = low if low < -size else high
            valid = f"valid: {-size} to {size - 1}" if size else "it is empty"
            raise InputError(f"index {bad} is out of range for axis {axis} of size {size} "
                             f"({valid})", node=node, op="take", field="inputs[1]")
    return np.take(data, indices, axis=axis)


def _take_vjp(i, g, x, ans, axis, node=None):
    """Scatter-add g back along axis: sort the indices once, sum repeated ones with
    one add.reduceat (np.add.at is much slower), then one fancy assignment."""
    if i == 1:
        return None
    data, indices = x
    size = data.shape[axis]
    flat = indices.ravel().astype(np.intp)
    flat = np.where(flat < 0, flat + size, flat)
    k = g.shape[0]
    before, after = prod(data.shape[:axis]), prod(data.shape[axis + 1:])
    g4 = g.reshape(k, before, flat.size, after)
    out = np.zeros((k, before, size, after), g.dtype)
    if flat.size:
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        if starts.size == flat.size:  # no index repeats
            out[:, :, flat] = g4
        else:
            out[:, :, ordered[starts]] = np.add.reduceat(g4[:, :, order], starts, axis=2)
    return out.reshape((k,) + data.shape)


_row(OpDef(
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
    "with respect to the indices", dtype=_take_dtype, node_attr=True))


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


_row(OpDef(
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
    dtype=lambda names, dtypes, dtype: dtype))


# --- convolution and pooling (kernels in windows.py) ------------------------------------

def _spatial_rank(shape):
    if len(shape) < 3:
        raise RuleError(f"the input must be (N, C, spatial...) with at least one spatial axis, "
                        f"got {fmt_shape(shape)}", "inputs[0]")
    return len(shape) - 2


def _spatial_ints(attrs, name, count, default, low):
    values = attrs[name]
    if values is None:
        return (default,) * count
    if len(values) != count:
        per = ("a begin value for each spatial axis, then an end value for each"
               if name == "pads" else "one per spatial axis")
        raise RuleError(f"{name} has {len(values)} values, expected {count} ({per})",
                        f"attrs.{name}")
    for v in values:
        if v < low:
            raise RuleError(f"{name} value {v} is below {low}", f"attrs.{name}")
    return tuple(values)


def _geometry(attrs, d):
    return dict(strides=_spatial_ints(attrs, "strides", d, 1, 1),
                pads=_spatial_ints(attrs, "pads", 2 * d, 0, 0),
                dilations=_spatial_ints(attrs, "dilations", d, 1, 1))


def _window_out(spatial, win):
    out = win.out(spatial)
    padded = [None if s is None else s + b + e for s, b, e in zip(spatial, win.begin, win.end)]
    for axis, (p, o, extent) in enumerate(zip(padded, out, win.extents())):
        if o is not None and o < 1:
            raise RuleError(f"spatial axis {axis}: the padded input has {p} elements, fewer "
                            f"than the (dilated) kernel's extent {extent}")
    return out


WINDOW_ATTRS = (
    AttrSpec("strides", "ints", None, "step per spatial axis; absent: 1s"),
    AttrSpec("pads", "ints", None, "begin values for each spatial axis, then end values "
             "(ONNX order); absent: 0s"),
    AttrSpec("dilations", "ints", None, "kernel dilation per spatial axis; absent: 1s"),
)


def _norm_conv(attrs, shapes):
    d = _spatial_rank(shapes[0])
    if attrs["groups"] < 1:
        raise RuleError(f"groups {attrs['groups']} is below 1", "attrs.groups")
    return dict(_geometry(attrs, d), groups=attrs["groups"])


def _conv_rule(shapes, dtypes, strides, pads, dilations, groups):
    x, w = shapes
    if len(w) != len(x):
        raise RuleError(f"the weight {fmt_shape(w)} must have the input's rank {len(x)}: "
                        "(O, C / groups, kernel...)", "inputs[1]")
    c, (o, cg) = x[1], w[:2]
    if c is not None and cg is not None and c != cg * groups:
        raise RuleError(f"the input has {c} channels, but the weight {fmt_shape(w)} takes "
                        f"{cg} per group x {groups} group(s)", "inputs[1]")
    if o is not None and o % groups:
        raise RuleError(f"{o} output channels do not split into {groups} groups",
                        "attrs.groups")
    if None in w[2:]:
        return (x[0], o) + (None,) * (len(x) - 2)
    return (x[0], o) + _window_out(x[2:], Window(w[2:], strides, pads, dilations))


def _conv_jvp(t, x, ans, **geometry):
    (tx, tw), (xv, wv) = t, x
    terms = []
    if tx is not None:
        k, n = tx.shape[0], xv.shape[0]
        tx = fill_seed(tx, xv.shape).reshape((k * n,) + xv.shape[1:])
        terms.append(conv(tx, wv[None], **geometry)[0].reshape((k,) + ans.shape))
    if tw is not None:
        terms.append(conv(xv, fill_seed(tw, wv.shape), **geometry))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _conv_vjp(i, g, x, ans, **geometry):
    xv, wv = x
    if i == 1:
        return conv_weight_grad(g, xv, wv.shape[2:], **geometry)
    k, n = g.shape[:2]
    gx = conv_input_grad(g.reshape((k * n,) + g.shape[2:]), wv, xv.shape[2:], **geometry)
    return gx.reshape((k,) + xv.shape)


_row(OpDef(
    "conv", 2, _conv_rule, lambda x, w, **geometry: conv(x, w[None], **geometry)[0],
    _conv_jvp, _conv_vjp,
    WINDOW_ATTRS + (AttrSpec("groups", "int", 1, "channel groups (C and O divisible by it)"),),
    frozenset({"x"}), True, _norm_conv,
    "N-d convolution (cross-correlation, as ONNX Conv and PyTorch), NCHW: x (N, C, *S), "
    "weight (O, C / groups, *kernel); no bias (add it)",
    scratch=lambda shapes, **geometry: conv_scratch(shapes[0], shapes[1], **geometry),
    flops=lambda shapes, out, **_: 2 * prod(out) * prod(shapes[1][1:])))


def _norm_pool(attrs, shapes):
    d = _spatial_rank(shapes[0])
    kernel = _spatial_ints(attrs, "kernel_shape", d, None, 1)
    win = Window(kernel, **_geometry(attrs, d))
    for axis, (b, e, extent) in enumerate(zip(win.begin, win.end, win.extents())):
        if max(b, e) >= extent:
            raise RuleError(f"pads {list(win.pads)}: spatial axis {axis} is padded by "
                            f"{max(b, e)}, not less than the kernel's extent {extent} (a "
                            "window could hold only padding)", "attrs.pads")
    out = {"window": win}
    if "count_include_pad" in attrs:
        out["count_include_pad"] = attrs["count_include_pad"]
    return out


def _pool_rule(shapes, dtypes, window, count_include_pad=None):
    x = shapes[0]
    return x[:2] + _window_out(x[2:], window)


POOL_ATTRS = (AttrSpec("kernel_shape", "ints", description="window size per spatial axis"),
              ) + WINDOW_ATTRS

_row(OpDef(
    "max_pool", 1, _pool_rule, lambda x, window: max_pool(x, window),
    lambda t, x, ans, window: max_pool_jvp(fill_seed(t[0], x[0].shape), x[0], ans, window),
    lambda i, g, x, ans, window: max_pool_vjp(g, x[0], ans, window),
    POOL_ATTRS, frozenset({"x", "ans"}), True, _norm_pool,
    "N-d max pooling, NCHW, padding -inf (ONNX MaxPool without ceil_mode); the derivative of "
    "a window goes to its first maximal element in row-major order (to its last NaN if it "
    "has any), as in PyTorch",
    scratch=lambda shapes, window: max_pool_scratch(shapes[0], window),
    flops=lambda shapes, out, window: prod(out) * prod(window.kernel)))
_row(OpDef(
    "avg_pool", 1, _pool_rule,
    lambda x, window, count_include_pad: avg_pool(x, window, count_include_pad),
    lambda t, x, ans, window, count_include_pad: avg_pool(t[0], window, count_include_pad),
    lambda i, g, x, ans, window, count_include_pad: avg_pool_vjp(
        g, x[0].shape[2:], window, count_include_pad),
    POOL_ATTRS + (AttrSpec("count_include_pad", "bool", False,
                           "divide by the whole window, padding included (else by the "
                           "elements that are not padding)"),),
    frozenset(), True, _norm_pool,
    "N-d average pooling, NCHW (ONNX AveragePool without ceil_mode)",
    scratch=lambda shapes, window, count_include_pad: avg_pool_scratch(shapes[0], window),
    flops=lambda shapes, out, window, count_include_pad: prod(out) * prod(window.kernel)))


# --- attribute checking --------------------------------------------------------

_ATTR_CHECKS = {
    "int": lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)),
    "bool": lambda v: isinstance(v, (bool, np.bool_)),
    "float": lambda v: isinstance(v, (int, float, np.integer, np.floating))
    and not isinstance(v, (bool, np.bool_)),
    "ints": lambda v: isinstance(v, (list, tuple, np.ndarray)) and all(
        _ATTR_CHECKS["int"](e) for e in v),
    "string": lambda v: isinstance(v, str),
}


def _convert(spec: AttrSpec, value):
    if spec.type == "ints":
        return tuple(int(e) for e in value)
    if spec.type == "int":
        return int(value)
    if spec.type == "bool":
        return bool(value)
    if spec.type == "string":
        return str(value)
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


def check_dtypes(op: OpDef, names, dtypes, attrs=None) -> str:
    """The op's result dtype, by its own rule or else: operands share one dtype, which
    the result keeps; float-only ops refuse integers, and only some ops take bool."""
    if op.dtype is not None:
        return op.dtype(names, dtypes, **(attrs or {}))
    return shared_dtype(names, dtypes, op.float_only)
