"""The decorators every RPC method wears: admit the call, parse the request bytes,
run the method, map errors to statuses, record the outcome.

The server is grpc's asyncio server (server.app): its event loop waits on every
call, so an idle stream holds no thread and health checks always answer, while
everything CPU-bound about a request (parsing, the engine, serializing the
reply) runs in a bounded pool of worker threads (`Calls.executor`). The servicer's
methods stay plain functions `method(self, request, context)` run in a worker;
their `context` is a CallState (is_active, time_remaining), which the engine's
`check` reads between ops. Small Evaluate, Differentiate and TrainSteps requests
within the inline time budget are answered on the event loop instead (server.lean).

Requests arrive as raw bytes (the handlers are registered without a
deserializer) so that bytes that are not a valid request are INVALID_ARGUMENT
with a message, not grpcio's INTERNAL "Exception deserializing request!".
Replies leave as bytes serialized in the worker; those carrying tensors are written
by gradserve.v1.tensor_wire, their arrays joined in once.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.modes import mode_name
from gradserve.v1.tensor_wire import LAYOUTS, decode

from .errors import (BadRequest, LimitExceeded, RequestError, ServerClosing, StreamIdle, abort,
                     status_for)
from .limits import Limits
from .memory import TRIM_AFTER_BYTES, MemoryGuard, trim
from .wire import wire_counter

# After shutdown began, how long a stream that just finished a message waits for its
# next one (already sent, typically) before it is ended UNAVAILABLE. 0.1 s cut streams
# whose next message was already sent on a loaded machine (load average 16 on 2 cores:
# grpc's threads hand a message over late); the streams wait in parallel, within the
# grace.
CLOSING_READ_SECONDS = 1.0


def _mode(reply) -> str | None:
    """The mode a reply reports, for the differentiations counter (None: no mode)."""
    mode = getattr(reply, "mode", None)
    return mode_name(mode) if mode else None


def _code(exc: BaseException) -> str:
    code = status_for(exc)
    return code.name if code is not None else "INTERNAL"


def parse(request_type, data, limits: Limits):
    """The request message from its bytes (a message passes through unchanged); for
    the requests carrying tensors a TensorMessage, whose arrays are read-only views of
    `data` (gradserve.v1.tensor_wire).

    Parsing takes 10-30x the wire size, so the repeated fields that limits bound
    (nodes, constants, inputs, ...) are counted on the wire first (server.wire).
    """
    if not isinstance(data, bytes):
        return data
    wire_counter(request_type, limits).check(data)
    try:
        if request_type in LAYOUTS:
            return decode(request_type, data, limits.max_tensor_elements)
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


class CallState:
    """What a method running in a worker knows of its call, read by the engine's
    `check` between ops: it ends when grpc cancels the handler's task, which it does
    when the client cancels or the call's deadline passes (then the client reads
    DEADLINE_EXCEEDED from grpc, never a status of ours)."""

    __slots__ = ("_deadline", "ended", "peer")

    def __init__(self, context: grpc.aio.ServicerContext):
        remaining = context.time_remaining()
        self._deadline = None if remaining is None else time.monotonic() + remaining
        self.ended = False
        self.peer = peer_host(context.peer())  # the client address (the store's owner)

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def is_active(self) -> bool:
        return not self.ended


def peer_host(peer: str) -> str:
    """The client's address without its port: "ipv4:10.0.0.7:51234" -> "ipv4:10.0.0.7"."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6") and ":" in rest:
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer


class Calls:
    """A server's call machinery: the worker threads, the admission count
    (max_concurrent_rpcs), the open streams (max_streams, max_streams_per_client) and
    their idle timeout (stream_idle_seconds). Counts are touched on the event loop only."""

    def __init__(self, limits: Limits, max_workers: int):
        self.limits = limits
        self.executor = futures.ThreadPoolExecutor(max_workers=max_workers,
                                                   thread_name_prefix="gradserve")
        self.in_progress = 0
        self.streams: Counter[str] = Counter()  # open streams by client address
        self._closing: asyncio.Future | None = None
        self._working = 0  # requests running in a worker (their calls may have ended)
        self._working_lock = threading.Lock()
        self.memory = MemoryGuard(limits.max_rss_bytes)
        self.blas = None  # the servicer's server.blas.BlasWidth

    @property
    def working(self) -> int:
        """Requests a worker is computing now, including some whose call has ended and
        which stop at the engine's next check."""
        return self._working

    def _counted(self, fn, *args):
        with self._working_lock:
            self._working += 1
        try:
            return fn(*args)
        finally:
            with self._working_lock:
                self._working -= 1

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(
            self.executor, self._counted, fn, *args)

    def admit(self) -> None:
        """Count one request in progress; LimitExceeded beyond max_concurrent_rpcs."""
        limit = self.limits.max_concurrent_rpcs
        if limit and self.in_progress >= limit:
            raise LimitExceeded(f"{self.in_progress} requests in progress, at the server's "
                                f"limit of {limit} (max_concurrent_rpcs); retry with backoff")
        rss = self.memory.over()
        if rss:
            raise LimitExceeded(f"the server process holds {rss:,} bytes, over its limit of "
                                f"{self.limits.max_rss_bytes:,} (max_rss_bytes): retry with "
                                "backoff or on another replica")
        self.in_progress += 1
        if self.blas is not None:
            self.blas.narrow()  # a large request running wide no longer runs alone

    def done(self) -> None:
        self.in_progress -= 1

    def open_stream(self, context) -> str:
        """Count a new stream of this client; LimitExceeded over either stream limit."""
        host = peer_host(context.peer())
        per_client, total = self.limits.max_streams_per_client, self.limits.max_streams
        if per_client and self.streams[host] >= per_client:
            raise LimitExceeded(f"{self.streams[host]} streams already open from {host}, the "
                                f"limit per client address (max_streams_per_client) is "
                                f"{per_client}")
        if total and sum(self.streams.values()) >= total:
            raise LimitExceeded(f"{total} streams open, the server's limit (max_streams)")
        self.streams[host] += 1
        return host

    def close_stream(self, host: str) -> None:
        self.streams[host] -= 1
        if not self.streams[host]:
            del self.streams[host]

    def _closing_future(self) -> asyncio.Future:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_future()
        return self._closing

    def close_streams(self) -> None:
        """Shutdown: streams waiting for a message end now, UNAVAILABLE (on the loop)."""
        closing = self._closing_future()
        if not closing.done():
            closing.set_result(None)

    async def next_message(self, context):
        """The stream's next request bytes, or grpc.aio.EOF; StreamIdle after
        stream_idle_seconds without one, ServerClosing once the server shuts down."""
        closing = self._closing_future()
        idle = self.limits.stream_idle_seconds or None
        read = asyncio.ensure_future(context.read())
        try:
            if closing.done():
                done, _ = await asyncio.wait((read,), timeout=CLOSING_READ_SECONDS)
            else:
                done, _ = await asyncio.wait((read, closing), timeout=idle,
                                             return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not read.done():
                read.cancel()
        if read in done:
            return read.result()
        if closing.done():
            raise ServerClosing("the server is shutting down; open a new stream (another "
                                "replica answers)")
        raise StreamIdle(f"stream idle for {idle:g} s, the server's limit "
                         "(stream_idle_seconds); open a new stream to go on")


def _run(method, name: str, request_type, self, data, call: CallState, started: float):
    """In a worker: parse, call the method, record the outcome; the reply's bytes. A
    Differentiate request of a form the lean path keeps templates of is answered by
    them (server.lean: LeanPath.answer_in_worker), the same bytes without the parse and
    the general reply's building."""
    request = data
    size = len(data) if isinstance(data, bytes) else 0
    lean = getattr(self, "lean", None)
    if lean is not None and size:
        reply = lean.answer_in_worker(name, data, started, call)
        if reply is not None:
            return reply
    try:
        request = parse(request_type, data, self.limits)
        reply = method(self, request, call)
    except Exception as exc:  # noqa: BLE001 - recorded here, mapped to a status by the caller
        self.telemetry.record(name, _code(exc), started, request)
        request = data = None  # this frame stays in the traceback: see forget_frames
        raise
    finally:
        if size >= TRIM_AFTER_BYTES:  # what parsing it freed, back to the system
            trim()
    self.telemetry.record(name, "OK", started, request, reply, _mode(reply))
    return reply.SerializeToString()


def rpc(method):
    """A unary RPC: run in a worker; an exception becomes its status (INTERNAL, logged,
    if unmapped)."""
    name = method.__name__
    run = functools.partial(_run, method, name, _request_type(name))

    @functools.wraps(method)
    async def wrapper(self, data, context):
        started = time.perf_counter()
        calls = self.calls
        try:
            calls.admit()
        except LimitExceeded as exc:
            self.telemetry.record(name, _code(exc), started)
            await abort(context, exc)
        call = None
        try:
            lean = self.lean  # small requests: answered here, on the loop (server.lean)
            if lean is not None:
                reply = lean.answer(name, data, started, context.time_remaining())
                if reply is not None:
                    return reply
            call = CallState(context)
            return await calls.in_worker(run, self, data, call, started)
        except asyncio.CancelledError:
            if call is not None:
                call.ended = True  # the worker's next check stops the work
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            error = exc
        finally:
            calls.done()
        # Outside the except clause: the abort's own exception then chains nothing, and
        # this frame (in its traceback) no longer holds the request's bytes.
        data = None
        await abort(context, error)
    return wrapper


def stream_rpc(method):
    """A bidirectional stream of requests each answered by one reply: `method(self,
    request, context)` answers one request, in a worker. The stream waits for its
    next request on the event loop (no thread held), ends DEADLINE_EXCEEDED after
    stream_idle_seconds without one, and UNAVAILABLE when the server shuts down
    while it waits; an error ends it with its status."""
    name = method.__name__
    run = functools.partial(_run, method, name, _request_type(name))

    @functools.wraps(method)
    async def wrapper(self, requests, context):
        calls = self.calls
        try:
            host = calls.open_stream(context)
        except LimitExceeded as exc:
            self.telemetry.record(name, _code(exc), time.perf_counter())
            await abort(context, exc)
        call = CallState(context)
        try:
            while True:
                try:  # the stream's own ends; errors of a request are recorded by _run
                    data = await calls.next_message(context)
                    if data is grpc.aio.EOF:
                        return
                    started = time.perf_counter()
                    calls.admit()
                except RequestError as exc:
                    self.telemetry.record(name, _code(exc), time.perf_counter())
                    raise
                try:
                    reply = await calls.in_worker(run, self, data, call, started)
                finally:
                    calls.done()
                await context.write(reply)
        except asyncio.CancelledError:
            call.ended = True
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            error = exc
        finally:
            calls.close_stream(host)
        data = None  # as in rpc: not held by the abort's traceback
        await abort(context, error)
    return wrapper
