"""The `gradserve` command: serve, demo, health."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import fields

import numpy as np

from .limits import Limits

DEFAULT_PORT = 50051


def _env(name: str, default):
    return os.environ.get("GRADSERVE_" + name, default)


def _serve(args) -> int:
    from .app import serve

    from .app import TLSConfig
    from .auth import read_token

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    overrides = {f.name: getattr(args, f.name) for f in fields(Limits)}
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("gradserve serve: --tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        raise SystemExit("gradserve serve: --tls-client-ca needs --tls-cert and --tls-key")
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    token = read_token(args.auth_token_file) if args.auth_token_file else None
    return serve(args.host, args.port, Limits.from_env(**overrides), args.max_workers,
                 not args.no_reflection, args.grace, token, tls, args.metrics_port)


@contextlib.contextmanager
def _server_address(address: str | None):
    """The given address, or an in-process server on a free loopback port."""
    if address:
        yield address
        return
    from .app import create_server

    with create_server("127.0.0.1:0") as server:
        yield f"127.0.0.1:{server.port}"


def _demo(args) -> int:
    from gradserve.client import Client, GraphBuilder

    with _server_address(args.server) as address, Client(address) as client:
        where = args.server or f"an in-process server on {address}"
        print(f"gradserve demo against {where}\n")

        g = GraphBuilder()
        x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
        g.output("o", (x + y) * g.sin(x))
        pi = np.float32([np.pi])
        r = client.differentiate(g, {"x": pi, "y": pi})
        print("1. o = (x + y) * sin(x) at x = y = pi (float32)")
        print(f"   o     = {r.outputs['o'][0]:.4e}")
        print(f"   do/dx = {r.jacobian['o', 'x'].item():.4f}")
        print(f"   do/dy = {r.jacobian['o', 'y'].item():.4e}")
        _print_planner(r)

        g = GraphBuilder()
        t = g.input("t", "float64", [1])
        k = g.constant(np.linspace(0.0, 10.0, 1000))
        g.output("wave", g.sin(k * t) * g.exp(-0.1 * k))
        r = client.differentiate(g, {"t": np.float64([0.5])})
        print("\n2. wave = sin(k t) exp(-0.1 k) for 1000 values of k, at t = 0.5 (float64)")
        print(f"   d wave / dt has shape {r.jacobian['wave', 't'].shape}; first values "
              + ", ".join(f"{v:.4f}" for v in r.jacobian["wave", "t"][:4, 0]))
        _print_planner(r)
    return 0


def _print_planner(r) -> None:
    p = r.planner
    print(f"   mode  = {r.mode}: n = {p.n} input elements, m = {p.m} output elements, "
          f"cost forward {p.cost_forward:g}, reverse {p.cost_reverse:g} "
          "(in forward directions)")
    print(f"   why   = {p.reason}")


def _train(args) -> int:
    from gradserve.client.train_command import main as train_main

    if args.server:
        return train_main(args, args.server)
    with _server_address(None) as address:
        return train_main(args, [address], in_process=True)


def _graph(args) -> int:
    from gradserve.client.graph_command import main as graph_main

    return graph_main(args, lambda: _server_address(args.server))


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve",
        description="gradserve: values, Jacobians, JVPs and VJPs of computational graphs, "
                    "served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run the gRPC service",
        description="Run the gRPC service until SIGTERM or SIGINT. Every flag can also be "
                    "set by the environment variable GRADSERVE_<FLAG> (e.g. GRADSERVE_PORT, "
                    "GRADSERVE_MAX_NODES); a flag wins over the variable.")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                       help="address to bind; 0.0.0.0 for all interfaces, e.g. in a container "
                            "(default: %(default)s)")
    serve.add_argument("--port", type=int, default=int(_env("PORT", DEFAULT_PORT)),
                       help="port to bind, 0 picks a free one (default: %(default)s)")
    serve.add_argument("--max-workers", type=int, default=int(_env("MAX_WORKERS", 16)),
                       help="threads serving calls (default: %(default)s)")
    serve.add_argument("--grace", type=float, default=float(_env("GRACE", 10.0)),
                       help="seconds in-flight calls get to finish on shutdown (default: %(default)s)")
    serve.add_argument("--no-reflection", action="store_true",
                       default=_env("NO_REFLECTION", "") not in ("", "0"),
                       help="turn off gRPC server reflection")
    serve.add_argument("--metrics-port", type=int, default=_env("METRICS_PORT", None),
                       help="serve Prometheus metrics at http://HOST:PORT/metrics "
                            "(default: off; 0 picks a free port)")
    serve.add_argument("--auth-token-file", default=_env("AUTH_TOKEN_FILE", None),
                       metavar="PATH", help="require 'authorization: Bearer <token>' on every "
                       "call but health checks; the token is the file's content")
    serve.add_argument("--tls-cert", default=_env("TLS_CERT", None), metavar="PEM",
                       help="serve TLS with this certificate chain (needs --tls-key)")
    serve.add_argument("--tls-key", default=_env("TLS_KEY", None), metavar="PEM",
                       help="the certificate's private key")
    serve.add_argument("--tls-client-ca", default=_env("TLS_CLIENT_CA", None), metavar="PEM",
                       help="mutual TLS: clients must present a certificate signed by this CA")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "warning"),
                       choices=["debug", "info", "warning", "error"],
                       help="log level; info adds one JSON line per request with method, "
                            "graph_id, mode, status code and milliseconds "
                            "(default: %(default)s)")
    defaults = Limits()
    for f in fields(Limits):
        serve.add_argument("--" + f.name.replace("_", "-"), type=int, default=None,
                           help=f"default {getattr(defaults, f.name):,}, or GRADSERVE_{f.name.upper()}")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="the worked example, end to end over gRPC",
                          description="Run o = (x + y) * sin(x) at x = y = pi over real gRPC, "
                                      "then an example with 1 input and 1000 outputs where "
                                      "the server picks forward mode.")
    demo.add_argument("--server", metavar="HOST:PORT",
                      help="a running server (default: start one in-process on a free port)")
    demo.set_defaults(func=_demo)

    from gradserve.client.train_command import add_arguments as add_train_arguments

    train = sub.add_parser("train", help="train a model with SGD through the service",
                           description="An SGD worker: holds the parameters and the data and "
                                       "asks the service for each minibatch's gradient.")
    add_train_arguments(train)
    train.set_defaults(func=_train)

    from gradserve.client.graph_command import add_arguments as add_graph_arguments

    graph = sub.add_parser("graph", help="draw a graph with its values and derivatives",
                           description="Draw a computational graph with Graphviz: its "
                                       "structure, or the values, tangents or adjoints a "
                                       "server computes on it.")
    add_graph_arguments(graph)
    graph.set_defaults(func=_graph)

    health = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_argument("--server", metavar="HOST:PORT",
                        default=f"127.0.0.1:{_env('PORT', DEFAULT_PORT)}")
    health.add_argument("--service", default="", help="service name ('' = the whole server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds")
    health.set_defaults(func=_health)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
