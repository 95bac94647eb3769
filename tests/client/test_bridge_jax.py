"""gradserve.client.jax: a registered graph as a JAX function, against a real server on
loopback through the real Client.

Oracles: jax.test_util.check_grads (finite differences, both modes), the service's own
JVP and Jacobian, the same computation written in jax.numpy, and the published seed
figures.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from numpy.testing import assert_allclose

jax = pytest.importorskip("jax", reason="JAX is not installed: pip install 'gradserve[jax]' "
                          "to test the JAX bridge")

import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

from support.bridge_cases import (CountingClient, builder_from_engine,  # noqa: E402
                                  finite_difference_jvp, random_tangents)
from support.graphs import PUBLISHED_DODX, PUBLISHED_DODY  # noqa: E402
from gradserve.client import Client, GraphBuilder  # noqa: E402
from gradserve.client.jax import RemoteError, remote_function  # noqa: E402
from gradserve.server.limits import Limits  # noqa: E402
from support.graphs import valid_graphs  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64 graphs need 64-bit JAX arrays

GRAPH_SETTINGS = settings(max_examples=15, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def counting(address):
    with CountingClient(address, timeout=30.0) as c:
        yield c


def arrays(inputs):
    return tuple(jnp.asarray(v) for v in inputs.values())


def seed_values(shape=(3,), seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-2, 2, shape), "y": rng.uniform(-2, 2, shape)}


# --- the seed example -------------------------------------------------------------------


def test_seed_float32_gives_the_published_gradient(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float32"))
    dodx, dody = jax.grad(lambda x, y: f(x, y).sum(), argnums=(0, 1))(
        *arrays(seed_inputs("float32")))
    assert dodx.dtype == dody.dtype == jnp.float32
    assert abs(dodx.item() - PUBLISHED_DODX) < 1e-4
    assert abs(dody.item() - PUBLISHED_DODY) < 1e-11


def test_check_grads_seed_float64(client, seed_builder):
    f = remote_function(client, seed_builder("float64", (3,)))
    check_grads(f, arrays(seed_values()), order=1, modes=["fwd", "rev"])


@GRAPH_SETTINGS
@given(valid_graphs())
def test_check_grads_random_graph(client, case):
    graph, inputs = case
    f = remote_function(client, builder_from_engine(graph))
    check_grads(f, arrays(inputs), order=1, modes=["fwd", "rev"])


# --- forward mode -----------------------------------------------------------------------


@GRAPH_SETTINGS
@given(valid_graphs())
def test_jvp_matches_the_service_and_finite_differences(client, case):
    graph, inputs = case
    g = builder_from_engine(graph)
    f = remote_function(client, g)
    tangents = random_tangents(inputs)

    _, got = jax.jvp(f, arrays(inputs), arrays(tangents))

    got = got if isinstance(got, tuple) else (got,)
    _, service = client.jvp(g, inputs, tangents)
    numeric = finite_difference_jvp(client, g, inputs, tangents)
    for name, t in zip(graph.outputs, got):
        assert_allclose(np.asarray(t), service[name], rtol=1e-12, atol=1e-14)
        assert_allclose(np.asarray(t), numeric[name], rtol=1e-5, atol=1e-7)


# --- jit and what each call asks of the service -----------------------------------------


def round_trips(calls) -> dict:
    """Requests by kind: an Evaluate that keeps residuals is still one Evaluate."""
    merged = {k: v for k, v in calls.items() if k not in ("evaluate_for_vjp",
                                                            "vjp_from_residuals")}
    if calls.get("evaluate_for_vjp"):
        merged["evaluate"] = merged.get("evaluate", 0) + calls["evaluate_for_vjp"]
    return merged


def test_round_trips(counting, seed_builder):
    f = remote_function(counting, seed_builder("float64", (-1,)))
    x, y = arrays(seed_values())
    loss = lambda x, y: f(x, y).sum()  # noqa: E731
    assert counting.calls == {"register": 1}

    counting.calls.clear()
    jax.grad(loss)(x, y)  # values, then the VJP of x alone
    assert round_trips(counting.calls) == {"evaluate": 1, "vjp": 1}
    assert counting.calls["vjp_from_residuals"] == 1  # the server's second forward spared

    counting.calls.clear()
    jax.jvp(f, (x, y), (jnp.ones(3), jnp.zeros(3)))
    assert round_trips(counting.calls) == {"evaluate": 1, "jvp": 1}

    counting.calls.clear()
    step = jax.jit(jax.value_and_grad(loss))
    step(x, y)  # the trace knows the output shapes from the calls above
    assert round_trips(counting.calls) == {"evaluate": 1, "vjp": 1}
    counting.calls.clear()
    step(x + 1, y)
    assert round_trips(counting.calls) == {"evaluate": 1, "vjp": 1}
    counting.calls.clear()
    step(jnp.ones(5), jnp.ones(5))  # a new size: the trace learns the output shapes
    assert round_trips(counting.calls) == {"evaluate": 2, "vjp": 1}  # from an Evaluate of zeros

    grad = jax.jit(jax.grad(loss))
    grad(x, y)
    counting.calls.clear()
    grad(x, y)  # XLA drops the Evaluate whose values nothing reads: the VJP alone
    assert round_trips(counting.calls) == {"vjp": 1}


def test_jit_gives_the_eager_results(client, seed_builder):
    f = remote_function(client, seed_builder("float64", (3,)))
    x, y = arrays(seed_values())
    t = jnp.asarray(random_tangents({"x": x})["x"])

    grads = jax.grad(lambda x, y: f(x, y).sum(), argnums=(0, 1))
    for a, b in zip(jax.jit(grads)(x, y), grads(x, y)):
        assert_allclose(a, b, rtol=1e-15)
    jvp = lambda x, y, t: jax.jvp(f, (x, y), (t, t))  # noqa: E731
    for a, b in zip(jax.jit(jvp)(x, y, t), jvp(x, y, t)):
        assert_allclose(a, b, rtol=1e-15)


def test_gradient_descent_matches_jax_numpy(client):
    """A fit whose loss is computed remotely reaches the parameters the same fit in
    jax.numpy reaches."""
    g = GraphBuilder()
    w, x, y = g.input("w", "float64", [3]), g.input("x", "float64", [-1, 3]), \
        g.input("y", "float64", [-1])
    r = g.tanh(x @ w) - y
    g.output("loss", g.mean(r * r))
    remote = remote_function(client, g)
    local = lambda w, x, y: jnp.mean((jnp.tanh(x @ w) - y) ** 2)  # noqa: E731
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.uniform(-1, 1, (16, 3)))
    y = jnp.tanh(x @ jnp.asarray([0.5, -1.0, 2.0]))

    def fit(loss):
        step = jax.jit(lambda w: w - 0.5 * jax.grad(loss)(w, x, y))
        w = jnp.zeros(3)
        for _ in range(30):
            w = step(w)
        return w

    assert_allclose(fit(remote), fit(local), rtol=1e-12)
    assert remote(fit(remote), x, y) < remote(jnp.zeros(3), x, y) / 4


def test_outputs_by_name_and_order(client):
    g = GraphBuilder()
    x, i = g.input("x", "float64", [4]), g.input("i", "int64", [2])
    g.output("picked", g.take(x, i))
    g.output("total", g.sum(x * x))
    g.output("big", g.greater(x, 0.5))
    f = remote_function(client, g, outputs=["total", "picked"])
    x, i = jnp.arange(4.0), jnp.asarray([3, 3])

    total, picked = f(i=i, x=x)
    grad = jax.grad(lambda x: f(x, i)[0] + f(x, i)[1].sum())(x)

    assert total == 14.0 and picked.tolist() == [3.0, 3.0]
    assert grad.tolist() == [0.0, 2.0, 4.0, 8.0]
    big = remote_function(client, g, outputs="big")
    assert big(x, i).dtype == jnp.bool_
    assert jax.grad(lambda x: jnp.where(big(x, i), x, 0.0).sum())(x).tolist() == [0, 1, 1, 1]


# --- batching ---------------------------------------------------------------------------


def test_jacobians_are_one_request_each(counting, seed_builder):
    g = seed_builder("float64", (3,))
    f = remote_function(counting, g)
    inputs = seed_values(seed=2)
    want = counting.jacobian(g, inputs)
    counting.calls.clear()

    rev = jax.jacrev(f, argnums=(0, 1))(*arrays(inputs))
    assert round_trips(counting.calls) == {"evaluate": 1, "vjp": 1}  # 3 directions, one request
    fwd = jax.jacfwd(f, argnums=(0, 1))(*arrays(inputs))
    assert round_trips(counting.calls) == {"evaluate": 2, "vjp": 1, "jvp": 1}

    for n, name in enumerate("xy"):
        assert_allclose(rev[n], want["o", name], rtol=1e-14)
        assert_allclose(fwd[n], want["o", name], rtol=1e-14)


def test_nested_vmap_of_seeds_is_one_request(counting, seed_builder):
    f = remote_function(counting, seed_builder("float64", (2,)))
    x, y = jnp.asarray([0.3, 1.2]), jnp.asarray([-0.4, 0.9])
    _, pullback = jax.vjp(f, x, y)
    seeds = jnp.asarray(np.random.default_rng(4).standard_normal((4, 5, 2)))
    counting.calls.clear()

    gx, gy = jax.vmap(jax.vmap(pullback))(seeds)
    jvp = lambda t: jax.jvp(f, (x, y), (t, t))[1]  # noqa: E731
    tangents = jax.jit(jax.vmap(jax.vmap(jvp), in_axes=1))(seeds)  # batch axes 1, then 0

    dodx, dody = jnp.sin(x) + (x + y) * jnp.cos(x), jnp.sin(x)
    assert_allclose(gx, seeds * dodx, rtol=1e-13)
    assert_allclose(gy, seeds * dody, rtol=1e-13)
    assert_allclose(tangents, jnp.moveaxis(seeds, 1, 0) * (dodx + dody), rtol=1e-13)
    assert counting.calls["vjp"] == 1 and counting.calls["jvp"] == 1


def test_vmap_over_primal_inputs_is_a_clear_error(client, seed_builder):
    f = remote_function(client, seed_builder("float64", (2,)))
    batch = jnp.ones((3, 2))
    with pytest.raises(NotImplementedError, match="vmap over the primal inputs.*-1"):
        jax.vmap(f)(batch, batch)


# --- errors -----------------------------------------------------------------------------


def test_errors_in_reverse_mode_are_remote_errors(start_server):
    """Values within the server's limits, the Jacobian's 1000 directions over them."""
    server = start_server(Limits(max_intermediate_bytes=1 << 20))
    g = GraphBuilder()
    g.output("o", g.sin(g.input("x", "float64", [1000])))
    with Client(f"127.0.0.1:{server.port}") as client:
        f = remote_function(client, g)
        x = jnp.ones(1000)
        assert f(x).shape == (1000,)
        with pytest.raises(RemoteError, match="VJP.*RESOURCE_EXHAUSTED.*1000 seed directions"):
            jax.jacrev(f)(x)


def matmul_graph():
    g = GraphBuilder()
    a, b = g.input("a", "float64", [3, 4]), g.input("b", "float64", [-1, 2])
    g.output(g.matmul(a, b, name="h2"))
    return g


def test_service_errors_name_node_and_field(client):
    f = remote_function(client, matmul_graph())
    a, b = jnp.zeros((3, 4)), jnp.zeros((5, 2))
    for call in (f, jax.jit(f)):  # under jit, when the trace learns the output shapes
        with pytest.raises(RemoteError, match=r"node 'h2' \(matmul\).*do not align.*field"):
            call(a, b)


def test_value_errors_under_jit_name_node_and_field(client):
    g = GraphBuilder()
    x, i = g.input("x", "float64", [4]), g.input("i", "int64", [1])
    g.output("o", g.take(x, i))
    f = remote_function(client, g)
    x = jnp.zeros(4)
    with pytest.raises(RemoteError, match=r"node 'o' \(take\).*field graph\['o'\]\.inputs\[1\]"):
        f(x, jnp.asarray([9]))
    # Under jit the index is known only when the callback runs: JAX wraps the error,
    # and its message still carries ours.
    with pytest.raises(jax.errors.JaxRuntimeError,
                       match=r"RemoteError.*node 'o' \(take\).*inputs\[1\]"):
        jax.jit(f)(x, jnp.asarray([9])).block_until_ready()


def test_numbers_and_numpy_arrays_as_arguments(client, seed_builder):
    f = remote_function(client, seed_builder("float64", ()))
    assert_allclose(f(np.float64(0.5), y=1.0), 1.5 * np.sin(0.5), rtol=1e-15)
    with pytest.raises(TypeError, match="input 'x' is float64 in the graph, got float32"):
        f(np.float32(0.5), 1.0)  # arrays keep their dtype: the service never casts


def test_argument_errors(client, seed_builder):
    f = remote_function(client, seed_builder("float64"))
    x = jnp.zeros(1)
    with pytest.raises(TypeError, match="input 'y' is float64 in the graph, got float32"):
        f(x, jnp.zeros(1, jnp.float32))
    with pytest.raises(TypeError, match=r"missing graph inputs \['y'\]"):
        f(x)
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(TypeError, match="jax_enable_x64"):
            f(x, x)
    finally:
        jax.config.update("jax_enable_x64", True)


def test_second_derivatives_are_a_clear_error(client, seed_builder):
    f = remote_function(client, seed_builder("float64", ()))
    with pytest.raises(NotImplementedError, match="second derivatives"):
        jax.hessian(lambda x: f(x, x))(jnp.asarray(1.0))
