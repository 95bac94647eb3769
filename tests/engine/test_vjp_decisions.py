"""A VJP's decision is remembered per request form (engine/request.py): repeated at the
same shapes it is the same, at other shapes (a dynamic batch) or for other `wrt` it is
that request's own (n and m counted here from the shapes), and a plan no longer used is
not kept alive by it."""

from __future__ import annotations

import gc
import weakref

import numpy as np

from gradserve.engine import Graph, Input, Node, compile as compile_plan


def dense_plan():
    """tanh(x @ W + b) with a dynamic batch."""
    return compile_plan(Graph(
        inputs=[Input("x", "float64", (-1, 3)), Input("W", "float64", (3, 4)),
                Input("b", "float64", (4,))],
        nodes=[Node("h", "matmul", ["x", "W"]), Node("z", "add", ["h", "b"]),
               Node("y", "tanh", ["z"])],
        outputs=["y"]))


def inputs(batch):
    rng = np.random.default_rng(batch)
    return {"x": rng.standard_normal((batch, 3)), "W": rng.standard_normal((3, 4)),
            "b": rng.standard_normal(4)}


def test_each_vjp_decision_counts_its_own_request():
    plan = dense_plan()
    sizes = {"x": lambda batch: 3 * batch, "W": lambda batch: 12, "b": lambda batch: 4}
    for batch, wrt in [(2, None), (5, None), (2, None), (2, ("b",)), (5, ("W", "b")),
                       (2, ("b",)), (7, ("x",))]:
        values = inputs(batch)
        g = np.ones((batch, 4))
        result = plan.differentiate(values, cotangents={"y": g}, wrt=wrt)
        names = wrt or ("x", "W", "b")
        assert result.decision.mode == "reverse"
        assert result.decision.n == sum(sizes[n](batch) for n in names), (batch, wrt)
        assert result.decision.m == 4 * batch, (batch, wrt)
        assert set(result.cotangents) == set(names)
        # the cotangents themselves against the closed form
        dz = g * (1 - np.tanh(values["x"] @ values["W"] + values["b"]) ** 2)
        expected = {"x": dz @ values["W"].T, "W": values["x"].T @ dz, "b": dz.sum(0)}
        for name in names:
            np.testing.assert_allclose(result.cotangents[name], expected[name], rtol=1e-12)


def test_a_plan_is_not_kept_alive_by_its_remembered_decisions():
    plan = dense_plan()
    plan.differentiate(inputs(3), cotangents={"y": np.ones((3, 4))})
    ref = weakref.ref(plan)
    del plan
    gc.collect()
    assert ref() is None
