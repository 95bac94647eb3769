"""Requests over the inline budget answered in a worker by the lean path's templates
(server.lean: LeanPath.answer_in_worker), over real gRPC on 127.0.0.1: a model's VJP
with its parameters stored, call after call, gives the same reply bytes as the general
path (a server with inline_budget_us=0), the event loop never answers it, its errors are
the general path's, and the call's cancellation reaches its engine.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from gradserve.client import Client
from gradserve.server.app import create_server
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import fill_tensors, to_tensor

from support.models import DENSE_PARAMETERS as PARAMETERS, dense_model
from support.requests import RawServer


class Raw(RawServer):
    """A RawServer whose client put PARAMETERS once (`handle`)."""

    def __init__(self, server):
        super().__init__(server)
        with Client(f"127.0.0.1:{server.port}") as client:
            self.handle = client.put(PARAMETERS).id

    def vjp(self, graph_id, x, g, request_id="", handle=None, names=None) -> bytes:
        """A VJP request's bytes: x and the cotangent g sent, the parameters stored."""
        request = pb.DifferentiateRequest(graph_id=graph_id, request_id=request_id,
                                          cotangents={"y": to_tensor(g)})
        fill_tensors(request.inputs, {"x": x})
        for key in PARAMETERS:
            entry = request.stored_inputs[key]
            entry.handle, entry.name = handle or self.handle, (names or {}).get(key, key)
        return request.SerializeToString()


@pytest.fixture(scope="module")
def servers():
    """(worker, general, default): a server whose inline budget nothing fits (every
    Differentiate goes to a worker, the lean path's templates there), one without a lean
    path (the general path), and one with the default budget."""
    started = [create_server("127.0.0.1:0", inline_budget_us=1).start(),
               create_server("127.0.0.1:0", inline_budget_us=0).start(),
               create_server("127.0.0.1:0").start()]
    try:
        yield tuple(Raw(server) for server in started)
    finally:
        for server in started:
            server.stop(grace=0)


def registered(raws, graph) -> str:
    ids = {raw.register(graph) for raw in raws}
    assert len(ids) == 1
    return ids.pop()


def test_requests_over_the_budget_are_answered_by_templates_in_a_worker(servers):
    """Call after call (new x and cotangents, request ids of one length then another),
    the worker's replies are the general path's bytes; from the second of each form on
    they come from the templates; none is answered on the event loop."""
    worker, general, _ = servers
    graph_id = registered(servers[:2], dense_model())
    rng = np.random.default_rng(5)
    before, templated = worker.counts, worker.lean.templated
    ids = ("", "1", "2", "3", "r" * 200, "s" * 200)
    for request_id in ids:
        x = rng.standard_normal((6, 3)).astype(np.float32)
        g = rng.standard_normal((6, 2)).astype(np.float32)
        fast = worker("Differentiate", worker.vjp(graph_id, x, g, request_id))
        slow = general("Differentiate", general.vjp(graph_id, x, g, request_id))
        assert isinstance(fast, bytes) and isinstance(slow, bytes), (request_id, fast, slow)
        assert fast == slow, request_id
    after = worker.counts
    assert after["inline"] == before["inline"]
    assert after["worker"] - before["worker"] == len(ids)
    assert after["over_budget"] - before["over_budget"] == len(ids)
    # ("" and "1" each made a form's templates, as did the first id of 200 bytes)
    assert worker.lean.templated - templated == 3
    # the reply agrees with the closed form: dL/dV = h^T g, h = tanh(x W + b)
    reply = pb.DifferentiateResponse.FromString(fast)
    grad_v = np.frombuffer(reply.cotangents["V"].data, np.float32).reshape(4, 2)
    np.testing.assert_allclose(grad_v, np.tanh(x @ PARAMETERS["W"] + PARAMETERS["b"]).T @ g,
                               rtol=1e-5, atol=1e-6)


def test_errors_of_templated_requests_in_a_worker_are_the_general_paths(servers):
    """A stored name that does not exist, another batch that does not bind, and a
    handle deleted after the form's templates were made: each is the general path's
    status and message."""
    worker, general, _ = servers
    graph_id = registered(servers[:2], dense_model())
    handles = []
    for raw in (worker, general):
        with Client(f"127.0.0.1:{raw.server.port}") as client:
            handles.append(client.put(PARAMETERS).id)
    x, g = np.ones((4, 3), np.float32), np.ones((4, 2), np.float32)

    def both(**fields):
        fast = worker("Differentiate", worker.vjp(graph_id, handle=handles[0], **fields))
        slow = general("Differentiate", general.vjp(graph_id, handle=handles[1], **fields))
        return fast, slow
    for _ in range(2):  # the second by the templates
        fast, slow = both(x=x, g=g, request_id="9")
        assert isinstance(fast, bytes) and fast == slow
    cases = {"no such name": dict(x=x, g=g, request_id="9", names={"V": "nope"}),
             "a cotangent of another batch": dict(x=x, g=np.ones((3, 2), np.float32),
                                                  request_id="9")}
    for raw, handle in zip((worker, general), handles):
        with Client(f"127.0.0.1:{raw.server.port}") as client:
            assert client.delete(handle)
    cases["deleted handle"] = dict(x=x, g=g, request_id="9")
    for name, fields in cases.items():
        fast, slow = both(**fields)
        assert isinstance(fast, grpc.RpcError) and isinstance(slow, grpc.RpcError), name
        assert fast.code() == slow.code(), name
        assert fast.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert fast.details().replace(handles[0], "H") == \
            slow.details().replace(handles[1], "H"), name
    assert worker.server.servicer.calls.in_progress == 0


class Call:
    """What a worker knows of its call (server.calls.CallState): active or ended."""

    def __init__(self, active: bool):
        self.active = active
        self.peer = "ipv4:127.0.0.1"

    def is_active(self) -> bool:
        return self.active


def test_the_calls_cancellation_reaches_the_engine_in_a_worker(servers):
    """A call that has ended is not computed by the templates (the engine's check
    stops it; the general path then ends it with its own status), a live one is."""
    worker, general, _ = servers
    graph_id = registered(servers[:2], dense_model())
    x, g = np.full((5, 3), 0.5, np.float32), np.ones((5, 2), np.float32)
    data = worker.vjp(graph_id, x, g, "4")
    assert worker("Differentiate", data) == general("Differentiate",
                                                   general.vjp(graph_id, x, g, "4"))
    lean = worker.lean
    templated = lean.templated
    assert lean.answer_in_worker("Differentiate", data, time.perf_counter(),
                                 Call(False)) is None
    assert lean.templated == templated
    reply = lean.answer_in_worker("Differentiate", data, time.perf_counter(), Call(True))
    assert reply == general("Differentiate", general.vjp(graph_id, x, g, "4"))
    assert lean.templated == templated + 1


def test_a_form_first_answered_in_a_worker_within_the_budget_is_then_answered_inline(
        servers):
    """A small request that reached a worker (its deadline passed on the way, say) keeps
    templates the event loop may use: its estimate is within the budget."""
    _, general, default = servers
    graph_id = registered((general, default), dense_model())
    x, g = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
    data = default.vjp(graph_id, x, g, "12")
    lean = default.lean
    first = lean.answer_in_worker("Differentiate", data, time.perf_counter(), Call(True))
    expected = general("Differentiate", general.vjp(graph_id, x, g, "12"))
    assert first == expected
    before, templated = default.counts, lean.templated
    assert default("Differentiate", data) == expected
    assert default.counts["inline"] == before["inline"] + 1
    assert lean.templated == templated + 1
