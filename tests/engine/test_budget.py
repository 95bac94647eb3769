"""engine.Budget: what one request may spend, admitted before any work and checked at
every loop boundary during it; and the one request entry, which binds inputs once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from gradserve.engine import (Budget, DeadlineExceeded, Graph, Input, Node, ResourceLimitError,
                              compile)


def chain_plan(n=200):
    """x -> sin -> sin -> ... (n ops) -> sum: a scalar loss of a vector input."""
    nodes = [Node("v0", "sin", ["x"])]
    nodes += [Node(f"v{i}", "sin", [f"v{i - 1}"]) for i in range(1, n)]
    nodes.append(Node("L", "sum", [f"v{n - 1}"]))
    return compile(Graph([Input("x", "float64", [8])], nodes, ["L"]))


X = {"x": np.linspace(0.1, 0.8, 8)}


def test_keywords_and_a_budget_are_the_same_limits():
    plan = chain_plan()
    for call in (lambda **b: plan.evaluate(X, **b),
                 lambda **b: plan.jacobian(X, **b),
                 lambda **b: plan.hessian(X, **b),
                 lambda **b: plan.differentiate(X, trace=True, **b)):
        with pytest.raises(ResourceLimitError, match="max_request_flops") as by_keyword:
            call(max_flops=100)
        with pytest.raises(ResourceLimitError, match="max_request_flops") as by_budget:
            call(budget=Budget(max_flops=100))
        assert str(by_keyword.value) == str(by_budget.value)
    assert Budget.of(Budget(max_bytes=5), max_flops=7) == Budget(max_bytes=5, max_flops=7)
    with pytest.raises(TypeError, match="max_byte"):
        plan.evaluate(X, max_byte=10)


def test_a_passed_deadline_stops_the_work_in_every_request():
    plan = chain_plan()
    past = Budget(deadline=time.monotonic() - 1)
    vectors = {"x": np.ones(8)}
    for call in (lambda: plan.evaluate(X, budget=past),
                 lambda: plan.jvp(X, {"x": np.ones(8)}, budget=past),
                 lambda: plan.vjp(X, {"L": np.float64(1)}, budget=past),
                 lambda: plan.jacobian(X, budget=past),
                 lambda: plan.hvp(X, vectors, budget=past),
                 lambda: plan.hessian(X, budget=past),
                 lambda: plan.differentiate(X, trace=True, budget=past),
                 lambda: plan.trace(X, "forward", tangents={"x": np.ones(8)}, budget=past)):
        with pytest.raises(DeadlineExceeded):
            call()
    # a deadline ahead changes nothing
    ahead = Budget(deadline=time.monotonic() + 3600)
    assert plan.evaluate(X, budget=ahead)["L"] == plan.evaluate(X)["L"]


def test_cancellation_raises_what_the_callers_check_raises():
    plan = chain_plan()
    calls = []

    class Gone(Exception):
        pass

    def cancel():
        calls.append(1)
        if len(calls) > 2:
            raise Gone

    with pytest.raises(Gone):
        plan.hessian(X, budget=Budget(cancel=cancel))
    assert len(calls) == 3  # checked at loop boundaries: 200 ops are more than one chunk


def test_a_dynamic_batch_is_checked_by_its_bound_size():
    """A value whose size is known only at run time is checked before as any value of its
    bound size: a small batch every CHUNK steps (not before every step), a large one
    before each op; cancellation stops both part-way."""
    nodes = [Node("v0", "sin", ["x"])]
    nodes += [Node(f"v{i}", "sin", [f"v{i - 1}"]) for i in range(1, 200)]
    nodes.append(Node("L", "sum", [f"v{199}"]))
    plan = compile(Graph([Input("x", "float64", [-1])], nodes, ["L"]))

    def checks(size):
        calls = []
        x = {"x": np.linspace(0.1, 0.8, size)}
        plan.vjp(x, {"L": np.float64(1)}, check=lambda: calls.append(1))
        return len(calls)

    small, large = checks(8), checks(1 << 16)
    assert 2 * 2 <= small <= 2 * 8  # each sweep: at the start, then every CHUNK (64) steps
    assert large >= 2 * 200  # each sweep: before every op on 64K elements
    assert small < large

    class Gone(Exception):
        pass

    for size in (8, 1 << 16):
        calls = []

        def cancel():
            calls.append(1)
            if len(calls) > 2:
                raise Gone
        with pytest.raises(Gone):
            plan.vjp({"x": np.linspace(0.1, 0.8, size)}, {"L": np.float64(1)}, check=cancel)
        assert len(calls) == 3


class CountingInputs(dict):
    """Inputs that count how often the engine looks a value up (a bind reads each once)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.reads = 0

    def get(self, key, default=None):
        self.reads += 1
        return super().get(key, default)


@pytest.mark.parametrize("ask", [{}, {"mode": "forward", "tangents": {"x": np.ones(8)}},
                                 {"cotangents": {"L": np.float64(1)}}],
                         ids=["jacobian", "jvp", "vjp"])
def test_a_traced_request_binds_its_inputs_once(ask):
    plan = chain_plan(5)
    inputs = CountingInputs(X)
    if "tangents" in ask:
        ask = {k: v for k, v in ask.items() if k != "mode"}
    r = plan.differentiate(inputs, trace=True, **ask)
    assert inputs.reads == 1
    assert r.trace is not None and r.trace["L"].value == plan.evaluate(X)["L"]
