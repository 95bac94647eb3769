"""Client.differentiate_async / evaluate_async over real gRPC on 127.0.0.1: many
calls in flight give what sequential calls give, errors arrive on the future with
their status code, UNAVAILABLE is retried and NOT_FOUND resends the graph inline,
as for the blocking calls."""

from __future__ import annotations

import time
from concurrent.futures import Future, wait

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.server.app import create_server
from support.server_process import free_port


def inputs(i: int) -> dict:
    return {"x": np.float32([0.1 * i]), "y": np.float32([1.0 - 0.05 * i])}


@pytest.mark.parametrize("channels", [1, 4])
def test_64_futures_in_flight_equal_sequential_calls(address, seed_builder, channels):
    graph = seed_builder()
    with Client(address, channels=channels) as client:
        expected = [client.differentiate(graph, inputs(i)) for i in range(64)]
        futures = [client.differentiate_async(graph, inputs(i)) for i in range(64)]
        values = [client.evaluate_async(graph, inputs(i)) for i in range(64)]
        assert all(isinstance(f, Future) for f in futures + values)
        for want, future, value in zip(expected, futures, values):
            got = future.result(timeout=30)
            assert got.mode == want.mode and got.graph_id == want.graph_id
            assert set(got.jacobian) == set(want.jacobian)
            for block in want.jacobian:
                np.testing.assert_array_equal(got.jacobian[block], want.jacobian[block])
            np.testing.assert_array_equal(got.outputs["o"], want.outputs["o"])
            np.testing.assert_array_equal(value.result(timeout=30)["o"], want.outputs["o"])


def test_an_error_surfaces_on_the_future_with_its_status_code(client, seed_builder):
    future = client.evaluate_async(seed_builder(), {"x": np.float32([1.0])})  # y missing
    err = future.exception(timeout=30)
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        future.result()
    unknown = client.differentiate_async("0" * 64, {"x": np.float32([1.0])})
    assert unknown.exception(timeout=30).code() == grpc.StatusCode.NOT_FOUND


def test_unavailable_is_retried_then_not_found_resends_the_graph_inline(seed_builder,
                                                                        seed_inputs):
    port = free_port()
    graph = seed_builder()
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 200)]
    with Client(f"127.0.0.1:{port}", retries=20, backoff=0.05, options=options) as client:
        with create_server(f"127.0.0.1:{port}"):
            want = client.differentiate(graph, seed_inputs())  # registers the graph
        # No server now: the call is UNAVAILABLE until one starts, which has never
        # seen the graph (NOT_FOUND: sent again inline).
        future = client.differentiate_async(graph, seed_inputs())
        time.sleep(0.5)
        assert not future.done()
        with create_server(f"127.0.0.1:{port}"):
            got = future.result(timeout=30)
        np.testing.assert_array_equal(got.jacobian["o", "x"], want.jacobian["o", "x"])


def test_unavailable_after_the_retries_surfaces_on_the_future(seed_builder):
    with Client(f"127.0.0.1:{free_port()}", retries=1, backoff=0.01, timeout=5) as client:
        future = client.evaluate_async("0" * 64, {"x": np.float32([1.0])})
        done, _ = wait([future], timeout=30)
        assert done and future.exception().code() == grpc.StatusCode.UNAVAILABLE
