"""TrainSteps: K SGD steps with momentum in one call equal K steps made one
Differentiate at a time with the worker's own update rule (bitwise: the same
gradients, the same float32 arithmetic), and bad requests are refused by field."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradserve.client import GraphBuilder
from gradserve.server.limits import Limits
from gradserve.client import Client


def model():
    g = GraphBuilder()
    x = g.input("X", "float32", [-1, 4])
    w = g.input("W", "float32", [4, 3])
    b = g.input("b", "float32", [3])
    y = g.input("Y", "float32", [-1, 3])
    g.output("loss", g.mean(g.square(g.tanh(x @ w + b) - y)))
    return g


def data(k=6, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return ({"X": rng.standard_normal((k, batch, 4)).astype(np.float32),
             "Y": rng.standard_normal((k, batch, 3)).astype(np.float32)},
            {"W": rng.standard_normal((4, 3)).astype(np.float32),
             "b": np.zeros(3, np.float32)})


def one_step_at_a_time(client, g, batches, params, lr, momentum):
    """The worker's loop: one Differentiate per step, PyTorch's SGD rule in float32."""
    params = dict(params)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    losses = []
    for k in range(len(next(iter(batches.values())))):
        r = client.differentiate(g, {**{n: b[k] for n, b in batches.items()}, **params},
                                 wrt=list(params), of=["loss"])
        losses.append(float(r.outputs["loss"]))
        for name, p in params.items():
            velocity[name] = np.float32(momentum) * velocity[name] + r.jacobian["loss", name]
            params[name] = (p - np.float32(lr) * velocity[name]).astype(np.float32)
    return params, velocity, losses


def test_k_steps_in_one_call_equal_k_calls(client):
    g = model()
    batches, params = data()
    result = client.train_steps(g, params, batches, learning_rate=0.1, momentum=0.9)
    expected, velocity, losses = one_step_at_a_time(client, g, batches, params, 0.1, 0.9)
    for name in params:
        np.testing.assert_array_equal(result.parameters[name], expected[name])
        np.testing.assert_array_equal(result.velocity[name], velocity[name])
        assert result.parameters[name].dtype == np.float32
    assert result.losses == losses
    assert losses[-1] < losses[0]
    # continuing from the returned state equals one longer run
    first, _ = data(k=3)
    a = client.train_steps(g, params, {n: b[:3] for n, b in batches.items()},
                           learning_rate=0.1, momentum=0.9)
    b = client.train_steps(g, a.parameters, {n: v[3:] for n, v in batches.items()},
                           learning_rate=0.1, momentum=0.9, velocity=a.velocity)
    for name in params:
        np.testing.assert_array_equal(b.parameters[name], result.parameters[name])


@pytest.mark.parametrize("change,field", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(momentum=1.0), "momentum"),
    (dict(parameters={"Q": np.zeros(3, np.float32)}), "parameters"),
    (dict(batches={"X": np.zeros((2, 8, 4), np.float32)}), "batches"),
    (dict(batches={"X": np.zeros((2, 8, 4), np.float32),
                   "Y": np.zeros((3, 8, 3), np.float32)}), "batches"),
    (dict(velocity={"W": np.zeros((3, 4), np.float32)}), "velocity"),
    (dict(loss="nope"), "loss"),
])
def test_bad_requests_name_the_field(client, change, field):
    batches, params = data(k=2)
    kwargs = dict(parameters=params, batches=batches, learning_rate=0.1, momentum=0.5)
    kwargs.update(change)
    with pytest.raises(grpc.RpcError) as info:
        client.train_steps(model(), **kwargs)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field in bad_request_field(info.value), info.value.details()


def bad_request_field(err) -> str:
    detail = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(detail)
    return detail.field_violations[0].field


def test_steps_per_call_are_bounded(start_server):
    server = start_server(Limits(max_steps_per_call=4))
    with Client(f"127.0.0.1:{server.port}") as client:
        assert client.server_info().limits.max_steps_per_call == 4
        batches, params = data(k=5)
        with pytest.raises(grpc.RpcError) as info:
            client.train_steps(model(), params, batches, learning_rate=0.1)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_steps_per_call" in info.value.details()
        ok = client.train_steps(model(), params, {n: b[:4] for n, b in batches.items()},
                                learning_rate=0.1)
        assert len(ok.losses) == 4
