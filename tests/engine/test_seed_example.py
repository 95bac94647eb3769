"""The worked example of DESIGN.md: x = y = pi, o = (x + y) * sin(x).

do/dx = sin(x) + (x + y) cos(x) = -6.2832 and do/dy = sin(x) = -8.7423e-08 in float32
(PyTorch prints the same). The oracles are those published figures and the closed
form computed by NumPy in the same dtype, never numbers taken from the engine.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import REVERSE_COST_RATIO, Graph, Input, Node, compile, plan_mode
from gradserve.engine.planner import plan_second_order
from support.graphs import (PUBLISHED_DODX, PUBLISHED_DODY, closed_form, seed_graph, seed_inputs,
                            seed_nodes)

METHODS = ["jacobian-forward", "jacobian-reverse", "jacobian-auto", "vjp", "jvp"]


def derivatives(plan, inputs, method):
    """(do/dx, do/dy) as arrays shaped like o (o, x and y share one shape here)."""
    shape = inputs["x"].shape
    if method.startswith("jacobian-"):
        result = plan.jacobian(inputs, mode=method.removeprefix("jacobian-"))
        blocks = [result.jacobian["o", n] for n in ("x", "y")]
        for block in blocks:
            assert block.shape == shape + shape
        return [b.reshape(shape) for b in blocks]  # shape is () or (1,): one element
    if method == "vjp":
        result = plan.vjp(inputs, {"o": np.ones(shape, inputs["x"].dtype)})
        return [result.cotangents[n] for n in ("x", "y")]
    one, zero = np.ones(shape, inputs["x"].dtype), np.zeros(shape, inputs["x"].dtype)
    return [plan.jvp(inputs, {"x": one, "y": zero}).tangents["o"],
            plan.jvp(inputs, {"x": zero, "y": one}).tangents["o"]]


def test_closed_form_matches_published_figures():
    _, dodx, dody = closed_form(np.float32)
    assert dodx.dtype == dody.dtype == np.float32
    assert abs(dodx - PUBLISHED_DODX) < 1e-4
    assert abs(dody - PUBLISHED_DODY) < 1e-11


@pytest.mark.parametrize("shape", [(1,), ()])
@pytest.mark.parametrize("method", METHODS)
def test_seed_float32(method, shape):
    plan, inputs = compile(seed_graph("float32", shape)), seed_inputs(np.float32, shape)
    o, want_dodx, want_dody = closed_form(np.float32)

    dodx, dody = derivatives(plan, inputs, method)

    for d in (dodx, dody):
        assert d.dtype == np.float32 and d.shape == shape
    assert abs(float(dodx.item()) - PUBLISHED_DODX) < 1e-4
    assert abs(float(dody.item()) - PUBLISHED_DODY) < 1e-11
    assert_allclose(dodx, want_dodx, rtol=1e-6, atol=0)
    assert_allclose(dody, want_dody, rtol=1e-6, atol=1e-12)
    value = plan.evaluate(inputs)["o"]
    assert value.dtype == np.float32 and value.shape == shape
    assert_allclose(value, o, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("shape", [(1,), ()])
@pytest.mark.parametrize("method", METHODS)
def test_seed_float64(method, shape):
    plan, inputs = compile(seed_graph("float64", shape)), seed_inputs(np.float64, shape)
    _, want_dodx, want_dody = closed_form(np.float64)

    dodx, dody = derivatives(plan, inputs, method)

    assert dodx.dtype == dody.dtype == np.float64
    assert abs(float(dody.item()) - np.sin(np.pi)) < 1e-20
    assert abs(float(dody.item()) - 1.2246e-16) < 1e-20
    assert_allclose(dodx, -2 * np.pi, rtol=1e-14)
    assert_allclose(dodx, want_dodx, rtol=1e-15)


def test_jvp_with_tangent_omitted_is_zero_tangent():
    plan, inputs = compile(seed_graph("float32", (1,))), seed_inputs(np.float32, (1,))
    dody = plan.jvp(inputs, {"y": np.float32([1.0])}).tangents["o"]
    assert abs(float(dody[0]) - PUBLISHED_DODY) < 1e-11


# --- the planner's decision ------------------------------------------------------------
# Contract: forward iff n <= ratio * m (ratio REVERSE_COST_RATIO by default), n = input
# elements differentiated, m = output elements differentiated.


def test_decision_for_the_seed():
    plan, inputs = compile(seed_graph("float32", (1,))), seed_inputs(np.float32, (1,))
    result = plan.jacobian(inputs)  # mode="auto"
    d = result.decision
    assert (d.n, d.m) == (2, 1)
    assert d.mode == result.mode == ("forward" if 2 <= REVERSE_COST_RATIO * 1 else "reverse")
    assert (d.cost_forward, d.cost_reverse) == (2, REVERSE_COST_RATIO * 1)


def test_decision_reverse_for_many_inputs_one_output():
    graph = seed_graph("float64", (3,))
    graph.nodes.append(Node("loss", "sum", ["o"]))
    graph.outputs = ["loss"]
    plan, inputs = compile(graph), seed_inputs(np.float64, (3,))
    result = plan.jacobian(inputs)
    assert (result.decision.n, result.decision.m) == (6, 1)
    assert result.decision.mode == result.mode == "reverse"
    assert_allclose(result.jacobian["loss", "x"], np.full(3, -2 * np.pi), rtol=1e-14)


def test_decision_forward_for_one_input_many_outputs():
    c = np.linspace(-1.0, 1.0, 1000, dtype=np.float32)
    graph = Graph([Input("x", "float32", (1,))],
                  seed_nodes(y="c"),
                  ["o"], constants={"c": c})
    x = np.float32([np.pi])
    result = compile(graph).jacobian({"x": x})
    assert (result.decision.n, result.decision.m) == (1, 1000)
    assert result.decision.mode == result.mode == "forward"
    block = result.jacobian["o", "x"]
    assert block.shape == (1000, 1) and block.dtype == np.float32
    assert_allclose(block[:, 0], np.sin(x) + (x + c) * np.cos(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, m, ratio, mode", [
    (2, 1, 2.0, "forward"),
    (3, 1, 2.0, "reverse"),
    (1, 1000, 2.0, "forward"),
    (3, 1, 3.0, "forward"),
    (4, 1, 3.0, "reverse"),
])
def test_plan_mode_rule(n, m, ratio, mode):
    d = plan_mode(n, m, ratio=ratio)
    assert (d.mode, d.n, d.m) == (mode, n, m)
    assert d.cost_forward >= 0 and d.cost_reverse >= 0
    assert isinstance(d.reason, str) and d.reason


def test_reason_counts_agree_with_their_nouns():
    """The reason names n and m with the noun agreeing: the worked example has 1 output
    element, the one-input graph 1 input element."""
    assert plan_mode(2, 1).reason.startswith(
        "2 input elements (one forward direction each) against 1 output element (")
    assert plan_mode(1, 1000).reason.startswith("1 input element (")
    assert "against 1000 output elements (" in plan_mode(1, 1000).reason
    one = plan_second_order(1, 1).reason
    assert "carrying 1 tangent direction (" in one and "n = 1 input element," in one
    assert "(1 direction in the same sweep)" in one
    assert "carrying 3 tangent directions (" in plan_second_order(3, 3).reason
