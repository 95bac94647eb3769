"""Error messages that echo what the request sent stay short, over real gRPC.

An 8 KB node name, a 1,000-entry `perm` or a wrong-typed 1,000,000-int attribute made
error strings of 8 KB to 8 MB; gRPC carries the status in trailers that the client caps
at 8 KiB, so the client got RESOURCE_EXHAUSTED "received metadata size exceeds limit"
and lost the BadRequest detail. Echoed values are now clipped (engine.errors.echo,
ECHO_LIMIT characters each) and a whole message to MESSAGE_LIMIT bytes: each case gets
INVALID_ARGUMENT with a short message that still names the node, op and field, and the
BadRequest detail. A list attribute longer than any op takes (2 x MAX_RANK values) is
refused before it is converted, with its length only.
"""

from __future__ import annotations

import json
import time
import logging

import grpc
import numpy as np
import pytest

from gradserve.engine.errors import MESSAGE_LIMIT, clip, echo
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import graph_pb2

from support.requests import (F32, INVALID, call, check_good_request, check_status, graph, inp,
                                 node, tensors)

LONG_NAME = "n" * 8192
WIDE_NAME = "\N{GREEK SMALL LETTER ALPHA}" * 8192  # 2 bytes each in UTF-8


def million_ints() -> graph_pb2.Attribute:
    attr = graph_pb2.Attribute()
    attr.ints.values.extend(np.zeros(1_000_000, np.int64).tolist())
    return attr


X = tensors({"x": np.ones((2, 3), np.float32)})
CASES = [
    # (id, () -> (rpc, request), substrings of the message, field path prefix)
    ("8KB-node-name", lambda: ("RegisterGraph", pb.RegisterGraphRequest(graph=graph(
        [inp("x")], [node(LONG_NAME, "sin", "y")], [LONG_NAME]))),
     ("(sin)", "input 'y' is not an input", "8,192 characters"), "graph['nnn"),
    ("8KB-non-ascii-node-name", lambda: ("RegisterGraph", pb.RegisterGraphRequest(graph=graph(
        [inp("x")], [node(WIDE_NAME, "sin", "y")], [WIDE_NAME]))),
     ("(sin)", "is not an input"), "graph['"),
    ("8KB-input-reference", lambda: ("RegisterGraph", pb.RegisterGraphRequest(graph=graph(
        [inp("x")], [node("o", "sin", LONG_NAME)]))), ("node 'o' (sin)",), "graph['o']"),
    ("1000-entry-perm", lambda: ("Evaluate", pb.EvaluateRequest(graph=graph(
        [inp("x", F32, (2, 3))], [node("o", "transpose", "x", perm=list(range(1000)))]),
        inputs=X)), ("node 'o' (transpose)", "attribute 'perm' has 1,000 values"), "graph['o'].attrs.perm"),
    ("1M-int-attribute-of-the-wrong-type", lambda: ("Differentiate", pb.DifferentiateRequest(
        graph=graph([inp("x", F32, (2, 3))], [node("o", "softmax", "x", axis=million_ints())]),
        inputs=X)), ("node 'o' (softmax)", "attribute 'axis' has 1,000,000 values"),
     "graph['o'].attrs.axis"),
    ("8KB-string-attribute-of-the-wrong-type", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=graph([inp("x", F32, (2, 3))], [node("o", "softmax", "x", axis="s" * 8192)]),
        inputs=X)), ("node 'o' (softmax)", "attribute 'axis' must be int"),
     "graph['o'].attrs.axis"),
    ("8KB-input-key", lambda: ("Evaluate", pb.EvaluateRequest(
        graph=graph([inp("x", F32, (2, 3))], [node("o", "sin", "x")]),
        inputs=tensors({"x": np.ones((2, 3), np.float32), LONG_NAME: np.ones(1, np.float32)}))),
     ("is not an input",), ""),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rpc_kind", ["unary", "stream"])
def test_echoed_values_are_clipped(stub, case, rpc_kind):
    _, make, says, field = case
    rpc, request = make()
    if rpc_kind == "stream":
        if rpc == "RegisterGraph":
            request = pb.DifferentiateRequest(graph=request.graph)
        elif rpc == "Evaluate":
            request = pb.DifferentiateRequest(graph=request.graph, inputs=request.inputs)
        rpc = "DifferentiateStream"
    with pytest.raises(grpc.RpcError) as info:
        call(stub, rpc, request)
    err = info.value
    check_status(err, INVALID, says, field)
    assert len(err.details().encode()) <= MESSAGE_LIMIT, len(err.details())
    check_good_request(stub)


def test_echo_and_clip():
    assert echo("short") == "short" and echo(3) == "3" and echo((3,)) == "(3,)"
    assert echo([1, 2, 3]) == "[1, 2, 3]"
    long = echo(list(range(10**6)))
    assert long.startswith("[0, 1, 2,") and long.endswith(", ... (1,000,000 items)]")
    assert len(long) < 120
    name = echo("a" * 8192)
    assert len(name) <= 80 and "8,192 characters" in name and name.startswith("aaa")
    text = clip("x" * 5000 + " is not a permutation of the 3 axes")
    assert len(text) == MESSAGE_LIMIT and text.endswith("is not a permutation of the 3 axes")


def test_unknown_8kb_graph_id_is_clipped(stub, caplog):
    """In the status, and in the request log line (the server runs in this process)."""
    with caplog.at_level(logging.INFO, logger="gradserve.requests"), \
            pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(pb.EvaluateRequest(graph_id="f" * 8192), timeout=30)
    check_status(info.value, grpc.StatusCode.NOT_FOUND, ("unknown graph_id", "8,192 characters"),
                 "graph_id")
    assert len(info.value.details()) <= 200
    logged = [json.loads(r.getMessage()) for r in caplog.records
              if r.name == "gradserve.requests"]
    assert logged and logged[-1]["code"] == "NOT_FOUND"
    assert len(logged[-1]["graph_id"]) <= 80 and "8,192 characters" in logged[-1]["graph_id"]


def test_a_six_million_value_attribute_is_refused_before_conversion(stub):
    """A list attribute longer than any op takes (2 x MAX_RANK values) is INVALID_ARGUMENT
    before it becomes a Python list: 6,000,000 values (6 MB on the wire) took 190 MB and
    5 s to convert and check before."""
    attr = graph_pb2.Attribute()
    attr.ints.values.extend(np.zeros(6_000_000, np.int64).tolist())
    request = pb.EvaluateRequest(
        graph=graph([inp("x", F32, (2, 3))], [node("o", "transpose", "x", perm=attr)]),
        inputs=X)
    # CPU time of this process (the in-process server and the client), not wall time: a
    # loaded machine stretches the latter
    started = time.process_time()
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request, timeout=30)
    took = time.process_time() - started
    check_status(info.value, INVALID, ("node 'o' (transpose)", "6,000,000 values", "64"),
                 "graph['o'].attrs.perm")
    assert took < 1.0, f"refusing it took {took:.2f} CPU-s"
    check_good_request(stub)
