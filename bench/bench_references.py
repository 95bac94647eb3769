"""Server CPU per call by graph id to a graph that reads one value many times.

Issue 19 item 2: a cached graph's per-call cost must not depend on re-walking its
references. Two graphs with the same output size, registered once in a real `gradserve
serve` process:

  refs      o = sum(concat(x, x, ..., x, y)), x and y float32 [1]: N references
  elements  o = sum(concat(z)), z float32 [N - 1]: one reference, the same elements

Each call kind (evaluate, the gradient in reverse mode, a JVP of one direction, an HVP)
is made by id through the Client; the server process's CPU time is read from /proc
(10 ms ticks) around --calls-per-sample calls in a row. Rounds are interleaved (every
kind on both graphs per round); the median and min-max per call are printed, with the ratio refs / elements of the medians (the same run) and the
registration's CPU. Prints the load average: the machine is shared.

    .venv/bin/python bench/bench_references.py [--references 1000000] [--rounds 7]
        [--calls evaluate,reverse,jvp,hvp] [--calls-per-sample 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.process_stats import cpu_seconds  # noqa: E402
from support.server_process import ServerProcess  # noqa: E402

from gradserve.client import Client, GraphBuilder  # noqa: E402

CALLS = ("evaluate", "reverse", "jvp", "hvp")


def graphs(references):
    refs = GraphBuilder()
    x, y = refs.input("x", "float32", [1]), refs.input("y", "float32", [1])
    refs.output("o", refs.sum(refs.concat([x] * (references - 2) + [y])))
    elements = GraphBuilder()
    z = elements.input("z", "float32", [references - 1])
    elements.output("o", elements.sum(elements.concat([z])))
    rng = np.random.default_rng(0)
    return {"refs": (refs, {"x": np.float32([1.5]), "y": np.float32([2.0])}),
            "elements": (elements, {"z": rng.standard_normal(references - 1)
                                    .astype(np.float32)})}


def call(client, kind, graph, inputs):
    if kind == "evaluate":
        return client.evaluate(graph, inputs)
    if kind == "reverse":
        return client.differentiate(graph, inputs, mode=kind)
    ones = {k: np.ones_like(v) for k, v in inputs.items()}
    if kind == "jvp":
        return client.jvp(graph, inputs, ones)
    return client.hvp(graph, inputs, ones, of="o")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--references", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", default=",".join(CALLS))
    parser.add_argument("--calls-per-sample", type=int, default=10)
    args = parser.parse_args(argv)
    kinds = args.calls.split(",")
    cases = graphs(args.references)
    with ServerProcess("--port", "0", "--max-connection-age", "0") as server:
        pid = server.proc.pid
        with Client(server.wait_serving(), timeout=3600.0) as client:
            registered = {}
            for name, (graph, inputs) in cases.items():
                start = cpu_seconds(pid)
                client.register(graph)
                registered[name] = cpu_seconds(pid) - start
                for kind in kinds:  # warm: first-call caches (costs, activity)
                    call(client, kind, graph, inputs)
            spent = {(kind, name): [] for kind in kinds for name in cases}
            for _ in range(args.rounds):
                for kind in kinds:
                    for name, (graph, inputs) in cases.items():
                        start = cpu_seconds(pid)
                        for _ in range(args.calls_per_sample):
                            call(client, kind, graph, inputs)
                        spent[kind, name].append((cpu_seconds(pid) - start)
                                                 / args.calls_per_sample)
        server.terminate(timeout=30)
    print(f"{args.references:,} references; server CPU-s per call by id, median "
          f"(min-max) of {args.rounds} interleaved rounds")
    print(f"register: refs {registered['refs']:.3f}, elements {registered['elements']:.3f}")
    print(f"{'call':10} {'refs':>24} {'elements':>24} {'refs/elements':>14}")
    for kind in kinds:
        cells = []
        for name in cases:
            v = spent[kind, name]
            cells.append(f"{statistics.median(v):.4f} ({min(v):.4f}-{max(v):.4f})")
        ratio = statistics.median(spent[kind, "refs"]) / statistics.median(
            spent[kind, "elements"])
        print(f"{kind:10} {cells[0]:>24} {cells[1]:>24} {ratio:>13.2f}x")
    print("load average: " + " ".join(f"{v:.2f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
