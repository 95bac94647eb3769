"""GraphBuilder: a method per op, Python operators, constants from Python scalars, output
names and errors. Each built graph is compiled by the engine (through the server's
converter) and evaluated against NumPy (tests/oracles.py's references).
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve import engine
from gradserve.client import GraphBuilder, Value
from gradserve.server.convert import graph_from_proto
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import attribute_value, from_tensor
from support.oracles import domains_for, random_inputs, reference
from support import REPO

UNARY = ["neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf"]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum"]
COMPARISONS = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
# The engine's page, whose op table lists every engine op.
ENGINE_PAGE = REPO / "docs" / "engine.md"

# op -> (operand shapes, attributes): one row per op of the engine.
ROWS = {
    **{op: (((2, 3),), {}) for op in UNARY},
    **{op: (((2, 3), (3,)), {}) for op in BINARY},
    "matmul": (((2, 3), (3, 4)), {}),
    "sum": (((2, 3),), {"axes": [1], "keepdims": True}),
    "mean": (((2, 3),), {"axes": [0]}),
    "max": (((2, 3),), {}),
    "reshape": (((2, 3),), {"shape": [3, -1]}),
    "transpose": (((2, 3),), {"perm": [1, 0]}),
    "broadcast_to": (((3,),), {"shape": [2, 3]}),
    "concat": (((2, 3), (1, 3)), {"axis": 0}),
    "slice": (((4, 3),), {"starts": [1, 0], "stops": [3, 2], "axes": [0, 1]}),
    "softmax": (((2, 3),), {"axis": 0}),
    "log_softmax": (((2, 3),), {"axis": -1}),
    "logsumexp": (((2, 3),), {"axis": 1, "keepdims": True}),
    **{op: (((2, 3), (3,)), {}) for op in COMPARISONS},
    "min": (((2, 3),), {"axes": [0]}),
    "prod": (((2, 3),), {"axes": [1], "keepdims": True}),
    "cumsum": (((2, 3),), {"axis": 1, "reverse": True, "exclusive": False}),
    "clip": (((2, 3),), {"min": -0.5, "max": 0.5}),
    "where": (((2, 3), (2, 3), (3,)), {}),
    "cast": (((2, 3),), {"dtype": "float64"}),
    "pad": (((2, 3),), {"pads": [1, 0, 0, 2], "value": 0.5}),
    "take": (((4, 3), (2,)), {"axis": 0}),
    "conv": (((1, 2, 5, 5), (3, 2, 3, 3)), {"strides": [2, 1], "pads": [1, 1, 0, 0],
                                             "dilations": [1, 2], "groups": 1}),
    "max_pool": (((1, 2, 5, 5),), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    "avg_pool": (((1, 2, 5, 5),), {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1],
                                   "count_include_pad": True}),
}


def evaluate(g: GraphBuilder, inputs):
    """Build, convert as the server does, compile and evaluate in the engine."""
    return engine.compile(graph_from_proto(g.build())).evaluate(inputs)


def the_node(proto, name):
    return next(n for n in proto.nodes if n.name == name)


def test_every_engine_op_has_a_row_and_a_builder_method():
    assert set(ROWS) == set(engine.OPS)
    for op in engine.OPS:
        assert callable(getattr(GraphBuilder, op, None)), f"GraphBuilder has no method {op}"


def docs_op_table() -> set:
    """The op names (in backquotes) in the second column of docs/engine.md's op table."""
    text = ENGINE_PAGE.read_text()
    start = text.index("| group | ops |")
    rows = text[start:].split("\n\n", 1)[0].splitlines()[2:]
    return {name for line in rows for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[2])}


def test_every_engine_op_is_in_the_docs_op_table():
    listed = docs_op_table()
    assert not set(engine.OPS) - listed, \
        f"missing from docs/engine.md: {sorted(set(engine.OPS) - listed)}"
    assert not listed - set(engine.OPS), f"not engine ops: {sorted(listed - set(engine.OPS))}"


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("op", sorted(ROWS))
def test_builder_method_per_op(op, dtype):
    shapes, attrs = ROWS[op]
    names = "abcd"[:len(shapes)]
    rng = np.random.default_rng(zlib.crc32(op.encode()))
    specs = [(n, s, d) for n, s, d in zip(names, shapes, domains_for(op, len(shapes)))]
    inputs = random_inputs(rng, specs, dtype)

    g = GraphBuilder()
    values = [g.input(n, inputs[n].dtype.name, s) for n, s in zip(names, shapes)]
    method = getattr(g, op)
    out = method(values, **attrs) if op == "concat" else method(*values, **attrs)
    g.output("out", out)
    proto = g.build()

    assert len(proto.nodes) == 1
    node = proto.nodes[0]
    assert (node.name, node.op, list(node.inputs)) == ("out", op, list(names))
    built = {k: attribute_value(a) for k, a in node.attrs.items()}
    for key, value in attrs.items():
        assert built[key] == value
    got = evaluate(g, inputs)["out"]
    want = reference(op, [inputs[n] for n in names], attrs)
    want_dtype = np.bool_ if op in COMPARISONS else np.dtype(attrs.get("dtype", dtype))
    assert got.dtype == want_dtype and got.shape == want.shape
    assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12, atol=1e-7)


OPERATORS = [
    ("x + y", lambda x, y: x + y, "add", ["x", "y"]),
    ("x - y", lambda x, y: x - y, "sub", ["x", "y"]),
    ("y - x", lambda x, y: y - x, "sub", ["y", "x"]),
    ("x * y", lambda x, y: x * y, "mul", ["x", "y"]),
    ("x / y", lambda x, y: x / y, "div", ["x", "y"]),
    ("y / x", lambda x, y: y / x, "div", ["y", "x"]),
    ("x ** y", lambda x, y: x ** y, "pow", ["x", "y"]),
    ("x @ y", lambda x, y: x @ y, "matmul", ["x", "y"]),
    ("y @ x", lambda x, y: y @ x, "matmul", ["y", "x"]),
    ("-x", lambda x, y: -x, "neg", ["x"]),
]


@pytest.mark.parametrize("text, f, op, operands", OPERATORS, ids=[o[0] for o in OPERATORS])
def test_operators_build_their_op(text, f, op, operands):
    g = GraphBuilder()
    x, y = g.input("x", "float64", [2, 2]), g.input("y", "float64", [2, 2])
    g.output("o", f(x, y))
    proto = g.build()
    assert [(n.op, list(n.inputs)) for n in proto.nodes] == [(op, operands)]
    assert list(proto.outputs) == ["o"] and not proto.constants
    inputs = {"x": np.array([[0.5, 1.5], [2.0, 0.75]]), "y": np.array([[1.25, -0.5], [3.0, 2.0]])}
    assert_allclose(evaluate(g, inputs)["o"], f(inputs["x"], inputs["y"]), rtol=1e-14)


SCALARS = [
    ("x + 2", lambda x: x + 2, "add", "xc"),
    ("2 + x", lambda x: 2 + x, "add", "cx"),
    ("x - 0.5", lambda x: x - 0.5, "sub", "xc"),
    ("3 - x", lambda x: 3 - x, "sub", "cx"),
    ("x * 1.5", lambda x: x * 1.5, "mul", "xc"),
    ("1.5 * x", lambda x: 1.5 * x, "mul", "cx"),
    ("x / 4", lambda x: x / 4, "div", "xc"),
    ("4 / x", lambda x: 4 / x, "div", "cx"),
    ("x ** 2", lambda x: x ** 2, "pow", "xc"),
    ("2 ** x", lambda x: 2 ** x, "pow", "cx"),
    ("np.float64(2) * x", lambda x: np.float64(2) * x, "mul", "cx"),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("text, f, op, order", SCALARS, ids=[s[0] for s in SCALARS])
def test_python_scalars_become_constants_of_the_operands_dtype(text, f, op, order, dtype):
    g = GraphBuilder()
    x = g.input("x", dtype, [3])
    g.output("o", f(x))
    proto = g.build()
    (node,) = proto.nodes
    ((cname, const),) = proto.constants.items()
    assert node.op == op
    assert list(node.inputs) == [{"x": "x", "c": cname}[c] for c in order]
    value = from_tensor(const)
    assert value.dtype == np.dtype(dtype) and value.shape == ()
    xs = np.array([0.5, 1.25, 2.0], dtype=dtype)
    got = evaluate(g, {"x": xs})["o"]
    assert got.dtype == np.dtype(dtype)  # float32 stays float32
    scalar = np.dtype(dtype).type(value.item())
    want = f(xs) if not text.startswith("np.") else scalar * xs
    assert_allclose(got, np.asarray(want, dtype), rtol=1e-6)
    assert value.item() == {"x + 2": 2, "2 + x": 2, "x - 0.5": 0.5, "3 - x": 3, "x * 1.5": 1.5,
                            "1.5 * x": 1.5, "x / 4": 4, "4 / x": 4, "x ** 2": 2, "2 ** x": 2,
                            "np.float64(2) * x": 2}[text]


def test_integer_inputs_get_integer_constants():
    g = GraphBuilder()
    k = g.input("k", "int32", [2])
    g.output("o", k * 3 + 1)
    proto = g.build()
    assert {c.dtype for c in proto.constants.values()} == {tensor_pb2.DATA_TYPE_INT32}
    got = evaluate(g, {"k": np.int32([2, -5])})["o"]
    assert got.dtype == np.int32
    assert_array_equal(got, np.int32([7, -14]))


def test_constant_arrays_keep_their_dtype_or_take_the_given_one():
    g = GraphBuilder()
    assert g.constant(np.float32([1, 2])).dtype == "float32"
    assert g.constant([1.0, 2.0]).dtype == "float64"
    assert g.constant([1, 2], dtype="float32").dtype == "float32"
    assert g.constant([1, 2]).dtype == "int64"
    assert g.constant(np.float16([1])).dtype == "float64"  # not on the wire: widened


def test_the_seed_graph_compiles_and_evaluates_in_float32():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    proto = g.build()
    assert [(n.op, list(n.inputs)) for n in proto.nodes] == [
        ("add", ["x", "y"]), ("sin", ["x"]), ("mul", [proto.nodes[0].name, proto.nodes[1].name])]
    pi = np.float32([np.pi])
    got = evaluate(g, {"x": pi, "y": pi})["o"]
    assert got.dtype == np.float32
    assert_allclose(got, (pi + pi) * np.sin(pi), rtol=1e-6)


# --- names and outputs -------------------------------------------------------------------------


def test_output_renames_an_unnamed_value_everywhere():
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    s = x + 1.0
    t = g.sin(s)  # built before s gets its name
    g.output("s", s)
    g.output("t", t)
    proto = g.build()
    assert list(proto.outputs) == ["s", "t"]
    assert the_node(proto, "t").inputs == ["s"]
    assert s.name == "s" and t.name == "t"
    xs = np.array([0.25, -1.0])
    out = evaluate(g, {"x": xs})
    assert_allclose(out["s"], xs + 1.0, rtol=1e-15)
    assert_allclose(out["t"], np.sin(xs + 1.0), rtol=1e-15)


def test_output_keeps_given_names():
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    h = g.tanh(x, name="hidden")
    c = g.constant([1.0, 2.0])  # named by the builder: output() may rename it
    assert g.output(h) is h and g.output("x", x) is x
    g.output("k", c)
    proto = g.build()
    assert list(proto.outputs) == ["hidden", "x", "k"]
    assert list(proto.constants) == ["k"]
    assert_array_equal(evaluate(g, {"x": np.zeros(2)})["k"], [1.0, 2.0])


def test_renaming_a_named_value_is_refused():
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    h = g.tanh(x, name="hidden")
    with pytest.raises(ValueError, match="hidden"):
        g.output("other", h)
    with pytest.raises(ValueError, match="'x'"):
        g.output("y", x)
    c = g.constant([1.0], name="c")
    with pytest.raises(ValueError, match="'c'"):
        g.output("k", c)


def test_duplicate_names_are_refused():
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    with pytest.raises(ValueError, match="'x'"):
        g.input("x", "float32", [2])
    with pytest.raises(ValueError, match="'x'"):
        g.sin(x, name="x")
    with pytest.raises(ValueError, match="'x'"):
        g.constant([1.0], name="x")
    g.output("o", g.cos(x))
    with pytest.raises(ValueError, match="'o'"):
        g.output("o", g.exp(x))


def test_values_from_another_builder_are_refused():
    g, other = GraphBuilder(), GraphBuilder()
    x = g.input("x", "float64", [2])
    z = other.input("z", "float64", [2])
    with pytest.raises(ValueError, match="another GraphBuilder"):
        x + z
    with pytest.raises(ValueError, match="another GraphBuilder"):
        g.concat([x, z])
    with pytest.raises(ValueError, match="another GraphBuilder"):
        g.matmul(z, x)


def test_unsupported_input_dtype_is_refused():
    with pytest.raises(ValueError, match="float16"):
        GraphBuilder().input("h", "float16", [2])


def test_result_dtypes_of_comparisons_where_take_and_cast():
    g = GraphBuilder()
    x, mask = g.input("x", "float32", [3]), g.input("mask", "bool", [3])
    assert g.less(x, 0.5).dtype == "bool"
    picked = g.where(mask, x, 0.0)  # the 0.0 becomes a float32 constant, not a bool
    assert picked.dtype == "float32"
    assert g.cast(x, np.int64).dtype == "int64"
    rows = g.take(x, [2, -1, 0])  # a list of indices becomes an int64 constant
    assert rows.dtype == "float32"
    g.output("y", g.add(picked, rows))
    proto = g.build()
    dtypes = {name: from_tensor(t).dtype.name for name, t in proto.constants.items()}
    assert sorted(dtypes.values()) == ["float32", "float32", "int64"]
    out = evaluate(g, {"x": np.float32([1, 2, 3]), "mask": np.array([True, False, True])})
    assert_allclose(out["y"], np.float32([1, 0, 3]) + np.float32([3, 3, 1]))


def test_generic_node_and_value_repr():
    g = GraphBuilder()
    x = g.input("x", "float32", [2, 2])
    v = g.node("sum", [x], {"axes": [0]}, name="colsum")
    assert isinstance(v, Value) and (v.name, v.dtype) == ("colsum", "float32")
    assert "colsum" in repr(v)
    g.output(v)
    assert_allclose(evaluate(g, {"x": np.float32([[1, 2], [3, 4]])})["colsum"], [4, 6])


def test_serialized_is_deterministic_and_follows_changes():
    def build():
        g = GraphBuilder()
        x = g.input("x", "float64", [3])
        g.output("o", g.sum(g.exp(x) * 2.0))
        return g

    a, b = build(), build()
    data, digest = a.serialized()
    assert (data, digest) == b.serialized()
    assert digest == hashlib.sha256(data).hexdigest()
    assert graph_pb2.Graph.FromString(data) == a.build()
    a.output("e", a.exp(a.constant([1.0, 2.0, 3.0])))
    assert a.serialized()[1] != digest
