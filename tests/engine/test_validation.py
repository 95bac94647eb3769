"""Every error case of the engine contract, one table row each: the exception class,
the name in quotes in the message, `.node` and `.field`; and a 100,000-node chain
that compiles, evaluates and differentiates without recursion.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import (DifferentiationError, DTypeError, EngineError, Graph, GraphError,
                              Input, InputError, Node, ShapeError, compile)

X, Y = Input("x", "float64", (2, 3)), Input("y", "float64", (2, 3))


def graph(*nodes, inputs=(X, Y), outputs=None, constants=None):
    """A graph over `inputs` whose output is the last node unless `outputs` says otherwise."""
    return Graph(list(inputs), list(nodes), [nodes[-1].name] if outputs is None else outputs,
                 constants or {})


def on(*shapes, dtype="float64"):
    """Inputs a, b, ... of `shapes`."""
    return [Input("abcd"[i], dtype, s) for i, s in enumerate(shapes)]


FLOAT_ONLY_UNARY = ["sin", "cos", "tan", "exp", "log", "sqrt", "reciprocal", "tanh", "sigmoid",
                    "softplus", "log1p", "mean", "softmax", "log_softmax", "logsumexp"]
FLOAT_ONLY_BINARY = ["div", "pow"]

IMG, KER = on((2, 4, 5, 5), (6, 2, 3, 3))  # conv input and weight (groups=2)


def conv(**attrs):
    return graph(Node("h", "conv", ["a", "b"], attrs), inputs=(IMG, KER))


def pool(op, shape=(2, 4, 5, 5), **attrs):
    return graph(Node("h", op, ["a"], attrs), inputs=on(shape))


INDICES = Input("i", "int64", (3,))
FLAG = Input("f", "bool", (2, 3))

# The ops that came with real models: each bad attribute names its field.
NEW_OP_ERRORS = [
    ("conv-strides-length", conv(strides=[1]), ShapeError, "h", "attrs.strides"),
    ("conv-strides-zero", conv(strides=[1, 0]), ShapeError, "h", "attrs.strides"),
    ("conv-pads-length", conv(pads=[1, 1]), ShapeError, "h", "attrs.pads"),
    ("conv-pads-negative", conv(pads=[0, 0, -1, 0]), ShapeError, "h", "attrs.pads"),
    ("conv-dilations-zero", conv(dilations=[0, 1]), ShapeError, "h", "attrs.dilations"),
    ("conv-groups-zero", conv(groups=0), ShapeError, "h", "attrs.groups"),
    ("conv-groups-channels", conv(groups=1), ShapeError, "h", "inputs[1]"),
    ("conv-groups-outputs", graph(Node("h", "conv", ["a", "b"], {"groups": 4}),
                                  inputs=on((1, 4, 5, 5), (6, 1, 3, 3))),
     ShapeError, "h", "attrs.groups"),
    ("conv-strides-type", conv(strides=[1.5, 1]), GraphError, "h", "attrs.strides"),
    ("conv-weight-rank", graph(Node("h", "conv", ["a", "b"]), inputs=on((1, 2, 5, 5), (3, 2, 3))),
     ShapeError, "h", "inputs[1]"),
    ("conv-input-rank", graph(Node("h", "conv", ["a", "b"]), inputs=on((2, 5), (3, 2, 3))),
     ShapeError, "h", "inputs[0]"),
    ("conv-kernel-too-big", conv(dilations=[3, 1]), ShapeError, "h", None),
    ("max_pool-missing-kernel", pool("max_pool"), GraphError, "h", "attrs.kernel_shape"),
    ("max_pool-kernel-length", pool("max_pool", kernel_shape=[2]),
     ShapeError, "h", "attrs.kernel_shape"),
    ("max_pool-kernel-zero", pool("max_pool", kernel_shape=[2, 0]),
     ShapeError, "h", "attrs.kernel_shape"),
    ("max_pool-pads-not-below-kernel", pool("max_pool", kernel_shape=[2, 2], pads=[0, 2, 0, 0]),
     ShapeError, "h", "attrs.pads"),
    ("avg_pool-strides-zero", pool("avg_pool", kernel_shape=[2, 2], strides=[0, 1]),
     ShapeError, "h", "attrs.strides"),
    ("avg_pool-count-include-pad-int", pool("avg_pool", kernel_shape=[2, 2],
                                            count_include_pad=1),
     GraphError, "h", "attrs.count_include_pad"),
    ("max_pool-unknown-attr", pool("max_pool", kernel_shape=[2, 2], ceil_mode=True),
     GraphError, "h", "attrs.ceil_mode"),
    ("take-axis-range", graph(Node("h", "take", ["x", "i"], {"axis": 2}), inputs=(X, INDICES)),
     ShapeError, "h", "attrs.axis"),
    ("take-float-indices", graph(Node("h", "take", ["x", "y"])), DTypeError, "h", "inputs[1]"),
    ("cast-unknown-dtype", graph(Node("h", "cast", ["x"], {"dtype": "float16"})),
     DTypeError, "h", "attrs.dtype"),
    ("cast-dtype-not-string", graph(Node("h", "cast", ["x"], {"dtype": 3})),
     GraphError, "h", "attrs.dtype"),
    ("cast-missing-dtype", graph(Node("h", "cast", ["x"])), GraphError, "h", "attrs.dtype"),
    ("clip-nan", graph(Node("h", "clip", ["x"], {"min": float("nan")})),
     ShapeError, "h", "attrs.min"),
    ("clip-string", graph(Node("h", "clip", ["x"], {"max": "1"})), GraphError, "h", "attrs.max"),
    ("cumsum-missing-axis", graph(Node("h", "cumsum", ["x"])), GraphError, "h", "attrs.axis"),
    ("cumsum-axis-range", graph(Node("h", "cumsum", ["x"], {"axis": 2})),
     ShapeError, "h", "attrs.axis"),
    ("pad-length", graph(Node("h", "pad", ["x"], {"pads": [1, 1]})), ShapeError, "h", "attrs.pads"),
    ("pad-negative", graph(Node("h", "pad", ["x"], {"pads": [0, 0, -1, 0]})),
     ShapeError, "h", "attrs.pads"),
    ("where-float-condition", graph(Node("h", "where", ["x", "x", "y"])),
     DTypeError, "h", "inputs[0]"),
    ("where-operands-differ", graph(Node("h", "where", ["f", "x", "n"]),
                                    inputs=(X, FLAG, Input("n", "int32", (2, 3)))),
     DTypeError, "h", "inputs"),
    ("less-dtype-mismatch", graph(Node("h", "less", ["x", "n"]),
                                  inputs=(X, Input("n", "int32", (2, 3)))),
     DTypeError, "h", "inputs"),
    ("bool-arithmetic", graph(Node("h", "add", ["f", "f"]), inputs=(FLAG,)),
     DTypeError, "h", "inputs"),
    ("bool-float-only", graph(Node("h", "erf", ["f"]), inputs=(FLAG,)),
     DTypeError, "h", "inputs"),
    ("min-empty-axis", graph(Node("h", "min", ["a"], {"axes": [0]}), inputs=on((0, 3))),
     ShapeError, "h", "attrs.axes"),
]

# id, graph, exception class, .node, .field (None: the contract gives none)
COMPILE_ERRORS = [
    ("duplicate-input", graph(Node("h", "sin", ["x"]), inputs=(X, Input("x", "float64", (3,)))),
     GraphError, "x", None),
    ("duplicate-input-constant", graph(Node("h", "sin", ["x"]), constants={"x": np.ones(3)}),
     GraphError, "x", None),
    ("duplicate-node-input", graph(Node("y", "sin", ["x"])), GraphError, "y", None),
    ("duplicate-node-constant", graph(Node("c", "sin", ["x"]), constants={"c": np.ones(3)}),
     GraphError, "c", None),
    ("duplicate-node-node", graph(Node("h", "sin", ["x"]), Node("h", "cos", ["x"])),
     GraphError, "h", None),
    ("undefined-name", graph(Node("h", "add", ["x", "nope"])), GraphError, "h", "inputs[1]"),
    ("later-name", graph(Node("h", "sin", ["k"]), Node("k", "cos", ["x"]), outputs=["h"]),
     GraphError, "h", "inputs[0]"),
    ("self-reference", graph(Node("h", "sin", ["h"])), GraphError, "h", "inputs[0]"),
    ("two-cycle", graph(Node("a", "sin", ["b"]), Node("b", "sin", ["a"])),
     GraphError, "a", "inputs[0]"),
    ("unknown-op", graph(Node("h", "frobnicate", ["x"])), GraphError, "h", "op"),
    ("arity-binary-one-input", graph(Node("h", "add", ["x"])), GraphError, "h", "inputs"),
    ("arity-unary-two-inputs", graph(Node("h", "sin", ["x", "y"])), GraphError, "h", "inputs"),
    ("arity-concat-no-input", graph(Node("h", "concat", [])), GraphError, "h", "inputs"),
    ("missing-attr-reshape", graph(Node("h", "reshape", ["x"])), GraphError, "h", "attrs.shape"),
    ("missing-attr-broadcast_to", graph(Node("h", "broadcast_to", ["x"])),
     GraphError, "h", "attrs.shape"),
    ("missing-attr-slice", graph(Node("h", "slice", ["x"], {"starts": [0]})),
     GraphError, "h", "attrs.stops"),
    ("malformed-axes-str", graph(Node("h", "sum", ["x"], {"axes": "x"})),
     GraphError, "h", "attrs.axes"),
    ("malformed-keepdims-str", graph(Node("h", "sum", ["x"], {"keepdims": "yes"})),
     GraphError, "h", "attrs.keepdims"),
    ("malformed-shape-str", graph(Node("h", "reshape", ["x"], {"shape": "x"})),
     GraphError, "h", "attrs.shape"),
    ("malformed-shape-item", graph(Node("h", "reshape", ["x"], {"shape": [2, "a"]})),
     GraphError, "h", "attrs.shape"),
    ("malformed-shape-two-minus-one", graph(Node("h", "reshape", ["x"], {"shape": [-1, -1]})),
     GraphError, "h", "attrs.shape"),
    ("malformed-axis-float", graph(Node("h", "concat", ["x", "y"], {"axis": 1.5})),
     GraphError, "h", "attrs.axis"),
    ("malformed-perm-repeat", graph(Node("h", "transpose", ["x"], {"perm": [0, 0]})),
     GraphError, "h", "attrs.perm"),
    ("unknown-attr-unary", graph(Node("h", "sin", ["x"], {"axis": 0})),
     GraphError, "h", "attrs.axis"),
    ("unknown-attr-sum", graph(Node("h", "sum", ["x"], {"axis": [0]})),
     GraphError, "h", "attrs.axis"),
    ("axis-range-sum", graph(Node("h", "sum", ["x"], {"axes": [5]})),
     ShapeError, "h", "attrs.axes"),
    ("axis-range-sum-negative", graph(Node("h", "sum", ["x"], {"axes": [-3]})),
     ShapeError, "h", "attrs.axes"),
    ("axis-range-max", graph(Node("h", "max", ["x"], {"axes": [2]})),
     ShapeError, "h", "attrs.axes"),
    ("axis-range-softmax", graph(Node("h", "softmax", ["x"], {"axis": 3})),
     ShapeError, "h", "attrs.axis"),
    ("axis-range-logsumexp", graph(Node("h", "logsumexp", ["x"], {"axis": -3})),
     ShapeError, "h", "attrs.axis"),
    ("axis-range-concat", graph(Node("h", "concat", ["x", "y"], {"axis": 2})),
     ShapeError, "h", "attrs.axis"),
    ("axis-range-slice",
     graph(Node("h", "slice", ["x"], {"starts": [0], "stops": [1], "axes": [2]})),
     ShapeError, "h", "attrs.axes"),
    ("axis-range-perm", graph(Node("h", "transpose", ["x"], {"perm": [0, 2]})),
     GraphError, "h", "attrs.perm"),
    ("no-broadcast", graph(Node("h", "add", ["a", "b"]), inputs=on((3,), (4,))),
     ShapeError, "h", None),
    ("no-broadcast-to", graph(Node("h", "broadcast_to", ["x"], {"shape": [3, 3]})),
     ShapeError, "h", None),
    ("reshape-size", graph(Node("h", "reshape", ["x"], {"shape": [4, 4]})), ShapeError, "h", None),
    ("concat-other-dims",
     graph(Node("h", "concat", ["a", "b"], {"axis": 1}), inputs=on((2, 3), (3, 3))),
     ShapeError, "h", None),
    ("matmul-align", graph(Node("h2", "matmul", ["a", "b"]), inputs=on((3, 4), (5, 2))),
     ShapeError, "h2", None),
    ("matmul-align-vector", graph(Node("h", "matmul", ["a", "b"]), inputs=on((3,), (4, 2))),
     ShapeError, "h", None),
    ("dtype-mismatch", graph(Node("h", "add", ["a", "b"]),
                             inputs=[Input("a", "float32", (2,)), Input("b", "float64", (2,))]),
     DTypeError, "h", None),
    *[(f"float-only-{op}", graph(Node("h", op, ["a"]), inputs=on((2, 3), dtype="int32")),
       DTypeError, "h", None) for op in FLOAT_ONLY_UNARY],
    *[(f"float-only-{op}", graph(Node("h", op, ["a", "b"]), inputs=on((2,), (2,), dtype="int32")),
       DTypeError, "h", None) for op in FLOAT_ONLY_BINARY],
    *[(f"unsupported-input-{dt}", graph(Node("h", "neg", ["a"]), inputs=on((2,), dtype=dt)),
       DTypeError, "a", None) for dt in ("float16", "complex64", "float")],
    *[(f"unsupported-constant-{dt}",
       graph(Node("h", "add", ["x", "c"]), constants={"c": np.ones(3, dtype=dt)}),
       DTypeError, "c", None) for dt in ("float16", "complex64")],
    ("negative-dimension", graph(Node("h", "neg", ["a"]), inputs=on((2, -5))),
     ShapeError, "a", "shape"),
    ("missing-output", graph(Node("h", "sin", ["x"]), outputs=["h", "zz"]),
     GraphError, "zz", "outputs[1]"),
    *NEW_OP_ERRORS,
]


@pytest.mark.parametrize("g, error, node, field", [c[1:] for c in COMPILE_ERRORS],
                         ids=[c[0] for c in COMPILE_ERRORS])
def test_compile_error(g, error, node, field):
    with pytest.raises(error) as info:
        compile(g)
    e = info.value
    assert f"'{node}'" in str(e)
    assert e.node == node
    if field is not None:
        assert e.field == field


def test_matmul_message_names_node_and_shapes():
    with pytest.raises(ShapeError) as info:
        compile(graph(Node("h2", "matmul", ["a", "b"]), inputs=on((3, 4), (5, 2))))
    message = str(info.value)
    assert "'h2'" in message
    assert "(3, 4)" in message or "(3,4)" in message
    assert "(5, 2)" in message or "(5,2)" in message


# --- differentiation requests --------------------------------------------------------


def mixed_plan():
    """x (float64), n (int32) and constant c; output o = x * c + sin(x); h is not an output."""
    g = Graph([Input("x", "float64", (2,)), Input("n", "int32", (2,))],
              [Node("h", "mul", ["x", "c"]), Node("k", "neg", ["n"]),
               Node("o", "add", ["h", "x"])],
              ["o", "k"], constants={"c": np.float64([2.0, 3.0])})
    return compile(g), {"x": np.float64([0.5, 1.5]), "n": np.int32([1, 2])}


@pytest.mark.parametrize("name", ["h", "c", "n", "o"])
@pytest.mark.parametrize("method", ["jacobian", "vjp"])
def test_wrt_must_be_a_floating_input(method, name):
    plan, inputs = mixed_plan()
    with pytest.raises(DifferentiationError) as info:
        if method == "jacobian":
            plan.jacobian(inputs, wrt=[name], of=["o"])
        else:
            plan.vjp(inputs, {"o": np.ones(2)}, wrt=[name])
    assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("name", ["h", "x", "c"])
def test_of_must_be_an_output(name):
    plan, inputs = mixed_plan()
    with pytest.raises(DifferentiationError) as info:
        plan.jacobian(inputs, wrt=["x"], of=[name])
    assert f"'{name}'" in str(info.value)


def test_default_wrt_skips_integer_inputs():
    plan, inputs = mixed_plan()
    assert set(plan.vjp(inputs, {"o": np.ones(2)}).cotangents) == {"x"}
    blocks = plan.jacobian(inputs, of=["o"], mode="reverse").jacobian
    assert set(blocks) == {("o", "x")}
    assert_allclose(blocks["o", "x"], np.diag([3.0, 4.0]))


# --- run-time values ---------------------------------------------------------------------

F32 = Graph([Input("a", "float32", (2, 3)), Input("b", "float32", (-1, 3))],
            [Node("s", "sum", ["b"], {"axes": [0]}), Node("o", "mul", ["a", "s"])], ["o"])
GOOD = {"a": np.ones((2, 3), np.float32), "b": np.ones((5, 3), np.float32)}


def call(plan, method, inputs):
    if method == "evaluate":
        return plan.evaluate(inputs)
    if method == "jvp":
        return plan.jvp(inputs, {})
    if method == "vjp":
        return plan.vjp(inputs, {})
    return plan.jacobian(inputs)


RUNTIME_ERRORS = [
    ("missing-input", {"a": GOOD["a"]}, "b"),
    ("wrong-dtype-float64-for-float32", {**GOOD, "a": np.ones((2, 3))}, "a"),
    ("wrong-dtype-int-for-float", {**GOOD, "b": np.ones((5, 3), np.int32)}, "b"),
    ("wrong-shape", {**GOOD, "a": np.ones((3, 2), np.float32)}, "a"),
    ("wrong-rank", {**GOOD, "b": np.ones((15,), np.float32)}, "b"),
    ("wrong-fixed-dim-next-to-any", {**GOOD, "b": np.ones((5, 4), np.float32)}, "b"),
]


@pytest.mark.parametrize("method", ["evaluate", "jvp", "vjp", "jacobian"])
@pytest.mark.parametrize("inputs, name", [c[1:] for c in RUNTIME_ERRORS],
                         ids=[c[0] for c in RUNTIME_ERRORS])
def test_runtime_input_error(inputs, name, method):
    with pytest.raises(InputError) as info:
        call(compile(F32), method, inputs)
    assert f"'{name}'" in str(info.value)
    assert info.value.node == name


@pytest.mark.parametrize("rows", [0, 1, 7])
def test_any_size_dimension_accepts_any_size(rows):
    b = np.ones((rows, 3), np.float32)
    out = compile(F32).evaluate({**GOOD, "b": b})["o"]
    assert out.dtype == np.float32
    assert_allclose(out, np.full((2, 3), rows, np.float32))


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_any_size_dimension_differentiates_at_each_calls_shape(mode):
    """o[i, j] = a[i, j] * sum_r b[r, j], so do[i, j]/db[r, l] = a[i, j] if j == l else 0."""
    plan = compile(F32)
    a = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)
    for rows in (5, 2, 5, 1):  # the same plan, shapes changing between calls
        result = plan.jacobian({"a": a, "b": np.ones((rows, 3), np.float32)}, mode=mode)
        block = result.jacobian["o", "b"]
        assert block.shape == (2, 3, rows, 3)
        want = a[:, :, None, None] * np.eye(3, dtype=np.float32)[None, :, None, :]
        assert_allclose(block, np.broadcast_to(want, block.shape), rtol=1e-6)
        assert (result.decision.n, result.decision.m) == (6 + 3 * rows, 6)


ZERO_SIZE_REDUCTIONS = [("max", {"axes": [0]}), ("max", {}), ("logsumexp", {"axis": 0}),
                        ("softmax", {"axis": 0}), ("log_softmax", {"axis": 0}),
                        ("sum", {"axes": [0]}), ("mean", {"axes": [0]})]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # mean of nothing is nan
@pytest.mark.parametrize("shape", [(0, 3), (-1, 3)], ids=["static", "any-size"])
@pytest.mark.parametrize("op, attrs", ZERO_SIZE_REDUCTIONS,
                         ids=[f"{op}-{attrs}".replace(" ", "") for op, attrs in ZERO_SIZE_REDUCTIONS])
def test_zero_size_axis_is_a_result_or_an_engine_error(op, attrs, shape):
    """Bad input is always an EngineError (the server maps those); never a bare NumPy error."""
    g = Graph([Input("x", "float64", shape)], [Node("y", op, ["x"], attrs)], ["y"])
    try:
        plan = compile(g)
    except EngineError:
        return
    x = np.ones((0, 3))
    with np.errstate(all="ignore"):
        for call in (lambda: plan.evaluate({"x": x}),
                     lambda: plan.jacobian({"x": x}, mode="forward"),
                     lambda: plan.jacobian({"x": x}, mode="reverse")):
            try:
                call()
            except EngineError:
                pass


@pytest.mark.parametrize("seeds, name", [
    ({"a": np.ones((3, 2), np.float32)}, "a"),  # not a's shape
    ({"a": np.ones((2, 2, 3), np.float32), "b": np.ones((3, 5, 3), np.float32)}, None),  # k differs
])
def test_bad_tangents(seeds, name):
    with pytest.raises(InputError) as info:
        compile(F32).jvp(GOOD, seeds)
    if name is not None:
        assert f"'{name}'" in str(info.value)


@pytest.mark.parametrize("seeds", [{"o": np.ones((3, 2), np.float32)},
                                   {"o": np.ones((2, 4), np.float32)}])
def test_bad_cotangents(seeds):
    with pytest.raises(InputError) as info:
        compile(F32).vjp(GOOD, seeds)
    assert "'o'" in str(info.value)


# --- a long chain: validation and both sweeps are iterative ----------------------------


def test_100k_node_chain():
    """h[2i+1] = h[2i] + 1, h[2i+2] = h[2i+1] * k: o = k^N x + sum_j k^j; do/dx = k^N."""
    pairs, k = 50_000, 1.0 + 1e-5
    nodes, prev = [], "x"
    for i in range(pairs):
        nodes.append(Node(f"a{i}", "add", [prev, "one"]))
        nodes.append(Node(f"m{i}", "mul", [f"a{i}", "k"]))
        prev = f"m{i}"
    g = Graph([Input("x", "float64", ())], nodes, [prev],
              constants={"one": np.float64(1.0), "k": np.float64(k)})
    assert len(g.nodes) == 100_000
    x = np.float64(0.25)
    want_value = k ** pairs * x + k * (k ** pairs - 1) / (k - 1)
    want_slope = k ** pairs

    plan = compile(g)

    assert_allclose(plan.evaluate({"x": x})[prev], want_value, rtol=1e-9)
    for mode in ("forward", "reverse"):
        assert_allclose(plan.jacobian({"x": x}, mode=mode).jacobian[prev, "x"], want_slope,
                        rtol=1e-9, err_msg=mode)
    one = np.float64(1.0)
    assert_allclose(plan.jvp({"x": x}, {"x": one}).tangents[prev], want_slope, rtol=1e-9)
    assert_allclose(plan.vjp({"x": x}, {prev: one}).cotangents["x"], want_slope, rtol=1e-9)


def test_100k_node_chain_error_at_the_end():
    nodes = [Node(f"s{i}", "sin", [f"s{i - 1}" if i else "x"]) for i in range(100_000)]
    nodes.append(Node("bad", "add", ["s99999", "nope"]))
    with pytest.raises(GraphError) as info:
        compile(Graph([Input("x", "float64", ())], nodes, ["bad"]))
    assert info.value.node == "bad" and info.value.field == "inputs[1]"


def test_every_error_is_an_engine_error():
    for error in (GraphError, ShapeError, DTypeError, InputError, DifferentiationError):
        assert issubclass(error, EngineError)
