"""A node that reads one value many times (concat(x, x, ..., x, y)): values, every
derivative mode, second order, sparsity and traces equal independent oracles, and a
call's work follows the distinct values, not the references.

The oracle is the selection matrix S built by NumPy alone (support.oracles:
np.concatenate of the referenced inputs' element numbers says which input element each
output element copies). Then y = S x, the Jacobian is S, a VJP is S^T c, and for l = sum(y * y) the gradient is
2 S^T y and the Hessian 2 S^T S. Finite differences check the JVP besides.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import Graph, Input, Node, compile
from support.oracles import flatten, numeric_jvp, selection_matrix, unflatten

# (references, axis, size along the axis of each input): repeats, mixed distinct and
# repeated, an input of size 0 along the axis, one value only.
CASES = [
    (["a", "a", "a"], 0, {"a": 1}),
    (["a", "b", "a", "a", "c", "b", "a"], 1, {"a": 2, "b": 3, "c": 1}),
    (["b", "a", "b", "c", "c", "a"], 0, {"a": 3, "b": 1, "c": 0}),
    (["a", "b"] * 5 + ["c"], -1, {"a": 1, "b": 2, "c": 4}),
    (["c", "a", "c", "b", "c"], 2, {"a": 2, "b": 1, "c": 3}),
    # many inputs, each read once (the plan still gives the row their places)
    ([f"p{i}" for i in range(20)], 1, {f"p{i}": i % 3 for i in range(20)}),
    ([f"p{i}" for i in range(18)] * 2, 0, {f"p{i}": 1 + i % 2 for i in range(18)}),
]
OTHER = (2, 3, 2)  # the other axes' sizes (rank 3; axis 2 is the last)


def _shapes(axis, sizes):
    axis %= len(OTHER)
    return {name: tuple(size if j == axis else d for j, d in enumerate(OTHER))
            for name, size in sizes.items()}


def _graph(refs, axis, shapes, dtype, dynamic=False):
    inputs = [Input(name, dtype, [-1 if dynamic and j == axis % len(s) else d
                                  for j, d in enumerate(s)]) for name, s in shapes.items()]
    nodes = [Node("y", "concat", refs, {"axis": axis}), Node("q", "mul", ["y", "y"]),
             Node("l", "sum", ["q"])]
    return Graph(inputs, nodes, ["y", "l"])


def _setup(case, dtype, dynamic=False):
    refs, axis, sizes = case
    shapes = _shapes(axis, sizes)
    plan = compile(_graph(refs, axis, shapes, dtype, dynamic))
    rng = np.random.default_rng(len(refs) + axis)
    inputs = {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}
    return plan, inputs, shapes, selection_matrix(refs, axis, shapes)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)


PARAMS = [(case, dtype, dynamic) for case in CASES for dtype in ("float64", "float32")
          for dynamic in (False, True)]


@pytest.mark.parametrize("case,dtype,dynamic", PARAMS)
def test_values_and_first_order_equal_the_selection_oracle(case, dtype, dynamic):
    refs, axis, _ = case
    plan, inputs, shapes, s = _setup(case, dtype, dynamic)
    names = list(shapes)
    want = np.concatenate([inputs[r] for r in refs], axis=axis)
    out = plan.evaluate(inputs)["y"]
    assert out.dtype == np.dtype(dtype) and np.array_equal(out, want)
    assert_allclose(s @ flatten(inputs, names), want.ravel(), **_tol(dtype))

    rng = np.random.default_rng(7)
    k = 3
    tangents = {n: rng.standard_normal((k,) + sh).astype(dtype) for n, sh in shapes.items()}
    jvp = plan.jvp(inputs, tangents).tangents["y"]
    for d in range(k):
        assert_allclose(jvp[d].ravel(), s @ flatten({n: t[d] for n, t in tangents.items()},
                                                  names), **_tol(dtype))
    one = {n: t[0] for n, t in tangents.items()}
    f64 = {n: v.astype(np.float64) for n, v in inputs.items()}
    fd = numeric_jvp(lambda x: {"y": np.concatenate([x[r] for r in refs], axis=axis)}, f64,
                     one)
    assert_allclose(jvp[0], fd["y"], rtol=1e-5, atol=1e-5)

    cot = rng.standard_normal((k,) + want.shape).astype(dtype)
    vjp = plan.vjp(inputs, {"y": cot}, wrt=names).cotangents
    for d in range(k):
        pulled = unflatten(s.T @ cot[d].ravel().astype(np.float64), shapes)
        for n in names:
            assert vjp[n].dtype == np.dtype(dtype)
            assert_allclose(vjp[n][d], pulled[n], **_tol(dtype))

    for mode in ("forward", "reverse"):
        blocks = plan.jacobian(inputs, wrt=names, of=["y"], mode=mode,
                               sparsity="dense").jacobian
        full = np.concatenate([np.reshape(blocks["y", n], (want.size, -1)) for n in names],
                              axis=1)
        assert_allclose(full, s, **_tol(dtype))


@pytest.mark.parametrize("case,dtype,dynamic", PARAMS)
def test_second_order_equals_the_selection_oracle(case, dtype, dynamic):
    plan, inputs, shapes, s = _setup(case, dtype, dynamic)
    names = list(shapes)
    x = flatten(inputs, names)
    gradient = 2 * s.T @ (s @ x)
    hessian = 2 * s.T @ s
    rng = np.random.default_rng(3)
    vectors = {n: rng.standard_normal((2,) + sh).astype(dtype) for n, sh in shapes.items()}
    result = plan.hvp(inputs, vectors, of="l", wrt=names)
    want_g = unflatten(gradient, shapes)
    for n in names:
        assert_allclose(result.gradient[n], want_g[n], **_tol(dtype))
    for d in range(2):
        hv = unflatten(hessian @ flatten({n: v[d] for n, v in vectors.items()}, names), shapes)
        for n in names:
            assert_allclose(result.hvp[n][d], hv[n], **_tol(dtype))
    blocks = plan.hessian(inputs, of="l", wrt=names).hessian
    sizes = {n: int(np.prod(sh)) for n, sh in shapes.items()}
    full = np.block([[np.reshape(np.asarray(blocks[a, b].todense() if hasattr(
        blocks[a, b], "todense") else blocks[a, b]), (sizes[a], sizes[b])) for b in names]
        for a in names])
    assert_allclose(full, hessian, **_tol(dtype))


@pytest.mark.parametrize("case", CASES)
def test_sparse_jacobian_and_pattern_equal_the_selection_oracle(case):
    plan, inputs, shapes, s = _setup(case, "float64")
    names = list(shapes)
    blocks = plan.jacobian(inputs, wrt=names, of=["y"], sparsity="sparse").jacobian
    rows = s.shape[0]
    full = np.concatenate([np.reshape(np.asarray(blocks["y", n].todense()), (rows, -1))
                           for n in names], axis=1)
    assert_allclose(full, s, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_a_reverse_trace_sums_each_value_once(case):
    """A trace shows the node reading each distinct value once: its edge carries the sum
    of what every reference pulls back (the value's adjoint), which is S^T c."""
    refs, axis, _ = case
    plan, inputs, shapes, s = _setup(case, "float64")
    cot = np.random.default_rng(5).standard_normal(plan.evaluate(inputs)["y"].shape)
    trace = plan.trace(inputs, "reverse", cotangents={"y": cot})
    node = trace["y"]
    assert node.inputs == tuple(dict.fromkeys(refs))
    pulled = unflatten(s.T @ cot.ravel(), shapes)
    for edge in node.edges:
        assert_allclose(edge.cotangent, pulled[edge.input], rtol=1e-12, atol=1e-12)
        assert_allclose(trace[edge.input].adjoint, pulled[edge.input], rtol=1e-12,
                        atol=1e-12)


def test_integer_and_bool_values_repeat_too():
    for dtype, value in (("int64", np.arange(6).reshape(2, 3)),
                         ("bool", np.arange(6).reshape(2, 3) % 2 == 0)):
        g = Graph([Input("a", dtype, [2, 3]), Input("b", dtype, [2, 1])],
                  [Node("y", "concat", ["a", "b", "a", "b", "b"], {"axis": 1})], ["y"])
        b = value[:, :1]
        out = compile(g).evaluate({"a": value, "b": b})["y"]
        assert out.dtype == value.dtype
        assert np.array_equal(out, np.concatenate([value, b, value, b, b], axis=1))


def _cpu(run, repeat=3):
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def test_many_distinct_inputs_cost_each_call_once_each():
    """concat of 20,000 distinct inputs: the reverse sweep finds each input's slice at
    once (before, each vjp summed the sizes of the inputs before it: quadratic)."""
    many = 20_000
    names = [f"x{i}" for i in range(many)]
    g = Graph([Input(n, "float64", [1]) for n in names],
              [Node("c", "concat", names, {"axis": 0}), Node("o", "sum", ["c"])], ["o"])
    start = time.process_time()
    plan = compile(g)
    compiling = time.process_time() - start
    x = {n: np.array([float(i)]) for i, n in enumerate(names)}
    run = lambda: plan.vjp(x, {"o": np.float64(1.0)})  # noqa: E731
    gradient = run().cotangents
    assert all(gradient[n][0] == 1.0 for n in names)
    cpu = _cpu(run)
    assert cpu < 2 * compiling + 0.5, f"{cpu:.3f} CPU-s per VJP, {compiling:.3f} to compile"


def test_a_call_costs_what_the_distinct_values_cost_not_the_references():
    """concat of 200,000 references to two values: every mode's call takes far less CPU
    than reading the references once (compiling the plan); before, the reverse sweep
    pulled one cotangent per reference with a Python step each, and its offsets made it
    quadratic (16 CPU-s for 20,000 references)."""
    many = 200_000
    g = Graph([Input("x", "float32", [1]), Input("y", "float32", [1])],
              [Node("c", "concat", ["x"] * (many - 1) + ["y"], {"axis": 0}),
               Node("o", "sum", ["c"])], ["o"])
    compiling = _cpu(lambda: compile(g), repeat=1)
    plan = compile(g)
    x = {"x": np.float32([1.5]), "y": np.float32([2.0])}
    calls = {
        "evaluate": lambda: plan.evaluate(x),
        "jvp": lambda: plan.jvp(x, {"x": np.float32([1.0]), "y": np.float32([0.0])}),
        "vjp": lambda: plan.vjp(x, {"o": np.float32(1.0)}),
        "jacobian": lambda: plan.jacobian(x),
        "hvp": lambda: plan.hvp(x, {"x": np.float32([1.0]), "y": np.float32([1.0])}),
    }
    for run in calls.values():
        run()  # caches filled (costs, activity)
    gradient = plan.vjp(x, {"o": np.float32(1.0)}).cotangents
    assert gradient["x"] == np.float32(many - 1) and gradient["y"] == np.float32(1)
    for name, run in calls.items():
        cpu = _cpu(run)
        assert cpu < compiling / 4, (f"{name}: {cpu:.3f} CPU-s per call against "
                                     f"{compiling:.3f} to compile")


def test_sizes_known_only_at_run_time_change_from_call_to_call():
    """A plan whose sizes along the axis come with the inputs keeps the last call's
    layout: calls with other sizes, then the first ones again, still answer right."""
    refs = ["a", "b", "a", "a", "b", "c"]
    g = Graph([Input(n, "float64", [-1, 2]) for n in "abc"],
              [Node("y", "concat", refs, {"axis": 0})], ["y"])
    plan = compile(g)
    rng = np.random.default_rng(11)
    for sizes in ({"a": 1, "b": 2, "c": 0}, {"a": 3, "b": 1, "c": 2},
                  {"a": 2, "b": 2, "c": 1}, {"a": 1, "b": 2, "c": 0}):
        shapes = {n: (d, 2) for n, d in sizes.items()}
        x = {n: rng.standard_normal(s) for n, s in shapes.items()}
        s = selection_matrix(refs, 0, shapes)
        assert np.array_equal(plan.evaluate(x)["y"], np.concatenate([x[r] for r in refs]))
        cot = rng.standard_normal((2, s.shape[0] // 2, 2))
        pulled = plan.vjp(x, {"y": cot}).cotangents
        for d in range(2):
            want = unflatten(s.T @ cot[d].ravel(), shapes)
            for n in "abc":
                assert_allclose(pulled[n][d], want[n], rtol=1e-12, atol=1e-12)
