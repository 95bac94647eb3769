"""What a compiled graph holds in memory, per constant, per input and per node.

The graph cache (gradserve.server.registry) counts each cached plan as its wire
size plus these figures times the graph's constants, inputs and nodes. Each is
measured here as the server builds a plan: the Graph message parsed from its
wire bytes, converted (server.convert.graph_from_proto) and compiled
(engine.compile), then everything but the plan dropped. Reported per item:

  held   bytes the plan keeps (tracemalloc, NumPy buffers included), over N items
  peak   bytes Python allocated at the worst moment of parse + convert + compile
         (protobuf's own arena is not traced: see first)
  first  growth of the process's resident set for the first such graph, parse
         included (what one request costs a fresh server at worst)
  kept   growth of the resident set for each of 3 more such graphs kept: what a
         cached plan really costs, allocator overheads included (the cache's figure)

Graphs (float32 scalars, so that the data is negligible and the overhead shows):

  constants  o = sin(x) and N constants c0..cN-1 no node reads
  inputs     o = sin(x0) and N inputs x0..xN-1
  chain      x -> sin -> sin ... (N nodes)
  add-const  x -> add c0 -> add c1 ... (N nodes, each reading its own constant)
  outputs    N constants, each also an output (minus `constants`: per output)

Run from the repository root (takes ~2 minutes):

    .venv/bin/python bench/bench_graph_memory.py [--items 100000]
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.wire_bytes import field  # noqa: E402  (tests/: requests in the wire format)

KINDS = ("constants", "inputs", "chain", "add-const", "outputs")


_SCALAR = b"\x08\x01" + field(3, b"\0\0\0\0")  # Tensor: float32, shape [], 0.0


def _input(name: str) -> bytes:
    return field(1, field(1, name.encode()) + b"\x10\x01")


def _constant(name: str) -> bytes:
    return field(2, field(1, name.encode()) + field(2, _SCALAR))


def _node(name: str, op: str, *inputs: str) -> bytes:
    return field(3, field(1, name.encode()) + field(2, op.encode())
                  + b"".join(field(3, i.encode()) for i in inputs))


def graph_bytes(kind: str, n: int) -> bytes:
    """The Graph message of `kind` with `n` items, serialized."""
    if kind == "constants":
        parts = [_input("x")] + [_constant(f"c{k}") for k in range(n)]
        parts += [_node("o", "sin", "x"), field(4, b"o")]
    elif kind == "inputs":
        parts = [_input(f"x{k}") for k in range(n)] + [_node("o", "sin", "x0"), field(4, b"o")]
    elif kind == "chain":
        parts = [_input("x")] + [_node(f"n{k}", "sin", f"n{k - 1}" if k else "x")
                                 for k in range(n)] + [field(4, f"n{n - 1}".encode())]
    elif kind == "outputs":
        parts = [_input("x")] + [_constant(f"c{k}") for k in range(n)]
        parts += [_node("o", "sin", "x")] + [field(4, f"c{k}".encode()) for k in range(n)]
    elif kind == "add-const":
        parts = [_input("x")] + [_constant(f"c{k}") for k in range(n)]
        parts += [_node(f"n{k}", "add", f"n{k - 1}" if k else "x", f"c{k}") for k in range(n)]
        parts += [field(4, f"n{n - 1}".encode())]
    else:
        raise ValueError(kind)
    return b"".join(parts)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(kind: str, n: int) -> dict:
    """Run in a fresh process (see main): bytes held, peak, first and kept."""
    from gradserve import engine
    from gradserve.server.convert import graph_from_proto
    from gradserve.v1 import graph_pb2

    data = graph_bytes(kind, n)

    def build():
        graph = graph_pb2.Graph.FromString(data)
        plan = engine.compile(graph_from_proto(graph))
        del graph
        gc.collect()
        return plan

    gc.collect()
    rss_before = _rss()
    plans = [build()]
    first = _rss() - rss_before
    rss_before = _rss()
    plans += [build() for _ in range(3)]
    kept = (_rss() - rss_before) / 3
    tracemalloc.start()  # last: its own bookkeeping, freed, would hide the others' growth
    base = tracemalloc.get_traced_memory()[0]
    plans.append(build())
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"wire": len(data), "held": held - base, "peak": peak - base, "first": first,
            "kept": kept}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # KIND N, in a child
    args = parser.parse_args(argv)
    if args.measure:
        kind, n = args.measure[0], int(args.measure[1])
        print(repr(measure(kind, n)))
        return 0
    n = args.items
    print(f"bytes per item of {n:,}-item graphs")
    print(f"{'graph':<10} {'wire':>6} {'held':>6} {'peak':>6} {'first':>6} {'kept':>6}")
    for kind in KINDS:
        # A fresh process each: one graph's freed memory must not hide the next one's.
        out = subprocess.run([sys.executable, __file__, "--measure", kind, str(n)],
                             capture_output=True, text=True, check=True).stdout
        r = eval(out)  # noqa: S307 - our own child's repr of a dict of ints
        print(f"{kind:<10} " + " ".join(f"{r[k] / n:>6.0f}"
                                         for k in ("wire", "held", "peak", "first", "kept")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
