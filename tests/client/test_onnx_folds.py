"""The ONNX importer's import-time folds against the engine.

The importer computes on the client side whatever it knows at import time (shape
plumbing; with parameters="constants", anything computed from initializers alone): each
fold re-implements an engine op with numpy. Here every Emitter method is called twice
with the same arguments: once on arrays (the fold) and once with the arrays as graph
inputs (the node the importer would emit), and that node is run by the engine itself.
The two must agree: bit for bit where the fold is the engine's own numpy expression,
within a few ulp where it is not (erf: the engine's rational approximations against
math.erf).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gradserve import engine
from gradserve.client.builder import GraphBuilder
from gradserve.client.onnx.emitter import Emitter
from gradserve.client.onnx.folds import BINARY_FOLDS, COMPARISONS, UNARY_FOLDS
from gradserve.client.onnx.values import Dyn
from gradserve.server.convert import graph_from_proto

R = np.random.default_rng(7)
WIDE = np.array([-1000.0, -89.5, -30.0, -1.5, -1e-8, 0.0, 1e-8, 0.25, 1.0, 3.0, 30.0, 89.5,
                 1000.0])


class Arg:
    """An argument that is a graph input in the emitted version (and an array in the fold)."""

    def __init__(self, array):
        self.array = np.asarray(array)


def fold_and_engine(method, *args, **kwargs):
    """(the fold's result, the engine's result of the emitted node)."""
    plain = [a.array if isinstance(a, Arg) else [v.array for v in a] if isinstance(a, list)
             and a and isinstance(a[0], Arg) else a for a in args]
    folded = getattr(Emitter(GraphBuilder(), set()), method)(*plain, **kwargs)

    g = GraphBuilder()
    e = Emitter(g, set())
    feeds, emitted = {}, []
    for i, a in enumerate(args):
        if isinstance(a, Arg):
            name = f"in{i}"
            feeds[name] = a.array
            a = Dyn(g.input(name, a.array.dtype.name, a.array.shape), a.array.shape,
                    a.array.dtype)
        elif isinstance(a, list) and a and isinstance(a[0], Arg):  # concat's values
            values = []
            for j, v in enumerate(a):
                name = f"in{i}_{j}"
                feeds[name] = v.array
                values.append(Dyn(g.input(name, v.array.dtype.name, v.array.shape),
                                  v.array.shape, v.array.dtype))
            a = values
        emitted.append(a)
    out = getattr(e, method)(*emitted, **kwargs)
    assert isinstance(out, Dyn), f"{method} folded although an input is a graph input"
    g.output(out.value)
    plan = engine.compile(graph_from_proto(g.build()))
    (got,) = plan.evaluate(feeds).values()
    assert tuple(got.shape) == tuple(out.shape), (method, got.shape, out.shape)
    return np.asarray(folded), got


def assert_same(folded, got, ulps=0):
    assert folded.dtype == got.dtype, (folded.dtype, got.dtype)
    assert folded.shape == got.shape, (folded.shape, got.shape)
    if ulps == 0:
        assert_array_equal(folded, got)
        return
    finite = np.isfinite(got)
    assert_array_equal(np.isfinite(folded), finite)
    spacing = np.spacing(np.abs(got[finite]).astype(got.dtype))
    assert np.all(np.abs(folded[finite] - got[finite]) <= ulps * spacing)


DOMAIN = {"log": np.abs(WIDE) + 1e-3, "sqrt": np.abs(WIDE), "log1p": np.abs(WIDE),
          "reciprocal": WIDE[WIDE != 0]}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", sorted(UNARY_FOLDS))
def test_unary_folds_equal_the_engine(op, dtype):
    x = DOMAIN.get(op, WIDE).astype(dtype)
    if op in ("exp", "tan", "sin", "cos", "tanh", "square"):
        x = x[np.abs(x) < 80]  # within range: overflow is a separate matter
    folded, got = fold_and_engine("unary", op, Arg(x))
    assert_same(folded, got, ulps=4 if op == "erf" else 0)


FLOATS = (np.array([[-3.5, -1.0, 0.0, 0.5, 2.0, 7.25]]), np.array([[2.0], [-0.5], [3.0]]))
INTS = (np.array([[-7, -1, 0, 3, 8, 9]]), np.array([[2], [-3], [5]]))


@pytest.mark.parametrize("op, dtype", [
    (op, dtype) for op in sorted(BINARY_FOLDS) for dtype in ("float32", "float64", "int64", "int32")
    if dtype.startswith("float") or not engine.OPS[op].float_only])  # as the engine takes them
def test_binary_folds_equal_the_engine(op, dtype):
    a, b = INTS if dtype.startswith("int") else FLOATS
    a, b = a.astype(dtype), b.astype(dtype)
    if op == "pow":
        a = np.abs(a) + (1 if dtype.startswith("int") else 0.5)
        b = np.abs(b)
    if op == "div" and dtype.startswith("int"):
        b = np.where(b == 0, 1, b).astype(dtype)
    folded, got = fold_and_engine("binary", op, Arg(a), Arg(b))
    assert (folded.dtype == np.bool_) == (op in COMPARISONS)
    assert_same(folded, got)


X = R.standard_normal((3, 4, 5))
X32 = X.astype(np.float32)

EMITTER_CASES = [
    ("where", (Arg(X > 0), Arg(X), Arg(-X)), {}),
    ("clip", (Arg(X32),), {"low": -0.5, "high": 0.25}),
    ("clip", (Arg(X),), {"high": 0.1}),
    ("cast", (Arg(X * 10),), {"dtype": "int64"}),
    ("cast", (Arg(X),), {"dtype": "float32"}),
    ("cast", (Arg(np.array([-3, 0, 5])),), {"dtype": "bool"}),
    ("reshape", (Arg(X),), {"shape": (4, 15)}),
    ("transpose", (Arg(X),), {"perm": [2, 0, 1]}),
    ("broadcast_to", (Arg(X[:, :1]),), {"shape": (2, 3, 4, 5)}),
    ("concat", ([Arg(X), Arg(X[:, :2])], 1), {}),
    ("slice", (Arg(X), [1, -1], [3, 0], [1, 2], [1, -2]), {}),
    ("slice", (Arg(X), [0], [100], [0], [2]), {}),
    ("pad", (Arg(X), [1, 0, 2, 0, 3, 1]), {"value": -2.0}),
    ("take", (Arg(X), np.array([[2, 0], [1, 1]])), {"axis": 1}),
    ("matmul", (Arg(X), Arg(R.standard_normal((5, 2)))), {}),
    ("matmul", (Arg(R.standard_normal(4)), Arg(X)), {}),
    ("softmax", ("softmax", Arg(X * 30), 1), {}),
    ("softmax", ("log_softmax", Arg(X32 * 30), -1), {}),
] + [("reduce", (op, Arg(x), axes, keep), {})
     for op in ("sum", "mean", "max", "min", "prod")
     for x in (X, X32, np.arange(24).reshape(2, 3, 4) - 5)
     for axes, keep in ((None, False), ([0, 2], True), ([1], False))
     if not (op == "mean" and x.dtype.kind == "i")]


@pytest.mark.parametrize("method, args, kwargs", EMITTER_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(EMITTER_CASES)])
def test_emitter_folds_equal_the_engine(method, args, kwargs):
    folded, got = fold_and_engine(method, *args, **kwargs)
    # reductions and matmul may sum in another order than numpy's own (pairwise, BLAS)
    close = method == "matmul" or (method == "reduce" and args[0] in
                                               ("sum", "mean", "prod")
                                               and args[1].array.dtype.kind == "f")
    assert_same(folded, got, ulps=8 if close else 0)
