"""Hardening over real gRPC: the bad-input classes that tests/server/test_service_errors.py does
not cover, memory bombs, and work stopped when a call's deadline passes or it is cancelled.

- shapes whose element count overflows int64, and huge dimensions next to a zero (a
  zero-size array NumPy still cannot describe): refused with INVALID_ARGUMENT or
  RESOURCE_EXHAUSTED naming the tensor or node, never INTERNAL;
- a node-count bomb refused (RESOURCE_EXHAUSTED) before the engine allocates anything,
  and the compiled-graph cache kept within its byte limit in real memory;
- a 100,000-node chain works (inline, by id, both modes, streamed);
- NaN and Inf inputs give IEEE results (float32 and float64), never an error;
- bytes that do not parse are INVALID_ARGUMENT on the unary methods and on the stream;
- a slow request whose deadline passes, or that the client cancels, stops using the
  server's CPU (the server runs in this process: its CPU time is this process's
  utime + stime, time.process_time(), BLAS threads included).

After every refusal the same server answers the worked example right.
"""

from __future__ import annotations

import functools
import threading
import time

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.client import GraphBuilder
from gradserve.server.app import create_server
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import graph_pb2
from gradserve.v1.codec import from_tensor, to_tensor

from support.process_stats import reset_peak_rss, status_mib
from support.server_process import ServerProcess
from support.wire_bytes import field
from support.requests import (EXHAUSTED, F32, INVALID, call, check_good_request, check_status,
                                 graph, inp, node, raw_tensor)

MiB = 1 << 20
BIG = 2 ** 62
INT64_MAX = 2 ** 63 - 1
REFUSED = (INVALID, EXHAUSTED)


def check_refused(err, says=(), field=""):
    """INVALID_ARGUMENT or RESOURCE_EXHAUSTED (a shape NumPy cannot hold is both bad input
    and over every limit), with the message, BadRequest detail and field of any error."""
    assert err.code() in REFUSED, f"{err.code()}: {err.details()}"
    check_status(err, err.code(), says, field)


def empty(shape, dtype=F32):
    """A zero-size tensor (no data bytes) of `shape`."""
    return raw_tensor(dtype, shape, b"")


def one_op(x_shape, op="sin", constants=None, **attrs):
    """o = op(x) (or op(x, c) with a constant c), x float32 of `x_shape` (-1 = any size)."""
    ins = ["x"] + list(constants or {})
    g = graph([inp("x", F32, x_shape)], [node("o", op, *ins, **attrs)])
    for name, tensor in (constants or {}).items():
        g.constants[name].CopyFrom(tensor)
    return g


# --- element counts overflowing int64, huge dims next to a zero --------------------------

OVERFLOW_CASES = [
    # (id, () -> (rpc, request), substrings of the message, field path)
    ("input-2^62x2^62", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([-1, -1]), inputs={"x": empty([BIG, BIG])})), ("inputs['x']",),
     "inputs['x']"),
    ("input-int64-max-cubed", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=one_op([-1, -1, -1]), inputs={"x": empty([INT64_MAX] * 3)})), ("inputs['x']",),
     "inputs['x']"),
    ("input-with-data", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([-1, -1]), inputs={"x": raw_tensor(F32, [BIG, 4], b"\0" * 64)})),
     ("inputs['x']",), "inputs['x']"),
    ("declared-input-shape", lambda: ("RegisterGraph", pb.RegisterGraphRequest(
        graph=one_op([2 ** 40] * 4))), ("too large",), "graph['x'].shape"),
    ("constant", lambda: ("RegisterGraph", pb.RegisterGraphRequest(
        graph=one_op([1], "add", {"c": empty([BIG, BIG])}))), ("constants['c']",),
     "constants['c']"),
    ("tangent", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=one_op([-1]), inputs={"x": to_tensor(np.ones(2, np.float32))},
        tangents={"x": empty([BIG, BIG, 2])})), ("tangents['x']",), "tangents['x']"),
    ("reshape-attr", lambda: ("RegisterGraph", pb.RegisterGraphRequest(
        graph=one_op([2], "reshape", shape=[BIG, BIG]))), ("node 'o' (reshape)",), "graph['o']"),
    ("broadcast-to-attr", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([1], "broadcast_to", shape=[2 ** 40, 2 ** 40]),
        inputs={"x": to_tensor(np.ones(1, np.float32))})), ("too large",), "graph['o']"),
]


@pytest.mark.parametrize("case", OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_element_count_overflowing_int64(stub, case):
    _, make, says, field = case
    rpc, request = make()
    with pytest.raises(grpc.RpcError) as info:
        call(stub, rpc, request)
    check_refused(info.value, says, field)
    check_good_request(stub)


# A zero-size shape whose other dimensions multiply past what NumPy can index
# (e.g. [0, 2**62] float32, or a Jacobian block [0, 2**40, 0, 2**40]) must be refused,
# not reach np.reshape/np.broadcast_to/np.zeros ("ValueError: array is too big").
ZERO_CASES = [
    # (id, () -> (rpc, request), field path)
    ("input-0x2^62", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([-1, -1]), inputs={"x": empty([0, BIG])})), "inputs['x']"),
    ("input-2^62x0x2^62", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=one_op([-1, -1, -1]), inputs={"x": empty([BIG, 0, BIG])})), "inputs['x']"),
    ("input-0x2^31x2^31", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([-1, -1, -1]), inputs={"x": empty([0, 2 ** 31, 2 ** 31])})),
     "inputs['x']"),
    # declared so in the graph: the graph itself is refused, naming the input's shape
    ("input-as-declared", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([0, BIG]), inputs={"x": empty([0, BIG])})), "graph['x'].shape"),
    ("constant-0x2^62", lambda: ("RegisterGraph", pb.RegisterGraphRequest(
        graph=one_op([1], "add", {"c": empty([0, BIG])}))), "constants['c']"),
    ("tangent-1x0x2^62", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=one_op([0, -1]), inputs={"x": empty([0, 2 ** 20])},
        tangents={"x": empty([1, 0, BIG])})), "tangents['x']"),
    ("reshape-to-0x2^62", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([0], "reshape", shape=[0, BIG]), inputs={"x": empty([0])})), "graph['o']"),
    ("broadcast-to-2^62x0", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=one_op([1], "broadcast_to", shape=[BIG, 0]),
        inputs={"x": to_tensor(np.ones(1, np.float32))})), "graph['o']"),
    # NumPy holds the input [0, 2**40], but not the Jacobian block [0, 2**40, 0, 2**40]
    ("jacobian-block-of-0x2^40", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=one_op([-1, -1]), inputs={"x": empty([0, 2 ** 40])})), ""),
]


@pytest.mark.parametrize("case", ZERO_CASES, ids=[c[0] for c in ZERO_CASES])
def test_huge_dims_next_to_a_zero_are_refused(stub, case):
    _, make, field = case
    rpc, request = make()
    with pytest.raises(grpc.RpcError) as info:
        call(stub, rpc, request)
    check_refused(info.value, field=field)
    check_good_request(stub)


@pytest.mark.parametrize("shape", [[0, 2 ** 20], [2 ** 20, 0], [0, 3, 2 ** 30]],
                         ids=str)
def test_zero_size_arrays_numpy_can_hold_work(stub, shape):
    """Zero-size inputs whose dimensions NumPy can index are computed: empty results of
    the right shapes (also as Jacobian blocks, when those fit)."""
    g = one_op([-1] * len(shape))
    reply = stub.Evaluate(pb.EvaluateRequest(graph=g, inputs={"x": empty(shape)}), timeout=30)
    assert list(reply.outputs["o"].shape) == shape and reply.outputs["o"].data == b""
    vjp = stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs={"x": empty(shape)}, cotangents={"o": empty(shape)}), timeout=30)
    assert list(vjp.cotangents["x"].shape) == shape
    if shape == [0, 2 ** 20]:
        jac = stub.Differentiate(pb.DifferentiateRequest(graph=g, inputs={"x": empty(shape)}),
                                 timeout=30)
        assert list(jac.jacobian[0].value.shape) == shape + shape
    check_good_request(stub)


# --- memory bombs ------------------------------------------------------------------------


def chain_request_bytes(length: int, input_name: str = "x", op: str = "sin") -> bytes:
    """The serialized RegisterGraphRequest of x -> op -> op ... (`length` nodes, named
    0, 1, ...), written directly (building a million Node messages would take minutes)."""
    parts = [field(1, field(1, input_name.encode()) + b"\x10\x01" + field(3, b"\x01"))]
    prev = input_name.encode()
    op_field = field(2, op.encode())
    for i in range(length):
        name = str(i).encode()
        parts.append(field(3, field(1, name) + op_field + field(3, prev)))
        prev = name
    parts.append(field(4, prev))
    return field(1, b"".join(parts))


def flat_request_bytes(length: int) -> bytes:
    """A RegisterGraphRequest of `length` copies of one node (quick to build; the count is
    over the limit, so the names are never looked at)."""
    one = field(3, field(1, b"n") + field(2, b"sin") + field(3, b"x"))
    graph = (field(1, field(1, b"x") + b"\x10\x01" + field(3, b"\x01")) + one * length
             + field(4, b"n"))
    return field(1, graph)


def test_chain_request_bytes_are_a_valid_request():
    data = chain_request_bytes(3, "x")
    want = pb.RegisterGraphRequest(graph=graph_pb2.Graph(
        inputs=[inp("x", F32, [1])],
        nodes=[node("0", "sin", "x"), node("1", "sin", "0"), node("2", "sin", "1")],
        outputs=["2"]))
    assert pb.RegisterGraphRequest.FromString(data) == want
    flat = pb.RegisterGraphRequest.FromString(flat_request_bytes(3)).graph
    assert [n.name for n in flat.nodes] == ["n"] * 3 and list(flat.outputs) == ["n"]


def register_raw(channel, data: bytes, timeout=60):
    return pb.RegisterGraphResponse.FromString(channel.unary_unary(
        "/gradserve.v1.GradientService/RegisterGraph")(data, timeout=timeout))


def test_node_count_bomb_is_refused_before_any_allocation():
    """200,000 nodes (4 MiB on the wire) against --max-nodes 1000: RESOURCE_EXHAUSTED naming
    the limit, and the server's peak RSS grows by about what parsing the message takes
    (~50 MiB here), far less than compiling those nodes would (~330 MiB), i.e. the engine
    never saw the graph."""
    data = chain_request_bytes(200_000)
    with ServerProcess("--port", "0", "--max-nodes", "1000") as server:
        host, port = server.address()
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            check_good_request(pb_grpc.GradientServiceStub(channel))  # warm
            reset_peak_rss(server.proc.pid)
            before = status_mib(server.proc.pid, "VmHWM")
            for i in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    register_raw(channel, data)
                check_status(info.value, EXHAUSTED, ("more than 1,000 nodes",), "graph.nodes")
                if i == 0:  # one request: later ones may land on another worker thread's
                    growth = status_mib(server.proc.pid, "VmHWM") - before  # malloc arena
            check_good_request(pb_grpc.GradientServiceStub(channel))
        assert server.terminate(timeout=30) == 0
    assert growth < 100, f"peak RSS grew by {growth:.0f} MiB refusing a node-count bomb"


# Parsing takes 11-18x the wire size (2,500,000 nodes in 31 MiB: ~570 MiB), so the
# server counts the nodes on the wire before parsing.
def test_node_count_bomb_at_the_message_size_limit_is_refused_before_parsing():
    data = flat_request_bytes(2_500_000)
    size = len(data) / MiB
    assert size < Limits().max_message_bytes / MiB
    with ServerProcess("--port", "0") as server:
        host, port = server.address()
        with grpc.insecure_channel(f"{host}:{port}", options=[
                ("grpc.max_send_message_length", 128 * MiB)]) as channel:
            check_good_request(pb_grpc.GradientServiceStub(channel))  # warm
            reset_peak_rss(server.proc.pid)
            before = status_mib(server.proc.pid, "VmHWM")
            with pytest.raises(grpc.RpcError) as info:
                register_raw(channel, data)
            growth = status_mib(server.proc.pid, "VmHWM") - before
            check_status(info.value, EXHAUSTED, ("more than 250,000 nodes",), "graph.nodes")
            check_good_request(pb_grpc.GradientServiceStub(channel))
        assert server.terminate(timeout=30) == 0
    assert growth <= 4 * size + 32, (
        f"peak RSS grew by {growth:.0f} MiB refusing a {size:.0f} MiB node-count bomb")


def test_node_count_bomb_at_the_default_limit(stub, channel):
    """One node over the default max_nodes (250,000) is refused; the server answers after."""
    limit = Limits().max_nodes
    with pytest.raises(grpc.RpcError) as info:
        register_raw(channel, chain_request_bytes(limit + 1))
    check_status(info.value, EXHAUSTED, (f"more than {limit:,} nodes",), "graph.nodes")
    check_good_request(stub)


def test_graph_cache_memory_stays_within_max_cache_bytes():
    """max_cache_bytes bounds the compiled plans (a plan takes ~50x its wire size), not
    the wire bytes: six distinct 20,000-node chains (~0.6 MB each on the wire, ~24 MB
    compiled) under a 64 MiB cache may not grow the server's RSS by much more than 64 MiB,
    and a chain whose plan alone is over the cache is refused."""
    with ServerProcess("--port", "0", "--max-cache-bytes", str(64 * MiB)) as server:
        host, port = server.address()
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            register_raw(channel, chain_request_bytes(100, "warm"))
            before = status_mib(server.proc.pid)
            for k in range(6):
                register_raw(channel, chain_request_bytes(20_000, f"x{k}"))
            growth = status_mib(server.proc.pid) - before
            with pytest.raises(grpc.RpcError) as info:
                register_raw(channel, chain_request_bytes(60_000, "too-big"))
            check_status(info.value, EXHAUSTED, ("max_cache_bytes",), "graph")
            stub = pb_grpc.GradientServiceStub(channel)
            check_good_request(stub)
        assert server.terminate(timeout=30) == 0
    assert growth <= 2 * 64 + 48, f"server RSS grew by {growth:.0f} MiB with a 64 MiB cache"


# --- a 100,000-node chain ----------------------------------------------------------------


def sin_chain(length, dtype="float64"):
    g = GraphBuilder()
    h = g.input("x", dtype, [3])
    for _ in range(length):
        h = g.sin(h)
    g.output("o", h)
    return g


def sin_chain_reference(x, length):
    """Values and d/dx (elementwise) of `length` nested sines, by the chain rule."""
    h, d = np.array(x, np.float64), np.ones_like(x, np.float64)
    for _ in range(length):
        d = d * np.cos(h)
        h = np.sin(h)
    return h, d


def test_100k_node_chain_over_grpc(stub, client):
    """No RecursionError anywhere (validation, compile, both sweeps, the reply)."""
    length = 100_000
    g = sin_chain(length)
    x = np.array([0.5, 1.0, -2.0])
    want_o, want_d = sin_chain_reference(x, length)
    request = pb.DifferentiateRequest(graph=g.build(), inputs={"x": to_tensor(x)})
    reply = stub.Differentiate(request, timeout=120)  # inline
    assert_allclose(from_tensor(reply.outputs["o"]), want_o, rtol=1e-9)
    assert_allclose(np.diagonal(from_tensor(reply.jacobian[0].value)), want_d, rtol=1e-6)
    other = "reverse" if reply.mode == pb.MODE_FORWARD else "forward"
    r = client.differentiate(g, {"x": x}, mode=other)  # by id, through the client
    assert r.mode == other
    assert_allclose(np.diagonal(r.jacobian["o", "x"]), want_d, rtol=1e-6)
    with client.stream(g) as s:
        _, cot = client.vjp(g, {"x": x}, {"o": np.ones(3)})
        assert_allclose(cot["x"], want_d, rtol=1e-6)
        r = s.differentiate({"x": x}, cotangents={"o": np.ones(3)})
        assert_allclose(r.outputs["o"], want_o, rtol=1e-9)
        assert_allclose(r.cotangents["x"], want_d, rtol=1e-6)


# --- NaN and Inf -------------------------------------------------------------------------

SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, -1.0, 1.0, 1e30, -1e30, 1e-30]
# (name, the node built from g and the inputs x, y, the NumPy reference); unary ops ignore y
ELEMENTWISE = [
    ("div", lambda g, x, y: x / y, lambda x, y: x / y),
    ("pow", lambda g, x, y: x ** y, lambda x, y: x ** y),
    ("maximum", lambda g, x, y: g.maximum(x, y), lambda x, y: np.maximum(x, y)),
    ("minimum", lambda g, x, y: g.minimum(x, y), lambda x, y: np.minimum(x, y)),
    ("mul", lambda g, x, y: x * y, lambda x, y: x * y),
    ("sub", lambda g, x, y: x - y, lambda x, y: x - y),
    ("log", lambda g, x, _: g.log(x), lambda x, _: np.log(x)),
    ("sqrt", lambda g, x, _: g.sqrt(x), lambda x, _: np.sqrt(x)),
    ("exp", lambda g, x, _: g.exp(x), lambda x, _: np.exp(x)),
    ("reciprocal", lambda g, x, _: g.reciprocal(x), lambda x, _: np.reciprocal(x)),
    ("tan", lambda g, x, _: g.tan(x), lambda x, _: np.tan(x)),
    ("tanh", lambda g, x, _: g.tanh(x), lambda x, _: np.tanh(x)),
    ("square", lambda g, x, _: g.square(x), lambda x, _: np.square(x)),
    ("abs", lambda g, x, _: g.abs(x), lambda x, _: np.abs(x)),
    ("relu", lambda g, x, _: g.relu(x), lambda x, _: np.maximum(x, 0)),
]
BINARY = {"div", "pow", "maximum", "minimum", "mul", "sub"}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, raised inside the server
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", ELEMENTWISE, ids=[e[0] for e in ELEMENTWISE])
def test_nan_and_inf_give_ieee_results(client, op, dtype):
    """Special values (every pair of them for binary ops) through the op: values equal
    NumPy's bit for bit (NaN where NumPy has NaN) in the inputs' dtype; derivatives come
    back in both modes (no error) in that dtype, and agree where both are finite."""
    name, build, reference = op
    if name in BINARY:
        pairs = np.array([(a, b) for a in SPECIALS for b in SPECIALS], dtype=dtype)
        x, y = np.ascontiguousarray(pairs[:, 0]), np.ascontiguousarray(pairs[:, 1])
    else:
        x, y = np.array(SPECIALS, dtype=dtype), None
    g = GraphBuilder()
    gx = g.input("x", dtype, [len(x)])
    gy = g.input("y", dtype, [len(y)]) if y is not None else None
    g.output("o", build(g, gx, gy))
    inputs = {"x": x} if y is None else {"x": x, "y": y}
    with np.errstate(all="ignore"):
        want = np.asarray(reference(x, y), dtype=dtype)
    out = client.evaluate(g, inputs)["o"]
    assert out.dtype == np.dtype(dtype)
    assert_array_equal(out, want)
    _, jvp = client.jvp(g, inputs, {"x": np.ones_like(x)})
    _, vjp = client.vjp(g, inputs, {"o": np.ones_like(x)}, wrt=["x"])
    assert jvp["o"].dtype == vjp["x"].dtype == np.dtype(dtype)
    both = np.isfinite(jvp["o"]) & np.isfinite(vjp["x"])
    assert_allclose(jvp["o"][both], vjp["x"][both], rtol=1e-6)
    r = client.differentiate(g, inputs)
    assert_array_equal(r.outputs["o"], want)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_and_inf_through_reductions(client, stub, dtype):
    """sum, mean, max, softmax, log_softmax and logsumexp over rows holding NaN, +-Inf and
    finite values: OK replies, the dtype kept, NaN rows NaN, the sums and maxima NumPy's."""
    rows = np.array([[1.0, 2.0, 3.0], [np.nan, 1.0, 2.0], [np.inf, 1.0, 2.0],
                     [-np.inf, 1.0, 2.0], [np.inf, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf],
                     [1e30, 1e30, -1e30]], dtype=dtype)
    g = GraphBuilder()
    x = g.input("x", dtype, list(rows.shape))
    g.output("sum", g.sum(x, axes=[1]))
    g.output("mean", g.mean(x, axes=[1]))
    g.output("max", g.max(x, axes=[1]))
    g.output("softmax", g.softmax(x, axis=1))
    g.output("log_softmax", g.log_softmax(x, axis=1))
    g.output("logsumexp", g.logsumexp(x, axis=1))
    r = client.differentiate(g, {"x": rows})
    with np.errstate(all="ignore"):
        assert_array_equal(r.outputs["sum"], rows.sum(axis=1))
        assert_array_equal(r.outputs["max"], rows.max(axis=1))
    for name, value in r.outputs.items():
        assert value.dtype == np.dtype(dtype), name
        assert np.isnan(value[1]).all(), f"{name} of a row with NaN: {value[1]}"
        assert np.isfinite(value[0]).all(), f"{name} of a finite row: {value[0]}"
    for block in r.jacobian.values():  # (reverse mode spreads NaN rows: 0 * NaN = NaN)
        assert block.dtype == np.dtype(dtype)
    # reverse and forward agree where they are finite
    f = client.differentiate(g, {"x": rows}, mode="forward")
    for key, block in r.jacobian.items():
        both = np.isfinite(block) & np.isfinite(f.jacobian[key])
        assert_allclose(block[both], f.jacobian[key][both], rtol=1e-5)
    check_good_request(stub)


# --- bytes that do not parse -------------------------------------------------------------


def _valid(method: str) -> bytes:
    x = np.float32([1.0])
    g = graph([inp("xyz", F32, [1])], [node("abc", "sin", "xyz")], ["abc"])
    return {
        "RegisterGraph": pb.RegisterGraphRequest(graph=g),
        "Evaluate": pb.EvaluateRequest(graph=g, inputs={"xyz": to_tensor(x)}),
        "Differentiate": pb.DifferentiateRequest(graph=g, inputs={"xyz": to_tensor(x)}),
        "DifferentiateStream": pb.DifferentiateRequest(graph=g, inputs={"xyz": to_tensor(x)}),
    }[method].SerializeToString()


GARBAGE = {
    "random": lambda m: b"\xff\xff\xff\xff not a protobuf message",
    "truncated": lambda m: _valid(m)[:-3],
    "invalid-utf8-in-a-name": lambda m: _valid(m).replace(b"abc", b"\xff\xfe\xfd"),
    "length-past-the-end": lambda m: b"\x0a\xff\xff\xff\x7f" + b"x" * 10,
    "varint-too-long": lambda m: b"\x08" + b"\xff" * 11,
    "unbalanced-group-end": lambda m: b"\x0c",
    "groups-nested-too-deep": lambda m: b"\x0b" * 10_000 + b"\x0c" * 10_000,
    "megabyte-of-noise": lambda m: np.random.default_rng(6).bytes(1 << 20),
}
# GetServerInfoRequest has no fields, so only wire-level corruption fails to parse
INFO_GARBAGE = ["random", "length-past-the-end", "varint-too-long", "unbalanced-group-end",
                "groups-nested-too-deep"]
UNARY = [(m, k) for m in ("RegisterGraph", "Evaluate", "Differentiate") for k in GARBAGE]
UNARY += [("GetServerInfo", k) for k in INFO_GARBAGE]


def check_unparsable(err):
    assert err.code() == INVALID, f"{err.code()}: {err.details()}"
    assert err.details(), "no message"


@pytest.mark.parametrize("method, kind", UNARY, ids=[f"{m}-{k}" for m, k in UNARY])
def test_unparsable_bytes_on_unary_methods(channel, stub, method, kind):
    data = GARBAGE[kind](method)
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(f"/gradserve.v1.GradientService/{method}")(data, timeout=30)
    check_unparsable(info.value)
    check_good_request(stub)


@pytest.fixture(scope="module")
def garbage_server():
    """A server of its own for garbage on the stream: grpcio may keep such a call in its
    state for good (see test_service_errors.py), so it is stopped without waiting."""
    server = create_server("127.0.0.1:0").start()
    yield server
    server.stop(grace=0)


@pytest.mark.parametrize("kind", list(GARBAGE))
@pytest.mark.parametrize("after_good", [False, True], ids=["first", "after-a-good-one"])
def test_unparsable_bytes_on_the_stream(garbage_server, kind, after_good):
    """Garbage as the stream's first message, or after a good one (whose reply comes
    first): the stream ends INVALID_ARGUMENT; a new stream and a unary call work."""
    good = _valid("DifferentiateStream")
    with grpc.insecure_channel(f"127.0.0.1:{garbage_server.port}") as ch:
        stream = ch.stream_stream("/gradserve.v1.GradientService/DifferentiateStream")
        replies = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in stream(iter(([good] if after_good else []) +
                                     [GARBAGE[kind]("DifferentiateStream"), good]), timeout=30):
                replies.append(reply)
        check_unparsable(info.value)
        assert len(replies) == int(after_good)
        stub = pb_grpc.GradientServiceStub(ch)
        good_request = pb.DifferentiateRequest.FromString(good)
        assert len(list(stub.DifferentiateStream(iter([good_request] * 2), timeout=30))) == 2
        check_good_request(stub)


# --- deadlines and cancellation stop the work --------------------------------------------


@functools.cache
def long_chain(length=30_000, size=50_000):
    """sum(sin(...sin(x))) over `length` cheap ops (50,000 float32 each): many checks."""
    g = GraphBuilder()
    h = g.input("x", "float32", [size])
    for _ in range(length):
        h = g.sin(h)
    g.output("o", g.sum(h))
    return g.build(), {"x": np.linspace(0.0, 1.0, size, dtype=np.float32)}


@functools.cache
def matmul_chain(length=60, size=1000):
    """x @ w @ w ... : `length` expensive ops (under the engine's chunk of 64 ops)."""
    g = GraphBuilder()
    h, w = g.input("x", "float64", [size, size]), g.input("w", "float64", [size, size])
    for _ in range(length):
        h = h @ w
    g.output("o", h)
    rng = np.random.default_rng(0)
    return g.build(), {"x": rng.standard_normal((size, size)),
                       "w": rng.standard_normal((size, size)) / np.sqrt(size)}


# A graph of fewer than 64 expensive ops (60 matmuls of 1000x1000 here) must stop too:
# the engine checks before every heavy op, not only every 64 ops.
STOP_CASES = [
    pytest.param("chain", "Evaluate", "deadline", id="long-chain-evaluate-deadline"),
    pytest.param("chain", "Differentiate", "deadline", id="long-chain-jvp-deadline"),
    pytest.param("chain", "Evaluate", "cancel", id="long-chain-evaluate-cancel"),
    pytest.param("chain", "Differentiate", "cancel", id="long-chain-jvp-cancel"),
    pytest.param("matmul", "Evaluate", "deadline", id="matmul-chain-deadline"),
    pytest.param("matmul", "Evaluate", "cancel", id="matmul-chain-cancel"),
]


# The estimate counts every node's value as if all were alive at once (30,000 x 200 kB
# here); forward sweeps free them as they go, so the chain runs in a few MB.
NO_MEMORY_LIMIT = Limits(max_intermediate_bytes=1 << 40)


def ended_calls(server, method, code):
    value = server.servicer.telemetry.registry.get_sample_value(
        "gradserve_requests_total", {"method": method, "code": code})
    return int(value or 0)


@pytest.mark.parametrize("kind, method, how", STOP_CASES)
def test_deadline_or_cancel_stops_the_work(start_server, kind, method, how):
    """A full run first (its CPU time is the yardstick), then the same request with a 0.25 s
    deadline or cancelled after 0.25 s: the client sees DEADLINE_EXCEEDED or CANCELLED, the
    server ends the call as CANCELLED (not OK), and the CPU the process spends from then on
    is a small part of a full run's."""
    s = start_server(NO_MEMORY_LIMIT)
    g, inputs = long_chain() if kind == "chain" else matmul_chain()
    with grpc.insecure_channel(f"127.0.0.1:{s.port}", options=[
            ("grpc.max_receive_message_length", 64 * MiB)]) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=60).graph_id
        tensors = {k: to_tensor(v) for k, v in inputs.items()}
        if method == "Evaluate":
            request = pb.EvaluateRequest(graph_id=graph_id, inputs=tensors)
        else:
            request = pb.DifferentiateRequest(graph_id=graph_id, inputs=tensors,
                                              tangents={"x": tensors["x"]})  # a JVP
        rpc = getattr(stub, method)

        wall, cpu = time.monotonic(), time.process_time()
        rpc(request, timeout=120)
        full_wall, full_cpu = time.monotonic() - wall, time.process_time() - cpu
        assert full_wall > 0.5, f"the request is too quick ({full_wall:.2f} s) to stop"

        ended = {c: ended_calls(s, method, c) for c in ("OK", "CANCELLED")}
        if how == "deadline":
            with pytest.raises(grpc.RpcError) as info:
                rpc(request, timeout=0.25)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        else:
            future = rpc.future(request, timeout=120)
            time.sleep(0.25)
            assert future.cancel()
            assert future.cancelled()
        client_end = time.process_time()
        # wait for the server to end the call (OK or CANCELLED), at most a full run + 5 s
        limit = time.monotonic() + full_wall + 5.0
        while time.monotonic() < limit and all(
                ended_calls(s, method, c) == ended[c] for c in ended):
            time.sleep(0.01)
        time.sleep(0.2)
        after = time.process_time() - client_end
        codes = {c: ended_calls(s, method, c) - ended[c] for c in ended}

    figures = (f"the server ended the abandoned call as {codes} and spent {after:.2f} s of CPU "
               f"after it ended; a full run takes {full_cpu:.2f} s CPU, {full_wall:.2f} s")
    assert codes == {"OK": 0, "CANCELLED": 1}, figures
    assert after <= 0.2 * full_cpu + 0.1, figures
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:
        check_good_request(pb_grpc.GradientServiceStub(channel))


def test_stream_cancelled_mid_request_stops_the_work(start_server):
    """The same for DifferentiateStream: cancelling the stream while the server computes a
    request stops it."""
    s = start_server(NO_MEMORY_LIMIT)
    g, inputs = long_chain()
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=60).graph_id
        x = to_tensor(inputs["x"])
        request = pb.DifferentiateRequest(graph_id=graph_id, inputs={"x": x}, tangents={"x": x})
        cpu = time.process_time()
        list(stub.DifferentiateStream(iter([request]), timeout=120))
        full_cpu = time.process_time() - cpu
        before = ended_calls(s, "DifferentiateStream", "OK")
        go = threading.Event()

        def requests():
            yield request
            go.wait(30)

        stream = stub.DifferentiateStream(requests(), timeout=120)
        time.sleep(0.25)
        stream.cancel()
        go.set()
        client_end = time.process_time()
        time.sleep(max(1.0, full_cpu))
        after = time.process_time() - client_end
        assert ended_calls(s, "DifferentiateStream", "OK") == before  # no reply was recorded
    assert after <= 0.2 * full_cpu + 0.1, (
        f"{after:.2f} s of CPU after the stream was cancelled; a full run takes "
        f"{full_cpu:.2f} s")
