"""`gradserve health`: a grpc.health.v1 check; exit 0 when SERVING."""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .serve import DEFAULT_PORT, env


def add_arguments(health: argparse.ArgumentParser) -> None:
    health.add_argument("--server", metavar="HOST:PORT",
                        default=f"127.0.0.1:{env('PORT', DEFAULT_PORT)}")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")


def run(args) -> int:
    with grpc.insecure_channel(args.server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout)
        except grpc.RpcError as err:
            print(f"{args.server}: {err.code().name}: {err.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.server}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
