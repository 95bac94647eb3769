"""Repeated fields counted on the wire before parsing, over real gRPC.

Parsing takes 10-30x a message's wire size, so the server counts the entries of every
repeated field a limit bounds (graph nodes, constants, inputs and outputs; a request's
inputs, tangents, cotangents, wrt and of) on the wire, and refuses a request over a
limit with RESOURCE_EXHAUSTED naming the field, before parsing it. The walk stops at
the first bound passed, and a message with more fields than its limits allow is refused
too, so that the walk's own cost is bounded by the limits, not by the message size.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from gradserve.server.app import create_server
from gradserve.server.errors import LimitExceeded
from gradserve.server.limits import Limits
from gradserve.server.wire import wire_counter
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc

from support.requests import EXHAUSTED, check_good_request, check_status
from support.wire_bytes import (FLOAT32_SCALAR, OUTPUT_O, SIN_GRAPH, X_INPUT, constants_graph, field,
                                inputs_graph, map_entries)
from support.requests import call_raw, refused_with_little_work

MiB = 1 << 20
SMALL = Limits(max_nodes=100, max_inputs=20, max_constants=30)
NAMES = 20 + 30 + 100  # max_inputs + max_constants + max_nodes: the most outputs


def strings(number: int, count: int) -> bytes:
    return b"".join(field(number, f"s{k}".encode()) for k in range(count))


# (id, method, request bytes of one entry over SMALL's bound, field path, limit named)
OVER = [
    ("inputs", "Evaluate", field(1, SIN_GRAPH) + map_entries(3, 21), "inputs", "max_inputs"),
    ("tangents", "Differentiate", field(1, SIN_GRAPH) + map_entries(7, 21), "tangents",
     "max_inputs"),
    # DifferentiateRequest.second_order (field 11) holds `vectors` (field 1), one per input
    ("second-order-vectors", "Differentiate",
     field(1, SIN_GRAPH) + field(11, map_entries(1, 21)), "second_order.vectors",
     "max_inputs"),
    ("train-steps-batches", "TrainSteps", field(1, SIN_GRAPH) + map_entries(6, 21),
     "batches", "max_inputs"),
    ("tangents-stream", "DifferentiateStream", field(1, SIN_GRAPH) + map_entries(7, 21),
     "tangents", "max_inputs"),
    ("wrt", "Differentiate", field(2, b"id") + strings(4, 21), "wrt", "max_inputs"),
    ("cotangents", "Differentiate", field(2, b"id") + map_entries(8, NAMES + 1), "cotangents",
     "max_nodes"),
    ("of", "Differentiate", field(2, b"id") + strings(5, NAMES + 1), "of", "max_nodes"),
    ("graph-inputs", "RegisterGraph", field(1, inputs_graph(20)), "graph.inputs",
     "max_inputs"),
    ("graph-constants", "RegisterGraph", field(1, constants_graph(31)), "graph.constants",
     "max_constants"),
    ("graph-nodes", "Evaluate", field(1, SIN_GRAPH + field(3, b"") * 100), "graph.nodes",
     "max_nodes"),
    ("graph-outputs", "RegisterGraph", field(1, SIN_GRAPH + strings(4, NAMES)),
     "graph.outputs", "max_nodes"),
    # the parser merges a message sent in pieces: the pieces are counted together
    ("graph-in-pieces", "RegisterGraph",
     field(1, SIN_GRAPH) + b"".join(field(1, field(2, field(1, f"c{k}".encode())
                                                      + field(2, FLOAT32_SCALAR)))
                                    for k in range(31)), "graph.constants", "max_constants"),
]


@pytest.fixture(scope="module")
def small_channel():
    server = create_server("127.0.0.1:0", SMALL).start()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield channel
    server.stop(grace=0)


@pytest.mark.parametrize("case", OVER, ids=[c[0] for c in OVER])
def test_entries_over_a_limit_are_refused_naming_the_field(small_channel, case):
    _, method, data, path, limit = case
    with pytest.raises(grpc.RpcError) as info:
        call_raw(small_channel, method, data)
    check_status(info.value, EXHAUSTED, (path, limit), path)
    check_good_request(pb_grpc.GradientServiceStub(small_channel))


@pytest.mark.parametrize("where, data", [
    ("EvaluateRequest", b"\x7a\x00" * 1_000_000),  # field 15, unknown: 2 MB of empty fields
    ("graph", field(1, SIN_GRAPH + b"\x7a\x00" * 1_000_000)),
], ids=["request", "graph"])
def test_a_flood_of_unknown_fields_is_refused_without_walking_it(small_channel, where, data):
    """The walk stops once a message holds more fields than its limits allow."""
    with pytest.raises(grpc.RpcError) as info:
        call_raw(small_channel, "Evaluate", data)
    check_status(info.value, EXHAUSTED, (f"{where} has more than",), where)


def test_entries_at_the_limits_pass(small_channel):
    """max_inputs graph inputs and max_constants constants: compiled and evaluated."""
    graph = inputs_graph(19) + map_entries(2, 30, prefix="c")
    inputs = map_entries(3, 19, prefix="i") + field(3, field(1, b"x") + field(
        2, b"\x08\x01" + field(2, b"\x01") + field(3, b"\0\0\0\0")))
    reply = pb.EvaluateResponse.FromString(call_raw(small_channel, "Evaluate",
                                                    field(1, graph) + inputs))
    assert list(reply.outputs) == ["o"]


def test_a_million_entry_inputs_map_is_refused_before_parsing():
    """1,000,000 `inputs` entries (20 MiB): parsing them took ~650 MiB and 6.5 s of server
    CPU before an INVALID_ARGUMENT; counted on the wire, they are refused with
    RESOURCE_EXHAUSTED naming the field, with the peak RSS grown by about the message's
    own buffers and well under a second of server CPU."""
    data = field(1, SIN_GRAPH) + map_entries(3, 1_000_000, prefix="i")
    refused_with_little_work("Evaluate", data, ("inputs", "max_inputs"), "inputs")


def test_the_walk_of_a_big_graph_costs_little(small_channel):
    """What the walk adds to a request that passes is small next to parsing it."""
    limits = Limits()
    graph = field(1, constants_graph(limits.max_constants))
    started = time.process_time()
    wire_counter(pb.RegisterGraphRequest, limits).check(graph)
    walked = time.process_time() - started
    started = time.process_time()
    pb.RegisterGraphRequest.FromString(graph)
    parsed = time.process_time() - started
    assert walked < max(0.25, 2 * parsed), (walked, parsed)


# --- input references in a large request ------------------------------------------------
# A request over 1 MiB has its references' tag bytes (0x1a) counted over its graph field
# only, not over the tensors beside it (4.8 ms for a 16 MiB input); these check that the
# bound still holds there, and that tag bytes in the data do not count.

REFERENCES = Limits(max_references=10)
TAG_DATA = field(3, field(1, b"x") + field(2, b"\x08\x01" + field(2, b"\x80\x80\x40")
                                             + field(3, b"\x1a" * (4 * MiB))))  # 1M f32


def concat_of(name: bytes, references: int) -> bytes:
    """Graph.nodes entry: `name` = concat(x, x, ... x), `references` operands."""
    return field(3, field(1, name) + field(2, b"concat") + field(3, b"x") * references)


@pytest.fixture(scope="module")
def references_channel():
    server = create_server("127.0.0.1:0", REFERENCES).start()
    options = [("grpc.max_send_message_length", 64 * MiB),
               ("grpc.max_receive_message_length", 64 * MiB)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", options) as channel:
        yield channel
    server.stop(grace=0)


@pytest.mark.parametrize("graph", [
    field(1, X_INPUT + concat_of(b"o", 11) + OUTPUT_O),
    # the parser merges a graph sent in two pieces: 6 + 6 references over a bound of 10
    field(1, X_INPUT + concat_of(b"o", 6) + OUTPUT_O) + field(1, concat_of(b"p", 6)),
], ids=["one-graph", "graph-in-pieces"])
@pytest.mark.parametrize("data_first", [False, True], ids=["graph-first", "data-first"])
def test_references_in_a_large_request_are_bounded(references_channel, graph, data_first):
    data = TAG_DATA + graph if data_first else graph + TAG_DATA
    assert len(data) > 4 * MiB
    with pytest.raises(grpc.RpcError) as info:
        call_raw(references_channel, "Evaluate", data)
    check_status(info.value, EXHAUSTED, ("10", "max_references"), "graph.nodes.inputs")
    check_good_request(pb_grpc.GradientServiceStub(references_channel))


def test_tag_bytes_in_a_large_tensor_are_not_references(references_channel):
    """4 MiB of 0x1a bytes as x's data and a graph of 2 references: evaluated, the
    output equal to numpy's concatenate of x with itself."""
    graph = field(1, field(1, field(1, b"x") + b"\x10\x01" + field(3, b"\x80\x80\x40"))
                  + concat_of(b"o", 2) + OUTPUT_O)
    reply = pb.EvaluateResponse.FromString(
        call_raw(references_channel, "Evaluate", graph + TAG_DATA))
    x = np.frombuffer(b"\x1a" * (4 * MiB), np.float32)
    out = reply.outputs["o"]
    assert list(out.shape) == [2 * x.size]
    assert out.data == np.concatenate([x, x]).tobytes()


def test_a_large_request_of_many_fields_counts_its_references_whole():
    """Past the top-level fields it walks to find the graph, the counter counts the tag
    bytes over the whole request: still bounded."""
    many = b"\x78\x00" * 5000  # field 15 (unknown), varint 0: 5,000 fields
    graph = field(1, X_INPUT + concat_of(b"o", 11) + OUTPUT_O)
    with pytest.raises(LimitExceeded) as info:
        wire_counter(pb.EvaluateRequest, REFERENCES).check(many + TAG_DATA + graph)
    assert info.value.field == "graph.nodes.inputs"
