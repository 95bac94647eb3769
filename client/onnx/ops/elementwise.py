"""Elementwise ops: arithmetic, comparisons, logic, activations; and the ops computed
at import time only (Floor, Range, ArgMax...)."""

from __future__ import annotations

import math

import numpy as np

from ..registry import _out, converts
from ..values import Dim, Dyn, _broadcast, _dtype_of, _FoldError, _has_dim, _prod, _shape_of


UNARY_OPS = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Exp": "exp", "Log": "log",
             "Neg": "neg", "Sqrt": "sqrt", "Abs": "abs", "Erf": "erf", "Sin": "sin",
             "Cos": "cos", "Tan": "tan", "Reciprocal": "reciprocal", "Softplus": "softplus"}


@converts(*UNARY_OPS)
def _unary(imp, node, x, attrs):
    return imp.e.unary(UNARY_OPS[node.op_type], x[0], name=_out(node))


BINARY_OPS = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow",
              "Equal": "equal", "Less": "less", "LessOrEqual": "less_equal",
              "Greater": "greater", "GreaterOrEqual": "greater_equal"}


@converts(*BINARY_OPS)
def _binary(imp, node, x, attrs):
    a, b = x
    e = imp.e
    if node.op_type == "Pow":
        if _dtype_of(b) != _dtype_of(a):
            b = e.cast(b, _dtype_of(a))
        if isinstance(a, Dyn) and not isinstance(b, Dyn) and np.size(b) == 1:
            p = float(np.asarray(b).ravel()[0])
            special = {2.0: "square", 0.5: "sqrt", 1.0: None, -1.0: "reciprocal"}
            if p in special:
                op = special[p]
                return e.cast(a, a.dtype, name=_out(node)) if op is None else \
                    e.unary(op, a, name=_out(node))
    return e.binary(BINARY_OPS[node.op_type], a, b, name=_out(node))


@converts("Max", "Min", "Sum", "Mean")
def _variadic(imp, node, x, attrs):
    op = {"Max": "maximum", "Min": "minimum", "Sum": "add", "Mean": "add"}[node.op_type]
    last = node.op_type != "Mean"
    out = x[0]
    for i, v in enumerate(x[1:], start=2):
        out = imp.e.binary(op, out, v, name=_out(node) if last and i == len(x) else None)
    if node.op_type == "Mean":
        return imp.e.div(out, imp.e.const(len(x), out), name=_out(node))
    return out if len(x) > 1 else imp.e.cast(out, _dtype_of(out), name=_out(node))


@converts("Not")
def _not(imp, node, x, attrs):
    return imp.e.binary("equal", x[0], np.asarray(False), name=_out(node))


@converts("And", "Or", "Xor")
def _logical(imp, node, x, attrs):
    a, b = x
    if node.op_type == "Xor":
        return imp.e.binary("not_equal", a, b, name=_out(node))
    if node.op_type == "And":
        return imp.e.where(a, b, np.asarray(False), name=_out(node))
    return imp.e.where(a, np.asarray(True), b, name=_out(node))


@converts("Mod", "Floor", "Ceil", "Round", "Sign", "IsNaN", "IsInf", "Range", "NonZero",
          "ArgMax", "ArgMin", "EyeLike", "Size")
def _known_only(imp, node, x, attrs):
    """Ops computed at import time only (no derivative; in shape plumbing)."""
    op = node.op_type
    if op == "Size":
        shape = _shape_of(x[0])
        return np.asarray(_prod(shape), dtype=object if _has_dim(shape) else np.int64)
    a = [imp.static(v, f"input {i} of {op} (computed at import time only)")
         for i, v in enumerate(x)]
    if op == "Mod":
        imp.e.charge(_broadcast(a[0].shape, a[1].shape), a[0].dtype)
        if attrs.get("fmod", 0):
            return np.fmod(a[0], a[1])
        if a[0].dtype != object and a[1].dtype != object:
            return np.mod(a[0], a[1])  # x mod 0: 0 for integers, NaN for floats
        return np.asarray(np.frompyfunc(_shape_mod, 2, 1)(a[0], a[1]))
    if op in ("Floor", "Ceil", "Round", "Sign"):
        return {"Floor": np.floor, "Ceil": np.ceil, "Round": np.round, "Sign": np.sign}[op](a[0])
    if op == "IsNaN":
        return np.isnan(a[0])
    if op == "IsInf":
        return np.isinf(a[0])
    if op == "Range":
        start, limit, delta = (v.item() for v in a[:3])
        if delta == 0:
            raise _FoldError("Range with delta 0")
        count = max(math.ceil((limit - start) / delta), 0) if math.isfinite(
            (limit - start) / delta) else _fold_error("Range over an infinite span")
        imp.e.charge([count], a[0].dtype)
        return np.arange(start, limit, delta).astype(a[0].dtype)
    if op == "NonZero":
        imp.e.charge([a[0].ndim, a[0].size], np.int64)
        return np.array(np.nonzero(a[0]), dtype=np.int64)
    if op == "EyeLike":
        dtype = a[0].dtype if "dtype" not in attrs else \
            imp.onnx.helper.tensor_dtype_to_np_dtype(attrs["dtype"])
        imp.e.charge(a[0].shape, dtype)
        return np.eye(*a[0].shape, k=attrs.get("k", 0), dtype=dtype)
    axis = attrs.get("axis", 0)
    f = np.argmax if op == "ArgMax" else np.argmin
    array = np.flip(a[0], axis) if attrs.get("select_last_index", 0) else a[0]
    out = f(array, axis=axis)
    if attrs.get("select_last_index", 0):
        out = a[0].shape[axis] - 1 - out
    return np.asarray(np.expand_dims(out, axis) if attrs.get("keepdims", 1) else out, np.int64)

@converts("Where")
def _where(imp, node, x, attrs):
    return imp.e.where(x[0], x[1], x[2], name=_out(node))


@converts("Clip")
def _clip(imp, node, x, attrs):
    low = x[1] if len(x) > 1 else attrs.get("min")
    high = x[2] if len(x) > 2 else attrs.get("max")
    e = imp.e
    if isinstance(low, Dyn) and low.array is None or isinstance(high, Dyn) and high.array is None:
        out = x[0] if low is None else e.binary("maximum", x[0], low)
        return out if high is None else e.binary("minimum", out, high, name=_out(node))
    low = None if low is None else float(np.asarray(imp.static(low, "min")).item())
    high = None if high is None else float(np.asarray(imp.static(high, "max")).item())
    return e.clip(x[0], low, high, name=_out(node))

@converts("Gelu")
def _gelu(imp, node, x, attrs):
    e, v = imp.e, x[0]
    if attrs.get("approximate", "none") == "tanh":
        inner = e.mul(e.add(v, e.mul(e.const(0.044715, v), e.mul(v, e.unary("square", v)))),
                      e.const(math.sqrt(2 / math.pi), v))
        half = e.add(e.unary("tanh", inner), e.const(1.0, v))
    else:
        half = e.add(e.unary("erf", e.mul(v, e.const(1 / math.sqrt(2), v))), e.const(1.0, v))
    return e.mul(e.mul(v, e.const(0.5, v)), half, name=_out(node))


@converts("LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "ThresholdedRelu")
def _piecewise(imp, node, x, attrs):
    e, v, op = imp.e, x[0], node.op_type
    positive = e.binary("greater", v, e.const(0, v))
    if op == "LeakyRelu":
        return e.where(positive, v, e.mul(v, e.const(attrs.get("alpha", 0.01), v)),
                       name=_out(node))
    if op == "PRelu":
        return e.where(positive, v, e.mul(v, x[1]), name=_out(node))
    if op == "ThresholdedRelu":
        above = e.binary("greater", v, e.const(attrs.get("alpha", 1.0), v))
        return e.where(above, v, e.const(0, v), name=_out(node))
    alpha = attrs.get("alpha", {"Elu": 1.0, "Celu": 1.0, "Selu": 1.67326319217681884765625}[op])
    scaled = e.div(v, e.const(alpha, v)) if op == "Celu" else v
    negative = e.mul(e.sub(e.unary("exp", e.binary("minimum", scaled, e.const(0, v))),
                           e.const(1, v)), e.const(alpha, v))
    if op != "Selu":
        return e.where(positive, v, negative, name=_out(node))
    gamma = e.const(attrs.get("gamma", 1.05070102214813232421875), v)
    return e.mul(e.where(positive, v, negative), gamma, name=_out(node))


@converts("HardSigmoid", "HardSwish", "Softsign", "Mish")
def _smooth(imp, node, x, attrs):
    e, v, op = imp.e, x[0], node.op_type
    if op == "Softsign":
        return e.div(v, e.add(e.unary("abs", v), e.const(1, v)), name=_out(node))
    if op == "Mish":
        return e.mul(v, e.unary("tanh", e.unary("softplus", v)), name=_out(node))
    alpha, beta = (attrs.get("alpha", 0.2), attrs.get("beta", 0.5)) if op == "HardSigmoid" \
        else (1 / 6, 0.5)
    hard = e.clip(e.add(e.mul(v, e.const(alpha, v)), e.const(beta, v)), 0.0, 1.0,
                  name=_out(node) if op == "HardSigmoid" else None)
    return hard if op == "HardSigmoid" else e.mul(v, hard, name=_out(node))


def _shape_mod(p, q):
    if isinstance(p, Dim) or isinstance(q, Dim):
        return p % q
    if q == 0:
        raise _FoldError("a shape computation takes a modulus by 0")
    return p % q


def _fold_error(what):
    raise _FoldError(what)


@converts("Swish")
def _swish(imp, node, x, attrs):
    e, v = imp.e, x[0]
    alpha = attrs.get("alpha", 1.0)
    scaled = v if alpha == 1.0 else e.mul(v, e.const(alpha, v))
    return e.mul(v, e.unary("sigmoid", scaled), name=_out(node))


@converts("Sinh", "Cosh", "Asinh", "Acosh", "Atanh")
def _hyperbolic(imp, node, x, attrs):
    """From exp, log and sqrt: sinh = (e^x - e^-x) / 2, asinh = log(x + sqrt(x^2 + 1))..."""
    e, v, op = imp.e, x[0], node.op_type
    one, half = e.const(1, v), e.const(0.5, v)
    if op in ("Sinh", "Cosh"):
        up, down = e.unary("exp", v), e.unary("exp", e.unary("neg", v))
        both = e.sub(up, down) if op == "Sinh" else e.add(up, down)
        return e.mul(both, half, name=_out(node))
    if op == "Atanh":
        return e.mul(e.unary("log", e.div(e.add(one, v), e.sub(one, v))), half,
                     name=_out(node))
    square = e.unary("square", v)
    root = e.unary("sqrt", e.add(square, one) if op == "Asinh" else e.sub(square, one))
    return e.unary("log", e.add(v, root), name=_out(node))


@converts("Shrink")
def _shrink(imp, node, x, attrs):
    e, v = imp.e, x[0]
    lambd, bias = attrs.get("lambd", 0.5), attrs.get("bias", 0.0)
    below = e.binary("less", v, e.const(-lambd, v))
    above = e.binary("greater", v, e.const(lambd, v))
    return e.where(below, e.add(v, e.const(bias, v)),
                   e.where(above, e.sub(v, e.const(bias, v)), e.const(0, v)), name=_out(node))
