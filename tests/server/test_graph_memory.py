"""Wide graphs over real gRPC: what the graph cache counts, the bounds on constants and
inputs, and graph ids that unknown fields do not change.

- A compiled plan holds ~640 bytes per scalar constant, ~500 per input and ~1,000 per
  node beyond its wire bytes (bench/bench_graph_memory.py); the cache used to count
  only wire bytes plus 1,200 per node, so 1,000,000 constants (20 MiB on the wire)
  took 1.23 GiB and graphs of many constants filled the server past max_cache_bytes.
- Constants and inputs are bounded like nodes (max_constants, max_inputs, reported by
  GetServerInfo), counted on the wire before the graph is parsed.
- An unknown field inside a Graph (from a newer client, or garbage) is discarded before
  the id is computed: the same graph gets the same id however it was sent.
"""

from __future__ import annotations

import grpc
import pytest

from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc

from support.server_process import ServerProcess
from support.requests import EXHAUSTED, check_good_request, check_status
from support.process_stats import status_mib
from support.requests import call_raw, refused_with_little_work
from support.wire_bytes import FLOAT32_SCALAR, OUTPUT_O, X_INPUT, constants_graph, field, varint

MiB = 1 << 20


def register(channel, graph: bytes) -> str:
    return pb.RegisterGraphResponse.FromString(
        call_raw(channel, "RegisterGraph", field(1, graph))).graph_id


def test_limits_on_constants_and_inputs_are_reported(start_server):
    server = start_server(Limits(max_inputs=7, max_constants=9))
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        limits = pb_grpc.GradientServiceStub(channel).GetServerInfo(
            pb.GetServerInfoRequest(), timeout=10).limits
    assert (limits.max_inputs, limits.max_constants) == (7, 9)
    defaults = Limits()
    assert defaults.max_inputs == 10_000 and defaults.max_constants == 100_000


def test_a_million_constants_are_refused_before_parsing():
    """1,000,000 scalar constants (20 MiB): 1.23 GiB of RSS and 19 s to register before;
    now RESOURCE_EXHAUSTED naming graph.constants, within the message's own buffers and
    well under a second of server CPU."""
    refused_with_little_work("RegisterGraph", field(1, constants_graph(1_000_000)),
                             ("graph.constants", "max_constants"), "graph.constants")


def test_graphs_of_many_constants_stay_within_max_cache_bytes():
    """Eight distinct graphs of 40,000 constants (0.8 MB each on the wire, ~26 MB each
    compiled) under a 64 MiB cache: counted by what their plans hold, at most two stay
    cached, and the server's RSS grows by about the cache's size plus one request's
    parsing, not by the ~205 MB all eight take when only their wire bytes are counted.
    A graph whose plan alone is over the cache (100,000 constants) is refused."""
    with ServerProcess("--port", "0", "--max-cache-bytes", str(64 * MiB)) as server:
        with grpc.insecure_channel(server.wait_serving()) as channel:
            register(channel, constants_graph(10))  # warm
            pid = server.proc.pid
            before = status_mib(pid, "VmRSS")
            ids = {register(channel, field(2, field(1, f"tag{k}".encode())
                                           + field(2, FLOAT32_SCALAR))
                            + constants_graph(40_000)) for k in range(8)}
            growth = status_mib(pid, "VmRSS") - before
            assert len(ids) == 8
            assert growth <= 2 * 64, f"server RSS grew by {growth:.0f} MiB with a 64 MiB cache"
            with pytest.raises(grpc.RpcError) as info:
                register(channel, constants_graph(100_000))
            check_status(info.value, EXHAUSTED, ("max_cache_bytes",), "graph")
            check_good_request(pb_grpc.GradientServiceStub(channel))
        assert server.terminate(timeout=30) == 0


def _unknown(number: int) -> bytes:
    """An unknown varint field `number` = 1."""
    return varint(number << 3) + b"\x01"


SIN = field(3, field(1, b"o") + field(2, b"sin") + field(3, b"x"))
SIN_WITH_UNKNOWN = field(3, field(1, b"o") + field(2, b"sin") + field(3, b"x") + _unknown(99))
CONSTANT = field(2, field(1, b"c") + field(2, FLOAT32_SCALAR))
CONSTANT_WITH_UNKNOWN = field(2, field(1, b"c") + field(2, FLOAT32_SCALAR + _unknown(77)))


@pytest.mark.parametrize("variant", [
    X_INPUT + CONSTANT + SIN + OUTPUT_O + _unknown(15),  # in Graph
    _unknown(1000) + X_INPUT + CONSTANT + SIN + OUTPUT_O,  # first, a large field number
    X_INPUT + CONSTANT + SIN_WITH_UNKNOWN + OUTPUT_O,  # in a Node
    X_INPUT + CONSTANT_WITH_UNKNOWN + SIN + OUTPUT_O,  # in a constant's Tensor
], ids=["graph", "graph-first", "node", "tensor"])
def test_unknown_fields_do_not_change_the_graph_id(channel, variant):
    plain = register(channel, X_INPUT + CONSTANT + SIN + OUTPUT_O)
    assert register(channel, variant) == plain
    reply = pb.EvaluateResponse.FromString(call_raw(channel, "Evaluate", field(1, variant) + field(
        3, field(1, b"x") + field(2, b"\x08\x01" + field(2, b"\x01") + field(3, b"\0" * 4)))))
    assert reply.graph_id == plain


def concat_graph(references: int, tag: bytes = b"") -> bytes:
    """Graph bytes of o = concat(x, x, ... x) (`references` operands), x float32 [1]: 3
    bytes on the wire per reference. `tag` names a second output to tell graphs apart."""
    node = field(3, field(1, b"o") + field(2, b"concat") + field(3, b"x") * references)
    extra = field(3, field(1, tag) + field(2, b"sin") + field(3, b"x")) + field(4, tag) if tag else b""
    return X_INPUT + node + extra + OUTPUT_O


def test_input_references_are_bounded_on_the_wire():
    """A concat of 1,200,000 references (3.6 MB) is over max_references (1,000,000 by
    default, reported by GetServerInfo): refused before parsing, within the message's
    own buffers and well under a second of server CPU (16.8M references took 13.6 CPU-s
    and +2.4 GiB to register)."""
    refused_with_little_work("RegisterGraph", field(1, concat_graph(1_200_000)),
                             ("1,000,000", "max_references"), "graph.nodes.inputs")


def test_graphs_of_many_references_count_them_in_the_cache():
    """Three distinct 1.2 MB graphs of 400,000 references each under --max-cache-bytes
    16 MiB: each would hold ~36 MiB compiled (~90 bytes per reference), counted as its
    wire bytes before (all three kept: +287 MiB with 4 MB graphs); now counted at 100 bytes
    a reference, each is over the cache and refused, and the server's RSS stays put."""
    with ServerProcess("--port", "0", "--max-cache-bytes", str(16 * MiB)) as server:
        with grpc.insecure_channel(server.wait_serving()) as channel:
            limits = pb_grpc.GradientServiceStub(channel).GetServerInfo(
                pb.GetServerInfoRequest(), timeout=10).limits
            assert limits.max_references == Limits().max_references == 1_000_000
            register(channel, concat_graph(1000))  # warm, and small ones are kept
            pid = server.proc.pid
            before = status_mib(pid, "VmRSS")
            for k in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    register(channel, concat_graph(400_000, f"t{k}".encode()))
                check_status(info.value, EXHAUSTED, ("max_cache_bytes",), "graph")
            growth = status_mib(pid, "VmRSS") - before
            assert growth <= 48, f"server RSS grew by {growth:.0f} MiB"
            check_good_request(pb_grpc.GradientServiceStub(channel))
        assert server.terminate(timeout=30) == 0
