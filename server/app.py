"""Building the gRPC server: service, health, reflection, start and graceful stop.

The server is grpc's asyncio server on an event loop of its own (one thread per
Server): waiting calls and idle streams hold no thread, health always answers,
and the engine's work runs in the servicer's worker threads (server.calls).
The `gradserve serve` command (gradserve.cli.serve) runs one until a signal."""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradient_service_pb2 as pb

from .auth import TokenAuthInterceptor
from .calls import method_handler
from .blas import BlasPolicy
from .lean import DEFAULT_INLINE_BUDGET_US
from .limits import Limits
from .servicer import GradientServicer

log = logging.getLogger("gradserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name


@dataclass(frozen=True)
class TLSConfig:
    """PEM files: the server's certificate chain and key; with `client_ca`, clients
    must present a certificate signed by it (mutual TLS)."""

    cert: str | Path
    key: str | Path
    client_ca: str | Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(Path(self.key).read_bytes(), Path(self.cert).read_bytes())],
            root_certificates=ca, require_client_auth=ca is not None)


class Health(health_pb2_grpc.HealthServicer):
    """grpc.health.v1 on the event loop (so it answers whatever the workers do). Unlike
    grpc_health's servicer, shutdown ends the Watch calls, once each has sent
    NOT_SERVING, instead of letting them hold the server for its whole grace."""

    def __init__(self):
        self._status = {"": health_pb2.HealthCheckResponse.SERVING}
        self._changed: asyncio.Condition | None = None  # made on the loop
        self._shutting_down = False

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        changed, last = self._condition(), None
        while True:
            status = self._current(request.service)
            if status != last:  # written without the lock: a slow reader blocks no one
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            if self._shutting_down:
                return  # NOT_SERVING was sent: end the call OK
            async with changed:
                await changed.wait_for(lambda: self._shutting_down
                                       or self._current(request.service) != last)

    def _current(self, service: str):
        return self._status.get(service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)

    async def set(self, service: str, status) -> None:
        if self._shutting_down:
            return
        async with self._condition():
            self._status[service] = status
            self._condition().notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """Every service NOT_SERVING for good; Watch calls see it and end."""
        async with self._condition():
            self._shutting_down = True
            for service in self._status:
                self._status[service] = health_pb2.HealthCheckResponse.NOT_SERVING
            self._condition().notify_all()


EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def new_event_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    """asyncio's own event loop, or uvloop's (a dependency, not on Windows); "auto": uvloop's if
    it is installed. uvloop makes the hand-off of each request to a worker and back
    cheaper (bench/bench_server_model.py: about 100 us less server CPU per call)."""
    if kind == "auto":
        try:
            import uvloop
        except ImportError:
            return asyncio.new_event_loop()
        return uvloop.new_event_loop()
    if kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    if kind != "asyncio":
        raise ValueError(f"event loop must be one of {EVENT_LOOPS}, not {kind!r}")
    return asyncio.new_event_loop()


class EventLoopThread:
    """An asyncio event loop running in a daemon thread of its own."""

    def __init__(self, kind: str = "auto", name: str = "gradserve-loop"):
        self.loop = new_event_loop(kind)
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout: float | None = None):
        """Run `coroutine` on the loop and return its result (from any other thread)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class Server:
    """A grpc.aio server, bound and started-or-not, with its health service, running on
    an event loop of its own in a background thread (so that a plain program or test
    uses it like a sync server)."""

    def __init__(self, grpc_server: grpc.aio.Server, port: int, health_servicer: Health,
                 servicer: GradientServicer, loop: EventLoopThread):
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.servicer = servicer
        self.metrics_port: int | None = None
        self._loop = loop
        self._stopped = False

    def start(self, metrics_address: tuple[str, int] | None = None,
              metrics_labels: dict[str, str] | None = None) -> "Server":
        """Start serving; with `metrics_address` (host, port), also Prometheus /metrics,
        every sample carrying `metrics_labels` (e.g. {"process": "0"}) when given."""
        if metrics_address is not None:
            self.metrics_port = self.servicer.telemetry.serve_metrics(*metrics_address,
                                                                      labels=metrics_labels)
        self._loop.run(self._start())
        return self

    async def _start(self) -> None:
        await self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = 10.0, drain: float = 0.0) -> None:
        """Drain, then stop: health NOT_SERVING at once, new calls still served for
        `drain` seconds (so that balancers and probes see NOT_SERVING before any call
        is refused), then streams waiting for a message and health watches end, new
        calls are refused UNAVAILABLE and calls in flight get the rest of `grace` to
        finish. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            # Bounded: whatever grpc does, stop() returns.
            self._loop.run(self._stop(grace, drain),
                           None if grace is None else grace + drain + 5.0)
        except TimeoutError:
            log.warning("the server did not stop within its grace and drain + 5 s")
        finally:
            self.servicer.telemetry.close()
            self.servicer.residuals.close()
            self._loop.close()
            self.servicer.calls.executor.shutdown(wait=False, cancel_futures=True)

    async def _stop(self, grace: float | None, drain: float) -> None:
        await self.health.enter_graceful_shutdown()
        if drain > 0:
            await asyncio.sleep(drain if grace is None else min(drain, grace))
            grace = None if grace is None else max(0.0, grace - drain)
        self.servicer.calls.close_streams()
        await self.grpc_server.stop(grace)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(grace=1.0)


def service_handler(servicer: GradientServicer) -> grpc.GenericRpcHandler:
    """GradientService's methods taking raw request bytes (the servicer's decorators
    parse them, so that bad bytes get INVALID_ARGUMENT) and returning reply bytes
    (serialized in a worker thread, not on the event loop)."""
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    handlers = {}
    for method in service.methods:
        handlers[method.name] = method_handler(
            method.client_streaming, method.server_streaming, getattr(servicer, method.name))
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def create_server(address: str = "127.0.0.1:0", limits: Limits | None = None,
                  max_workers: int = 16, reflection_enabled: bool = True,
                  auth_token: str | None = None, tls: TLSConfig | None = None,
                  event_loop: str = "auto", max_connection_age: float = 0.0,
                  max_connection_age_grace: float = 0.0,
                  inline_budget_us: float = DEFAULT_INLINE_BUDGET_US,
                  reuse_port: bool = False, blas: BlasPolicy | None = None) -> Server:
    """A gradserve server bound to `address` (port 0 picks a free port), not started.

    With `auth_token`, every call but health checks needs `authorization: Bearer
    <token>` metadata; with `tls`, the port speaks TLS (mutual with a client CA).
    `max_workers` threads compute requests; `event_loop` is "asyncio", "uvloop" (a
    dependency, not on Windows) or "auto" (uvloop if installed). Small requests whose estimated
    time is within `inline_budget_us` are answered on the event loop (server.lean; 0:
    every request in a worker). A large request alone on the server may run its BLAS
    products on more threads, as `blas` says (server.blas.BlasPolicy; it needs
    OPENBLAS_THREAD_TIMEOUT set before NumPy was imported).

    With `max_connection_age` > 0 seconds the server sends each connection an HTTP/2
    GOAWAY once it is that old (grpc adds +-10% jitter): the client reconnects and
    resolves the name again, which is how clients of a DNS name (a headless Service)
    come to use replicas added after they connected. Calls in flight then get
    `max_connection_age_grace` seconds to finish before the connection closes (0: as
    long as they need).

    `reuse_port` lets other sockets with SO_REUSEPORT share the port (the processes of
    `gradserve serve --processes N` only); without it, binding a port in use fails
    (OSError) rather than sharing it with whatever holds it.
    """
    limits = limits or Limits()
    loop = EventLoopThread(event_loop)
    age = (max_connection_age, max_connection_age_grace)
    try:
        return loop.run(_build(address, limits, max_workers, reflection_enabled, auth_token,
                               tls, loop, age, inline_budget_us, reuse_port, blas))
    except BaseException:
        loop.close()
        raise


async def _build(address, limits, max_workers, reflection_enabled, auth_token, tls,
                 loop, age=(0.0, 0.0), inline_budget_us=DEFAULT_INLINE_BUDGET_US,
                 reuse_port=False, blas=None) -> Server:
    """The server, built on its own loop (grpc.aio binds a server to the running loop)."""
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # grpc sets SO_REUSEPORT by default on Linux: a second server on a port in use
        # would start and take a share of its connections.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    if age[0] > 0:  # GOAWAY after age[0] s; in-flight calls get age[1] s more (0: unbounded)
        options.append(("grpc.max_connection_age_ms", round(age[0] * 1000)))
        options.append(("grpc.max_connection_age_grace_ms",
                        round(age[1] * 1000) if age[1] > 0 else 2 ** 31 - 1))
    # No maximum_concurrent_rpcs here: that would count health checks and idle streams
    # too; the servicer admits requests itself (server.calls.Calls.admit).
    server = grpc.aio.server(options=options,
                             interceptors=[TokenAuthInterceptor(auth_token)] if auth_token else [])
    servicer = GradientServicer(limits, max_workers, inline_budget_us, blas)
    servicer.connection_age = age  # reported by GetServerInfo
    server.add_generic_rpc_handlers((service_handler(servicer),))
    health_servicer = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    try:
        port = (server.add_secure_port(address, tls.credentials()) if tls
                else server.add_insecure_port(address))
    except RuntimeError:  # grpc's "Failed to bind": in use, or not an address of this host
        port = 0
    if port == 0:
        raise OSError(f"could not bind {address}: the port is in use (by another server?) "
                      "or the address is not one of this host's")
    return Server(server, port, health_servicer, servicer, loop)
