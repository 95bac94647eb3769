"""Building and running the gRPC server: service, health, reflection, shutdown."""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc

from .limits import Limits
from .servicer import GradientServicer

log = logging.getLogger("gradserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientService"].full_name


class Server:
    """A started-or-not grpc.Server with its health service and bound port."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer,
                 servicer: GradientServicer):
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.servicer = servicer

    def start(self) -> "Server":
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 10.0) -> None:
        """Health NOT_SERVING first, then refuse new calls and let in-flight ones finish."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(grace=1.0)


def create_server(address: str = "127.0.0.1:0", limits: Limits | None = None,
                  max_workers: int = 16, reflection_enabled: bool = True) -> Server:
    """A gradserve server bound to `address` (port 0 picks a free port), not started."""
    limits = limits or Limits()
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="gradserve"),
                         options=options,
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    servicer = GradientServicer(limits)
    pb_grpc.add_GradientServiceServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return Server(server, port, health_servicer, servicer)


def serve(host: str, port: int, limits: Limits, max_workers: int, reflection_enabled: bool,
          grace: float) -> int:
    """Run until SIGTERM or SIGINT, then shut down cleanly; returns the exit code."""
    server = create_server(f"{host}:{port}", limits, max_workers, reflection_enabled).start()
    log.warning("gradserve listening on %s:%d", host, server.port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.warning("shutting down: health NOT_SERVING, finishing calls in flight (up to %gs)", grace)
    server.stop(grace)
    return 0
