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
from gradserve.v1.modes import mode_name

from .errors import BadRequest, abort, status_for
from .limits import Limits
from .wire import wire_counter

def _mode(reply) -> str | None:
    """The mode a reply reports, for the differentiations counter (None: no mode)."""
    mode = getattr(reply, "mode", None)
    return mode_name(mode) if mode else None


def _code(exc: BaseException) -> str:
    code = status_for(exc)
    return code.name if code is not None else "INTERNAL"


def parse(request_type, data, limits: Limits):
    """The request message from its bytes (a message passes through unchanged).

    Parsing takes 10-30x the wire size, so the repeated fields that limits bound
    (nodes, constants, inputs, ...) are counted on the wire first (server.wire).
    """
    if not isinstance(data, bytes):
        return data
    wire_counter(request_type, limits).check(data)
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
            request = parse(request_type, request, self.limits)
            reply = method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            self.telemetry.record(name, _code(exc), started, request)
            abort(context, exc)
        self.telemetry.record(name, "OK", started, request, reply,
                              _mode(reply))
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
            parsed = (parse(request_type, r, self.limits) for r in requests)
            for reply in method(self, parsed, context):
                self.telemetry.record(name, "OK", started, None, reply,
                                      _mode(reply))
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
