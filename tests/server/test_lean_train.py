"""TrainSteps on the lean path (server.lean) over real gRPC on 127.0.0.1: a small call by
graph id, on a stored state or on the parameters it carries, is answered on the event
loop with the same reply bytes and the same errors as the general path (a server with
inline_budget_us=0, every request in a worker); exactly once, versions, the FLOP
budget and deadlines stay as they were; calls estimated over the time budget and calls
on a state a worker holds go to a worker, and the event loop never waits for a state.
Numbers are checked against SGD written by hand in numpy.
"""

from __future__ import annotations

from collections import Counter

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import Client
from gradserve.server.app import create_server
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import fill_tensors
from gradserve.v1.tensor_wire import decode
from support.regression import data as dataset, initial, model

SERVICE = "/gradserve.v1.GradientService/"
LR, MOMENTUM = 0.1, 0.9


def by_hand(params, velocity, batches):
    """The model's SGD steps with momentum written by hand in numpy (float64 here):
    the losses, parameters and momentum buffers after them."""
    params = {k: v.astype(np.float64) for k, v in params.items()}
    velocity = {k: v.astype(np.float64) for k, v in velocity.items()}
    losses = []
    for X, Y in batches:
        t = np.tanh(X @ params["W"] + params["b"])
        losses.append(np.mean((t - Y) ** 2))
        d = 2 * (t - Y) / t.size * (1 - t * t)
        grads = {"W": X.T @ d, "b": d.sum(axis=0)}
        for name in params:
            velocity[name] = MOMENTUM * velocity[name] + grads[name]
            params[name] = params[name] - LR * velocity[name]
    return losses, params, velocity


class Server:
    """One server: raw request bytes in, raw reply bytes (or the RpcError) out."""

    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.client = Client(f"127.0.0.1:{server.port}", timeout=30.0)

    def __call__(self, data: bytes, timeout: float = 30.0, method: str = "TrainSteps"):
        call = self.channel.unary_unary(SERVICE + method, _registered_method=True)
        try:
            return call(data, timeout=timeout)
        except grpc.RpcError as err:
            return err

    def future(self, data: bytes):
        call = self.channel.unary_unary(SERVICE + "TrainSteps", _registered_method=True)
        return call.future(data, timeout=30.0)

    @property
    def counts(self) -> Counter | None:
        lean = self.server.servicer.lean
        return Counter(lean.counts) if lean is not None else None

    def put(self, tensors) -> str:
        return self.client.put(tensors).id

    def close(self):
        self.client.close()
        self.channel.close()
        self.server.stop(grace=0)


@pytest.fixture
def pair():
    """(lean, general): a server with the default inline budget and one with none; the
    model registered on both (the same id)."""
    lean = Server(create_server("127.0.0.1:0").start())
    general = Server(create_server("127.0.0.1:0", inline_budget_us=0).start())
    try:
        yield lean, general
    finally:
        lean.close()
        general.close()


def register(servers, graph=None) -> str:
    ids = {s.client.register(graph or model()) for s in servers}
    assert len(ids) == 1
    return ids.pop()


def request(graph_id, **fields) -> pb.TrainStepsRequest:
    tensors = {k: fields.pop(k) for k in ("parameters", "velocity", "batches") if k in fields}
    fields = {"learning_rate": LR, "momentum": MOMENTUM, "loss": "loss", **fields}
    message = pb.TrainStepsRequest(graph_id=graph_id, **fields)
    for name, arrays in tensors.items():
        fill_tensors(getattr(message, name), arrays)
    return message


def same_reply(lean, general, lean_data: bytes, general_data: bytes) -> bytes:
    """Both servers' replies, equal byte for byte; the lean one answered inline."""
    before = lean.counts["inline"]
    fast, slow = lean(lean_data), general(general_data)
    assert isinstance(fast, bytes) and isinstance(slow, bytes), (fast, slow)
    assert fast == slow
    assert lean.counts["inline"] == before + 1, lean.counts
    return fast


def test_inline_parameters_reply_byte_identically_and_equal_sgd_by_hand(pair):
    lean, general = pair
    graph_id = register(pair)
    d, params = dataset(40), initial()
    velocity = {"W": np.full((4, 3), 0.5, np.float32)}  # "b" starts from zeros
    stacked = {n: a[:24].reshape(3, 8, -1) for n, a in d.items()}
    data = request(graph_id, parameters=params, velocity=velocity,
                   batches=stacked).SerializeToString()
    reply = decode(pb.TrainStepsResponse, same_reply(lean, general, data, data))
    losses, want, want_velocity = by_hand(
        params, {"W": velocity["W"], "b": np.zeros(3, np.float32)},
        [(stacked["X"][k], stacked["Y"][k]) for k in range(3)])
    np.testing.assert_allclose(list(reply.losses), losses, rtol=1e-5)
    for name in params:
        np.testing.assert_allclose(reply.parameters[name], want[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(reply.velocity[name], want_velocity[name], rtol=1e-5,
                                   atol=1e-6)
    assert general.counts is None


def test_a_stored_state_steps_byte_identically_exactly_once(pair):
    """Rows of a stored data set (a short last batch, an evaluation, the state returned),
    stacked stored batches, and a retry of each call: the same bytes from both servers,
    the retry without stepping again; the state after them equals SGD by hand."""
    lean, general = pair
    graph_id = register(pair)
    d, params = dataset(40), initial()
    stacked = {n: a[:16].reshape(2, 8, -1) for n, a in d.items()}
    handles = [{"state": s.put(params), "data": s.put(d), "test": s.put(d),
                "batches": s.put(stacked)} for s in (lean, general)]
    rows = np.random.default_rng(5).permutation(len(d["X"]))[:13]
    calls = [
        lambda h, v: request(graph_id, state=h["state"], state_version=v, data=h["data"],
                             rows=rows.tolist(), batch_sizes=[8, 5]),
        lambda h, v: request(graph_id, state=h["state"], state_version=v,
                             stored_batches={n: pb.StoredTensor(handle=h["batches"], name=n)
                                             for n in stacked}),
        lambda h, v: request(graph_id, state=h["state"], state_version=v, data=h["data"],
                             rows=rows[:6].tolist(), batch_sizes=[6],
                             evaluate_data=h["test"], evaluate_outputs=["loss"],
                             return_state=True),
    ]
    version, replies = 0, []
    for make in calls:
        first = [make(h, version).SerializeToString() for h in handles]
        reply = same_reply(lean, general, *first)
        assert same_reply(lean, general, *first) == reply  # the retry: the same reply
        version = pb.TrainStepsResponse.FromString(reply).state_version
        replies.append(decode(pb.TrainStepsResponse, reply))
    assert [(r.state_version, r.state_steps) for r in replies] == [(1, 2), (2, 4), (3, 5)]
    batches = [(d["X"][rows[:8]], d["Y"][rows[:8]]), (d["X"][rows[8:13]], d["Y"][rows[8:13]])]
    batches += [(stacked["X"][k], stacked["Y"][k]) for k in range(2)]
    batches.append((d["X"][rows[:6]], d["Y"][rows[:6]]))
    losses, want, want_velocity = by_hand(params, {k: np.zeros_like(v)
                                                   for k, v in params.items()}, batches)
    np.testing.assert_allclose([x for r in replies for x in r.losses], losses, rtol=1e-5)
    final = replies[-1]
    for name in params:
        np.testing.assert_allclose(final.parameters[name], want[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.velocity[name], want_velocity[name], rtol=1e-5,
                                   atol=1e-6)
    t = np.tanh(d["X"] @ want["W"] + want["b"])
    np.testing.assert_allclose(final.evaluation["loss"], np.mean((t - d["Y"]) ** 2), rtol=1e-5)
    # Stored on the server: equal to the reply's state, on both
    for server, h in zip(pair, handles):
        stored = server.client.get(h["state"])
        for name in params:
            np.testing.assert_array_equal(stored[name], final.parameters[name])


def test_errors_are_those_of_the_general_path_and_change_nothing(pair):
    lean, general = pair
    graph_id = register(pair)
    d, params = dataset(40), initial()
    handles = [{"state": s.put(params), "data": s.put(d)} for s in (lean, general)]

    def by_rows(h, **fields):
        base = dict(state=h["state"], data=h["data"], rows=[0, 1, 2], batch_sizes=[3])
        return request(graph_id, **{**base, **fields}).SerializeToString()
    cases = {
        "stale version": lambda h: by_rows(h, state_version=4),
        "unknown state": lambda h: by_rows(h, state="0" * 32),
        "unknown data": lambda h: by_rows(h, data="1" * 32),
        "row out of range": lambda h: by_rows(h, rows=[0, 1, 400]),
        "batch sizes": lambda h: by_rows(h, batch_sizes=[2]),
        "learning rate": lambda h: request(graph_id, state=h["state"], data=h["data"],
                                           rows=[0], batch_sizes=[1],
                                           learning_rate=1e300).SerializeToString(),
        "parameters too": lambda h: by_rows(h, parameters={"W": params["W"]}),
        "unknown loss": lambda h: request(graph_id, state=h["state"], data=h["data"], rows=[0],
                                          batch_sizes=[1], loss="nope").SerializeToString(),
        "unknown evaluate_data": lambda h: by_rows(h, evaluate_data="2" * 32),
        "unknown graph": lambda h: request("0" * 64, state=h["state"], data=h["data"],
                                           rows=[0], batch_sizes=[1]).SerializeToString(),
        "bytes": lambda h: b"\xff\xff\xff",
    }
    inline = lean.counts["inline"]
    for name, make in cases.items():
        fast, slow = lean(make(handles[0])), general(make(handles[1]))
        assert isinstance(fast, grpc.RpcError) and isinstance(slow, grpc.RpcError), name
        assert fast.code() == slow.code(), name
        assert fast.details() == slow.details(), name
        assert dict(fast.trailing_metadata()) == dict(slow.trailing_metadata()), name
    assert lean.counts["inline"] == inline  # a failing call is never counted answered
    # nothing changed: the state steps from version 0, on both alike
    reply = same_reply(lean, general, by_rows(handles[0]), by_rows(handles[1]))
    assert pb.TrainStepsResponse.FromString(reply).state_version == 1


def test_the_flop_budget_is_the_general_paths():
    """max_request_flops bounds the whole call (K steps x one step) on both paths."""
    limits = Limits(max_request_flops=2_000)
    lean = Server(create_server("127.0.0.1:0", limits).start())
    general = Server(create_server("127.0.0.1:0", limits, inline_budget_us=0).start())
    try:
        graph_id = register((lean, general))
        d, params = dataset(40), initial()
        stacked = {n: a[:32].reshape(4, 8, -1) for n, a in d.items()}
        data = request(graph_id, parameters=params, batches=stacked).SerializeToString()
        fast, slow = lean(data), general(data)
        assert fast.code() == slow.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fast.details() == slow.details() and "max_request_flops" in fast.details()
        one = {n: a[:1] for n, a in stacked.items()}
        small = request(graph_id, parameters=params, batches=one).SerializeToString()
        same_reply(lean, general, small, small)
    finally:
        lean.close()
        general.close()


def test_calls_over_the_time_budget_go_to_a_worker(pair):
    """Many steps in one call, or a batch of many wide rows gathered from a stored data
    set: estimated over the budget, answered by a worker with the same bytes."""
    lean, general = pair
    graph_id = register(pair)
    wide_id = register(pair, model(features=512))
    rng = np.random.default_rng(6)
    params = initial()
    wide = {"W": rng.standard_normal((512, 3)).astype(np.float32), "b": params["b"]}
    many = {"X": rng.standard_normal((200, 1, 4)).astype(np.float32),
            "Y": rng.standard_normal((200, 1, 3)).astype(np.float32)}
    rows = {"X": rng.standard_normal((2000, 512)).astype(np.float32),
            "Y": rng.standard_normal((2000, 3)).astype(np.float32)}
    handles = [{"state": s.put(wide), "data": s.put(rows)} for s in pair]
    cases = {
        "many steps": lambda h: request(graph_id, parameters=params, batches=many),
        "wide rows": lambda h: request(wide_id, state=h["state"], data=h["data"],
                                       rows=list(range(2000)), batch_sizes=[2000]),
    }
    for name, make in cases.items():
        before = lean.counts
        data = [make(h).SerializeToString() for h in handles]
        assert len(data[0]) < 16384, name  # small enough for the lean path to look at
        fast, slow = lean(data[0]), general(data[1])
        assert isinstance(fast, bytes) and fast == slow, name
        after = lean.counts
        assert after["over_budget"] == before["over_budget"] + 1, name
        assert after["inline"] == before["inline"], name


def test_a_state_a_worker_holds_is_never_waited_for_on_the_loop(pair):
    """While the state's lock is held (as by a call stepping it in a worker), a call on
    it goes to a worker, which waits; health checks and other calls are answered
    meanwhile; once the lock is free the call steps as usual."""
    lean, general = pair
    graph_id = register(pair)
    d, params = dataset(40), initial()
    handles = [{"state": s.put(params), "data": s.put(d)} for s in pair]
    data = [request(graph_id, state=h["state"], data=h["data"], rows=[3, 1, 4],
                    batch_sizes=[3]).SerializeToString() for h in handles]
    other = request(graph_id, parameters=params,
                    batches={n: a[None, :5] for n, a in d.items()}).SerializeToString()
    entry = lean.server.servicer.store.entry(handles[0]["state"], "state")
    inline = lean.counts["inline"]
    assert entry.lock.acquire(timeout=10)
    try:
        waiting = lean.future(data[0])
        health = health_pb2_grpc.HealthStub(lean.channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        assert isinstance(lean(other), bytes)  # answered inline meanwhile
        assert lean.counts["inline"] == inline + 1
        assert not waiting.done()
    finally:
        entry.lock.release()
    assert waiting.result(timeout=30) == general(data[1])
    assert lean.counts["inline"] == inline + 1  # the call on the held state: by a worker


def test_a_call_past_its_deadline_is_not_stepped_inline(pair):
    """Left to the general path (counted "expired"), which grpc's cancellation ends: a
    call ends OK with the right reply or DEADLINE_EXCEEDED, and the state's version
    says how many calls stepped it (none twice)."""
    lean, _ = pair
    graph_id = register(pair)
    d, params = dataset(40), initial()
    state, data = lean.put(params), lean.put(d)
    before = lean.counts["expired"]
    version, codes = 0, Counter()
    for _ in range(500):
        message = request(graph_id, state=state, state_version=version, data=data,
                          rows=[0, 1], batch_sizes=[2]).SerializeToString()
        reply = lean(message, timeout=1e-6)
        if isinstance(reply, bytes):
            codes["OK"] += 1
            version = pb.TrainStepsResponse.FromString(reply).state_version
        else:
            assert reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED, reply
            codes["DEADLINE_EXCEEDED"] += 1
            # the call may have stepped before its reply was dropped: a retry says
            reply = lean(message)
            assert isinstance(reply, bytes), reply
            version = pb.TrainStepsResponse.FromString(reply).state_version
        if lean.counts["expired"] > before and codes["DEADLINE_EXCEEDED"]:
            break
    assert lean.counts["expired"] > before, codes
    entry = lean.server.servicer.store.entry(state, "state")
    assert entry.version == version == entry.steps
    assert lean.server.servicer.calls.in_progress == 0
