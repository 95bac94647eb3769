"""The `gradserve` command's parser: one subcommand per module of this package."""

from __future__ import annotations

import argparse

from . import demo, graph, health, serve, train, umbridge


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradserve",
        description="gradserve: values, Jacobians, JVPs and VJPs of computational graphs, "
                    "served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_parser = sub.add_parser(
        "serve", help="run the gRPC service",
        description="Run the gRPC service until SIGTERM or SIGINT. Every flag can also be "
                    "set by the environment variable GRADSERVE_<FLAG> (e.g. GRADSERVE_PORT, "
                    "GRADSERVE_MAX_NODES); a flag wins over the variable.")
    serve.add_arguments(serve_parser)
    serve_parser.set_defaults(func=serve.run)

    demo_parser = sub.add_parser("demo", help="the worked example, end to end over gRPC",
                                 description="Run o = (x + y) * sin(x) at x = y = pi over real "
                                             "gRPC, then an example with 1 input and 1000 "
                                             "outputs where the server picks forward mode.")
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(func=demo.run)

    train_parser = sub.add_parser("train", help="train a model with SGD through the service",
                                  description="An SGD worker: holds the parameters and the "
                                              "data and asks the service for each "
                                              "minibatch's gradient.")
    train.add_arguments(train_parser)
    train_parser.set_defaults(func=train.run)

    graph_parser = sub.add_parser("graph", help="draw a graph with its values and derivatives; "
                                               "import an ONNX model",
                                  description="Draw a computational graph with Graphviz: its "
                                              "structure, or the values, tangents or adjoints "
                                              "a server computes on it (show); import an ONNX "
                                              "model as a gradserve graph (import).")
    graph.add_arguments(graph_parser)
    graph_parser.set_defaults(func=graph.run)

    umbridge_parser = sub.add_parser(
        "umbridge", help="serve a graph as a UM-Bridge model over HTTP",
        description="Serve a graph as a UM-Bridge model (protocol 1.0): its floating inputs "
                    "and outputs, flattened, with Evaluate, Gradient, ApplyJacobian and "
                    "ApplyHessian computed by gradserve, for UM-Bridge clients in Python "
                    "(umbridge, PyMC, emcee), C++, R, Julia and Matlab. Needs the umbridge "
                    "extra. Each derivative call logs the planner's decision.")
    umbridge.add_arguments(umbridge_parser)
    umbridge_parser.set_defaults(func=umbridge.run)

    health_parser = sub.add_parser("health", help="grpc.health.v1 check; exit 0 when SERVING")
    health.add_arguments(health_parser)
    health_parser.set_defaults(func=health.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)

