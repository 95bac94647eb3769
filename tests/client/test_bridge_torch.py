"""gradserve.client.torch: a registered graph as a PyTorch function, against a real server
on loopback through the real Client.

Oracles: the same model computed entirely in PyTorch, torch.autograd.gradcheck (finite
differences), the service's own JVP and Jacobian, and the published seed figures.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from numpy.testing import assert_allclose

torch = pytest.importorskip("torch", reason="PyTorch is not installed: pip install "
                            "'gradserve[torch]' (torch==2.13.0) to test the PyTorch bridge")

from support.bridge_cases import (CountingClient, builder_from_engine,  # noqa: E402
                                  finite_difference_jvp, random_tangents)
from support.graphs import PUBLISHED_DODX, PUBLISHED_DODY  # noqa: E402
from gradserve.client import Client, GraphBuilder  # noqa: E402
from gradserve.client.torch import RemoteError, remote_function  # noqa: E402
from gradserve.server.limits import Limits  # noqa: E402
from support.graphs import valid_graphs  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}
GRAPH_SETTINGS = settings(max_examples=15, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture
def counting(address):
    with CountingClient(address, timeout=30.0) as c:
        yield c


def tensors(inputs, requires_grad=False):
    return {k: torch.tensor(np.array(v), requires_grad=requires_grad) for k, v in inputs.items()}


# --- the seed example -------------------------------------------------------------------


def test_seed_float32_gives_the_published_gradient(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float32"))
    x, y = tensors(seed_inputs("float32"), requires_grad=True).values()

    o = f(x, y)
    o.sum().backward()

    assert o.dtype == x.grad.dtype == y.grad.dtype == torch.float32
    assert abs(x.grad.item() - PUBLISHED_DODX) < 1e-4
    assert abs(y.grad.item() - PUBLISHED_DODY) < 1e-11
    pi = torch.tensor([np.pi], dtype=torch.float32, requires_grad=True)
    want = (pi + pi.detach()) * torch.sin(pi)  # PyTorch's own figure
    want.backward()
    assert_allclose(x.grad.numpy(), pi.grad.numpy(), rtol=1e-6)


def test_gradcheck_seed_float64(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float64", (3,)))
    rng = np.random.default_rng(0)
    x, y = (torch.tensor(rng.uniform(-2, 2, 3), requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(f, (x, y), check_forward_ad=True)


@GRAPH_SETTINGS
@given(valid_graphs())
def test_gradcheck_random_graph(client, case):
    graph, inputs = case
    f = remote_function(client, builder_from_engine(graph))
    args = tuple(tensors(inputs, requires_grad=True).values())
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True)


# --- forward mode -----------------------------------------------------------------------


@GRAPH_SETTINGS
@given(valid_graphs())
def test_forward_mode_matches_the_service_and_finite_differences(client, case):
    graph, inputs = case
    g = builder_from_engine(graph)
    f = remote_function(client, g)
    tangents = random_tangents(inputs)

    _, got = torch.func.jvp(f, tuple(tensors(inputs).values()),
                            tuple(tensors(tangents).values()))

    got = got if isinstance(got, tuple) else (got,)
    _, service = client.jvp(g, inputs, tangents)
    numeric = finite_difference_jvp(client, g, inputs, tangents)
    for name, t in zip(graph.outputs, got):
        assert_allclose(t.numpy(), service[name], rtol=1e-12, atol=1e-14)
        assert_allclose(t.numpy(), numeric[name], rtol=1e-5, atol=1e-7)


def test_forward_ad_dual_tensors(client, seed_builder, seed_inputs):
    import torch.autograd.forward_ad as fwAD
    f = remote_function(client, seed_builder("float64"))
    x, y = tensors(seed_inputs("float64")).values()
    with fwAD.dual_level():
        o = f(fwAD.make_dual(x, torch.ones_like(x)), y)
        tangent = fwAD.unpack_dual(o).tangent
    assert_allclose(tangent.numpy(), [-2 * np.pi], rtol=1e-14)


# --- training: a model with a remote graph inside --------------------------------------


def hidden_layer_graph(dtype):
    """z = tanh(h) @ w: the part of the model the service computes."""
    g = GraphBuilder()
    h, w = g.input("h", dtype, [-1, 4]), g.input("w", dtype, [4, 1])
    g.output("z", g.tanh(h) @ w)
    return g


class Model(torch.nn.Module):
    def __init__(self, dtype, remote=None):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Linear(3, 4, dtype=dtype)
        self.w = torch.nn.Parameter(torch.randn(4, 1, dtype=dtype))
        self.remote = remote

    def forward(self, x):
        h = self.first(x)
        if self.remote is not None:
            return self.remote(h, self.w)
        return torch.tanh(h) @ self.w


def train(model, dtype, steps=25):
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.uniform(-1, 1, (32, 3)), dtype=dtype)
    y = torch.sin(x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-10), ("float32", 1e-4)])
def test_training_matches_pytorch(counting, dtype, rtol):
    remote = Model(DTYPES[dtype], remote_function(counting, hidden_layer_graph(dtype)))
    local = Model(DTYPES[dtype])

    remote_losses, local_losses = train(remote, DTYPES[dtype]), train(local, DTYPES[dtype])

    assert remote_losses[-1] < remote_losses[0] / 2  # it learns
    assert_allclose(remote_losses, local_losses, rtol=rtol)
    for (name, p), q in zip(remote.named_parameters(), local.parameters()):
        assert p.dtype == DTYPES[dtype]
        assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=rtol, atol=rtol / 10,
                        err_msg=name)
    # each step: one Evaluate keeping residuals (forward) and one VJP from them (backward):
    # two round trips, one forward sweep on the server
    assert counting.calls == {"register": 1, "evaluate_for_vjp": 25, "vjp": 25,
                              "vjp_from_residuals": 25}


# --- what each call asks of the service -------------------------------------------------


def test_backward_asks_only_for_inputs_that_require_grad(counting, seed_builder, seed_inputs):
    f = remote_function(counting, seed_builder("float64"))
    x, y = tensors(seed_inputs("float64")).values()
    x.requires_grad_(True)

    f(x, y).sum().backward()

    assert y.grad is None
    assert_allclose(x.grad.numpy(), [-2 * np.pi], rtol=1e-14)
    assert counting.calls == {"register": 1, "evaluate_for_vjp": 1, "vjp": 1,
                              "vjp_from_residuals": 1}


def test_no_round_trip_without_gradients(counting, seed_builder, seed_inputs):
    f = remote_function(counting, seed_builder("float64"))
    with torch.no_grad():
        f(**tensors(seed_inputs("float64")))
    assert counting.calls == {"register": 1, "evaluate": 1}


def test_outputs_by_name_and_order(client):
    g = GraphBuilder()
    x, i = g.input("x", "float64", [4]), g.input("i", "int64", [2])
    g.output("picked", g.take(x, i))
    g.output("total", g.sum(x * x))
    g.output("big", g.greater(x, 0.5))
    f = remote_function(client, g, outputs=["total", "picked"])
    x = torch.arange(4.0, dtype=torch.float64, requires_grad=True)

    total, picked = f(i=torch.tensor([3, 3]), x=x)
    (total + picked.sum()).backward()

    assert total.item() == 14.0 and picked.tolist() == [3.0, 3.0]
    assert x.grad.tolist() == [0.0, 2.0, 4.0, 8.0]
    big = remote_function(client, g, outputs="big")(x, torch.tensor([0, 1]))
    assert big.dtype == torch.bool and not big.requires_grad


def test_an_unused_output_sends_no_cotangent(counting):
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    g.output("a", g.sin(x))
    g.output("b", g.exp(x))
    f = remote_function(counting, g)
    x = torch.tensor([0.5, 1.0], dtype=torch.float64, requires_grad=True)
    a, b = f(x)
    a.sum().backward()
    assert_allclose(x.grad.numpy(), np.cos([0.5, 1.0]), rtol=1e-14)
    assert counting.calls["vjp"] == 1


# --- batching ---------------------------------------------------------------------------


def test_jacobians_are_one_request_each(counting, seed_builder):
    g = seed_builder("float64", (3,))
    f = remote_function(counting, g)
    rng = np.random.default_rng(2)
    inputs = {"x": rng.uniform(-2, 2, 3), "y": rng.uniform(-2, 2, 3)}
    want = counting.jacobian(g, inputs)
    counting.calls.clear()

    rev = torch.func.jacrev(f, argnums=(0, 1))(*tensors(inputs).values())
    # 3 directions, one request, from the residuals the forward left on the server
    assert counting.calls == {"evaluate_for_vjp": 1, "vjp": 1, "vjp_from_residuals": 1}
    fwd = torch.func.jacfwd(f, argnums=(0, 1))(*tensors(inputs).values())
    assert counting.calls == {"evaluate_for_vjp": 1, "vjp": 1, "vjp_from_residuals": 1,
                              "evaluate": 1, "jvp": 1}

    for n, name in enumerate("xy"):
        assert_allclose(rev[n].numpy(), want["o", name], rtol=1e-14)
        assert_allclose(fwd[n].numpy(), want["o", name], rtol=1e-14)


def test_vmap_over_cotangents_and_tangents(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float64", (2,)))
    x, y = (torch.tensor([0.3, 1.2], dtype=torch.float64) for _ in range(2))
    _, pullback = torch.func.vjp(f, x, y)
    seeds = torch.randn(5, 2, dtype=torch.float64)

    gx, gy = torch.func.vmap(pullback)(seeds)

    dodx, dody = torch.sin(x) + (x + y) * torch.cos(x), torch.sin(x)
    assert_allclose(gx.numpy(), (seeds * dodx).numpy(), rtol=1e-13)
    assert_allclose(gy.numpy(), (seeds * dody).numpy(), rtol=1e-13)
    tangents = torch.func.vmap(lambda t: torch.func.jvp(f, (x, y), (t, t))[1])(seeds)
    assert_allclose(tangents.numpy(), (seeds * (dodx + dody)).numpy(), rtol=1e-13)


def test_vmap_over_primal_inputs_is_a_clear_error(client, seed_builder):
    f = remote_function(client, seed_builder("float64", (2,)))
    batch = torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="vmap over the primal inputs.*-1"):
        torch.func.vmap(f)(batch, batch)


def test_older_vmap_is_a_clear_error(client, seed_builder):
    f = remote_function(client, seed_builder("float64", (3,)))
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="torch.func.vmap"):
        torch.autograd.grad(f(x, x), x, torch.eye(3, dtype=torch.float64),
                            is_grads_batched=True)


# --- errors -----------------------------------------------------------------------------


def test_errors_in_backward_are_remote_errors(start_server):
    """Values within the server's limits, the Jacobian's 1000 directions over them."""
    server = start_server(Limits(max_intermediate_bytes=1 << 20))
    g = GraphBuilder()
    g.output("o", g.sin(g.input("x", "float64", [1000])))
    with Client(f"127.0.0.1:{server.port}") as client:
        f = remote_function(client, g)
        x = torch.ones(1000, dtype=torch.float64)
        assert f(x).shape == (1000,)
        with pytest.raises(RemoteError, match="VJP.*RESOURCE_EXHAUSTED.*1000 seed directions"):
            torch.func.jacrev(f)(x)


def test_service_errors_name_node_and_field(client):
    g = GraphBuilder()
    a, b = g.input("a", "float64", [3, 4]), g.input("b", "float64", [-1, 2])
    g.output(g.matmul(a, b, name="h2"))
    f = remote_function(client, g)
    with pytest.raises(RemoteError, match=r"node 'h2' \(matmul\).*do not align.*field graph"):
        f(torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5, 2, dtype=torch.float64))


def test_index_error_in_forward_names_node_and_field(client):
    g = GraphBuilder()
    x, i = g.input("x", "float64", [4]), g.input("i", "int64", [1])
    g.output("o", g.take(x, i))
    f = remote_function(client, g)
    with pytest.raises(RemoteError) as info:
        f(torch.zeros(4, dtype=torch.float64, requires_grad=True), torch.tensor([9]))
    assert "node 'o' (take)" in str(info.value) and "inputs[1]" in info.value.field
    assert info.value.code().name == "INVALID_ARGUMENT"


def test_numbers_and_numpy_arrays_as_arguments(client, seed_builder):
    f = remote_function(client, seed_builder("float64", ()))
    assert_allclose(f(np.float64(0.5), y=1.0).item(), 1.5 * np.sin(0.5), rtol=1e-15)
    with pytest.raises(TypeError, match="input 'x' is float64 in the graph, got float32"):
        f(np.float32(0.5), 1.0)  # arrays keep their dtype: the service never casts


def test_argument_errors(client, seed_builder):
    f = remote_function(client, seed_builder("float64"))
    x = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(TypeError, match="input 'y' is float64 in the graph, got float32"):
        f(x, torch.zeros(1))
    with pytest.raises(TypeError, match=r"missing graph inputs \['y'\]"):
        f(x)
    with pytest.raises(TypeError, match="unknown input 'z'"):
        f(x, x, z=x)
    with pytest.raises(ValueError, match="distinct graph outputs"):
        remote_function(client, seed_builder("float64"), outputs=["nope"])


def test_second_derivatives_are_a_clear_error(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float64"))
    x, y = tensors(seed_inputs("float64"), requires_grad=True).values()
    (gx,) = torch.autograd.grad(f(x, y).sum(), x, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives"):
        gx.sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_tensors_go_to_the_cpu_and_back(client, seed_builder, seed_inputs):
    f = remote_function(client, seed_builder("float64"))
    x, y = (t.cuda().requires_grad_() for t in tensors(seed_inputs("float64")).values())
    o = f(x, y)
    o.sum().backward()
    assert o.device == x.grad.device == y.grad.device == x.device
