"""Residuals kept between an Evaluate and its VJP (EvaluateRequest.keep_residuals,
DifferentiateRequest.residuals): the VJP equals one computed from the inputs, the
server skips the forward sweep (its CPU time shows it), and the store is bounded by
count, bytes and age, a handle it no longer holds falling back to the inputs."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.client import Client, GraphBuilder
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import to_tensor
from support.process_stats import cpu_seconds
from support.server_process import ServerProcess


def mlp():
    g = GraphBuilder()
    x = g.input("x", "float64", [-1, 5])
    w = g.input("w", "float64", [5, 3])
    y = g.input("y", "float64", [-1, 3])
    g.output("loss", g.sum(g.square(g.tanh(x @ w) - y)))
    return g


def inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((8, 5)), "w": rng.standard_normal((5, 3)),
            "y": rng.standard_normal((8, 3))}


def test_vjp_from_residuals_equals_the_vjp_from_inputs(client):
    g, x = mlp(), inputs()
    outputs, handle = client.evaluate_for_vjp(g, x)
    assert handle
    one = {"loss": np.float64(1.0)}
    kept_out, kept = client.vjp(g, x, one, wrt=["w"], residuals=handle)
    plain_out, plain = client.vjp(g, x, one, wrt=["w"])
    assert_allclose(kept["w"], plain["w"], rtol=1e-12)
    assert_allclose(kept_out["loss"], outputs["loss"])
    # a handle serves several VJPs (e.g. other wrt, other cotangents)
    _, again = client.vjp(g, x, {"loss": np.float64(2.0)}, wrt=["x", "w"], residuals=handle)
    assert_allclose(again["w"], 2 * plain["w"], rtol=1e-12)
    # against finite differences of the loss
    eps, w = 1e-6, x["w"].copy()
    w[1, 2] += eps
    up = client.evaluate(g, {**x, "w": w})["loss"]
    w[1, 2] -= 2 * eps
    down = client.evaluate(g, {**x, "w": w})["loss"]
    assert_allclose(kept["w"][1, 2], (up - down) / (2 * eps), rtol=1e-6)


def test_bad_combinations_are_invalid_argument(client, stub):
    g, x = mlp(), inputs()
    _, handle = client.evaluate_for_vjp(g, x)
    graph_id = client.register(g)
    cot = {"loss": to_tensor(np.float64(1.0))}
    cases = [
        (dict(inputs={k: to_tensor(v) for k, v in x.items()}, cotangents=cot), "inputs"),
        (dict(tangents={"w": to_tensor(x["w"])}), "tangents"),
        (dict(), "cotangents"),
        (dict(cotangents=cot, trace=True), "trace"),
    ]
    for fields, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Differentiate(pb.DifferentiateRequest(graph_id=graph_id, residuals=handle,
                                                       **fields), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert field in info.value.details()
    # a handle of another graph is not found for this one
    other = GraphBuilder()
    other.output("loss", other.sum(other.input("x", "float64", [-1, 5])))
    with pytest.raises(grpc.RpcError) as info:
        stub.Differentiate(pb.DifferentiateRequest(graph_id=client.register(other),
                                                   residuals=handle, cotangents=cot), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert info.value.details().startswith("residuals")


def test_the_store_is_bounded_and_falls_back_to_the_inputs(start_server):
    server = start_server(Limits(max_residual_sets=2, max_residual_bytes=20_000,
                                 residual_seconds=1))
    with Client(f"127.0.0.1:{server.port}") as client:
        info = client.server_info().limits
        assert (info.max_residual_sets, info.max_residual_bytes, info.residual_seconds) == (
            2, 20_000, 1)
        g, one = mlp(), {"loss": np.float64(1.0)}
        handles = [client.evaluate_for_vjp(g, inputs(i))[1] for i in range(3)]
        assert all(handles) and len(server.servicer.residuals) == 2  # the first was dropped
        assert server.servicer.residuals.nbytes <= 20_000
        big = {"x": np.zeros((1000, 5)), "w": np.zeros((5, 3)), "y": np.zeros((1000, 3))}
        assert client.evaluate_for_vjp(g, big)[1] == ""  # alone over max_residual_bytes
        time.sleep(1.2)  # past residual_seconds: every handle expired
        for i, handle in enumerate(handles):
            _, kept = client.vjp(g, inputs(i), one, residuals=handle)  # falls back
            _, plain = client.vjp(g, inputs(i), one)
            assert_allclose(kept["w"], plain["w"], rtol=1e-12)
        assert len(server.servicer.residuals) == 0


def test_the_backward_call_skips_the_forward_sweep():
    """loss = sum(x * k) where k is 20 sines of a 1,000,000-element input (176 MB of residuals): the forward
    sweep costs seconds of CPU, the backward one multiply. With the residuals kept,
    the VJP call costs the server a small part of the Evaluate's CPU; without them,
    about as much again."""
    g = GraphBuilder()
    x = g.input("x", "float64", [1_000_000])
    k = g.input("c", "float64", [1_000_000])
    for _ in range(20):
        k = g.sin(k)
    g.output("loss", g.sum(x * k))
    values = {"x": np.ones(1_000_000), "c": np.linspace(0, 1, 1_000_000)}
    one = {"loss": np.float64(1.0)}
    with ServerProcess("--port", "0") as server:
        with Client(server.wait_serving(), timeout=60) as client:
            client.register(g)
            pid = server.proc.pid
            t0 = cpu_seconds(pid)
            _, handle = client.evaluate_for_vjp(g, values)
            t1 = cpu_seconds(pid)
            _, kept = client.vjp(g, values, one, wrt=["x"], residuals=handle)
            t2 = cpu_seconds(pid)
            _, plain = client.vjp(g, values, one, wrt=["x"])
            t3 = cpu_seconds(pid)
    forward, backward, both = t1 - t0, t2 - t1, t3 - t2
    assert_allclose(kept["x"], plain["x"])
    assert backward < forward / 3, (forward, backward, both)
    assert both > forward / 2, (forward, backward, both)
