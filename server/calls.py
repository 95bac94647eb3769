"""The decorators every RPC method wears: map errors to statuses, record the outcome."""

from __future__ import annotations

import functools
import time

import grpc

from gradserve.v1 import gradient_service_pb2 as pb

from .errors import abort, status_for

_MODES = {pb.MODE_FORWARD: "forward", pb.MODE_REVERSE: "reverse"}


def _code(exc: BaseException) -> str:
    code = status_for(exc)
    return code.name if code is not None else "INTERNAL"


def rpc(method):
    """A unary RPC: an exception becomes its status (INTERNAL, logged, if unmapped)."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        try:
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

    @functools.wraps(method)
    def wrapper(self, requests, context):
        started = time.perf_counter()
        try:
            for reply in method(self, requests, context):
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
