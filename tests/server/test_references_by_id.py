"""A graph that reads one value many times (concat(x, x, ..., x, y)) over real gRPC:
registered once, each call by id costs what its values and elements cost, not what its
references cost (issue 19 item 2), and its values and derivatives equal an oracle in every
mode.

Before, each call by id to a cached graph of 1,000,000 references walked them again:
~0.15 CPU-s for an Evaluate, and a reverse sweep pulled one cotangent per reference with
a quadratic offset sum (16 CPU-s for 20,000 references, hours for 1,000,000). The server
process's CPU time is read from /proc around the calls (no wall-clock assertions).
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.client import Client, GraphBuilder
from gradserve.server.limits import Limits

from support.oracles import flatten, selection_matrix, unflatten
from support.process_stats import cpu_seconds
from support.server_process import ServerProcess

REFERENCES = 1_000_000  # the default max_references: the most one graph may hold
X_READS = REFERENCES - 2  # concat reads x this often, and y once; sum reads the concat


def _many_references():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    c = g.concat([x] * X_READS + [y], axis=0, name="c")
    g.output("o", g.sum(c))
    return g


def test_calls_by_id_to_a_million_references_cost_far_less_than_registering():
    """One graph of 1,000,000 references (max_references), registered once; then every
    kind of call by its id (values, forward and reverse Jacobians, a JVP, a VJP, HVPs,
    the Hessian): each costs the server well under a quarter of the registration's CPU,
    and answers right (d o / d x = 999,998, d o / d y = 1, the Hessian 0)."""
    assert Limits().max_references == REFERENCES
    graph = _many_references()
    x = {"x": np.float32([1.5]), "y": np.float32([2.0])}
    with ServerProcess("--port", "0", "--max-connection-age", "0") as server:
        pid = server.proc.pid
        with Client(server.wait_serving(), timeout=300.0) as client:
            client.evaluate(_small(), {"a": np.float32([1.0])})  # warm: first-call imports
            before = cpu_seconds(pid)
            client.register(graph)
            registering = cpu_seconds(pid) - before
            calls = {
                "evaluate": lambda: client.evaluate(graph, x),
                "reverse": lambda: client.differentiate(graph, x, mode="reverse"),
                "forward": lambda: client.differentiate(graph, x, mode="forward"),
                "jvp": lambda: client.jvp(graph, x, {"x": np.float32([1.0]),
                                                     "y": np.float32([2.0])}),
                "vjp": lambda: client.vjp(graph, x, {"o": np.float32(3.0)}),
                "hvp": lambda: client.hvp(graph, x, {"x": np.float32([1.0]),
                                                     "y": np.float32([1.0])}, of="o"),
                "hessian": lambda: client.hessian(graph, x, of="o"),
            }
            results, spent = {}, {}
            for name, call in calls.items():
                costs = []
                for _ in range(3):
                    start = cpu_seconds(pid)
                    results[name] = call()
                    costs.append(cpu_seconds(pid) - start)
                spent[name] = sorted(costs)[1]
    summary = ", ".join(f"{k} {v:.3f}" for k, v in spent.items())
    for name, cpu in spent.items():
        assert cpu < registering / 4, (f"{name}: {cpu:.3f} CPU-s per call against "
                                       f"{registering:.3f} to register ({summary})")
    assert results["evaluate"]["o"] == np.float32(1.5 * (X_READS) + 2.0)
    for mode in ("reverse", "forward"):
        r = results[mode]
        assert r.mode == mode
        assert r.jacobian["o", "x"] == np.float32(X_READS)
        assert r.jacobian["o", "y"] == np.float32(1)
    assert results["jvp"][1]["o"] == np.float32(X_READS + 2)
    assert results["vjp"][1]["x"] == np.float32(3 * (X_READS))
    assert results["vjp"][1]["y"] == np.float32(3)
    gradient, hvp = results["hvp"]
    assert gradient["x"] == np.float32(X_READS) and gradient["y"] == np.float32(1)
    assert not np.any(hvp["x"]) and not np.any(hvp["y"])
    assert all(not np.any(np.asarray(block.todense() if hasattr(block, "todense") else block))
               for block in results["hessian"].values())


def _small():
    g = GraphBuilder()
    g.output("o", g.sin(g.input("a", "float32", [1])))
    return g


# Small versions of the same graph: repeated references, mixed distinct and repeated
# inputs, several axes (one of size 0 along it), float32 and float64.
CASES = [
    (["a", "a", "a"], 0, {"a": 1}),
    (["a", "b", "a", "a", "c", "b", "a"], 1, {"a": 2, "b": 3, "c": 1}),
    (["b", "a", "b", "c", "c", "a"], 0, {"a": 3, "b": 1, "c": 0}),
    (["c", "a", "c", "b", "c"], -1, {"a": 2, "b": 1, "c": 3}),
]
OTHER = (2, 3, 2)


def _case(case, dtype):
    """(graph: y = concat(refs), l = sum(y * y); inputs; shapes; the oracle S)."""
    refs, axis, sizes = case
    shapes = {name: tuple(size if j == axis % 3 else d for j, d in enumerate(OTHER))
              for name, size in sizes.items()}
    g = GraphBuilder()
    values = {name: g.input(name, dtype, list(s)) for name, s in shapes.items()}
    y = g.concat([values[r] for r in refs], axis=axis, name="y")
    g.output("y", y)
    g.output("l", g.sum(y * y))
    rng = np.random.default_rng(len(refs))
    inputs = {name: rng.standard_normal(s).astype(dtype) for name, s in shapes.items()}
    return g, inputs, shapes, selection_matrix(refs, axis, shapes)


def _dense(block):
    return np.asarray(block.todense() if hasattr(block, "todense") else block)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_small_graphs_of_repeated_references_equal_the_oracle(client, case, dtype):
    refs, axis, _ = case
    graph, inputs, shapes, s = _case(case, dtype)
    names = list(shapes)
    tol = dict(rtol=2e-6, atol=2e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    x = flatten(inputs, names)
    y = np.concatenate([inputs[r] for r in refs], axis=axis)
    out = client.evaluate(graph, inputs)
    assert out["y"].dtype == np.dtype(dtype) and np.array_equal(out["y"], y)
    assert_allclose(out["l"], np.sum(y.astype(np.float64) ** 2), rtol=1e-5 if dtype ==
                    "float32" else 1e-12)

    for mode in ("forward", "reverse"):
        for sparsity in ("dense", "sparse"):
            blocks = client.jacobian(graph, inputs, of=["y"], mode=mode, sparsity=sparsity)
            full = np.concatenate([_dense(blocks["y", n]).reshape(y.size, -1)
                                   for n in names], axis=1)
            assert_allclose(full, s, **tol)

    rng = np.random.default_rng(1)
    tangents = {n: rng.standard_normal(sh).astype(dtype) for n, sh in shapes.items()}
    _, tangent = client.jvp(graph, inputs, tangents)
    assert_allclose(tangent["y"].ravel(), s @ flatten(tangents, names), **tol)
    cot = rng.standard_normal(y.shape).astype(dtype)
    _, pulled = client.vjp(graph, inputs, {"y": cot, "l": np.zeros((), dtype)})
    want = unflatten(s.T @ cot.ravel().astype(np.float64), shapes)
    for n in names:
        assert_allclose(pulled[n], want[n], **tol)

    gradient, hvp = client.hvp(graph, inputs, tangents, of="l")
    want_g = unflatten(2 * s.T @ (s @ x), shapes)
    want_hv = unflatten(2 * s.T @ (s @ flatten(tangents, names)), shapes)
    for n in names:
        assert_allclose(gradient[n], want_g[n], **tol)
        assert_allclose(hvp[n], want_hv[n], **tol)
    hessian = client.hessian(graph, inputs, of="l")
    sizes = {n: int(np.prod(sh)) for n, sh in shapes.items()}
    full = np.block([[_dense(hessian[a, b]).reshape(sizes[a], sizes[b]) for b in names]
                     for a in names])
    assert_allclose(full, 2 * s.T @ s, **tol)
