"""The `gradserve` command."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def _demo(args) -> int:
    from gradserve import engine

    g = engine.Graph(
        inputs=[engine.Input("x", "float32", [1]), engine.Input("y", "float32", [1])],
        nodes=[engine.Node("s", "add", ["x", "y"]), engine.Node("sx", "sin", ["x"]),
               engine.Node("o", "mul", ["s", "sx"])],
        outputs=["o"])
    x = y = np.float32([np.pi])
    r = engine.compile(g).jacobian({"x": x, "y": y})
    print("o = (x + y) * sin(x) at x = y = pi (float32), through the engine")
    print(f"  o     = {r.outputs['o'][0]:.4e}")
    print(f"  do/dx = {r.jacobian['o', 'x'][0, 0]:.4f}")
    print(f"  do/dy = {r.jacobian['o', 'y'][0, 0]:.4e}")
    print(f"  mode  = {r.mode} ({r.decision.reason})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="gradserve",
        description="gradserve: values, Jacobians, JVPs and VJPs of computational graphs.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the worked example o = (x + y) * sin(x)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
