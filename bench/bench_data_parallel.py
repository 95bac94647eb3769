"""Data-parallel gradient step: a thread per server (DataParallelGradient) against
Client.differentiate_async futures, over two `gradserve serve` processes.

    python bench/bench_data_parallel.py [--steps 200] [--rounds 7]

The MLP 64-64-10 on digits, batch 64 split into two shards of 32, one per server
(each `--processes 1`, --blas-threads 1). Rounds of the two ways alternate; the
medians and their ratio are printed (quote the ratio: the box is shared). Never
asserts on time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support.server_process import ServerProcess  # noqa: E402  (tests/: subprocess helper)

from gradserve.client.datasets import load_dataset  # noqa: E402
from gradserve.client.gradients import remote_gradient  # noqa: E402
from gradserve.client.models import LOSS, ModelSpec, one_hot  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)

    data = load_dataset("digits", test_fraction=0.2, seed=1)
    spec = ModelSpec.mlp(data.num_features, data.num_classes, (64, 64))
    params = spec.init_params(np.random.default_rng(0))
    X, Y = data.X_train[:64], one_hot(data.y_train[:64], data.num_classes)
    servers = [ServerProcess("--processes", "1", "--port", "0") for _ in range(2)]
    try:
        parallel = remote_gradient([s.wait_serving() for s in servers], spec.build_graph(),
                                   spec.param_names)
        shards = list(zip(parallel.replicas, np.array_split(X, 2), np.array_split(Y, 2)))

        def futures():
            pending = [r.client.differentiate_async(r.graph, {**params, "X": x, "Y": y},
                                                    wrt=r.param_names, of=[LOSS])
                       for r, x, y in shards]
            return [f.result() for f in pending]

        ways = {"threads (DataParallelGradient)": lambda: parallel(params, X, Y),
                "futures (differentiate_async)": futures}
        times = {name: [] for name in ways}
        for r in range(args.rounds + 1):
            for name, step in ways.items():
                t = time.perf_counter()
                for _ in range(args.steps):
                    step()
                if r:  # round 0 warms up
                    times[name].append((time.perf_counter() - t) / args.steps)
        parallel.close()
    finally:
        for s in servers:
            s.stop()
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t) * 1e6:,.0f} us/step, "
              f"min {min(t) * 1e6:,.0f}")
    a, b = (statistics.median(t) for t in times.values())
    load = os.getloadavg()
    print(f"futures / threads: {b / a:.2f}x (load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f})")


if __name__ == "__main__":
    main()
