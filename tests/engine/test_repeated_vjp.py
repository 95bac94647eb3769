"""A VJP asked again in the same form runs its reverse sweep as one generated function
(engine/compiled.py, Plan.run_vjp; engine/sweeps.py's compiled_reverse): the same bits
as the interpreter's sweep, the same checks, its compile memory declared on the call
that compiles (no room: the interpreter answers), and the forms it keeps bounded and
counted in the plan's cache_bytes."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from gradserve.engine import DeadlineExceeded, Graph, Input, Node, compile as compile_plan
from gradserve.engine import losses
from gradserve.engine.compiled import _ACTIVITY_BYTES, _VJP_SWEEPS_KEPT


def fanning_plan():
    """Values that fan out, are reduced to their shapes on the way (the 64K-element
    sin), square themselves (x * x) and reach no cotangent (u's branch is not wrt)."""
    return compile_plan(Graph(
        [Input("x", "float64", [256, 256]), Input("w", "float64", [256]),
         Input("u", "float64", [3])],
        [Node("a", "mul", ["x", "w"]), Node("b", "sin", ["a"]), Node("c", "mul", ["a", "b"]),
         Node("d", "mul", ["c", "c"]), Node("e", "add", ["d", "a"]),
         Node("s", "sum", ["e"], {"axes": [0]}), Node("t", "exp", ["u"]),
         Node("y", "mul", ["s", "s"])], ["y", "t"]))


def values(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((256, 256)) * 0.1, "w": rng.standard_normal(256),
            "u": rng.standard_normal(3)}


def seeds(k=None, seed=1):
    rng = np.random.default_rng(seed)
    shape = (256,) if k is None else (k, 256)
    return {"y": rng.standard_normal(shape)}


def compiled_forms(plan) -> int:
    return sum(1 for sweep in plan.vjp_sweeps.values() if sweep)


@pytest.mark.parametrize("k", [None, 3])
def test_a_repeated_vjp_answers_the_interpreters_bits(k):
    plan = compile_plan(fanning_plan().graph)
    assert any(st.drop for st in plan.steps)  # a value reduced to its shape on the way
    first = plan.vjp(values(), seeds(k), wrt=["x", "w"])
    assert compiled_forms(plan) == 0  # seen once: interpreted
    for _ in range(2):
        again = plan.vjp(values(), seeds(k), wrt=["x", "w"])
        assert compiled_forms(plan) == 1
        for name in ("y", "t"):
            np.testing.assert_array_equal(again.outputs[name], first.outputs[name])
        for name in ("x", "w"):
            np.testing.assert_array_equal(again.cotangents[name], first.cotangents[name])
    # and against the other mode: <g, J v> == <J^T g, v> for one direction
    rng = np.random.default_rng(7)
    v = {"x": rng.standard_normal((256, 256)), "w": rng.standard_normal(256)}
    jvp = plan.jvp(values(), v)
    g = seeds(k)["y"] if k is None else seeds(k)["y"][1]
    dot_vjp = sum(np.vdot(again.cotangents[n] if k is None else again.cotangents[n][1], v[n])
                  for n in v)
    np.testing.assert_allclose(np.vdot(g, jvp.tangents["y"]), dot_vjp, rtol=1e-9)


def test_other_forms_and_new_inputs_are_their_own():
    plan = fanning_plan()
    for _ in range(2):
        plan.vjp(values(), seeds(), wrt=["w"])
    by_w = plan.vjp(values(3), seeds(seed=4), wrt=["w"])  # compiled, other numbers
    fresh = compile_plan(plan.graph).vjp(values(3), seeds(seed=4), wrt=["w"])
    np.testing.assert_array_equal(by_w.cotangents["w"], fresh.cotangents["w"])
    assert set(by_w.cotangents) == {"w"}
    both = plan.vjp(values(), {"y": seeds()["y"], "t": np.ones(3)}, wrt=["w", "u"])
    assert compiled_forms(plan) == 1  # a new form: seen once
    np.testing.assert_allclose(both.cotangents["u"], np.exp(values()["u"]))


def test_the_compiled_sweep_checks_where_the_interpreter_does():
    plan = fanning_plan()
    counted = []
    for _ in range(3):
        checks = []
        plan.vjp(values(), seeds(), wrt=["x", "w"], check=lambda: checks.append(1))
        counted.append(len(checks))
    assert compiled_forms(plan) == 1
    assert counted[0] == counted[1] == counted[2] > 0

    def cancel():
        raise DeadlineExceeded("gone")
    with pytest.raises(DeadlineExceeded, match="gone"):
        plan.vjp(values(), seeds(), wrt=["x", "w"], check=cancel)


def least_bytes(plan, call) -> int:
    """The smallest max_bytes under which `call(plan, max_bytes)` is admitted."""
    lo, hi = 1, 1 << 34
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            call(compile_plan(plan.graph), mid)
            hi = mid
        except Exception:  # noqa: BLE001 - ResourceLimitError: too little
            lo = mid + 1
    return lo


def test_the_compile_is_admitted_with_its_memory():
    plan = fanning_plan()
    def vjp(p, max_bytes):
        return p.vjp(values(), seeds(), wrt=["w"], max_bytes=max_bytes)
    least = least_bytes(plan, vjp)
    plan.vjp(values(), seeds(), wrt=["w"])  # seen once
    vjp(plan, least)  # no room to compile: answered by the interpreter
    assert compiled_forms(plan) == 0
    tracemalloc.start()
    try:
        vjp(plan, least + losses.plan_compile_bytes(plan))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert compiled_forms(plan) == 1
    assert peak <= least + losses.plan_compile_bytes(plan)  # what it was admitted with


def kept_sweeps_bytes(plan) -> int:
    """What the plan's cache_bytes counts for its kept VJP forms."""
    counted = plan.cache_bytes
    kept = dict(plan.vjp_sweeps)
    plan.vjp_sweeps.clear()
    try:
        return counted - plan.cache_bytes
    finally:
        plan.vjp_sweeps.update(kept)


def test_the_forms_kept_are_bounded_and_counted():
    plan = fanning_plan()
    form = len(plan.steps) * _ACTIVITY_BYTES + plan._names_entry_bytes
    plan.vjp(values(), seeds(), wrt=["x"])
    assert kept_sweeps_bytes(plan) == form  # seen once
    plan.vjp(values(), seeds(), wrt=["x"])
    assert kept_sweeps_bytes(plan) == form + losses.kept_bytes(plan)  # compiled
    wrts = [["x"], ["w"], ["u"], ["x", "w"], ["w", "x"], ["x", "u"], ["u", "w"],
            ["x", "w", "u"], ["w", "u", "x"], ["u", "x", "w"]]
    assert len(wrts) > _VJP_SWEEPS_KEPT
    for wrt in wrts:
        for _ in range(2):
            plan.vjp(values(), seeds(), wrt=wrt)
    assert len(plan.vjp_sweeps) == _VJP_SWEEPS_KEPT
    assert kept_sweeps_bytes(plan) == _VJP_SWEEPS_KEPT * (form + losses.kept_bytes(plan))


def test_a_plan_too_long_to_compile_keeps_no_forms(monkeypatch):
    monkeypatch.setattr(losses, "COMPILED_MAX_STEPS", 3)
    plan = fanning_plan()
    first = plan.vjp(values(), seeds(), wrt=["x", "w"])
    again = plan.vjp(values(), seeds(), wrt=["x", "w"])
    assert plan.vjp_sweeps == {} and kept_sweeps_bytes(plan) == 0
    np.testing.assert_array_equal(again.cotangents["w"], first.cotangents["w"])


def test_names_checked_before_are_taken_and_bad_ones_still_refused():
    plan = fanning_plan()
    for _ in range(3):
        plan.vjp(values(), seeds(), wrt=["x", "w"])
    fresh = compile_plan(plan.graph)
    for wrt, cot in ((["x", "nope"], seeds()), (["w", "w"], seeds()), (["x", "w"], {"s": 1.0}),
                     (["y"], seeds())):
        with pytest.raises(Exception) as got:
            plan.vjp(values(), cot, wrt=wrt)
        with pytest.raises(Exception) as expected:
            fresh.vjp(values(), cot, wrt=wrt)
        assert type(got.value) is type(expected.value)
        assert str(got.value) == str(expected.value)
    assert plan.wrt_names(("w", "x")) == ("w", "x")
    assert plan.wrt_names(None) == plan.float_inputs
