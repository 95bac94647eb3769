"""The lean path (server.lean) over real gRPC on 127.0.0.1: small Evaluate and
Differentiate requests by graph id answered on the event loop give the same reply
bytes and the same errors as the general path (a server with inline_budget_us=0,
every request in a worker), honour deadlines and cancellation, and the time gate
sends work estimated over the budget (a 2,000-op scalar chain) to the worker pool.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from gradserve.server.app import create_server
from gradserve.server import lean as lean_module
from gradserve.server.lean import LEAN_MAX_BYTES
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import fill_tensors, from_tensor, to_tensor
from gradserve.v1.modes import WIRE_MODES

from support.models import DENSE_PARAMETERS as PARAMETERS, dense_model
from support.requests import SERVICE, RawServer

PI = np.float32([np.pi])


def seed_graph(dtype="float32", shape=(1,)):
    g = GraphBuilder()
    x, y = g.input("x", dtype, shape), g.input("y", dtype, shape)
    g.output("o", (x + y) * g.sin(x))
    return g


def chain_graph(nodes: int):
    """A scalar chain of `nodes` - 1 alternating multiplies and sines: few FLOPs,
    milliseconds of per-op Python."""
    g = GraphBuilder()
    x = g.input("x", "float32", [1])
    v = x
    for i in range(nodes - 1):
        v = g.sin(v) if i % 2 else v * x
    g.output("o", v)
    return g


@pytest.fixture(scope="module")
def pair():
    """(lean, general): a server with the default inline budget and one with none."""
    lean = create_server("127.0.0.1:0").start(("127.0.0.1", 0))
    general = create_server("127.0.0.1:0", inline_budget_us=0).start()
    try:
        yield RawServer(lean), RawServer(general)
    finally:
        lean.stop(grace=0)
        general.stop(grace=0)


def registered(pair, graph) -> str:
    ids = {raw.register(graph) for raw in pair}
    assert len(ids) == 1  # content hashes: the same id on both
    return ids.pop()


def differentiate(graph_id, inputs, **fields) -> bytes:
    request = pb.DifferentiateRequest(graph_id=graph_id, **fields)
    fill_tensors(request.inputs, inputs)
    return request.SerializeToString()


def seed_cases(graph_id, graph64_id):
    x64 = np.float64([0.3, 1.1])
    return {
        "jacobian": ("Differentiate", differentiate(graph_id, {"x": PI, "y": PI},
                                                    request_id="7")),
        "wrt and of": ("Differentiate", differentiate(graph_id, {"x": PI, "y": PI},
                                                      wrt=["y"], of=["o"])),
        "forward mode": ("Differentiate", differentiate(
            graph_id, {"x": PI, "y": PI}, mode=WIRE_MODES["forward"])),
        "reverse mode": ("Differentiate", differentiate(
            graph_id, {"x": PI, "y": PI}, mode=WIRE_MODES["reverse"])),
        "jvp": ("Differentiate", differentiate(
            graph64_id, {"x": x64, "y": x64 + 1},
            tangents={"x": to_tensor(np.float64([1.0, -2.0]))})),
        "batched jvp": ("Differentiate", differentiate(
            graph64_id, {"x": x64, "y": x64 + 1},
            tangents={"x": to_tensor(np.float64([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]]))})),
        "vjp": ("Differentiate", differentiate(
            graph64_id, {"x": x64, "y": x64 + 1},
            cotangents={"o": to_tensor(np.float64([0.5, 2.0]))})),
        "evaluate": ("Evaluate", _evaluate(graph_id, {"x": PI, "y": np.float32([1.0])})),
    }


def _evaluate(graph_id, inputs) -> bytes:
    request = pb.EvaluateRequest(graph_id=graph_id)
    fill_tensors(request.inputs, inputs)
    return request.SerializeToString()


def test_replies_are_byte_identical_to_the_general_path(pair):
    lean, general = pair
    graph_id = registered(pair, seed_graph())
    graph64_id = registered(pair, seed_graph("float64", (2,)))
    for name, (method, data) in seed_cases(graph_id, graph64_id).items():
        before = lean.counts["inline"]
        fast, slow = lean(method, data), general(method, data)
        assert isinstance(fast, bytes) and isinstance(slow, bytes), (name, fast, slow)
        assert fast == slow, name
        assert lean.counts["inline"] == before + 1, f"{name}: not answered inline"
    assert general.counts is None


def mixed_graph():
    """Outputs of every kind a Jacobian reply holds: a matrix block and vector ones, a
    scalar (shape ()) input and output, a zero-element input (blocks with no data), int
    and bool outputs (values only), and names that are prefixes of each other (the
    map's order)."""
    g = GraphBuilder()
    x, s = g.input("x", "float32", [3]), g.input("s", "float32", [])
    z, k = g.input("z", "float32", [0]), g.input("k", "int32", [2])
    w = g.constant(np.float32([[1, 2, 3], [-1, 0.5, 2], [0.25, -3, 1]]))
    g.output("aa", g.sin(w @ x) * s)
    g.output("a", g.sum(x * x))
    g.output("b", s * s + g.sum(z))
    g.output("c", g.less(x, g.constant(np.float32(0.5))))
    g.output("k2", k * k)
    return g


def mixed_inputs(rng):
    return {"x": rng.standard_normal(3).astype(np.float32),
            "s": np.float32(rng.standard_normal()), "z": np.zeros(0, np.float32),
            "k": rng.integers(-5, 5, 2).astype(np.int32)}


def test_repeated_jacobian_requests_are_answered_by_a_template_byte_identically(pair):
    """The first request of a form is answered and its reply kept as a template; the
    next ones (new inputs, new request ids: none, one byte, a 2-byte length) by the
    sweep and the template: every reply equal to the general path's bytes. (A
    Jacobian answered by compressed sweeps, as the seed's of shape (2,) is, has no
    template: the same bytes the long way.)"""
    lean, general = pair
    rng = np.random.default_rng(7)
    seed_id = registered(pair, seed_graph("float64"))
    compressed_id = registered(pair, seed_graph("float64", (2,)))
    mixed_id = registered(pair, mixed_graph())
    forms = {
        "seed": (seed_id, lambda: {"x": rng.standard_normal(1), "y": rng.standard_normal(1)},
                 {}),
        "seed forward": (seed_id, lambda: {"x": rng.standard_normal(1),
                                           "y": rng.standard_normal(1)},
                         {"mode": WIRE_MODES["forward"]}),
        "seed wrt and of": (seed_id, lambda: {"x": rng.standard_normal(1),
                                              "y": rng.standard_normal(1)},
                            {"wrt": ["y"], "of": ["o"], "mode": WIRE_MODES["auto"]}),
        "compressed": (compressed_id, lambda: {"x": rng.standard_normal(2),
                                               "y": rng.standard_normal(2)}, {}),
        "mixed": (mixed_id, lambda: mixed_inputs(rng), {}),
        "mixed reverse": (mixed_id, lambda: mixed_inputs(rng),
                          {"wrt": ["s", "x", "z"], "of": ["a", "aa", "b"],
                           "mode": WIRE_MODES["reverse"]}),
    }
    for name, (graph_id, inputs, fields) in forms.items():
        before = lean.templated
        for request_id in ("", "7", "r" * 200, "8"):
            data = differentiate(graph_id, inputs(), request_id=request_id, **fields)
            fast, slow = lean("Differentiate", data), general("Differentiate", data)
            assert isinstance(fast, bytes) and fast == slow, (name, request_id)
        assert lean.templated == before + (0 if name == "compressed" else 3), name
    # ... the requests with a short id by their bytes, without parsing (RequestTemplate;
    # not those with an empty input, as the mixed graph's; JVPs and VJPs of these graphs,
    # which earlier tests sent, have templates of their own)
    known = {t.graph_id for forms in lean.server.servicer.lean._requests.values()
             for t in forms if t.seeded is None}
    assert seed_id in known and not {mixed_id, compressed_id} & known
    # a request id of a new length (a client's count passing 9, 99...): answered by the
    # form's reply template, and the next one of that length by its bytes again
    inputs = {"x": rng.standard_normal(1), "y": rng.standard_normal(1)}
    longer = [differentiate(seed_id, inputs, request_id=i) for i in ("10", "11")]
    for data in longer:
        assert lean("Differentiate", data) == general("Differentiate", data)
    assert any(t.match(longer[1]) is not None
               for forms in lean.server.servicer.lean._requests.values() for t in forms)


def test_the_seed_gradient_on_the_lean_path_matches_the_closed_form(pair):
    """The first call, and the next ones answered by the template, at other points."""
    lean, _ = pair
    graph_id = registered(pair, seed_graph("float64"))
    for x, y in ((0.7, -0.4), (2.5, 1.25), (-1.0, 3.0)):
        data = differentiate(graph_id, {"x": np.float64([x]), "y": np.float64([y])})
        reply = pb.DifferentiateResponse.FromString(lean("Differentiate", data))
        blocks = {(b.of, b.wrt): from_tensor(b.value) for b in reply.jacobian}
        # d/dx (x + y) sin x = sin x + (x + y) cos x; d/dy = sin x
        assert blocks["o", "x"].item() == pytest.approx(
            math.sin(x) + (x + y) * math.cos(x), rel=1e-12)
        assert blocks["o", "y"].item() == pytest.approx(math.sin(x), rel=1e-12)
        assert from_tensor(reply.outputs["o"]).item() == pytest.approx((x + y) * math.sin(x))


def bad_cases(graph_id):
    good = {"x": PI, "y": PI}
    bad_bytes = pb.DifferentiateRequest(graph_id=graph_id)
    fill_tensors(bad_bytes.inputs, good)
    bad_bytes.inputs["x"].data = b"\x00\x00"  # 2 bytes for one float32
    return {
        "unknown graph id": ("Differentiate", differentiate("0" * 64, good)),
        "missing input": ("Differentiate", differentiate(graph_id, {"x": PI})),
        "extra input": ("Evaluate", _evaluate(graph_id, {**good, "z": PI})),
        "wrong shape": ("Differentiate", differentiate(graph_id, {"x": PI, "y": np.float32([1, 2])})),
        "wrong dtype": ("Evaluate", _evaluate(graph_id, {"x": PI, "y": np.float64([1])})),
        "bytes do not match the shape": ("Differentiate", bad_bytes.SerializeToString()),
        "unknown mode": ("Differentiate", differentiate(graph_id, good, mode=9)),
        "wrt names an output": ("Differentiate", differentiate(graph_id, good, wrt=["o"])),
        "of names an input": ("Differentiate", differentiate(graph_id, good, of=["x"])),
        "tangents and cotangents": ("Differentiate", differentiate(
            graph_id, good, tangents={"x": to_tensor(PI)}, cotangents={"o": to_tensor(PI)})),
        "tangent of the wrong shape": ("Differentiate", differentiate(
            graph_id, good, tangents={"x": to_tensor(np.float32([1, 2, 3]))})),
        "not a request": ("Differentiate", b"\xff\xff\xff\xff"),
        "request_id not UTF-8": ("Differentiate", differentiate(
            graph_id, good, request_id="7")[:-1] + b"\xff"),
        "truncated": ("Evaluate", _evaluate(graph_id, good)[:-3]),
    }


def test_errors_are_those_of_the_general_path(pair):
    """Also once the request's form has a template (the same errors, by the general
    path, and nothing counted answered)."""
    lean, general = pair
    graph_id = registered(pair, seed_graph())
    for fields in ({}, {"wrt": ["x"]}, {"mode": 9}, {"request_id": "6"}):
        for _ in range(2):
            lean("Differentiate", differentiate(graph_id, {"x": PI, "y": PI}, **fields))
    inline = lean.counts["inline"]
    for name, (method, data) in bad_cases(graph_id).items():
        fast, slow = lean(method, data), general(method, data)
        assert isinstance(fast, grpc.RpcError) and isinstance(slow, grpc.RpcError), name
        assert fast.code() == slow.code(), name
        assert fast.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), name
        assert fast.details() == slow.details(), name
        assert dict(fast.trailing_metadata()) == dict(slow.trailing_metadata()), name
    assert lean.counts["inline"] == inline  # a failing request is never counted answered


def test_limits_are_those_of_the_general_path(start_server):
    limits = Limits(max_inputs=1)  # both inputs of the seed graph are one too many
    lean = RawServer(create_server("127.0.0.1:0", limits).start())
    general = RawServer(create_server("127.0.0.1:0", limits, inline_budget_us=0).start())
    try:
        data = differentiate("0" * 64, {"x": PI, "y": PI})
        fast, slow = lean("Differentiate", data), general("Differentiate", data)
        assert fast.code() == slow.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert fast.details() == slow.details()
    finally:
        lean.server.stop(grace=0)
        general.server.stop(grace=0)


def test_a_call_past_its_deadline_is_not_computed_inline(pair):
    """grpc delivers a call whose microsecond deadline has passed in transit (or ends it
    DEADLINE_EXCEEDED first): the lean path leaves such a call to the general path
    (counted "expired"), whose cancellation by grpc ends it; every call ends OK with
    the right reply or DEADLINE_EXCEEDED, and nothing stays in progress."""
    lean, general = pair
    graph_id = registered(pair, seed_graph())
    data = differentiate(graph_id, {"x": PI, "y": PI})
    expected = general("Differentiate", data)
    before = lean.counts["expired"]
    codes = Counter()
    for _ in range(500):
        reply = lean("Differentiate", data, timeout=1e-6)
        if isinstance(reply, bytes):
            assert reply == expected
            codes["OK"] += 1
        else:
            assert reply.code() == grpc.StatusCode.DEADLINE_EXCEEDED, reply
            codes["DEADLINE_EXCEEDED"] += 1
        if lean.counts["expired"] > before and codes["DEADLINE_EXCEEDED"]:
            break
    assert lean.counts["expired"] > before, codes
    assert lean("Differentiate", data, timeout=30.0) == expected
    assert lean.server.servicer.calls.in_progress == 0


def test_cancelled_calls_leave_nothing_in_progress(pair):
    lean, _ = pair
    graph_id = registered(pair, seed_graph())
    data = differentiate(graph_id, {"x": PI, "y": PI})
    call = lean.channel.unary_unary(SERVICE + "Differentiate", _registered_method=True)
    futures = [call.future(data, timeout=30.0) for _ in range(50)]
    for f in futures[::2]:
        f.cancel()
    for i, f in enumerate(futures):
        if f.cancelled():
            continue
        try:
            assert isinstance(f.result(), bytes)
        except grpc.FutureCancelledError:
            assert i % 2 == 0
    assert isinstance(lean("Differentiate", data), bytes)  # answered after the rest
    assert lean.server.servicer.calls.in_progress == 0


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in text.splitlines()
                                      if line and not line.startswith("#"))}


def test_the_time_gate_sends_a_long_scalar_chain_to_a_worker(pair):
    lean, general = pair
    chain_id = registered(pair, chain_graph(2000))
    seed_id = registered(pair, seed_graph())
    before = lean.counts
    data = differentiate(chain_id, {"x": np.float32([0.5])})
    reply = lean("Differentiate", data)
    assert reply == general("Differentiate", data)  # the same answer, from a worker
    after = lean.counts
    assert after["over_budget"] == before["over_budget"] + 1
    assert after["inline"] == before["inline"]
    # the 2,000-op chain passes any FLOPs gate a seed call passes: few FLOPs, many ops
    plans = lean.server.servicer.registry.cache
    assert plans.peek(chain_id).estimate_flops(plans.peek(chain_id).shapes, 1) < 20_000
    assert isinstance(lean("Differentiate", differentiate(seed_id, {"x": PI, "y": PI})), bytes)
    assert lean.counts["inline"] == before["inline"] + 1
    metrics = scrape(lean.server.metrics_port)
    assert metrics['gradserve_lean_requests_total{path="over_budget"}'] == \
        lean.counts["over_budget"]
    assert metrics['gradserve_lean_requests_total{path="inline"}'] == lean.counts["inline"]


def test_large_tensors_and_inline_graphs_take_the_general_path(pair):
    lean, general = pair
    g = GraphBuilder()
    size = LEAN_MAX_BYTES // 4 + 1  # float32 elements: a request over LEAN_MAX_BYTES
    x = g.input("x", "float32", [size])
    g.output("loss", g.sum(x * x))
    graph_id = registered(pair, g)
    before = lean.counts["inline"]
    big = differentiate(graph_id, {"x": np.linspace(0, 1, size, dtype=np.float32)})
    assert len(big) > LEAN_MAX_BYTES
    inline = pb.DifferentiateRequest(graph=seed_graph().build())
    fill_tensors(inline.inputs, {"x": PI, "y": PI})
    for method, data in (("Differentiate", big),
                         ("Differentiate", inline.SerializeToString())):
        fast = lean(method, data)
        assert isinstance(fast, bytes) and fast == general(method, data)
    assert lean.counts["inline"] == before


def with_stored(graph_id, inputs, stored: dict, **fields) -> bytes:
    """A Differentiate request naming stored tensors: stored = {field: {key: (handle,
    name)}} for stored_inputs, stored_tangents and stored_cotangents."""
    request = pb.DifferentiateRequest(graph_id=graph_id, **fields)
    fill_tensors(request.inputs, inputs)
    for field, refs in stored.items():
        for key, (handle, name) in refs.items():
            entry = getattr(request, field)[key]
            entry.handle, entry.name = handle, name
    return request.SerializeToString()


@pytest.fixture(scope="module")
def stored(pair):
    """The same tensors put on both servers: (lean's handle, general's handle)."""
    tensors = {**PARAMETERS, "big": np.ones((512, 3), np.float32),
               "huge": np.ones((100_000, 3), np.float32),
               "huge_g": np.ones((100_000, 2), np.float32),
               "g": np.float32([[1.0, -1.0]] * 5)}
    handles = []
    for raw in pair:
        with Client(f"127.0.0.1:{raw.server.port}") as client:
            handles.append(client.put(tensors).id)
    return tuple(handles)


def test_stored_tensors_and_dynamic_shapes_are_answered_inline_as_by_a_worker(pair, stored):
    """A model's gradient with its parameters in the tensor store and a dynamic batch
    (what an ONNX import's vjp sends): the same bytes as the general path's, inline."""
    lean, general = pair
    graph_id = registered(pair, dense_model())
    x = np.linspace(-2, 2, 15, dtype=np.float32).reshape(5, 3)
    params = {k: k for k in PARAMETERS}
    cases = {
        "vjp, stored parameters": ({"x": x}, {"stored_inputs": params},
                                   {"cotangents": {"y": to_tensor(np.float32([[0.5, 2]] * 5))}}),
        "vjp, stored cotangents": ({"x": x}, {"stored_inputs": params,
                                              "stored_cotangents": {"y": "g"}}, {}),
        "batched jvp": ({"x": x}, {"stored_inputs": params},
                        {"tangents": {"W": to_tensor(np.ones((2, 3, 4), np.float32))}}),
        "jacobian, stored x of another batch": (
            {}, {"stored_inputs": {**params, "x": "big"}}, {"wrt": ["b"]}),
        "jacobian, inline": ({"x": x, **PARAMETERS}, {}, {"mode": WIRE_MODES["reverse"]}),
    }
    for name, (inputs, refs, fields) in cases.items():
        requests = [with_stored(graph_id, inputs, {f: {k: (handle, n) for k, n in r.items()}
                                                   for f, r in refs.items()}, **fields)
                    for handle in stored]
        before = lean.counts["inline"]
        fast, slow = lean("Differentiate", requests[0]), general("Differentiate", requests[1])
        assert isinstance(fast, bytes) and isinstance(slow, bytes), (name, fast, slow)
        assert fast == slow, name
        assert lean.counts["inline"] == before + 1, f"{name}: not answered inline"


def test_repeated_requests_with_seeds_or_stored_tensors_are_answered_by_a_template(pair,
                                                                                   stored):
    """A request with seeds or stored tensors (an ONNX import's vjp, call after call)
    is answered by templates of its request's and reply's bytes once one of its form
    was answered: new arrays of the same shapes and request ids of the same length are
    read from the bytes without parsing, its stored tensors looked up again. Every
    reply is the general path's bytes; a request id of another length, or another
    form, is answered the long way and makes the template again."""
    lean, general = pair
    graph_id = registered(pair, dense_model())
    rng = np.random.default_rng(11)
    params = {k: k for k in PARAMETERS}

    def x():
        return rng.standard_normal((5, 3)).astype(np.float32)
    cases = {
        "vjp, stored parameters": lambda: ({"x": x()}, {"stored_inputs": params}, {
            "cotangents": {"y": to_tensor(rng.standard_normal((5, 2)).astype(np.float32))},
            "wrt": ["W", "b", "V"]}),
        "vjp, stored cotangents": lambda: ({"x": x()}, {"stored_inputs": params,
                                                        "stored_cotangents": {"y": "g"}}, {}),
        "batched jvp": lambda: ({"x": x()}, {"stored_inputs": params}, {
            "tangents": {"W": to_tensor(rng.standard_normal((2, 3, 4)).astype(np.float32))}}),
        "jacobian, stored parameters": lambda: ({"x": x()}, {"stored_inputs": params},
                                                {"wrt": ["b"]}),
        "vjp, inline parameters": lambda: ({"x": x(), **PARAMETERS}, {}, {
            "cotangents": {"y": to_tensor(np.ones((5, 2), np.float32))}}),
    }
    # ids: none; one byte (long way), one byte (template); 200 bytes, a 2-byte length
    # (long way), 200 bytes (template)
    ids = ("", "7", "8", "r" * 200, "s" * 200)
    for name, case in cases.items():
        before = lean.templated
        for request_id in ids:
            inputs, refs, fields = case()
            requests = [with_stored(graph_id, inputs,
                                    {f: {k: (handle, n) for k, n in r.items()}
                                     for f, r in refs.items()},
                                    request_id=request_id, **fields) for handle in stored]
            inline = lean.counts["inline"]
            fast = lean("Differentiate", requests[0])
            slow = general("Differentiate", requests[1])
            assert isinstance(fast, bytes) and fast == slow, (name, request_id)
            assert lean.counts["inline"] == inline + 1, (name, request_id)
        assert lean.templated == before + 2, name


def test_seeded_templates_are_bounded_in_number(pair, stored, monkeypatch):
    """Templates of seeded forms count against the same bound as Jacobian ones: past
    it, all are forgotten at once."""
    lean, _ = pair
    monkeypatch.setattr(lean_module, "_TEMPLATES_KEPT", 3)
    graph_id = registered(pair, dense_model())
    path = lean.server.servicer.lean
    cot = {"cotangents": {"y": to_tensor(np.ones((2, 2), np.float32))}}
    for wrt in (["W"], ["b"], ["V"], ["W", "b"], ["b", "V"], ["W", "V"], ["x"]):
        data = with_stored(graph_id, {"x": np.ones((2, 3), np.float32)},
                           {"stored_inputs": {k: (stored[0], k) for k in PARAMETERS}},
                           wrt=wrt, **cot)
        assert isinstance(lean("Differentiate", data), bytes)
        kept = sum(t.seeded is not None for forms in path._requests.values() for t in forms)
        assert kept + len(path._templates) <= 3


def test_a_templated_request_whose_stored_tensors_are_gone_gets_the_general_paths_error(
        pair):
    """Its handle is looked up on every call: deleted after the template was made, the
    next request's error is the general path's (NOT_FOUND, naming the field)."""
    lean, general = pair
    graph_id = registered(pair, dense_model())
    handles = []
    for raw in pair:
        with Client(f"127.0.0.1:{raw.server.port}") as client:
            handles.append(client.put(PARAMETERS).id)
    x = np.ones((4, 3), np.float32)
    cot = {"cotangents": {"y": to_tensor(np.ones((4, 2), np.float32))}}
    requests = [with_stored(graph_id, {"x": x}, {"stored_inputs": {k: (h, k)
                                                                   for k in PARAMETERS}},
                            request_id="5", **cot) for h in handles]
    for _ in range(2):  # the second one by the template
        assert lean("Differentiate", requests[0]) == general("Differentiate", requests[1])
    templated = lean.templated
    assert lean("Differentiate", requests[0]) == general("Differentiate", requests[1])
    assert lean.templated == templated + 1
    for raw, handle in zip(pair, handles):
        with Client(f"127.0.0.1:{raw.server.port}") as client:
            assert client.delete(handle)
    fast, slow = lean("Differentiate", requests[0]), general("Differentiate", requests[1])
    assert isinstance(fast, grpc.RpcError) and isinstance(slow, grpc.RpcError)
    assert fast.code() == slow.code() == grpc.StatusCode.NOT_FOUND
    # (each server's own handle)
    assert fast.details().replace(handles[0], "H") == slow.details().replace(handles[1], "H")
    assert handles[0] in fast.details()


def test_stored_inputs_that_fail_get_the_general_paths_errors(pair, stored):
    lean, general = pair
    graph_id = registered(pair, dense_model())
    x = np.zeros((2, 3), np.float32)
    cot = {"cotangents": {"y": to_tensor(np.ones((2, 2), np.float32))}}
    params = {k: k for k in PARAMETERS}
    cases = {
        "lost handle": lambda h: with_stored(graph_id, {"x": x}, {
            "stored_inputs": {k: ("no-such-handle", n) for k, n in params.items()}}, **cot),
        "no such name": lambda h: with_stored(graph_id, {"x": x}, {
            "stored_inputs": {**{k: (h, n) for k, n in params.items()}, "V": (h, "nope")}},
            **cot),
        "given twice": lambda h: with_stored(graph_id, {"x": x, "W": PARAMETERS["W"]}, {
            "stored_inputs": {k: (h, n) for k, n in params.items()}}, **cot),
        "a stored input of the wrong shape": lambda h: with_stored(graph_id, {"x": x}, {
            "stored_inputs": {**{k: (h, n) for k, n in params.items()}, "b": (h, "W")}},
            **cot),
    }
    for name, request in cases.items():
        before = lean.counts["inline"]
        fast, slow = lean("Differentiate", request(stored[0])), general(
            "Differentiate", request(stored[1]))
        assert isinstance(fast, grpc.RpcError) and isinstance(slow, grpc.RpcError), name
        assert (fast.code(), fast.details()) == (slow.code(), slow.details()), name
        assert fast.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
        assert lean.counts["inline"] == before, name


def test_a_large_stored_input_is_estimated_at_its_own_shape(pair, stored):
    """The request is small, but its stored x and cotangent have 100,000 rows: the
    estimate at the bound shapes is over the budget, and a worker answers it (the same
    bytes)."""
    lean, general = pair
    graph_id = registered(pair, dense_model())
    params = {k: k for k in PARAMETERS}
    requests = [with_stored(graph_id, {}, {"stored_inputs": {**{k: (h, n) for k, n in
                                                                 params.items()},
                                                              "x": (h, "huge")},
                                           "stored_cotangents": {"y": (h, "huge_g")}},
                            wrt=["b"]) for h in stored]
    assert len(requests[0]) < 1000
    slow = general("Differentiate", requests[1])
    for _ in range(2):  # the second time known over the budget by its bytes' prefix
        before = lean.counts
        fast = lean("Differentiate", requests[0])
        assert isinstance(fast, bytes) and fast == slow
        after = lean.counts
        assert after["over_budget"] == before["over_budget"] + 1
        assert after["inline"] == before["inline"]


PRODUCTS = {  # (a's shape, b's shape): stacks of tiny matrices, outer products, layers
    "stack of 2x2": ((20_000, 2, 2), (20_000, 2, 2)),
    "stack of 1x1": ((20_000, 1, 1), (20_000, 1, 1)),
    "stack of 7x8 by 8x7 (attention's)": ((2_000, 7, 8), (2_000, 8, 7)),
    "column by 1x1": ((4_096, 1), (1, 1)),
    "1x1 by row": ((1, 1), (1, 4_096)),
    "dense layer to 10 classes": ((64, 64), (64, 10)),
    "dense layer": ((256, 64), (64, 64)),
}


@pytest.fixture(scope="module")
def one_blas_thread_estimates(pair):
    """A lean path costing as `gradserve serve` does at one BLAS thread, on the server
    without one (its metric can be registered once there)."""
    from gradserve.server.lean import LeanPath, TimeModel
    return LeanPath(pair[1].server.servicer, model=TimeModel())


def engine_us_and_estimate(estimates, g, values, cotangent) -> tuple[float, float]:
    """(the engine's CPU microseconds for graph g's VJP at these values, the least of
    three runs at one BLAS thread; the lean path's estimate of it)."""
    from threadpoolctl import threadpool_limits

    from gradserve import engine
    from gradserve.server.convert import graph_from_proto

    plan = engine.compile(graph_from_proto(g.build()))
    estimate_us = estimates._differentiate_us(plan, plan.bind(values).shapes, 1)
    with threadpool_limits(1, "blas"):
        spent = []
        for _ in range(3):
            start = time.thread_time()
            plan.vjp(values, cotangent)
            spent.append(time.thread_time() - start)
    return min(spent) * 1e6, estimate_us


@pytest.fixture(scope="module")
def machine_speed(one_blas_thread_estimates) -> float:
    """How much slower than the time model's constants this machine runs elementwise
    work (at least 1): the constants were fitted on the project's machines, and a slower
    one stretches every product's time as much; its products must stay as far within
    their estimates as its elementwise work is."""
    g = GraphBuilder()
    a = g.input("a", "float32", (100_000,))
    g.output("o", g.sin(a) * a)
    values = {"a": np.linspace(-3, 3, 100_000, dtype=np.float32)}
    spent, estimate = engine_us_and_estimate(one_blas_thread_estimates, g, values,
                                             {"o": np.ones(100_000, np.float32)})
    return max(1.0, spent / estimate)


@pytest.mark.parametrize("case", PRODUCTS)
def test_a_products_estimate_bounds_its_engine_time(one_blas_thread_estimates, machine_speed,
                                                    case):
    """The lean path's estimate of a matrix product's gradient call (at one BLAS thread,
    as `gradserve serve` runs) is above the engine's CPU time for it, on a machine as
    fast as the model's (else scaled by machine_speed): BLAS's rate alone would put a
    stack of 20,000 2x2 products, named by a small request whose tensors are stored, at
    ~70 us against ~2 ms on the event loop."""
    a_shape, b_shape = PRODUCTS[case]
    g = GraphBuilder()
    g.output("o", g.input("a", "float32", a_shape) @ g.input("b", "float32", b_shape))
    rng = np.random.default_rng(0)
    values = {"a": rng.standard_normal(a_shape).astype(np.float32),
              "b": rng.standard_normal(b_shape).astype(np.float32)}
    cotangent = {"o": np.ones(np.broadcast_shapes(a_shape[:-2], b_shape[:-2])
                              + (a_shape[-2], b_shape[-1]), np.float32)}
    spent, estimate = engine_us_and_estimate(one_blas_thread_estimates, g, values, cotangent)
    assert spent < estimate * machine_speed, (case, spent, estimate, machine_speed)


def test_the_inline_budget_is_in_server_info(pair):
    """GetServerInfo says how long a request may hold the event loop and how large a
    request the lean path takes; a server without the lean path says 0."""
    from gradserve.server.lean import DEFAULT_INLINE_BUDGET_US

    lean, general = pair
    infos = [pb.GetServerInfoResponse.FromString(raw("GetServerInfo", b"")) for raw in pair]
    assert (infos[0].inline_budget_us, infos[0].lean_max_bytes) == (DEFAULT_INLINE_BUDGET_US,
                                                                   LEAN_MAX_BYTES)
    assert (infos[1].inline_budget_us, infos[1].lean_max_bytes) == (0, 0)
    # a request just over lean_max_bytes goes to a worker whatever its estimate
    n = LEAN_MAX_BYTES // 8  # x, y and o's cotangent: 1.5 times lean_max_bytes
    seed_id = registered(pair, seed_graph(shape=(n,)))
    x = np.full(n, np.pi, np.float32)
    data = differentiate(seed_id, {"x": x, "y": x},
                         cotangents={"o": to_tensor(np.ones(n, np.float32))})
    assert len(data) > infos[0].lean_max_bytes
    before = lean.counts["inline"]
    assert lean("Differentiate", data) == general("Differentiate", data)
    assert lean.counts["inline"] == before
