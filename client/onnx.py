"""ONNX models as gradserve graphs: `from_onnx(model) -> OnnxImport`.

    imported = from_onnx("model.onnx", parameters="inputs")
    imported.graph        # a GraphBuilder over the engine's ops
    imported.inputs       # the model's data inputs, in order
    imported.outputs      # its outputs, in order
    imported.parameters   # initializers that became graph inputs: name -> array
    client.grad(imported.graph, {**imported.parameters, "x": x}, of="y")

Each ONNX op becomes one engine op or a small composite of them (Gemm is a
matmul and an add, LayerNormalization a mean, a square, a reciprocal square
root and a few products). Whatever can be computed at import time is: shape
plumbing (Shape, Gather, Concat, Reshape... on shapes), Constant nodes and, with
parameters="constants", anything computed from initializers alone. A dynamic
dimension (a dim_param such as "batch") is carried as a symbol through that
arithmetic and becomes -1 in the graph where the engine allows it (a reshape
may have one).

Names are kept: inputs, outputs and initializers keep the model's names, and
each ONNX node's result is the graph value of its output's name; a composite's
intermediate values are named `output/op`.

Needs the `onnx` package (pip install 'gradserve[onnx]'); never onnxruntime.
"""

from __future__ import annotations

import ast
import importlib
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from gradserve.v1.codec import WIRE_DTYPES

from .builder import GraphBuilder, Value
from .extras import MissingExtra

OLDEST_OPSET = 13
PARAMETER_MODES = ("constants", "inputs")
ONNX_EXTRA_HINT = "pip install 'gradserve[onnx]'"
INT_MAX = 2 ** 63 - 1

# What to do about ops that are not imported (the general hint follows otherwise).
HINTS = {
    "Upsample": "it was replaced by Resize in opset 10: re-export with opset >= 13",
    "Resize": "only nearest-neighbour resizing by integer factors is supported",
    "ConvTranspose": "express the upsampling another way (e.g. Resize nearest + Conv)",
    "If": "control flow is not imported: export with fixed shapes so that the exporter "
          "resolves the branch",
    "Loop": "control flow is not imported: unroll the loop before exporting",
    "Scan": "control flow is not imported: unroll the loop before exporting",
    "LSTM": "recurrent layers are not imported",
    "GRU": "recurrent layers are not imported",
    "RNN": "recurrent layers are not imported",
}
EVAL_MODE_HINT = "export the model in eval mode (model.eval() in PyTorch)"


class OnnxImportError(ValueError):
    """A model that cannot be imported; the message names the node, its op type and what
    to do."""


class _FoldError(Exception):
    """Raised inside a converter; the importer adds the node's name and op type."""


@dataclass
class OnnxImport:
    graph: GraphBuilder
    inputs: list[str]  # data inputs, in the model's order
    outputs: list[str]
    parameters: dict[str, np.ndarray] = field(default_factory=dict)  # name -> value
    input_dtypes: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple] = field(default_factory=dict)  # -1: any size
    opset: int = 0
    values: dict[str, Value] = field(default_factory=dict)  # outputs and parameters
    output_shapes: dict[str, tuple] = field(default_factory=dict)  # as imported; -1: dynamic
    # graph node name -> (ONNX node name, op type, torch module path from the exporter's
    # metadata or ()), for pictures grouped by module (gradserve.client.render.model_dot)
    node_origins: dict[str, tuple] = field(default_factory=dict)


    @property
    def num_parameters(self) -> int:
        return sum(int(a.size) for a in self.parameters.values())


# --- dynamic dimensions --------------------------------------------------------------
# A dimension whose size is only known at run time is a monomial coef * N^p * M^q...,
# enough for what exporters do with a batch size: multiply, divide exactly, compare.

class Dim:
    __slots__ = ("coef", "syms")

    def __init__(self, coef, syms):
        self.coef, self.syms = Fraction(coef), tuple(sorted(syms))

    @staticmethod
    def symbol(name: str) -> "Dim":
        return Dim(1, ((name, 1),))

    @staticmethod
    def _make(coef, syms):
        syms = tuple((s, p) for s, p in syms if p)
        if not syms:
            if coef.denominator != 1:
                raise _FoldError(f"shape arithmetic gives a fraction ({coef})")
            return int(coef)
        return Dim(coef, syms)

    def _combine(self, other, sign):
        powers = dict(self.syms)
        for s, p in other.syms:
            powers[s] = powers.get(s, 0) + sign * p
        return powers.items()

    def __mul__(self, other):
        if isinstance(other, Dim):
            return Dim._make(self.coef * other.coef, self._combine(other, 1))
        if _is_int(other):
            return Dim._make(self.coef * int(other), self.syms)
        raise _FoldError(f"the dynamic dimension {self} is used in arithmetic with {other!r}")

    __rmul__ = __mul__

    def _divide(self, other):
        if isinstance(other, Dim):
            return Dim._make(self.coef / other.coef, self._combine(other, -1))
        if _is_int(other) and int(other) != 0:
            return Dim._make(self.coef / int(other), self.syms)
        raise _FoldError(f"the dynamic dimension {self} is divided by {other!r}")

    __floordiv__ = __truediv__ = _divide

    def __rfloordiv__(self, other):
        if _is_int(other):
            return Dim(int(other), ())._divide(self)
        raise _FoldError(f"{other!r} is divided by the dynamic dimension {self}")

    __rtruediv__ = __rfloordiv__

    def _same_term(self, other):
        return isinstance(other, Dim) and other.syms == self.syms

    def __add__(self, other):
        if self._same_term(other):
            return Dim._make(self.coef + other.coef, self.syms)
        if _is_int(other) and int(other) == 0:
            return self
        raise _FoldError(f"shape arithmetic {self} + {other} cannot be folded with a dynamic "
                         "dimension: give the input a fixed size (input_shapes=...)")

    __radd__ = __add__

    def __neg__(self):
        return Dim._make(-self.coef, self.syms)

    def __sub__(self, other):
        return self + (-other)

    def __rsub__(self, other):
        return (-self) + other

    def __mod__(self, other):
        if _is_int(other) and int(other) != 0 and self.coef.denominator == 1 \
                and self.coef.numerator % int(other) == 0:
            return 0
        raise _FoldError(f"{self} mod {other} cannot be folded with a dynamic dimension")

    def __eq__(self, other):
        if isinstance(other, Dim):
            return self.coef == other.coef and self.syms == other.syms
        return False  # a dynamic size is taken to differ from every fixed one

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash((self.coef, self.syms))

    def _order(self, other):
        raise _FoldError(f"the dynamic dimension {self} is compared with {other!r}")

    __lt__ = __le__ = __gt__ = __ge__ = _order

    def __repr__(self):
        term = "*".join(s if p == 1 else f"{s}^{p}" for s, p in self.syms)
        return term if self.coef == 1 else f"{self.coef}*{term}"


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _has_dim(values) -> bool:
    return any(isinstance(v, Dim) for v in np.asarray(values, dtype=object).ravel())


def _engine_shape(shape, what="shape") -> list[int]:
    """A shape for an engine attribute or input: its one dynamic entry as -1."""
    dims = [d for d in shape if isinstance(d, Dim)]
    if len(dims) > 1:
        raise _FoldError(f"{what} {_fmt(shape)} has more than one dynamic dimension; the "
                         "engine takes one -1: give the inputs fixed sizes (input_shapes=...)")
    return [-1 if isinstance(d, Dim) else int(d) for d in shape]


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


def _prod(values):
    out = 1
    for v in values:
        out = out * v
    return out


# --- values under import ---------------------------------------------------------------
# A tensor is either known now (a numpy array, object dtype when it holds a Dim) or a
# value of the graph (Dyn) with its shape and dtype tracked here.

class Dyn:
    __slots__ = ("_value", "shape", "dtype", "array", "_make")

    def __init__(self, value, shape, dtype, array=None, make=None):
        self._value, self.shape, self.dtype = value, tuple(shape), np.dtype(dtype).name
        self.array, self._make = array, make  # a parameter: its value, made on first use

    @property
    def value(self) -> Value:
        if self._value is None:
            self._value = self._make()
        return self._value

    @property
    def ndim(self):
        return len(self.shape)


class Seq(list):
    """An ONNX sequence of tensors whose length is known at import time."""


def _shape_of(x):
    return x.shape if isinstance(x, Dyn) else np.shape(x)


def _dtype_of(x) -> str:
    return x.dtype if isinstance(x, Dyn) else np.asarray(x).dtype.name


def _broadcast(*shapes):
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        dim = 1
        for s in shapes:
            d = s[axis] if -axis <= len(s) else 1
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
            else:
                raise _FoldError("shapes " + " and ".join(_fmt(s) for s in shapes)
                                 + " do not broadcast")
        out.append(dim)
    return tuple(out)


def _norm_axis(axis, ndim, what="axis"):
    axis = int(axis)
    if not -ndim <= axis < max(ndim, 1):
        raise _FoldError(f"{what} {axis} is out of range for rank {ndim}")
    return axis % ndim if ndim else 0


UNARY_FOLDS = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
    "abs": np.abs, "sin": np.sin, "cos": np.cos, "tan": np.tan, "reciprocal": np.reciprocal,
    "square": np.square, "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x),
    "log1p": np.log1p,
    "erf": lambda x: np.vectorize(math.erf, otypes=[x.dtype])(x).astype(x.dtype),
}


def _int_div(a, b):
    """ONNX Div on integers truncates; on shapes (object arrays) it is exact."""
    if a.dtype == object or b.dtype == object:
        return np.frompyfunc(_shape_div, 2, 1)(a, b)
    return _trunc_div(a, b)


def _shape_div(p, q):
    if isinstance(p, Dim) or isinstance(q, Dim):
        return p / q
    return int(_trunc_div(np.int64(p), np.int64(q)))


def _trunc_div(a, b):
    q = np.floor_divide(np.abs(a), np.abs(b))
    return (np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))


BINARY_FOLDS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum,
    "div": lambda a, b: np.divide(a, b) if a.dtype.kind == "f" else _int_div(a, b),
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
}
COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")


class Emitter:
    """The engine's ops over import-time values: computed with numpy when every operand is
    known, else added to the graph with their result's shape tracked."""

    def __init__(self, builder: GraphBuilder, reserved: set[str]):
        self.g = builder
        self.reserved = reserved  # every tensor name of the model
        self.used: set[str] = set()
        self.out = ""  # the ONNX output being built (intermediate names start with it)
        self.static_names: dict[int, tuple[np.ndarray, str]] = {}
        self.promoted: dict[str, Value] = {}

    # --- names and values ----------------------------------------------------------

    def fresh(self, op: str) -> str:
        base = f"{self.out}/{op}" if self.out else op
        name, k = base, 1
        while name in self.used or name in self.reserved:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def name(self, name, op):
        if name is None:
            return self.fresh(op)
        self.used.add(name)
        return name

    def register_static(self, array: np.ndarray, name: str):
        self.static_names[id(array)] = (array, name)

    def value(self, x, dtype=None) -> Value:
        """The graph value of `x`: a Dyn's value, or a constant holding a known array."""
        if isinstance(x, Dyn):
            return x.value
        array = np.asarray(x)
        known = self.static_names.get(id(x))
        if array.dtype == object:
            if _has_dim(array):
                raise _FoldError(f"the dynamic dimension in {array.tolist()} is used as a "
                                 "value: give the inputs fixed sizes (input_shapes=...)")
            array = array.astype(np.int64)
        if dtype is not None:
            array = array.astype(dtype)
        if array.dtype.name not in WIRE_DTYPES:
            raise _FoldError(f"a {array.dtype.name} tensor cannot be a graph value "
                             f"(supported: {', '.join(WIRE_DTYPES)})")
        if known is not None and known[0] is x and dtype is None:
            name = known[1]
            if name not in self.promoted:
                self.used.add(name)
                self.promoted[name] = self.g.constant(array, name=name)
            return self.promoted[name]
        return self.g.constant(array, name=self.fresh("const"))

    def const(self, value, like) -> np.ndarray:
        """A Python number as an array of `like`'s dtype."""
        return np.asarray(value, dtype=_dtype_of(like))

    def node(self, op, inputs, attrs, shape, dtype, name=None) -> Dyn:
        values = [self.value(v) for v in inputs]
        v = self.g.node(op, values, attrs, name=self.name(name, op))
        return Dyn(v, shape, dtype)

    # --- elementwise ---------------------------------------------------------------

    def unary(self, op, x, name=None):
        if not isinstance(x, Dyn):
            with np.errstate(all="ignore"):
                return np.asarray(UNARY_FOLDS[op](np.asarray(x)))
        return self.node(op, [x], {}, x.shape, x.dtype, name)

    def binary(self, op, a, b, name=None):
        if not isinstance(a, Dyn) and not isinstance(b, Dyn):
            a, b = np.asarray(a), np.asarray(b)
            with np.errstate(all="ignore"):
                out = np.asarray(BINARY_FOLDS[op](a, b))
            if out.dtype == object and not _has_dim(out) and op not in COMPARISONS:
                out = out.astype(np.int64)
            return out
        if not isinstance(a, Dyn):
            a = np.asarray(a, dtype=b.dtype)
        if not isinstance(b, Dyn):
            b = np.asarray(b, dtype=a.dtype)
        shape = _broadcast(_shape_of(a), _shape_of(b))
        dtype = "bool" if op in COMPARISONS else _dtype_of(a)
        return self.node(op, [a, b], {}, shape, dtype, name)

    def add(self, a, b, name=None): return self.binary("add", a, b, name)
    def sub(self, a, b, name=None): return self.binary("sub", a, b, name)
    def mul(self, a, b, name=None): return self.binary("mul", a, b, name)
    def div(self, a, b, name=None): return self.binary("div", a, b, name)

    def where(self, cond, a, b, name=None):
        if not any(isinstance(v, Dyn) for v in (cond, a, b)):
            return np.where(np.asarray(cond), np.asarray(a), np.asarray(b))
        if not isinstance(a, Dyn) and isinstance(b, Dyn):
            a = np.asarray(a, dtype=b.dtype)
        if not isinstance(b, Dyn) and isinstance(a, Dyn):
            b = np.asarray(b, dtype=a.dtype)
        shape = _broadcast(_shape_of(cond), _shape_of(a), _shape_of(b))
        return self.node("where", [cond, a, b], {}, shape, _dtype_of(a), name)

    def clip(self, x, low=None, high=None, name=None):
        if not isinstance(x, Dyn):
            return np.clip(x, low, high)
        return self.node("clip", [x], {k: float(v) for k, v in (("min", low), ("max", high))
                                        if v is not None}, x.shape, x.dtype, name)

    def cast(self, x, dtype, name=None):
        dtype = np.dtype(dtype).name
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            if array.dtype == object:
                if np.dtype(dtype).kind in "iu":
                    return array
                if _has_dim(array):
                    raise _FoldError(f"the dynamic dimension in {array.tolist()} is cast to "
                                     f"{dtype}: give the inputs fixed sizes (input_shapes=...)")
                array = array.astype(np.int64)
            return array.astype(dtype)
        if dtype not in WIRE_DTYPES:
            raise _FoldError(f"cast to {dtype} is not supported "
                             f"(supported: {', '.join(WIRE_DTYPES)})")
        if dtype == x.dtype and name is None:
            return x
        return self.node("cast", [x], {"dtype": dtype}, x.shape, dtype, name)

    # --- shape ops -------------------------------------------------------------------

    def reshape(self, x, shape, name=None):
        shape = tuple(shape)
        if not isinstance(x, Dyn):
            return np.reshape(x, [int(d) for d in shape]) if not _has_dim(shape) else \
                _fail(f"reshape of a known value to {_fmt(shape)}")
        if shape == x.shape and name is None:
            return x
        return self.node("reshape", [x], {"shape": _engine_shape(shape, "reshape to")},
                         shape, x.dtype, name)

    def transpose(self, x, perm, name=None):
        perm = [int(p) for p in perm]
        if not isinstance(x, Dyn):
            return np.transpose(x, perm)
        if perm == list(range(x.ndim)) and name is None:
            return x
        return self.node("transpose", [x], {"perm": perm}, tuple(x.shape[p] for p in perm),
                         x.dtype, name)

    def broadcast_to(self, x, shape, name=None):
        shape = tuple(shape)
        if not isinstance(x, Dyn):
            if not _has_dim(shape):
                return np.broadcast_to(x, [int(d) for d in shape])
        elif shape == x.shape and name is None:
            return x
        if not _has_dim(shape):
            return self.node("broadcast_to", [x], {"shape": [int(d) for d in shape]}, shape,
                             _dtype_of(x), name)
        # a dynamic dimension the value already has: broadcast the rest by adding zeros
        xs = (1,) * (len(shape) - len(_shape_of(x))) + tuple(_shape_of(x))
        zeros = [1 if isinstance(d, Dim) else d for d in shape]
        for d, have in zip(shape, xs):
            if isinstance(d, Dim) and have != d:
                raise _FoldError(f"cannot expand {_fmt(_shape_of(x))} to {_fmt(shape)}: the "
                                 "dynamic dimension is not the value's own")
        return self.add(x, np.zeros(zeros, _dtype_of(x)), name=name)

    def concat(self, values, axis, name=None):
        ndim = len(_shape_of(values[0]))
        axis = _norm_axis(axis, ndim)
        if not any(isinstance(v, Dyn) for v in values):
            arrays = [np.asarray(v) for v in values]
            kind = object if any(a.dtype == object for a in arrays) else None
            return np.concatenate([a.astype(kind) if kind else a for a in arrays], axis=axis)
        values = [v for v in values if _shape_of(v)[axis] != 0] or values[:1]
        if len(values) == 1 and name is None:
            return values[0]
        shapes = [_shape_of(v) for v in values]
        shape = list(shapes[0])
        for s in shapes[1:]:
            shape[axis] = shape[axis] + s[axis]
        dtype = next(v.dtype for v in values if isinstance(v, Dyn))
        return self.node("concat", values, {"axis": axis}, tuple(shape), dtype, name)

    def slice(self, x, starts, stops, axes, steps=None, name=None):
        """ONNX Slice with known starts, stops, axes and steps (clamped as ONNX does)."""
        shape = list(_shape_of(x))
        ndim = len(shape)
        steps = [1] * len(starts) if steps is None else steps
        picks = [None] * ndim  # (begin, end, step) per sliced axis
        for start, stop, axis, step in zip(starts, stops, axes, steps):
            axis = _norm_axis(axis, ndim)
            start, stop, step = int(start), int(stop), int(step)
            dim = shape[axis]
            if isinstance(dim, Dim):
                if step == 1 and start == 0 and stop >= 2 ** 31 - 1:
                    continue
                raise _FoldError(f"slicing the dynamic axis {axis} ({dim}) is not supported: "
                                 "give the inputs fixed sizes (input_shapes=...)")
            if step == 0:
                raise _FoldError("a slice step of 0")
            begin, end, step = slice(max(min(start, INT_MAX), -INT_MAX),
                                     max(min(stop, INT_MAX), -INT_MAX - 1), step).indices(dim)
            if (begin, max(begin, end), step) != (0, dim, 1):
                picks[axis] = (begin, end, step)  # end -1: before index 0 (a negative step)
        if not isinstance(x, Dyn):
            index = tuple(slice(None) if p is None else slice(p[0], None if p[1] < 0 else p[1],
                                                               p[2]) for p in picks)
            return np.asarray(x)[index]
        plain = [(a, p) for a, p in enumerate(picks) if p is not None and p[2] == 1]
        strided = [(a, p) for a, p in enumerate(picks) if p is not None and p[2] != 1]
        out = x
        if plain:
            spans = [(b, max(b, e)) for _, (b, e, _) in plain]
            sliced = list(x.shape)
            for (a, _), (b, e) in zip(plain, spans):
                sliced[a] = e - b
            out = self.node("slice", [x], {"starts": [b for b, _ in spans],
                                           "stops": [e for _, e in spans],
                                           "axes": [a for a, _ in plain]},
                            tuple(sliced), x.dtype, None if strided else name)
        for i, (a, (b, e, step)) in enumerate(strided):  # a step other than 1: pick indices
            out = self.take(out, np.arange(b, e, step, dtype=np.int64), a,
                            name=name if i == len(strided) - 1 else None)
        return out

    def pad(self, x, pads, value=0.0, name=None):
        if not any(pads):
            return x
        if not isinstance(x, Dyn):
            n = np.ndim(x)
            return np.pad(x, list(zip(pads[:n], pads[n:])), constant_values=value)
        n = x.ndim
        shape = tuple(d + b + e for d, b, e in zip(x.shape, pads[:n], pads[n:]))
        return self.node("pad", [x], {"pads": [int(p) for p in pads], "value": float(value)},
                         shape, x.dtype, name)

    def take(self, data, indices, axis, name=None):
        ndim = len(_shape_of(data))
        axis = _norm_axis(axis, ndim)
        if not isinstance(data, Dyn) and not isinstance(indices, Dyn):
            return np.take(np.asarray(data), np.asarray(indices, dtype=np.int64), axis=axis)
        if not isinstance(indices, Dyn):
            indices = np.asarray(indices, dtype=np.int64)
        ds = _shape_of(data)
        shape = tuple(ds[:axis]) + tuple(_shape_of(indices)) + tuple(ds[axis + 1:])
        return self.node("take", [data, indices], {"axis": axis}, shape, _dtype_of(data), name)

    # --- reductions and nn -----------------------------------------------------------------

    def reduce(self, op, x, axes=None, keepdims=False, name=None):
        ndim = len(_shape_of(x))
        axes = list(range(ndim)) if axes is None else sorted(_norm_axis(a, ndim) for a in axes)
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            f = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min,
                 "prod": np.prod}[op]
            out = f(array, axis=tuple(axes), keepdims=keepdims)
            return np.asarray(out) if array.dtype == object else np.asarray(out, array.dtype)
        if not axes:
            return x
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims \
            else tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return self.node(op, [x], {"axes": axes, "keepdims": bool(keepdims)}, shape, x.dtype,
                         name)

    def softmax(self, op, x, axis, name=None):
        axis = _norm_axis(axis, len(_shape_of(x)))
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            z = array - np.max(array, axis=axis, keepdims=True)
            lse = np.log(np.sum(np.exp(z), axis=axis, keepdims=True))
            return (z - lse if op == "log_softmax" else np.exp(z - lse)).astype(array.dtype)
        return self.node(op, [x], {"axis": axis}, x.shape, x.dtype, name)

    def cumsum(self, x, axis, reverse=False, exclusive=False, name=None):
        axis = _norm_axis(axis, len(_shape_of(x)))
        return self.node("cumsum", [x], {"axis": axis, "reverse": bool(reverse),
                                         "exclusive": bool(exclusive)},
                         _shape_of(x), _dtype_of(x), name)

    def matmul(self, a, b, name=None):
        if not isinstance(a, Dyn) and not isinstance(b, Dyn):
            return np.matmul(a, b)
        sa, sb = tuple(_shape_of(a)), tuple(_shape_of(b))
        a2 = (1,) + sa if len(sa) == 1 else sa
        b2 = sb + (1,) if len(sb) == 1 else sb
        if a2[-1] != b2[-2]:
            raise _FoldError(f"matmul of {_fmt(sa)} and {_fmt(sb)}: inner sizes differ")
        shape = _broadcast(a2[:-2], b2[:-2]) + ((a2[-2],) if len(sa) > 1 else ()) + \
            ((b2[-1],) if len(sb) > 1 else ())
        dtype = _dtype_of(a if isinstance(a, Dyn) else b)
        return self.node("matmul", [a, b], {}, shape, dtype, name)

    def conv(self, x, w, strides, pads, dilations, groups, name=None):
        ws = _shape_of(w)
        spatial = _window_out(_shape_of(x)[2:], ws[2:], strides, pads, dilations)
        shape = (_shape_of(x)[0], ws[0]) + spatial
        return self.node("conv", [x, w], {"strides": strides, "pads": pads,
                                          "dilations": dilations, "groups": int(groups)},
                         shape, _dtype_of(x), name)

    def pool(self, op, x, kernel, strides, pads, dilations, count_include_pad=None, name=None):
        xs = _shape_of(x)
        shape = tuple(xs[:2]) + _window_out(xs[2:], kernel, strides, pads, dilations)
        attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads,
                 "dilations": dilations}
        if count_include_pad is not None:
            attrs["count_include_pad"] = bool(count_include_pad)
        return self.node(op, [x], attrs, shape, _dtype_of(x), name)


def _window_out(spatial, kernel, strides, pads, dilations):
    d = len(spatial)
    out = []
    for i in range(d):
        if isinstance(spatial[i], Dim):
            raise _FoldError(f"spatial axis {i} is dynamic ({spatial[i]}): give the inputs "
                             "fixed sizes (input_shapes=...)")
        extent = dilations[i] * (kernel[i] - 1) + 1
        out.append((spatial[i] + pads[i] + pads[i + d] - extent) // strides[i] + 1)
    return tuple(out)


def _fail(what):
    raise _FoldError(f"{what} cannot be folded with a dynamic dimension")


# --- the importer ---------------------------------------------------------------------------

Converter = Callable  # (Importer, node, inputs, attrs) -> result or list of results
CONVERTERS: dict[str, Converter] = {}


def converts(*op_types):
    def register(f):
        for op in op_types:
            CONVERTERS[op] = f
        return f
    return register


class Importer:
    def __init__(self, model, parameters: str, input_shapes: dict | None,
                 builder: GraphBuilder | None = None, bound: dict | None = None,
                 taken: tuple = (), mark_outputs: bool = True):
        self.onnx = import_optional("onnx", "onnx", "ONNX import")
        self.numpy_helper = import_optional("onnx.numpy_helper", "onnx", "ONNX import")
        self.model = model
        self.mode = parameters
        self.input_shapes = dict(input_shapes or {})
        self.opset = _opset(model)
        graph = model.graph
        names = {i.name for i in graph.input} | {o.name for o in graph.output} | \
            {t.name for t in graph.initializer}
        for n in graph.node:
            names.update(n.input)
            names.update(n.output)
        names.discard("")
        self.g = builder or GraphBuilder()
        self.e = Emitter(self.g, names)
        self.e.used.update(taken)  # names the caller's part of the builder uses
        self.env: dict[str, object] = dict(bound or {})
        self.parameters: dict[str, np.ndarray] = {}
        self.dim_counter = 0
        self.mark_outputs = mark_outputs
        self.origins: dict[str, tuple] = {}

    # --- model pieces -----------------------------------------------------------------

    def run(self) -> OnnxImport:
        graph = self.model.graph
        initializers = {t.name: t for t in graph.initializer}
        for tensor in graph.initializer:
            self._initializer(tensor)
        data_inputs, dtypes, shapes = [], {}, {}
        for inp in graph.input:
            if inp.name in initializers:
                continue
            dyn = self.env[inp.name] if inp.name in self.env else self._graph_input(inp)
            data_inputs.append(inp.name)
            dtypes[inp.name] = dyn.dtype
            shapes[inp.name] = tuple(-1 if isinstance(d, Dim) else d for d in dyn.shape)
        for node in graph.node:
            self._node(node)
        outputs, values, out_shapes = [], {}, {}
        for out in graph.output:
            outputs.append(out.name)
            values[out.name] = self._output(out.name)
            out_shapes[out.name] = tuple(-1 if isinstance(d, Dim) else int(d)
                                         for d in _shape_of(self.env[out.name]))
        ordered = {name: self.parameters[name] for name in initializers if name in self.parameters}
        values.update((name, self.env[name].value) for name in ordered)
        return OnnxImport(self.g, data_inputs, outputs, ordered, dtypes, shapes, self.opset,
                          values, out_shapes, self.origins)

    def _initializer(self, tensor):
        array = _tensor_array(self.numpy_helper, tensor, "initializer")
        if self.mode == "inputs" and array.dtype.kind == "f":
            if array.dtype.name not in WIRE_DTYPES:
                raise OnnxImportError(f"initializer '{tensor.name}' is {array.dtype.name}; "
                                      "gradserve takes float32 and float64: convert the model "
                                      "to float32")
            name = tensor.name

            def make(name=name, array=array):
                self.parameters[name] = array
                self.e.used.add(name)
                return self.g.input(name, array.dtype.name, array.shape)
            self.env[name] = Dyn(None, array.shape, array.dtype, array=array, make=make)
        else:
            self.env[tensor.name] = array
            self.e.register_static(array, tensor.name)

    def _graph_input(self, inp) -> Dyn:
        t = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise OnnxImportError(f"input '{inp.name}' is not a tensor (sequences and maps "
                                  "are not supported)")
        dtype = _onnx_dtype(self.onnx, t.elem_type, f"input '{inp.name}'")
        if inp.name in self.input_shapes:
            shape = tuple(Dim.symbol(f"{inp.name}_{i}") if d is None or int(d) < 0 else int(d)
                          for i, d in enumerate(self.input_shapes[inp.name]))
        else:
            if not t.HasField("shape"):
                raise OnnxImportError(f"input '{inp.name}' has no declared shape: pass "
                                      f"input_shapes={{'{inp.name}': [...]}}")
            shape = tuple(self._dim(d) for d in t.shape.dim)
        self.e.used.add(inp.name)
        value = self.g.input(inp.name, dtype, [-1 if isinstance(d, Dim) else d for d in shape])
        dyn = Dyn(value, shape, dtype)
        self.env[inp.name] = dyn
        return dyn

    def _dim(self, d):
        if d.HasField("dim_value") and d.dim_value > 0:
            return int(d.dim_value)
        if d.HasField("dim_value") and d.dim_value == 0 and not d.dim_param:
            return 0
        if d.dim_param:
            return Dim.symbol(d.dim_param)
        self.dim_counter += 1
        return Dim.symbol(f"dim{self.dim_counter}")

    def _output(self, name):
        if name not in self.env:
            raise OnnxImportError(f"output '{name}' is not computed by any node")
        result = self.env[name]
        self.e.out = ""
        try:
            if isinstance(result, Dyn):
                value = result.value
                if value.name != name:
                    value = self.e.cast(result, result.dtype, name=name).value
            else:
                array = np.asarray(result)
                if array.dtype == object:
                    array = array.astype(np.int64) if not _has_dim(array) else _fail(
                        f"output '{name}'")
                self.e.used.add(name)
                value = self.g.constant(array, name=name) if name not in self.e.promoted \
                    else self.e.promoted[name]
        except _FoldError as err:
            raise OnnxImportError(f"output '{name}': {err}") from None
        if self.mark_outputs:
            self.g.output(value)
        return value

    def _node(self, node):
        where = f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise OnnxImportError(f"{where}: ops of domain '{node.domain}' are not supported "
                                  "(only the standard ai.onnx domain is); export without "
                                  "runtime-specific fusions or optimizations")
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            hint = HINTS.get(node.op_type, "rewrite that part of the model with supported ops "
                             "(see gradserve.client.onnx.supported_ops()) before exporting, or "
                             "file an issue")
            raise OnnxImportError(f"{where}: opset {self.opset} {node.op_type} is not "
                                  f"supported: {hint}")
        inputs = []
        for name in node.input:
            if name == "":
                inputs.append(None)
            elif name not in self.env:
                raise OnnxImportError(f"{where}: input '{name}' is not defined before the "
                                      "node (nodes must be in topological order)")
            else:
                inputs.append(self.env[name])
        attrs = {a.name: self._attr(a) for a in node.attribute}
        self.e.out = node.output[0]
        before = len(self.g._nodes)
        try:
            result = converter(self, node, inputs, attrs)
        except _FoldError as err:
            raise OnnxImportError(f"{where}: {err}") from None
        except OnnxImportError as err:
            raise OnnxImportError(f"{where}: {err}") from None
        origin = (node.name or node.output[0], node.op_type, _name_scopes(node))
        for value, *_ in self.g._nodes[before:]:
            self.origins[value.name] = origin
        results = result if isinstance(result, (list, tuple)) and not isinstance(result, Seq) \
            else [result]
        for name, r in zip(node.output, results):
            if name:
                if r is None:
                    raise OnnxImportError(f"{where}: output '{name}' is not supported")
                self.env[name] = r
                if not isinstance(r, Dyn):
                    self.e.register_static(r, name)

    def _attr(self, a):
        helper = self.onnx.helper
        value = helper.get_attribute_value(a)
        if a.type == self.onnx.AttributeProto.TENSOR:
            return _tensor_array(self.numpy_helper, value, f"attribute '{a.name}'")
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value

    # --- helpers for converters -------------------------------------------------------------

    def static(self, x, what):
        """A value the op needs at import time (axes, shapes, bounds...)."""
        if x is None:
            return None
        if isinstance(x, Dyn):
            if x.array is not None:
                return x.array
            raise _FoldError(f"{what} must be known at import time (a constant, an "
                             "initializer or computed from shapes), but it depends on the "
                             "graph's inputs")
        return np.asarray(x)

    def ints(self, x, what):
        array = self.static(x, what)
        return None if array is None else [v if isinstance(v, Dim) else int(v)
                                           for v in np.asarray(array).ravel()]


def _tensor_array(numpy_helper, tensor, what) -> np.ndarray:
    if tensor.data_location == 1:  # EXTERNAL, not loaded
        location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
        raise OnnxImportError(
            f"{what} '{tensor.name}' is stored in an external file ('{location}') that was "
            "not loaded: pass the model's path (its directory holds the file), or load it "
            "with onnx.load(path) first; a model given as bytes cannot reach its external data")
    return np.asarray(numpy_helper.to_array(tensor))


def _onnx_dtype(onnx, elem_type, what) -> str:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError):
        dtype = str(elem_type)
    if dtype not in WIRE_DTYPES:
        raise OnnxImportError(f"{what} is {dtype}; gradserve takes "
                              f"{', '.join(WIRE_DTYPES)}: convert the model (e.g. float16 to "
                              "float32) before importing")
    return dtype


def _opset(model) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise OnnxImportError("the model imports no ai.onnx opset")
    version = versions[0]
    if version < OLDEST_OPSET:
        raise OnnxImportError(
            f"the model uses opset {version}; the oldest supported is {OLDEST_OPSET}: convert "
            f"it with onnx.version_converter.convert_version(model, {OLDEST_OPSET}) or export "
            f"with opset_version >= {OLDEST_OPSET}")
    return version


def import_optional(module: str, package: str = "onnx", needed_for: str = "ONNX import"):
    """Import part of the onnx package, or raise MissingExtra naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"{ONNX_EXTRA_HINT}", name=module) from err


# --- public entry point --------------------------------------------------------------------

def load_model(model):
    """An onnx.ModelProto from a path, bytes or a ModelProto (external data loaded from the
    model's directory when given a path; refused for bytes)."""
    onnx = import_optional("onnx", "onnx", "ONNX import")
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as err:  # protobuf's DecodeError and friends
            raise OnnxImportError(f"the bytes are not an ONNX model ({err})") from None
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise OnnxImportError(f"{path}: no such file")
        try:
            proto = onnx.load(str(path), load_external_data=True)
        except FileNotFoundError as err:
            raise OnnxImportError(f"{path}: its external data file is missing ({err})") from None
        except Exception as err:
            raise OnnxImportError(f"{path} is not an ONNX model ({err})") from None
    else:
        raise TypeError(f"model must be a path, bytes or an onnx.ModelProto, not "
                        f"{type(model).__name__}")
    if proto.functions:
        inliner = import_optional("onnx.inliner", "onnx", "ONNX import")
        proto = inliner.inline_local_functions(proto)
    return proto


def _name_scopes(node) -> tuple:
    """The module path torch.onnx.export (dynamo) records for a node, e.g. ('layer1',
    'layer1.0', 'layer1.0.conv1'); () without that metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            return tuple(s for s in scopes[:-1] if s)  # the last one names the op
    return ()


def from_onnx(model, parameters: str = "constants", input_shapes: dict | None = None) \
        -> OnnxImport:
    """Import an ONNX model (a path, bytes or onnx.ModelProto) as a gradserve graph.

    parameters="constants": initializers become graph constants (register once, send only
    the data). parameters="inputs": floating initializers become graph inputs, returned with
    their values in `parameters`, so derivatives with respect to them can be asked for.
    `input_shapes` ({name: [dims]}, None or -1 for a dynamic size) overrides the model's
    declared input shapes.
    """
    if parameters not in PARAMETER_MODES:
        raise ValueError(f"parameters must be one of {', '.join(PARAMETER_MODES)}, "
                         f"not {parameters!r}")
    return Importer(load_model(model), parameters, input_shapes).run()


def import_into(builder: GraphBuilder, model, bound: dict[str, tuple[Value, tuple]],
                parameters: str = "inputs", taken: tuple = ()) -> OnnxImport:
    """Import `model` into an existing builder, with some of its inputs bound to values
    already there: {input name: (value, shape)}, shape with None for the dynamic batch.
    Used to wrap a model in a larger graph (a training loss); `taken`: the names the
    builder already uses. The model's outputs are not marked as graph outputs: their
    values are in the result's `values`."""
    proto = load_model(model)
    dyn = {name: Dyn(value, [Dim.symbol("batch") if d is None else d for d in shape],
                     value.dtype) for name, (value, shape) in bound.items()}
    return Importer(proto, parameters, None, builder, dyn, tuple(taken),
                    mark_outputs=False).run()


def model_inputs(model) -> list[tuple[str, str, list]]:
    """[(name, dtype, shape)] of the data inputs as the model declares them (None for a
    dynamic dimension)."""
    proto = load_model(model)
    onnx = import_optional("onnx", "onnx", "ONNX import")
    initializers = {t.name for t in proto.graph.initializer}

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in t.shape.dim]
        return v.name, _onnx_dtype(onnx, t.elem_type, f"'{v.name}'"), dims
    return [describe(v) for v in proto.graph.input if v.name not in initializers]


def supported_ops() -> list[str]:
    """The ONNX op types (ai.onnx domain) the importer converts."""
    return sorted(CONVERTERS)


# --- converters ---------------------------------------------------------------------------
# One function per ONNX op (or family): inputs are import-time values (arrays or Dyn),
# attrs the node's attributes; the node's first output names the final engine op.

def _out(node, i=0):
    return node.output[i] if len(node.output) > i and node.output[i] else None


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
        if attrs.get("fmod", 0):
            return np.fmod(a[0], a[1])
        return np.asarray(np.frompyfunc(lambda p, q: p % q, 2, 1)(a[0], a[1])).astype(
            a[0].dtype if a[0].dtype != object else object)
    if op in ("Floor", "Ceil", "Round", "Sign"):
        return {"Floor": np.floor, "Ceil": np.ceil, "Round": np.round, "Sign": np.sign}[op](a[0])
    if op == "IsNaN":
        return np.isnan(a[0])
    if op == "IsInf":
        return np.isinf(a[0])
    if op == "Range":
        return np.arange(a[0].item(), a[1].item(), a[2].item()).astype(a[0].dtype)
    if op == "NonZero":
        return np.array(np.nonzero(a[0]), dtype=np.int64)
    if op == "EyeLike":
        dtype = a[0].dtype if "dtype" not in attrs else \
            imp.onnx.helper.tensor_dtype_to_np_dtype(attrs["dtype"])
        return np.eye(*a[0].shape, k=attrs.get("k", 0), dtype=dtype)
    axis = attrs.get("axis", 0)
    f = np.argmax if op == "ArgMax" else np.argmin
    array = np.flip(a[0], axis) if attrs.get("select_last_index", 0) else a[0]
    out = f(array, axis=axis)
    if attrs.get("select_last_index", 0):
        out = a[0].shape[axis] - 1 - out
    return np.asarray(np.expand_dims(out, axis) if attrs.get("keepdims", 1) else out, np.int64)


@converts("Identity")
def _identity(imp, node, x, attrs):
    return x[0]


@converts("Dropout")
def _dropout(imp, node, x, attrs):
    training = imp.static(x[2], "Dropout's training_mode") if len(x) > 2 else None
    if training is not None and bool(np.asarray(training).item()):
        raise _FoldError("training_mode is true: " + EVAL_MODE_HINT)
    mask = np.ones([int(d) for d in _shape_of(x[0])], bool) if _out(node, 1) and not _has_dim(
        _shape_of(x[0])) else None
    return [x[0], mask]


@converts("Constant")
def _constant(imp, node, x, attrs):
    (key, value), = attrs.items()
    if key == "value":
        return value
    if key in ("value_float", "value_floats"):
        return np.asarray(value, np.float32)
    if key in ("value_int", "value_ints"):
        return np.asarray(value, np.int64)
    raise _FoldError(f"a constant given as {key} is not supported")


@converts("ConstantOfShape")
def _constant_of_shape(imp, node, x, attrs):
    shape = imp.ints(x[0], "the shape")
    value = attrs.get("value", np.zeros(1, np.float32))
    if _has_dim(shape):
        raise _FoldError(f"a constant of the dynamic shape {_fmt(shape)}: give the inputs "
                         "fixed sizes (input_shapes=...)")
    return np.full(shape, np.asarray(value).ravel()[0], dtype=np.asarray(value).dtype)


@converts("Shape")
def _shape(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    part = shape[slice(start, end)]
    return np.asarray(part, dtype=object if _has_dim(part) else np.int64)


@converts("Cast", "CastLike")
def _cast(imp, node, x, attrs):
    if node.op_type == "CastLike":
        dtype = _dtype_of(x[1])
    else:
        dtype = np.dtype(imp.onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])).name
    if isinstance(x[0], Dyn) and x[0].dtype == dtype:
        return x[0]
    return imp.e.cast(x[0], dtype, name=_out(node))


@converts("Reshape")
def _reshape(imp, node, x, attrs):
    data = x[0]
    target = imp.ints(x[1], "the target shape")
    src = list(_shape_of(data))
    if not attrs.get("allowzero", 0):
        target = [src[i] if (not isinstance(d, Dim) and d == 0) else d
                  for i, d in enumerate(target)]
    if any((not isinstance(d, Dim)) and d == -1 for d in target):
        known = _prod(d for d in target if isinstance(d, Dim) or d != -1)
        target = [(_prod(src) // known) if (not isinstance(d, Dim) and d == -1) else d
                  for d in target]
    return imp.e.reshape(data, target, name=_out(node))


@converts("Flatten")
def _flatten(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return imp.e.reshape(x[0], [_prod(shape[:axis]), _prod(shape[axis:])], name=_out(node))


def _axes(imp, node, x, attrs, position=1):
    if len(x) > position and x[position] is not None:
        return imp.ints(x[position], "axes")
    return attrs.get("axes")


@converts("Squeeze")
def _squeeze(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axes = _axes(imp, node, x, attrs)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if not isinstance(d, Dim) and d == 1]
    axes = {_norm_axis(a, len(shape)) for a in axes}
    return imp.e.reshape(x[0], [d for i, d in enumerate(shape) if i not in axes],
                         name=_out(node))


@converts("Unsqueeze")
def _unsqueeze(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axes = _axes(imp, node, x, attrs)
    rank = len(shape) + len(axes)
    axes = sorted(_norm_axis(a, rank) for a in axes)
    for a in axes:
        shape.insert(a, 1)
    if not isinstance(x[0], Dyn):
        return np.reshape(x[0], shape)
    return imp.e.reshape(x[0], shape, name=_out(node))


@converts("Transpose")
def _transpose(imp, node, x, attrs):
    perm = attrs.get("perm", list(reversed(range(len(_shape_of(x[0]))))))
    return imp.e.transpose(x[0], perm, name=_out(node))


@converts("Concat")
def _concat(imp, node, x, attrs):
    return imp.e.concat([v for v in x if v is not None], attrs["axis"], name=_out(node))


@converts("Slice")
def _slice(imp, node, x, attrs):
    starts = imp.ints(x[1], "starts")
    ends = imp.ints(x[2], "ends")
    axes = imp.ints(x[3], "axes") if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = imp.ints(x[4], "steps") if len(x) > 4 and x[4] is not None else None
    return imp.e.slice(x[0], starts, ends, axes, steps, name=_out(node))


@converts("Split")
def _split(imp, node, x, attrs):
    shape = _shape_of(x[0])
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    n = len(node.output)
    sizes = imp.ints(x[1], "split") if len(x) > 1 and x[1] is not None else attrs.get("split")
    if sizes is None:
        dim = shape[axis]
        if isinstance(dim, Dim):
            raise _FoldError(f"splitting the dynamic axis {axis}")
        n = attrs.get("num_outputs", n)
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    outs, start = [], 0
    for i, size in enumerate(sizes):
        outs.append(imp.e.slice(x[0], [start], [start + size], [axis], name=_out(node, i)))
        start += size
    return outs


@converts("SplitToSequence")
def _split_to_sequence(imp, node, x, attrs):
    shape = _shape_of(x[0])
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    dim = shape[axis]
    if isinstance(dim, Dim):
        raise _FoldError(f"splitting the dynamic axis {axis}")
    split = imp.ints(x[1], "split") if len(x) > 1 and x[1] is not None else None
    if split is None:  # pieces of one, the axis dropped unless keepdims
        pieces = [imp.e.slice(x[0], [i], [i + 1], [axis]) for i in range(dim)]
        if not attrs.get("keepdims", 1):
            pieces = [imp.e.reshape(p, [d for a, d in enumerate(_shape_of(p)) if a != axis])
                      for p in pieces]
        return Seq(pieces)
    sizes = split if len(split) > 1 or np.ndim(imp.static(x[1], "split")) else \
        [split[0]] * (dim // split[0]) + ([dim % split[0]] if dim % split[0] else [])
    out, start = Seq(), 0
    for size in sizes:
        out.append(imp.e.slice(x[0], [start], [start + size], [axis]))
        start += size
    return out


@converts("SequenceConstruct")
def _sequence_construct(imp, node, x, attrs):
    return Seq(x)


@converts("SequenceAt")
def _sequence_at(imp, node, x, attrs):
    return x[0][int(np.asarray(imp.static(x[1], "position")).item())]


@converts("SequenceLength")
def _sequence_length(imp, node, x, attrs):
    return np.asarray(len(x[0]), np.int64)


@converts("ConcatFromSequence")
def _concat_from_sequence(imp, node, x, attrs):
    values, axis = list(x[0]), attrs["axis"]
    if attrs.get("new_axis", 0):
        rank = len(_shape_of(values[0])) + 1
        axis = _norm_axis(axis, rank)
        values = [imp.e.reshape(v, list(_shape_of(v))[:axis] + [1] + list(_shape_of(v))[axis:])
                  for v in values]
    return imp.e.concat(values, axis, name=_out(node))


@converts("Gather")
def _gather(imp, node, x, attrs):
    return imp.e.take(x[0], x[1], attrs.get("axis", 0), name=_out(node))


@converts("Expand")
def _expand(imp, node, x, attrs):
    target = imp.ints(x[1], "the target shape")
    shape = _broadcast(tuple(_shape_of(x[0])), tuple(target))
    return imp.e.broadcast_to(x[0], shape, name=_out(node))


@converts("Tile")
def _tile(imp, node, x, attrs):
    repeats = imp.ints(x[1], "repeats")
    if not isinstance(x[0], Dyn):
        return np.tile(x[0], repeats)
    out = x[0]
    for axis, r in enumerate(repeats):
        if r != 1:
            dim = out.shape[axis]
            out = imp.e.take(out, np.tile(np.arange(dim), r), axis)
    return imp.e.cast(out, out.dtype, name=_out(node)) if out is not x[0] else out


@converts("Pad")
def _pad(imp, node, x, attrs):
    rank = len(_shape_of(x[0]))
    pads = imp.ints(x[1], "pads") if len(x) > 1 else attrs["pads"]
    value = imp.static(x[2], "the pad value") if len(x) > 2 and x[2] is not None else 0.0
    value = float(np.asarray(value).ravel()[0]) if np.size(value) else 0.0
    axes = imp.ints(x[3], "axes") if len(x) > 3 and x[3] is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        a = _norm_axis(a, rank)
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    mode = attrs.get("mode", "constant")
    if any(p < 0 for p in full):  # negative pads crop
        shape = _shape_of(x[0])
        cropped = imp.e.slice(x[0], [max(-p, 0) for p in full[:rank]],
                              [shape[a] - max(-full[a + rank], 0) for a in range(rank)],
                              list(range(rank)))
        return _pad_mode(imp, node, cropped, [max(p, 0) for p in full], value, mode)
    return _pad_mode(imp, node, x[0], full, value, mode)


def _pad_mode(imp, node, x, pads, value, mode):
    if mode == "constant":
        return imp.e.pad(x, pads, value, name=_out(node))
    rank = len(_shape_of(x))
    out = x
    for a in range(rank):
        b, e = pads[a], pads[a + rank]
        if not b and not e:
            continue
        n = _shape_of(out)[a]
        idx = np.arange(-b, n + e)
        if mode == "edge":
            idx = np.clip(idx, 0, n - 1)
        elif mode == "reflect":
            period = 2 * (n - 1)
            idx = np.abs(idx) % period if period else np.zeros_like(idx)
            idx = np.where(idx >= n, period - idx, idx)
        elif mode == "wrap":
            idx = idx % n
        else:
            raise _FoldError(f"pad mode {mode!r} is not supported")
        out = imp.e.take(out, idx, a)
    return imp.e.cast(out, _dtype_of(out), name=_out(node)) if isinstance(out, Dyn) else out


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


@converts("CumSum")
def _cumsum(imp, node, x, attrs):
    axis = int(imp.static(x[1], "axis").item())
    return imp.e.cumsum(x[0], axis, attrs.get("reverse", 0), attrs.get("exclusive", 0),
                        name=_out(node))


REDUCE_OPS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min",
              "ReduceProd": "prod"}


@converts(*REDUCE_OPS, "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceLogSum")
def _reduce(imp, node, x, attrs):
    axes = _axes(imp, node, x, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x[0]
        axes = None
    e, op, name = imp.e, node.op_type, _out(node)
    if op in REDUCE_OPS:
        return e.reduce(REDUCE_OPS[op], x[0], axes, keep, name=name)
    if op == "ReduceSumSquare":
        return e.reduce("sum", e.unary("square", x[0]), axes, keep, name=name)
    if op == "ReduceL1":
        return e.reduce("sum", e.unary("abs", x[0]), axes, keep, name=name)
    if op == "ReduceL2":
        return e.unary("sqrt", e.reduce("sum", e.unary("square", x[0]), axes, keep), name=name)
    if op == "ReduceLogSum":
        return e.unary("log", e.reduce("sum", x[0], axes, keep), name=name)
    # ReduceLogSumExp: max-shifted, as logsumexp (the engine's takes one axis)
    m = e.reduce("max", x[0], axes, True)
    s = e.reduce("sum", e.unary("exp", e.sub(x[0], m)), axes, keep)
    shift = m if keep else e.reduce("max", m, axes, False)
    return e.add(e.unary("log", s), shift, name=name)


@converts("Softmax", "LogSoftmax")
def _softmax(imp, node, x, attrs):
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    return imp.e.softmax(op, x[0], attrs.get("axis", -1), name=_out(node))


@converts("MatMul")
def _matmul(imp, node, x, attrs):
    return imp.e.matmul(x[0], x[1], name=_out(node))


@converts("Gemm")
def _gemm(imp, node, x, attrs):
    e = imp.e
    a = e.transpose(x[0], [1, 0]) if attrs.get("transA", 0) else x[0]
    b = e.transpose(x[1], [1, 0]) if attrs.get("transB", 0) else x[1]
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    c = x[2] if len(x) > 2 else None
    last = c is None or beta == 0
    y = e.matmul(a, b, name=_out(node) if last and alpha == 1.0 else None)
    if alpha != 1.0:
        y = e.mul(y, e.const(alpha, y), name=_out(node) if last else None)
    if last:
        return y
    if beta != 1.0:
        c = e.mul(c, e.const(beta, c))
    return e.add(y, c, name=_out(node))


def _window(imp, node, attrs, spatial, kernel):
    d = len(kernel)
    strides = list(attrs.get("strides", [1] * d))
    dilations = list(attrs.get("dilations", [1] * d))
    pads = list(attrs.get("pads", [0] * (2 * d)))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * d)
        for i in range(d):
            if isinstance(spatial[i], Dim):
                raise _FoldError("auto_pad on a dynamic spatial axis")
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
                        - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + d] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * d)
    return strides, pads, dilations


@converts("Conv")
def _conv(imp, node, x, attrs):
    w = x[1]
    ws = _shape_of(w)
    kernel = list(attrs.get("kernel_shape", ws[2:]))
    strides, pads, dilations = _window(imp, node, attrs, _shape_of(x[0])[2:], kernel)
    bias = x[2] if len(x) > 2 else None
    e = imp.e
    y = e.conv(x[0], w, strides, pads, dilations, attrs.get("group", 1),
               name=_out(node) if bias is None else None)
    if bias is None:
        return y
    rank = len(_shape_of(x[0]))
    return e.add(y, e.reshape(bias, [ws[0]] + [1] * (rank - 2)), name=_out(node))


def _ceil_pads(spatial, kernel, strides, pads, dilations):
    """Extra end padding that makes floor division give ONNX's ceil_mode sizes."""
    d = len(kernel)
    pads = list(pads)
    for i in range(d):
        extent = dilations[i] * (kernel[i] - 1) + 1
        span = spatial[i] + pads[i] + pads[i + d] - extent
        out = -(-span // strides[i]) + 1
        if (out - 1) * strides[i] >= spatial[i] + pads[i]:  # the last window would start in padding
            out -= 1
        pads[i + d] += max((out - 1) * strides[i] + extent - (spatial[i] + pads[i] + pads[i + d]),
                           0)
    return pads


@converts("MaxPool", "AveragePool")
def _pool(imp, node, x, attrs):
    if _out(node, 1):
        raise _FoldError("MaxPool's Indices output is not supported")
    kernel = list(attrs["kernel_shape"])
    spatial = _shape_of(x[0])[2:]
    strides, pads, dilations = _window(imp, node, attrs, spatial, kernel)
    op = "max_pool" if node.op_type == "MaxPool" else "avg_pool"
    count = None if op == "max_pool" else bool(attrs.get("count_include_pad", 0))
    if attrs.get("ceil_mode", 0):
        extra = _ceil_pads(spatial, kernel, strides, pads, dilations)
        if extra != pads and count:
            raise _FoldError("ceil_mode with count_include_pad is not supported")
        pads = extra
    return imp.e.pool(op, x[0], kernel, strides, pads, dilations, count, name=_out(node))


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp, node, x, attrs):
    op = "mean" if node.op_type == "GlobalAveragePool" else "max"
    rank = len(_shape_of(x[0]))
    return imp.e.reduce(op, x[0], list(range(2, rank)), True, name=_out(node))


def _channel(imp, v, rank):
    """A per-channel vector (C,) shaped to broadcast against (N, C, *spatial)."""
    return imp.e.reshape(v, [_shape_of(v)[0]] + [1] * (rank - 2))


@converts("BatchNormalization")
def _batch_norm(imp, node, x, attrs):
    if attrs.get("training_mode", 0) or any(_out(node, i) for i in (1, 2)):
        raise _FoldError("training mode (running statistics as outputs) is not supported: "
                         + EVAL_MODE_HINT)
    data, scale, bias, mean, var = x
    e = imp.e
    rank = len(_shape_of(data))
    eps = attrs.get("epsilon", 1e-5)
    factor = e.mul(scale, e.unary("reciprocal", e.unary("sqrt", e.add(var, e.const(eps, var)))))
    shift = e.sub(bias, e.mul(mean, factor))
    return e.add(e.mul(data, _channel(imp, factor, rank)), _channel(imp, shift, rank),
                 name=_out(node))


def _normalize(imp, x, axes, eps):
    """(x - mean) / sqrt(var + eps) over axes, with the mean and 1/sqrt(var + eps)."""
    e = imp.e
    mean = e.reduce("mean", x, axes, True)
    centered = e.sub(x, mean)
    var = e.reduce("mean", e.unary("square", centered), axes, True)
    inv = e.unary("reciprocal", e.unary("sqrt", e.add(var, e.const(eps, var))))
    return e.mul(centered, inv), mean, inv


@converts("LayerNormalization")
def _layer_norm(imp, node, x, attrs):
    data = x[0]
    rank = len(_shape_of(data))
    axis = _norm_axis(attrs.get("axis", -1), rank)
    y, mean, inv = _normalize(imp, data, list(range(axis, rank)), attrs.get("epsilon", 1e-5))
    e = imp.e
    scale = x[1] if len(x) > 1 else None
    bias = x[2] if len(x) > 2 else None
    if scale is not None:
        y = e.mul(y, scale, name=None if bias is not None else _out(node))
    if bias is not None:
        y = e.add(y, bias, name=_out(node))
    return [y, mean, inv]


@converts("InstanceNormalization")
def _instance_norm(imp, node, x, attrs):
    data, scale, bias = x
    rank = len(_shape_of(data))
    y, _, _ = _normalize(imp, data, list(range(2, rank)), attrs.get("epsilon", 1e-5))
    e = imp.e
    return e.add(e.mul(y, _channel(imp, scale, rank)), _channel(imp, bias, rank),
                 name=_out(node))


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


@converts("OneHot")
def _one_hot(imp, node, x, attrs):
    indices, depth, values = x
    depth = int(np.asarray(imp.static(depth, "depth")).item())
    values = imp.static(values, "values")
    axis = attrs.get("axis", -1)
    e = imp.e
    rank = len(_shape_of(indices)) + 1
    axis = _norm_axis(axis, rank)
    idx = e.cast(indices, "int64")
    idx = e.where(e.binary("less", idx, np.asarray(0, np.int64)),
                  e.add(idx, np.asarray(depth, np.int64)), idx)
    shape = list(_shape_of(idx))
    shape.insert(axis, 1)
    hot = e.binary("equal", e.reshape(idx, shape),
                   np.arange(depth, dtype=np.int64).reshape([-1] + [1] * (rank - axis - 1)))
    return e.where(hot, values[1], values[0], name=_out(node))


@converts("Trilu")
def _trilu(imp, node, x, attrs):
    k = int(np.asarray(imp.static(x[1], "k")).item()) if len(x) > 1 and x[1] is not None else 0
    shape = _shape_of(x[0])
    rows, cols = shape[-2], shape[-1]
    if isinstance(rows, Dim) or isinstance(cols, Dim):
        raise _FoldError("Trilu over dynamic axes")
    keep = np.triu(np.ones((rows, cols), bool), k) if attrs.get("upper", 1) else \
        np.tril(np.ones((rows, cols), bool), k)
    return imp.e.where(keep, x[0], imp.e.const(0, x[0]), name=_out(node))


@converts("Resize")
def _resize(imp, node, x, attrs):
    if attrs.get("mode", "nearest") != "nearest":
        raise _FoldError(f"mode {attrs.get('mode')!r}: " + HINTS["Resize"])
    shape = _shape_of(x[0])
    scales = imp.static(x[2], "scales") if len(x) > 2 and x[2] is not None else None
    sizes = imp.ints(x[3], "sizes") if len(x) > 3 and x[3] is not None else None
    if sizes is None:
        sizes = [d if float(f) == 1.0 else (_fail(f"resizing the dynamic axis {a}")
                                            if isinstance(d, Dim) else int(math.floor(d * f)))
                 for a, (d, f) in enumerate(zip(shape, np.asarray(scales).ravel()))]
    out = x[0]
    for axis, (dim, size) in enumerate(zip(shape, sizes)):
        if isinstance(dim, Dim) or size == dim:
            continue
        factor = size / dim
        if factor != int(factor):
            raise _FoldError(HINTS["Resize"] + f" (axis {axis}: {dim} -> {size})")
        out = imp.e.take(out, np.repeat(np.arange(dim), int(factor)), axis)
    return imp.e.cast(out, _dtype_of(out), name=_out(node)) if isinstance(out, Dyn) else out


@converts("Einsum")
def _einsum(imp, node, x, attrs):
    """The two-operand contractions exporters emit (attention's 'bhqd,bhkd->bhqk' and
    the like): transposes, a reshape-free batched matmul, a transpose back."""
    eq = attrs["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or "." in eq or not rhs:
        raise _FoldError(f"einsum {eq!r}: only explicit two-operand contractions are supported")
    a, b = terms
    contracted = [c for c in a if c in b and c not in rhs]
    batch = [c for c in rhs if c in a and c in b]
    free_a = [c for c in rhs if c in a and c not in b]
    free_b = [c for c in rhs if c in b and c not in a]
    if sorted(batch + free_a + contracted) != sorted(a) or \
            sorted(batch + free_b + contracted) != sorted(b) or len(set(a)) != len(a):
        raise _FoldError(f"einsum {eq!r} is not a plain batched contraction")
    e = imp.e
    sa, sb = _shape_of(x[0]), _shape_of(x[1])
    size = {c: d for c, d in zip(a, sa)} | {c: d for c, d in zip(b, sb)}
    ta = e.transpose(x[0], [a.index(c) for c in batch + free_a + contracted])
    tb = e.transpose(x[1], [b.index(c) for c in batch + contracted + free_b])
    nb = [size[c] for c in batch]
    ma = e.reshape(ta, nb + [_prod(size[c] for c in free_a), _prod(size[c] for c in contracted)])
    mb = e.reshape(tb, nb + [_prod(size[c] for c in contracted), _prod(size[c] for c in free_b)])
    y = e.reshape(e.matmul(ma, mb), nb + [size[c] for c in free_a] + [size[c] for c in free_b])
    order = batch + free_a + free_b
    return e.transpose(y, [order.index(c) for c in rhs], name=_out(node)) \
        if order != list(rhs) else e.cast(y, _dtype_of(y), name=_out(node))
