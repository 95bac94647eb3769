"""GraphBuilder: write a computation with Python operators, get a Graph proto.

    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))

Python numbers in expressions become constants of the other operand's dtype.
The builder knows op names and attributes only; the server validates shapes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from google.protobuf import json_format

from gradserve.v1 import graph_pb2
from gradserve.v1.codec import WIRE_DTYPES, fill_attribute, fill_tensor

from .render import graph_dot

UNARY = ("neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum", "matmul")
COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")


class Value:
    """A value in a graph under construction: an input, a constant or a node."""

    __slots__ = ("builder", "name", "dtype", "_auto")
    __array_priority__ = 1000  # numpy scalars on the left defer to our operators

    def __init__(self, builder: "GraphBuilder", name: str, dtype: str, auto: bool = False):
        self.builder, self.name, self.dtype, self._auto = builder, name, dtype, auto

    def __repr__(self):
        return f"Value({self.name!r}, {self.dtype})"

    def __add__(self, other): return self.builder.add(self, other)
    def __radd__(self, other): return self.builder.add(other, self)
    def __sub__(self, other): return self.builder.sub(self, other)
    def __rsub__(self, other): return self.builder.sub(other, self)
    def __mul__(self, other): return self.builder.mul(self, other)
    def __rmul__(self, other): return self.builder.mul(other, self)
    def __truediv__(self, other): return self.builder.div(self, other)
    def __rtruediv__(self, other): return self.builder.div(other, self)
    def __pow__(self, other): return self.builder.pow(self, other)
    def __rpow__(self, other): return self.builder.pow(other, self)
    def __matmul__(self, other): return self.builder.matmul(self, other)
    def __rmatmul__(self, other): return self.builder.matmul(other, self)
    def __neg__(self): return self.builder.neg(self)


def _unary(op):
    def method(self, x, name=None):
        return self.node(op, [x], name=name)
    method.__name__ = op
    method.__doc__ = f"Elementwise {op}(x)."
    return method


def _binary(op):
    def method(self, a, b, name=None):
        return self.node(op, [a, b], name=name)
    method.__name__ = op
    method.__doc__ = ("NumPy matmul(a, b)." if op == "matmul"
                      else f"Elementwise {op}(a, b) with NumPy broadcasting." if op in BINARY
                      else f"Elementwise {op}(a, b) with NumPy broadcasting: a bool value, "
                      "no derivative.")
    return method


def _result_dtype(op, values, attrs) -> str:
    """The dtype of a node's value, as the engine's dtype rules give it."""
    if op in COMPARISONS:
        return "bool"
    if op == "cast" and "dtype" in attrs:
        return str(attrs["dtype"])
    if op == "where" and len(values) == 3:
        return values[1].dtype
    return values[0].dtype if values else "float32"


class GraphBuilder:
    def __init__(self):
        self._inputs: list[graph_pb2.Input] = []
        self._constants: dict[str, np.ndarray] = {}
        self._nodes: list[tuple[Value, str, list[Value], dict]] = []
        self._outputs: list[Value] = []
        self._names: dict[str, Value] = {}
        self._counter = 0
        self._cache: tuple[bytes, str] | None = None

    # --- values --------------------------------------------------------------

    def input(self, name: str, dtype: str, shape: Sequence[int]) -> Value:
        """A graph input; -1 in `shape` accepts a dimension of any size."""
        dtype = np.dtype(dtype).name
        if dtype not in WIRE_DTYPES:
            raise ValueError(f"input '{name}': unsupported dtype {dtype} "
                             f"(supported: {', '.join(WIRE_DTYPES)})")
        self._inputs.append(graph_pb2.Input(name=name, dtype=WIRE_DTYPES[dtype],
                                            shape=[int(d) for d in shape]))
        return self._define(Value(self, name, dtype))

    def constant(self, value, dtype: str | None = None, name: str | None = None) -> Value:
        """A constant array baked into the graph."""
        array = np.asarray(value, dtype=dtype)
        if array.dtype.name not in WIRE_DTYPES:
            array = array.astype("float64" if array.dtype.kind in "fc" else "int64")
        return self._define(Value(self, name or self._fresh("const"), array.dtype.name,
                                  name is None), array)

    def node(self, op: str, inputs: Sequence, attrs: dict | None = None,
             name: str | None = None) -> Value:
        """A node of any op: the generic form behind every method below."""
        values = self._as_values(inputs)
        dtype = _result_dtype(op, values, attrs or {})
        value = Value(self, name or self._fresh(op), dtype, name is None)
        self._nodes.append((value, op, values, dict(attrs or {})))
        return self._define(value)

    def output(self, name_or_value, value: Value | None = None) -> Value:
        """Mark a value as an output: `output("o", v)` names it o; `output(v)` keeps its name."""
        if value is None:
            value = name_or_value
        else:
            name = name_or_value
            if value.name != name:
                if not value._auto:
                    raise ValueError(f"value is already named '{value.name}'; "
                                     f"output it as that name or build it with name='{name}'")
                self._rename(value, name)
        self._outputs.append(value)
        self._cache = None
        return value

    # --- ops -----------------------------------------------------------------

    for _op in UNARY:
        locals()[_op] = _unary(_op)
    for _op in BINARY + COMPARISONS:
        locals()[_op] = _binary(_op)
    del _op

    def sum(self, x, axes=None, keepdims=False, name=None):
        """Sum over `axes` (all when None)."""
        return self.node("sum", [x], _attrs(axes=axes, keepdims=keepdims), name)

    def mean(self, x, axes=None, keepdims=False, name=None):
        """Mean over `axes` (all when None)."""
        return self.node("mean", [x], _attrs(axes=axes, keepdims=keepdims), name)

    def max(self, x, axes=None, keepdims=False, name=None):
        """Max over `axes` (all when None); tied maxima share the derivative."""
        return self.node("max", [x], _attrs(axes=axes, keepdims=keepdims), name)

    def min(self, x, axes=None, keepdims=False, name=None):
        """Min over `axes` (all when None); tied minima share the derivative."""
        return self.node("min", [x], _attrs(axes=axes, keepdims=keepdims), name)

    def prod(self, x, axes=None, keepdims=False, name=None):
        """Product over `axes` (all when None)."""
        return self.node("prod", [x], _attrs(axes=axes, keepdims=keepdims), name)

    def cumsum(self, x, axis, reverse=False, exclusive=False, name=None):
        """Running sum along `axis`; `reverse` from the end, `exclusive` leaving each
        element out of its own sum."""
        return self.node("cumsum", [x], {"axis": axis, "reverse": reverse,
                                          "exclusive": exclusive}, name)

    def clip(self, x, min=None, max=None, name=None):
        """x limited to [min, max] (either may be None); derivative 1 within the bounds,
        bounds included."""
        return self.node("clip", [x], _attrs(min=_float(min), max=_float(max)), name)

    def where(self, cond, a, b, name=None):
        """a where the bool `cond` holds, else b (broadcasting). Python numbers for a or
        b become constants of the other's dtype."""
        a, b = self._as_values([a, b])
        return self.node("where", [cond, a, b], name=name)

    def cast(self, x, dtype, name=None):
        """x converted to `dtype` (float32, float64, int32, int64 or bool)."""
        return self.node("cast", [x], {"dtype": np.dtype(dtype).name}, name)

    def reshape(self, x, shape, name=None):
        return self.node("reshape", [x], {"shape": list(shape)}, name)

    def transpose(self, x, perm=None, name=None):
        return self.node("transpose", [x], _attrs(perm=perm), name)

    def broadcast_to(self, x, shape, name=None):
        return self.node("broadcast_to", [x], {"shape": list(shape)}, name)

    def concat(self, values, axis=0, name=None):
        return self.node("concat", list(values), {"axis": axis}, name)

    def slice(self, x, starts, stops, axes=None, name=None):
        """x[start:stop] along `axes` (0, 1, ... when None), NumPy semantics."""
        return self.node("slice", [x], _attrs(starts=starts, stops=stops, axes=axes), name)

    def pad(self, x, pads, value=0.0, name=None):
        """Constant padding: `pads` holds a begin value for each axis, then an end value
        for each (ONNX order)."""
        return self.node("pad", [x], {"pads": list(pads), "value": float(value)}, name)

    def take(self, data, indices, axis=0, name=None):
        """NumPy take (ONNX Gather): `indices` an int32/int64 value, or a list of ints
        (becomes an int64 constant); negative indices count from the end."""
        if not isinstance(indices, Value):
            indices = self.constant(np.asarray(indices, dtype=np.int64))
        return self.node("take", [data, indices], {"axis": axis}, name)

    def conv(self, x, w, strides=None, pads=None, dilations=None, groups=1, name=None):
        """N-d convolution, NCHW: x (N, C, *S), w (O, C / groups, *kernel); `pads` as
        begin values for each spatial axis, then end values. No bias: add it."""
        return self.node("conv", [x, w], _attrs(strides=strides, pads=pads,
                                                dilations=dilations, groups=groups), name)

    def max_pool(self, x, kernel_shape, strides=None, pads=None, dilations=None, name=None):
        """N-d max pooling, NCHW; a window's derivative goes to its first maximum."""
        return self.node("max_pool", [x], _attrs(kernel_shape=kernel_shape, strides=strides,
                                                 pads=pads, dilations=dilations), name)

    def avg_pool(self, x, kernel_shape, strides=None, pads=None, dilations=None,
                 count_include_pad=False, name=None):
        """N-d average pooling, NCHW; `count_include_pad` divides by the whole window."""
        return self.node("avg_pool", [x], _attrs(kernel_shape=kernel_shape, strides=strides,
                                                 pads=pads, dilations=dilations,
                                                 count_include_pad=count_include_pad), name)

    def softmax(self, x, axis=-1, name=None):
        return self.node("softmax", [x], {"axis": axis}, name)

    def log_softmax(self, x, axis=-1, name=None):
        return self.node("log_softmax", [x], {"axis": axis}, name)

    def logsumexp(self, x, axis=-1, keepdims=False, name=None):
        return self.node("logsumexp", [x], {"axis": axis, "keepdims": keepdims}, name)

    # --- output --------------------------------------------------------------

    def build(self) -> graph_pb2.Graph:
        """The Graph proto (nodes in the order they were built: a topological order)."""
        g = graph_pb2.Graph(inputs=self._inputs, outputs=[v.name for v in self._outputs])
        for name, array in self._constants.items():
            fill_tensor(g.constants[name], array, f"constant '{name}'")
        for value, op, inputs, attrs in self._nodes:
            node = g.nodes.add(name=value.name, op=op, inputs=[v.name for v in inputs])
            for key, attr in attrs.items():
                fill_attribute(node.attrs[key], attr)
        return g

    def to_dot(self, **options) -> str:
        """Graphviz DOT of the graph's structure (gradserve.client.render.graph_dot)."""
        return graph_dot(self.build(), **options)

    def save(self, path: str | Path) -> Path:
        """Write the Graph proto to `path`: JSON (protobuf's JSON mapping) when it ends
        in .json, binary otherwise (e.g. .pb). `load_graph` reads either back."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            path.write_text(json_format.MessageToJson(self.build()) + "\n")
        else:
            path.write_bytes(self.serialized()[0])
        return path

    def serialized(self) -> tuple[bytes, str]:
        """Deterministic bytes of the graph and their sha256, rebuilt only after a change."""
        if self._cache is None:
            data = self.build().SerializeToString(deterministic=True)
            self._cache = (data, hashlib.sha256(data).hexdigest())
        return self._cache

    # --- helpers -------------------------------------------------------------

    def _fresh(self, prefix: str) -> str:
        while True:
            self._counter += 1
            name = f"{prefix}_{self._counter}"
            if name not in self._names:
                return name

    def _define(self, value: Value, constant=None) -> Value:
        if value.name in self._names:
            raise ValueError(f"name '{value.name}' is already used in this graph")
        self._names[value.name] = value
        if constant is not None:
            self._constants[value.name] = constant
        self._cache = None
        return value

    def _rename(self, value: Value, name: str):
        if name in self._names:
            raise ValueError(f"name '{name}' is already used in this graph")
        del self._names[value.name]
        if value.name in self._constants:
            self._constants[name] = self._constants.pop(value.name)
        value.name, value._auto = name, False
        self._names[name] = value
        self._cache = None

    def _as_values(self, inputs) -> list[Value]:
        dtype = next((v.dtype for v in inputs if isinstance(v, Value)), None)
        out = []
        for v in inputs:
            if isinstance(v, Value):
                if v.builder is not self:
                    raise ValueError(f"value '{v.name}' belongs to another GraphBuilder")
                out.append(v)
            else:
                out.append(self.constant(v, dtype=dtype))
        return out


def load_graph(path: str | Path) -> graph_pb2.Graph:
    """A Graph proto saved by GraphBuilder.save: JSON if `path` ends in .json, else binary."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return json_format.Parse(path.read_text(), graph_pb2.Graph())
    return graph_pb2.Graph.FromString(path.read_bytes())


def _attrs(**kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if v is not None}


def _float(v):
    return None if v is None else float(v)
