"""Building the gRPC server: service, health, reflection, start and graceful stop.

The `gradserve serve` command (gradserve.cli.serve) runs one until a signal."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gradserve.v1 import gradient_service_pb2 as pb

from .auth import TokenAuthInterceptor
from .calls import method_handler
from .limits import Limits
from .servicer import GradientServicer

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


class Server:
    """A started-or-not grpc.Server with its health service and bound port."""

    def __init__(self, grpc_server: grpc.Server, port: int, health_servicer,
                 servicer: GradientServicer):
        self.grpc_server = grpc_server
        self.port = port
        self.health = health_servicer
        self.servicer = servicer
        self.metrics_port: int | None = None

    def start(self, metrics_address: tuple[str, int] | None = None) -> "Server":
        """Start serving; with `metrics_address` (host, port), also Prometheus /metrics."""
        if metrics_address is not None:
            self.metrics_port = self.servicer.telemetry.serve_metrics(*metrics_address)
        self.grpc_server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace: float | None = 10.0) -> None:
        """Health NOT_SERVING first, then refuse new calls and let in-flight ones finish."""
        self.health.enter_graceful_shutdown()
        self.servicer.telemetry.close()
        # Bounded: grpcio can keep a call that failed to parse in its state for good,
        # and then the event stop() returns is never set.
        self.grpc_server.stop(grace).wait(None if grace is None else grace + 5.0)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop(grace=1.0)


def service_handler(servicer: GradientServicer) -> grpc.GenericRpcHandler:
    """GradientService's methods taking raw request bytes (the servicer's decorators
    parse them, so that bad bytes get INVALID_ARGUMENT) and serializing replies."""
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    handlers = {}
    for method in service.methods:
        reply_type = getattr(pb, method.output_type.name)
        handlers[method.name] = method_handler(
            method.client_streaming, method.server_streaming, getattr(servicer, method.name),
            response_serializer=reply_type.SerializeToString)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def create_server(address: str = "127.0.0.1:0", limits: Limits | None = None,
                  max_workers: int = 16, reflection_enabled: bool = True,
                  auth_token: str | None = None, tls: TLSConfig | None = None) -> Server:
    """A gradserve server bound to `address` (port 0 picks a free port), not started.

    With `auth_token`, every call but health checks needs `authorization: Bearer
    <token>` metadata; with `tls`, the port speaks TLS (mutual with a client CA).
    """
    limits = limits or Limits()
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="gradserve"),
                         options=options,
                         interceptors=[TokenAuthInterceptor(auth_token)] if auth_token else [],
                         maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    servicer = GradientServicer(limits)
    server.add_generic_rpc_handlers((service_handler(servicer),))
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if reflection_enabled:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME), server)
    port = (server.add_secure_port(address, tls.credentials()) if tls
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"could not bind {address}")
    return Server(server, port, health_servicer, servicer)

