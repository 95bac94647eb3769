"""Property tests (hypothesis) on random graphs.

1. Random valid graphs of elementwise, reduction, scan, padding and shape ops, and
   comparisons feeding where (float64): the forward and reverse Jacobians agree with
   each other, with central finite differences, and the values with NumPy. Each graph
   is built with its input values in hand, so an op whose operand is outside its safe
   domain (pole, kink, tie, overflow) first gets an adapter.
2. Random, mostly invalid graphs: `compile` succeeds or raises an EngineError subclass,
   never anything else; a graph that compiles also evaluates on inputs that fit it.
"""

from __future__ import annotations


import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from gradserve.engine import OPS, EngineError, Graph, Input, Node, compile
from support.oracles import numeric_jacobian, reference
from support.graphs import SETTINGS, valid_graphs


# --- 1. random valid graphs -------------------------------------------------------------


def run_numpy(graph, inputs):
    """The graph's outputs, evaluated op by op with the NumPy references."""
    values = dict(inputs)
    for node in graph.nodes:
        values[node.name] = reference(node.op, [values[a] for a in node.inputs], node.attrs)
    return {o: values[o] for o in graph.outputs}


@SETTINGS
@given(valid_graphs())
def test_random_graph_jacobians(case):
    graph, inputs = case
    plan = compile(graph)

    values = plan.evaluate(inputs)
    forward = plan.jacobian(inputs, mode="forward").jacobian
    reverse = plan.jacobian(inputs, mode="reverse").jacobian

    want = run_numpy(graph, inputs)
    for name in graph.outputs:
        assert_allclose(values[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    numeric = numeric_jacobian(lambda xs: run_numpy(graph, xs), inputs)
    assert set(forward) == set(reverse) == set(numeric)
    for key, block in numeric.items():
        assert forward[key].shape == block.shape, key
        assert_allclose(forward[key], reverse[key], rtol=1e-10, atol=1e-12,
                        err_msg=f"{key} fwd/rev")
        assert_allclose(forward[key], block, rtol=1e-5, atol=1e-7, err_msg=f"{key} vs fd")


# --- 2. random, mostly invalid graphs ------------------------------------------------------

NAMES = ["x", "y", "c", "h0", "h1", "h2", "nope"]
BOGUS_OPS = ["frobnicate", "", "ADD", "sin ", "Matmul"]
ATTR_NAMES = ["axes", "keepdims", "shape", "perm", "axis", "starts", "stops", "bogus"]
ATTR_VALUES = [None, 0, 1, -1, 2, 3, 5, -5, 1.5, True, False, "x", [], [0], [1], [-1], [-2],
               [0, 1], [1, 0], [0, 0], [5], [2, 3], [3, 2], [6], [-1, 3], [3, -1], [-1, -1],
               [0, 6], [1, 2, 3], ["a"], [0.5], [None], {"a": 1}, (0,)]
DTYPES = ["float32", "float64", "int32", "int64", "float16", "complex64", "bogus"]


def _mostly(draw, good, bad):
    """Usually a draw from `good`, one time in sixteen from `bad`: most graphs get past
    their inputs and names and reach the op rules."""
    return draw(bad) if draw(st.integers(0, 15)) == 0 else draw(good)


@st.composite
def arbitrary_graphs(draw):
    dtype = draw(st.sampled_from(["float64", "float32", "int32"]))
    shape = st.lists(st.integers(1, 3), max_size=3)
    bad_shape = st.lists(st.sampled_from([0, -1, -5, 2]), min_size=1, max_size=3)
    names = ["x", "y"][:draw(st.integers(1, 2))] + _mostly(draw, st.just([]), st.just(["x"]))
    inputs = [Input(n, _mostly(draw, st.just(dtype), st.sampled_from(DTYPES)),
                    _mostly(draw, shape, bad_shape)) for n in names]
    constants = {}
    if draw(st.booleans()):
        c_dtype = _mostly(draw, st.just(dtype), st.sampled_from(DTYPES[:-1]))
        constants[_mostly(draw, st.just("c"), st.sampled_from(NAMES))] = np.ones(
            draw(st.lists(st.integers(0, 3), max_size=2)), dtype=c_dtype)
    defined = names + list(constants)
    nodes = []
    for j in range(draw(st.integers(1, 5))):
        op = _mostly(draw, st.sampled_from(sorted(OPS)), st.sampled_from(BOGUS_OPS))
        arity = OPS[op].arity if op in OPS and OPS[op].arity else 2
        arity = _mostly(draw, st.just(arity), st.integers(0, 3))
        refs = [_mostly(draw, st.sampled_from(defined or NAMES), st.sampled_from(NAMES))
                for _ in range(arity)]
        attr_names = [a.name for a in OPS[op].attrs] if op in OPS else []
        attrs = {}
        if attr_names and draw(st.booleans()):
            attrs = draw(st.dictionaries(st.sampled_from(attr_names), st.sampled_from(ATTR_VALUES),
                                         max_size=3))
        attrs = _mostly(draw, st.just(attrs), st.dictionaries(
            st.sampled_from(ATTR_NAMES), st.sampled_from(ATTR_VALUES), max_size=3))
        name = _mostly(draw, st.just(f"h{j}"), st.sampled_from(NAMES))
        nodes.append(Node(name, op, refs, attrs))
        defined.append(name)
    outputs = _mostly(draw, st.just(defined[-1:]), st.lists(st.sampled_from(NAMES), max_size=3))
    return Graph(inputs, nodes, outputs, constants)


def _fitting_inputs(graph):
    rng = np.random.default_rng(0)
    return {i.name: rng.uniform(-2, 2, i.shape).astype(i.dtype) for i in graph.inputs}


@settings(SETTINGS, max_examples=200)
@given(arbitrary_graphs())
def test_compile_raises_only_engine_errors(graph):
    try:
        plan = compile(graph)
    except EngineError:
        return
    if all(d >= 1 for i in graph.inputs for d in i.shape):
        with np.errstate(all="ignore"):
            try:
                plan.evaluate(_fitting_inputs(graph))
            except EngineError:
                pass
