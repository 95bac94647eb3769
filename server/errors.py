"""One table from exceptions to gRPC status codes, and the decorator that applies it.

Messages name the node and field, e.g. "node 'h2' (matmul): shapes (3, 4) and
(5, 2) do not align". Each error also carries a google.rpc.BadRequest detail
whose field violation gives the path into the request, for programs.
Anything unmapped is INTERNAL and logged: that is a bug, never bad input.

A status travels in gRPC trailers, which clients cap (8 KiB by default): the
message and the detail's description take at most engine.errors.MESSAGE_LIMIT
bytes of UTF-8 and the field path at most FIELD_LIMIT, whatever the request
echoed into them, so that the client gets the status and its detail.
"""

from __future__ import annotations

import logging
import traceback

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gradserve import engine
from gradserve.engine.errors import MESSAGE_LIMIT, clip, echo
from gradserve.v1.codec import TensorError, TensorLimitError

log = logging.getLogger("gradserve.server")
FIELD_LIMIT = 256  # characters of a BadRequest field path


class RequestError(Exception):
    """A request the server refuses; `field` names the offending field."""

    def __init__(self, message: str, field: str | None = None):
        self.field = field
        super().__init__(message)


class GraphNotFound(RequestError):
    pass


class ResidualsNotFound(RequestError):
    """A residuals handle the server no longer holds (field "residuals")."""


class LimitExceeded(RequestError):
    pass


class StoredNotFound(RequestError):
    """A tensor-store handle this server process does not hold (server.store)."""


class StateConflict(RequestError):
    """A TrainSteps call stepping a stored state from a version it is not at."""


class BadRequest(RequestError):
    pass


class CallEnded(RequestError):
    """The client cancelled or its deadline passed: stop computing for it."""


class StreamIdle(RequestError):
    """A stream sent no request for stream_idle_seconds."""


class ServerClosing(RequestError):
    """The server shuts down while a stream waits for its next request."""


# Most specific first: the first matching row wins.
STATUS_TABLE: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (GraphNotFound, grpc.StatusCode.NOT_FOUND),
    (ResidualsNotFound, grpc.StatusCode.NOT_FOUND),
    (StoredNotFound, grpc.StatusCode.NOT_FOUND),
    (StateConflict, grpc.StatusCode.FAILED_PRECONDITION),
    (CallEnded, grpc.StatusCode.CANCELLED),
    (StreamIdle, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ServerClosing, grpc.StatusCode.UNAVAILABLE),
    (LimitExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (engine.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (engine.ResourceLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TensorLimitError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (engine.EngineError, grpc.StatusCode.INVALID_ARGUMENT),
    (TensorError, grpc.StatusCode.INVALID_ARGUMENT),
]


def stop_when_ended(context):
    """A `check` for the engine: raises CallEnded once the call is cancelled or past
    its deadline, so an abandoned request stops using the server between ops."""
    def check():
        if not context.is_active():
            raise CallEnded("the call was cancelled or its deadline passed")
    return check


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    for kind, code in STATUS_TABLE:
        if isinstance(exc, kind):
            return code
    return None


def field_path(exc: BaseException) -> str:
    """Where the problem is, as a path into the request."""
    if isinstance(exc, engine.EngineError):
        parts = []
        if exc.node is not None:
            parts.append(f"graph['{echo(exc.node)}']")
        if exc.field:
            parts.append(exc.field)
        return ".".join(parts) or "graph"
    return getattr(exc, "field", None) or ""


def short(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """`text` in at most `limit` bytes of UTF-8: clipped, and non-ASCII characters
    escaped (\\uXXXX) when they would make it longer."""
    text = clip(text, limit)
    if len(text.encode()) > limit:
        text = clip(text.encode("ascii", "backslashreplace").decode(), limit)
    return text


def to_status(code: grpc.StatusCode, exc: BaseException) -> grpc.Status:
    message = short(str(exc))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=short(field_path(exc), FIELD_LIMIT),
                                                    description=message)]))
    return rpc_status.to_status(status_pb2.Status(
        code=getattr(code_pb2, code.name), message=message, details=[detail]))


def forget_frames(exc: BaseException) -> None:
    """Drop the frames `exc` (and the exceptions it chains) hold: their locals are the
    request and its arrays, and a traceback is a reference cycle (frame -> exception ->
    traceback -> frame) that only Python's cyclic GC would free, so a failed 60 MiB
    request stayed in memory (16 of them: +600 MiB) until it ran."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        traceback.clear_frames(exc.__traceback__)
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


async def abort(context: grpc.aio.ServicerContext, exc: BaseException):
    """End the call with the status of `exc` (raises, as context.abort does); `exc`'s
    frames are dropped first (forget_frames), once logged when it is INTERNAL."""
    code = status_for(exc)
    if code is None:
        log.error("internal error", exc_info=exc)
        message = short(f"internal error: {type(exc).__name__}: {exc}")
        forget_frames(exc)
        exc = None
        await context.abort(grpc.StatusCode.INTERNAL, message)
    forget_frames(exc)
    status = to_status(code, exc)
    exc = None
    await context.abort(status.code, status.details, status.trailing_metadata)
