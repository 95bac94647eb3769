"""`gradserve demo`: the worked example end to end over real gRPC."""

from __future__ import annotations

import argparse

import numpy as np

from gradserve.client import Client, GraphBuilder

from .in_process import server_address


def add_arguments(demo: argparse.ArgumentParser) -> None:
    demo.add_argument("--server", metavar="HOST:PORT",
                      help="a running server (default: start one in-process on a free port)")


def run(args) -> int:
    with server_address(args.server) as address, Client(address) as client:
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
    print(f"   mode  = {r.mode}: n = {p.n} and m = {p.m} input and output elements, "
          f"cost forward {p.cost_forward:g}, reverse {p.cost_reverse:g} "
          "(in forward directions)")
    print(f"   why   = {p.reason}")
