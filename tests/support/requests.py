"""Requests built by hand (the builder would refuse most of the graphs they carry), sent
through the generated stub or as raw bytes, and the checks every refusal must pass: its
status code, a message naming the field, a google.rpc.BadRequest detail, and the same
server still answering the worked example."""

from __future__ import annotations

from collections import Counter

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from numpy.testing import assert_allclose

from gradserve.client import GraphBuilder
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import fill_attribute, from_tensor, to_tensor
from support.process_stats import cpu_seconds, reset_peak_rss, status_mib
from support.server_process import ServerProcess


MiB = 1 << 20


F32, F64 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT64


I32, UNSPECIFIED = tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_UNSPECIFIED


INVALID = grpc.StatusCode.INVALID_ARGUMENT


NOT_FOUND = grpc.StatusCode.NOT_FOUND


EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def inp(name, dtype=F32, shape=(2,)):
    return graph_pb2.Input(name=name, dtype=dtype, shape=shape)


def node(name, op, *inputs, **attrs):
    n = graph_pb2.Node(name=name, op=op, inputs=inputs)
    for key, value in attrs.items():
        if isinstance(value, graph_pb2.Attribute):
            n.attrs[key].CopyFrom(value)
        else:
            fill_attribute(n.attrs[key], value)
    return n


def graph(inputs, nodes, outputs=("o",), constants=None):
    return graph_pb2.Graph(inputs=inputs, nodes=nodes, outputs=outputs,
                           constants={k: to_tensor(v) for k, v in (constants or {}).items()})


def tensors(arrays):
    return {name: to_tensor(a) for name, a in arrays.items()}


def raw_tensor(dtype, shape, data):
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def call(stub, rpc, request):
    if rpc == "DifferentiateStream":
        return list(stub.DifferentiateStream(iter([request]), timeout=30))
    return getattr(stub, rpc)(request, timeout=30)


def check_good_request(stub):
    """The worked example, on the server that has just refused a request."""
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    pi = np.float32([np.pi])
    reply = stub.Differentiate(pb.DifferentiateRequest(graph=g.build(),
                                                       inputs=tensors({"x": pi, "y": pi})),
                               timeout=30)
    jac = {(b.of, b.wrt): from_tensor(b.value) for b in reply.jacobian}
    dodx, dody = jac["o", "x"], jac["o", "y"]
    assert dodx.dtype == dody.dtype == np.float32
    assert abs(dodx.item() - -6.2832) < 1e-4
    assert abs(dody.item() - -8.7423e-08) < 1e-11
    assert_allclose(dodx.item(), (np.sin(pi) + (pi + pi) * np.cos(pi)).item(), rtol=1e-6)


def check_status(err, code, says=(), field=""):
    assert err.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), err.details()
    assert err.code() == code, err.details()
    for text in says:
        assert text in err.details()
    status = rpc_status.from_call(err)
    assert status is not None, "no google.rpc.Status in the trailers"
    assert status.code == code.value[0] and status.message == err.details()
    detail = error_details_pb2.BadRequest()
    assert status.details and status.details[0].Unpack(detail)
    assert detail.field_violations
    violation = detail.field_violations[0]
    assert violation.field, "the BadRequest field path is empty"
    assert field in violation.field
    assert violation.description


SERVICE = "/gradserve.v1.GradientService/"


class RawServer:
    """An in-process server (server.app.Server) called with raw request bytes: the raw
    reply bytes, or the grpc.RpcError, come back; `counts` and `templated` read its lean
    path's counters (None without one)."""

    def __init__(self, server):
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")

    def __call__(self, method: str, data: bytes, timeout: float = 30.0):
        call = self.channel.unary_unary(SERVICE + method, _registered_method=True)
        try:
            return call(data, timeout=timeout)
        except grpc.RpcError as err:
            return err

    def register(self, graph) -> str:
        data = pb.RegisterGraphRequest(graph=graph.build()).SerializeToString()
        return pb.RegisterGraphResponse.FromString(self("RegisterGraph", data)).graph_id

    @property
    def lean(self):
        return self.server.servicer.lean

    @property
    def counts(self):
        return Counter(self.lean.counts) if self.lean is not None else None

    @property
    def templated(self) -> int:
        return self.lean.templated


def call_raw(channel, method: str, data: bytes, timeout=60):
    if method == "DifferentiateStream":
        return list(channel.stream_stream(SERVICE + method)(iter([data]), timeout=timeout))
    return channel.unary_unary(SERVICE + method)(data, timeout=timeout)


def refused_with_little_work(method: str, data: bytes, says: tuple, path: str) -> None:
    """Send `data` to a fresh `gradserve serve`: RESOURCE_EXHAUSTED naming `path`, the
    server's peak RSS grown by about the message's own buffers (not by parsing it) and
    well under a second of its CPU spent; a good request answered afterwards."""
    size = len(data) / MiB
    with ServerProcess("--port", "0") as server:
        with grpc.insecure_channel(server.wait_serving(), options=[
                ("grpc.max_send_message_length", 128 * MiB)]) as channel:
            check_good_request(pb_grpc.GradientServiceStub(channel))  # warm
            pid = server.proc.pid
            reset_peak_rss(pid)
            before, cpu = status_mib(pid, "VmHWM"), cpu_seconds(pid)
            with pytest.raises(grpc.RpcError) as info:
                call_raw(channel, method, data)
            growth, used = status_mib(pid, "VmHWM") - before, cpu_seconds(pid) - cpu
            check_status(info.value, EXHAUSTED, says, path)
            check_good_request(pb_grpc.GradientServiceStub(channel))
        assert server.terminate(timeout=30) == 0
    assert growth <= 4 * size + 32, f"peak RSS grew by {growth:.0f} MiB ({size:.0f} MiB sent)"
    assert used < 1.0, f"refusing it took {used:.2f} s of server CPU"
