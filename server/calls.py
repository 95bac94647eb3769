"""The decorators every RPC method wears: parse the request bytes, map errors to
statuses, record the outcome.

Requests arrive as raw bytes (the handlers are registered without a
deserializer) so that bytes that are not a valid request are INVALID_ARGUMENT
with a message, not grpcio's INTERNAL "Exception deserializing request!".
"""

from __future__ import annotations

import functools
import time

import grpc
from google.protobuf.message import DecodeError

from gradserve.v1 import gradient_service_pb2 as pb

from .errors import BadRequest, LimitExceeded, abort, status_for

_MODES = {pb.MODE_FORWARD: "forward", pb.MODE_REVERSE: "reverse"}


def _code(exc: BaseException) -> str:
    code = status_for(exc)
    return code.name if code is not None else "INTERNAL"


def parse(request_type, data, max_nodes: int | None = None):
    """The request message from its bytes (a message passes through unchanged).

    Parsing takes 10-20x the wire size, so a graph over `max_nodes` is refused by
    counting its nodes on the wire first (only for messages big enough to hold one).
    """
    if not isinstance(data, bytes):
        return data
    if (max_nodes is not None and len(data) > 2 * max_nodes
            and "graph" in request_type.DESCRIPTOR.fields_by_name):
        count = _nodes_on_wire(data)
        if count > max_nodes:
            raise LimitExceeded(f"graph has {count:,} nodes, over the limit of {max_nodes:,}",
                                field="graph.nodes")
    try:
        return request_type.FromString(data)
    except DecodeError as err:
        raise BadRequest(f"the request bytes are not a valid "
                         f"{request_type.DESCRIPTOR.full_name}: {err}") from None


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def method_handler(request_streaming: bool, response_streaming: bool, behavior, **kwargs):
    """A grpc.RpcMethodHandler of the given kind (unary or streaming each way)."""
    return _HANDLER_KINDS[(request_streaming, response_streaming)](behavior, **kwargs)


_GRAPH_FIELD = 1  # `graph` in RegisterGraphRequest, EvaluateRequest, DifferentiateRequest
_NODES_FIELD = 3  # `nodes` in Graph


def _nodes_on_wire(data: bytes) -> int:
    """Graph.nodes entries in a serialized request, without parsing it (0 when the
    bytes do not walk: the parser then says what is wrong)."""
    try:
        for field, start, end in _fields(data, 0, len(data)):
            if field == _GRAPH_FIELD:
                return sum(1 for f, _, _ in _fields(data, start, end) if f == _NODES_FIELD)
    except (IndexError, ValueError):
        pass
    return 0


def _fields(buf: bytes, i: int, end: int):
    """(field number, start, end) of each length-delimited field of a message; other
    wire types are skipped."""
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 2:
            length, i = _varint(buf, i)
            yield key >> 3, i, i + length
            i += length
        elif wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire}")


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _request_type(method_name: str):
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    return getattr(pb, service.methods_by_name[method_name].input_type.name)


def rpc(method):
    """A unary RPC: an exception becomes its status (INTERNAL, logged, if unmapped)."""
    name = method.__name__
    request_type = _request_type(name)

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        try:
            request = parse(request_type, request, self.limits.max_nodes)
            reply = method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            self.telemetry.record(name, _code(exc), started, request)
            abort(context, exc)
        self.telemetry.record(name, "OK", started, request, reply,
                              _MODES.get(getattr(reply, "mode", None)))
        return reply
    return wrapper


def stream_rpc(method):
    """A streaming RPC: each reply is recorded; an error ends the stream with its status."""
    name = method.__name__

    request_type = _request_type(name)

    @functools.wraps(method)
    def wrapper(self, requests, context):
        started = time.perf_counter()
        try:
            parsed = (parse(request_type, r, self.limits.max_nodes) for r in requests)
            for reply in method(self, parsed, context):
                self.telemetry.record(name, "OK", started, None, reply,
                                      _MODES.get(reply.mode))
                yield reply
                started = time.perf_counter()
        except grpc.RpcError:
            if context.is_active():
                raise
            return  # the client cancelled or went away: nothing to answer
        except Exception as exc:  # noqa: BLE001
            self.telemetry.record(name, _code(exc), started)
            abort(context, exc)
    return wrapper
