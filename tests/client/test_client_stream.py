"""Client.stream() sessions against real servers on 127.0.0.1: a deadline on each
reply (not on the whole stream), UNAVAILABLE retried with backoff on a new stream
as unary calls are, and a new stream after an error.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from gradserve.server.app import create_server

FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 100),
                  ("grpc.max_reconnect_backoff_ms", 300)]


def sin_chain(length: int) -> GraphBuilder:
    """o = sum(sin(sin(...sin(x)))): its cost grows with the size of x."""
    g = GraphBuilder()
    h = g.input("x", "float64", [-1])
    for _ in range(length):
        h = g.sin(h)
    g.output("o", g.sum(h))
    return g


def check(result, x, length):
    h, d = x, np.ones_like(x)
    for _ in range(length):
        d, h = d * np.cos(h), np.sin(h)
    np.testing.assert_allclose(result.outputs["o"], h.sum(), rtol=1e-12)
    np.testing.assert_allclose(result.jacobian["o", "x"], d, rtol=1e-9)


def test_each_reply_has_the_deadline_not_the_whole_stream(address):
    g, x = sin_chain(3), np.linspace(0.0, 1.0, 5)
    with Client(address, timeout=1.0) as client, client.stream(g) as session:
        started = time.monotonic()
        for _ in range(4):
            check(session.differentiate({"x": x}), x, 3)
            time.sleep(0.4)
        assert time.monotonic() - started > 1.5  # the session outlived one timeout


def test_a_slow_reply_is_deadline_exceeded_and_the_session_goes_on(address):
    # a JVP through 4,000 sines of 20,000 doubles: a second or more here (about 1.3 GB
    # of values and tangents, under the server's limit on intermediates); the graph is
    # registered first with no hurry, so the deadline meets the slow step itself
    length = 4000
    g = sin_chain(length)
    with Client(address, timeout=60) as patient:
        patient.register(g)
    with Client(address, timeout=0.5) as client, client.stream(g) as session:
        big = np.linspace(0.0, 1.0, 20_000)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            session.differentiate({"x": big}, tangents={"x": np.ones_like(big)})
        waited = time.monotonic() - started
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "0.5 s" in info.value.details()
        assert waited >= 0.5, waited  # not before its deadline (how long after: the load)
        # the stream was cancelled; the next step opens a new one. On a busy machine the
        # server may still be finishing the cancelled step past the next one's 0.5 s, so
        # the session is given a few tries: each fails only by its deadline, then it works
        small = np.linspace(0.0, 1.0, 4)
        for _ in range(20):
            try:
                reply = session.differentiate({"x": small})
                break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        else:
            pytest.fail("the session never answered again")
        check(reply, small, length)


def test_an_error_ends_only_its_stream(client, seed_builder, seed_inputs):
    with client.stream(seed_builder()) as session:
        with pytest.raises(grpc.RpcError) as info:
            session.differentiate({"x": np.float32([1.0])})  # no value for y
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        r = session.differentiate(seed_inputs())
        assert abs(r.jacobian["o", "x"].item() - -6.2832) < 1e-4


def test_unavailable_is_retried_on_a_new_stream_until_the_server_is_back(seed_builder,
                                                                           seed_inputs):
    first = create_server("127.0.0.1:0").start()
    port = first.port
    restarted = []
    with Client(f"127.0.0.1:{port}", timeout=10, retries=30, backoff=0.05,
                options=FAST_RECONNECT) as client:
        session = client.stream(seed_builder())
        try:
            session.differentiate(seed_inputs())
            first.stop(grace=0)  # the stream dies with its server

            def restart():
                time.sleep(0.5)  # down for a while: the session retries meanwhile
                restarted.append(create_server(f"127.0.0.1:{port}").start())

            thread = threading.Thread(target=restart)
            thread.start()
            started = time.monotonic()
            r = session.differentiate(seed_inputs())  # new server: NOT_FOUND, then inline
            thread.join()
            assert time.monotonic() - started >= 0.4
            assert abs(r.jacobian["o", "x"].item() - -6.2832) < 1e-4
            r = session.differentiate(seed_inputs())  # and by id again
            assert abs(r.jacobian["o", "y"].item() - -8.7423e-08) < 1e-11
        finally:
            session.close()
            for server in restarted:
                server.stop(grace=0)


def test_unavailable_after_the_retries_is_raised(seed_builder, seed_inputs):
    server = create_server("127.0.0.1:0").start()
    with Client(f"127.0.0.1:{server.port}", timeout=10, retries=3, backoff=0.1,
                options=FAST_RECONNECT) as client:
        with client.stream(seed_builder()) as session:
            session.differentiate(seed_inputs())
            server.stop(grace=0)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                session.differentiate(seed_inputs())
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # three retries after the first try, waiting 0.1, 0.2 and 0.4 s between
            assert 0.7 <= time.monotonic() - started < 10
