"""engine.trace: every value, and every edge's derivative, of one sweep.

The seed example's figures come from the closed form in NumPy (the oracle of
tests/engine/test_seed_example.py) and the published -6.2832; on other graphs the
trace must agree with the Plan's own JVPs, VJPs and Jacobians, and its edges
must add up: a value's adjoint is the sum of the cotangents flowing back into
it, a node's tangent the sum of the tangents its edges carry.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.engine import (DifferentiationError, Graph, Input, InputError, Node,
                              ResourceLimitError, compile, trace)

from support.graphs import PUBLISHED_DODX, closed_form, seed_graph, seed_inputs


@pytest.fixture(scope="module")
def seed():
    plan = compile(seed_graph("float32", [1]))
    return plan, seed_inputs("float32", (1,))


def edge(node, name):
    """The edge of `node` reading `name` (the only one)."""
    (found,) = [e for e in node.edges if e.input == name]
    return found


def test_seed_reverse_splits_at_mul_and_sums_at_x(seed):
    plan, inputs = seed
    t = trace(plan, inputs, "reverse", cotangents={"o": np.float32([1])})
    x = y = np.float32(np.pi)
    _, dodx, dody = closed_form(np.float32)
    assert t.mode == "reverse"
    assert [(n.name, n.op) for n in t.nodes] == [
        ("x", "input"), ("y", "input"), ("s", "add"), ("sx", "sin"), ("o", "mul")]
    # mul splits the adjoint 1: sin(x) back to s = x + y, (x + y) back to sin(x)
    assert_array_equal(edge(t["o"], "s").cotangent, [np.sin(x)])
    assert_array_equal(edge(t["o"], "sx").cotangent, [x + y])
    # add passes sin(x) to x and to y; sin passes (x + y) cos(x) to x
    assert_array_equal(edge(t["s"], "x").cotangent, [np.sin(x)])
    assert_array_equal(edge(t["s"], "y").cotangent, [np.sin(x)])
    assert_allclose(edge(t["sx"], "x").cotangent, [(x + y) * np.cos(x)], rtol=1e-6)
    # x fans out to s and sx: its adjoint is the sum, -6.2832
    summed = edge(t["s"], "x").cotangent + edge(t["sx"], "x").cotangent
    assert_array_equal(t["x"].adjoint, summed)
    assert abs(t["x"].adjoint[0] - PUBLISHED_DODX) < 1e-4
    assert t["x"].adjoint.dtype == np.float32
    assert_allclose(t["x"].adjoint, [dodx], rtol=1e-6)
    assert_array_equal(t["y"].adjoint, [dody])
    assert_array_equal(t["o"].adjoint, [1])
    # an independent check: the Plan's reverse-mode Jacobian
    jac = plan.jacobian(inputs, mode="reverse").jacobian
    assert_allclose(t["x"].adjoint, jac["o", "x"].reshape(1), rtol=1e-6)
    assert_allclose(t["y"].adjoint, jac["o", "y"].reshape(1), rtol=1e-6)
    assert all(n.tangent is None for n in t.nodes)
    assert all(e.partial is None and e.tangent is None for n in t.nodes for e in n.edges)


def test_seed_forward_from_x(seed):
    plan, inputs = seed
    t = trace(plan, inputs, "forward", tangents={"x": np.float32([1])})
    x = np.float32(np.pi)
    assert t.mode == "forward"
    assert_array_equal(t["x"].tangent, [1])
    assert t["y"].tangent is None  # no tangent flows from y
    assert_array_equal(t["s"].tangent, [1])  # d(x + y)/dx = 1
    assert_array_equal(edge(t["s"], "x").partial, [1])
    assert_array_equal(edge(t["s"], "y").partial, [1])
    assert edge(t["s"], "y").tangent is None
    assert_array_equal(edge(t["sx"], "x").partial, [np.cos(x)])  # cos(pi) = -1
    assert_array_equal(edge(t["sx"], "x").partial, [-1])
    assert_array_equal(t["sx"].tangent, [-1])
    # mul: partials are the other operand; the tangent is the sum of both edges' tangents
    assert_array_equal(edge(t["o"], "s").partial, [np.sin(x)])
    assert_array_equal(edge(t["o"], "sx").partial, t["s"].value)
    assert_array_equal(t["o"].tangent,
                       edge(t["o"], "s").tangent + edge(t["o"], "sx").tangent)
    assert abs(t["o"].tangent[0] - PUBLISHED_DODX) < 1e-4
    jac = plan.jacobian(inputs, mode="forward").jacobian
    assert_allclose(t["o"].tangent, jac["o", "x"].reshape(1), rtol=1e-6)
    assert all(n.adjoint is None for n in t.nodes)


def test_values_are_the_plans():
    plan, inputs = compile(seed_graph("float64", [3])), seed_inputs("float64", (3,))
    t = trace(plan, inputs, "reverse", cotangents={"o": np.ones(3)})
    assert_array_equal(t["o"].value, plan.evaluate(inputs)["o"])
    assert_array_equal(t["x"].value, inputs["x"])


# --- the edges add up, on graphs with broadcasting, fan-out and non-elementwise ops ---

def mlp_graph():
    return Graph(
        [Input("a", "float64", [2, 3]), Input("w", "float64", [3, 4]),
         Input("b", "float64", [4])],
        [Node("h", "matmul", ["a", "w"]), Node("z", "add", ["h", "b"]),
         Node("r", "tanh", ["z"]), Node("q", "mul", ["r", "r"]),
         Node("scaled", "mul", ["q", "k"]), Node("unused", "exp", ["a"]),
         Node("l", "sum", ["scaled"]), Node("c", "concat", ["z", "r"], {"axis": 0})],
        ["l", "c"], {"k": np.float64(0.5)})


def chain_graph():
    return Graph(
        [Input("u", "float64", [5]), Input("v", "float64", [1])],
        [Node("d", "div", ["u", "v"]), Node("m", "maximum", ["d", "u"]),
         Node("e", "exp", ["m"]), Node("e2", "reshape", ["e"], {"shape": [5, 1]}),
         Node("t", "transpose", ["e2"]), Node("p", "pow", ["u", "v"]),
         Node("sm", "softmax", ["p"]), Node("o", "sub", ["sm", "t"])],
        ["o"])


GRAPHS = {"mlp": mlp_graph, "chain": chain_graph}


def random_inputs(plan, rng):
    out = {}
    for i in plan.graph.inputs:
        out[i.name] = rng.uniform(0.5, 1.5, size=i.shape)
    return out


@pytest.mark.parametrize("name", GRAPHS)
def test_reverse_edges_sum_to_adjoints_and_match_vjp(name):
    plan = compile(GRAPHS[name]())
    rng = np.random.default_rng(1)
    inputs = random_inputs(plan, rng)
    shapes = {k: v.shape for k, v in plan.evaluate(inputs).items()}
    cots = {k: rng.normal(size=s) for k, s in shapes.items()}
    t = trace(plan, inputs, "reverse", cotangents=cots)
    flowing = {}
    for node in t.nodes:
        for e in node.edges:
            assert e.cotangent.shape == t[e.input].value.shape
            flowing[e.input] = flowing.get(e.input, 0) + e.cotangent
    for node in t.nodes:
        expected = flowing.get(node.name, 0) + cots.get(node.name, 0)
        if node.adjoint is None:
            assert node.name not in flowing and node.name not in cots
        else:
            assert_allclose(node.adjoint, expected, rtol=1e-12)
    vjp = plan.vjp(inputs, cots).cotangents
    for k, g in vjp.items():
        assert_allclose(t[k].adjoint, g, rtol=1e-12)
    assert "unused" not in {n.name for n in t.nodes}  # pruned, as the Plan prunes it


@pytest.mark.parametrize("name", GRAPHS)
def test_forward_edges_sum_to_tangents_and_match_jvp(name):
    plan = compile(GRAPHS[name]())
    rng = np.random.default_rng(2)
    inputs = random_inputs(plan, rng)
    first = plan.input_names[0]
    tangents = {first: rng.normal(size=inputs[first].shape)}
    t = trace(plan, inputs, "forward", tangents=tangents)
    for node in t.nodes:
        carried = [e.tangent for e in node.edges if e.tangent is not None]
        if node.edges:
            if carried:
                assert_allclose(node.tangent, sum(carried), rtol=1e-12)
            else:
                assert node.tangent is None
        for e in node.edges:
            if e.partial is not None:  # elementwise: tangent carried = partial * input tangent
                assert e.partial.shape == node.value.shape
                if e.tangent is not None:
                    assert_allclose(e.tangent, e.partial * t[e.input].tangent, rtol=1e-12)
    jvp = plan.jvp(inputs, tangents).tangents
    for k, out in jvp.items():
        assert_allclose(t[k].tangent, out, rtol=1e-12)


def test_partials_only_for_elementwise_ops():
    plan = compile(mlp_graph())
    inputs = random_inputs(plan, np.random.default_rng(3))
    t = trace(plan, inputs, "forward", tangents={"b": np.ones(4)})
    assert all(e.partial is None for e in t["h"].edges + t["l"].edges + t["c"].edges)
    assert all(e.partial is not None for e in t["z"].edges + t["r"].edges + t["q"].edges)
    # broadcasting: b (4,) into z (2, 4); the partial is shaped like z
    assert_array_equal(edge(t["z"], "b").partial, np.ones((2, 4)))
    assert t["k"].op == "constant" and t["k"].tangent is None


def test_integer_values_carry_no_derivatives():
    g = Graph([Input("x", "float64", [2]), Input("n", "int64", [2])],
              [Node("nn", "mul", ["n", "n"]), Node("o", "sin", ["x"])], ["o", "nn"])
    plan = compile(g)
    inputs = {"x": np.array([0.1, 0.2]), "n": np.array([3, 4])}
    t = trace(plan, inputs, "reverse", cotangents={"o": np.ones(2)})
    assert_array_equal(t["nn"].value, [9, 16])
    assert t["nn"].adjoint is None and t["n"].adjoint is None
    assert all(e.cotangent is None for e in t["nn"].edges)


# --- refusals --------------------------------------------------------------------------

def test_needs_seeds_of_the_mode(seed):
    plan, inputs = seed
    with pytest.raises(DifferentiationError, match="needs tangents"):
        trace(plan, inputs, "forward")
    with pytest.raises(DifferentiationError, match="needs cotangents"):
        trace(plan, inputs, "reverse", tangents={"x": np.float32([1])})
    with pytest.raises(DifferentiationError, match="unknown trace mode"):
        trace(plan, inputs, "sideways", tangents={"x": np.float32([1])})
    with pytest.raises(DifferentiationError, match="not a graph output"):
        trace(plan, inputs, "reverse", cotangents={"x": np.float32([1])})


def test_refuses_batched_seeds(seed):
    plan, inputs = seed
    with pytest.raises(InputError, match="one direction"):
        trace(plan, inputs, "forward", tangents={"x": np.ones((2, 1), np.float32)})


def test_size_bound_is_checked_before_any_work(seed):
    plan, inputs = seed
    calls = []
    ok = trace(plan, inputs, "reverse", cotangents={"o": np.float32([1])}, max_elements=100,
               check=lambda: calls.append(1))
    assert ok["x"].adjoint is not None and calls
    calls.clear()
    with pytest.raises(ResourceLimitError, match="max_trace_elements"):
        trace(plan, inputs, "reverse", cotangents={"o": np.float32([1])}, max_elements=5,
              check=lambda: calls.append(1))
    assert not calls
