"""Local SGD (`gradserve train --sync-every H`) against data parallelism (one round
of communication per step) on digits, over real `gradserve serve` processes.

    python bench/bench_local_sgd.py [--epochs 20] [--speed-epochs 5] [--model mlp|cnn]

1. Accuracy vs communication rounds: the MLP 64-10 on digits (batch 32 split
   over 2 servers, inner SGD lr 0.1 without momentum), today's data parallelism
   (DataParallelGradient: a round per step) against local SGD with H = 4 and
   H = 16 (DiLoCo's outer optimizer: lr 0.7, Nesterov momentum 0.9). Per epoch:
   the rounds so far and the test accuracy; then the rounds to reach 95% and the
   whole run's rounds, with their ratio to data parallelism's. `--model cnn`:
   the digits CNN imported from ONNX (tests/client/test_onnx.py's digits_cnn_model,
   1,370 parameters) instead of the MLP.
2. Steps/s with 2 and 3 servers, data parallelism against H = 16 (--speed-epochs
   epochs each; every server `--processes 1`). The box is shared: quote the
   ratios, and the load average printed at the end.

A communication round is one exchange with every server (a Differentiate call
per server for data parallelism, a TrainSteps call per server for local SGD).
Never asserts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from support.server_process import ServerProcess  # noqa: E402  (tests/support)

from gradserve.client.datasets import load_dataset  # noqa: E402
from gradserve.client.gradients import remote_gradient  # noqa: E402
from gradserve.client.local_sgd import OuterConfig, local_sgd_trainer  # noqa: E402
from gradserve.client.models import ModelSpec  # noqa: E402
from gradserve.client.training import Trainer, TrainConfig  # noqa: E402

TARGET = 0.95


def run(spec, data, config, addresses, sync_every):
    """(per-epoch [(rounds so far, test accuracy)], steps, seconds) of one run;
    sync_every None: data parallelism."""
    if sync_every is None:
        gradient = remote_gradient(addresses, spec.build_graph(), spec.param_names)
        trainer, closer = Trainer(spec, data, gradient, config), gradient
        rounds = lambda state: state.step  # noqa: E731
    else:
        trainer = closer = local_sgd_trainer(spec, data, addresses, config,
                                             OuterConfig(sync_every))
        rounds = lambda state: trainer.rounds  # noqa: E731
    epochs = []

    def on_step(state, gradient):
        if len(state.history) > len(epochs):
            epochs.append((rounds(state), state.history[-1].test_accuracy))
    try:
        started = time.perf_counter()
        state = trainer.run(trainer.start(), on_step)
        seconds = time.perf_counter() - started
    finally:
        closer.close()
    return epochs, state.step, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--speed-epochs", type=int, default=5, help="0: skip part 2")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="runs per steps/s figure")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--lr", type=float, default=0.1, help="the inner learning rate")
    args = parser.parse_args(argv)

    data = load_dataset("digits", test_fraction=0.2, seed=1)
    if args.model == "cnn":
        import tempfile

        import onnx
        from test_onnx import digits_cnn_model  # tests/: the digits CNN, built with onnx.helper

        from gradserve.client.models import OnnxModelSpec
        path = os.path.join(tempfile.mkdtemp(), "digits_cnn.onnx")
        onnx.save(digits_cnn_model(), path)
        spec = OnnxModelSpec(path, data.num_features, data.num_classes)
    else:
        spec = ModelSpec.mlp(data.num_features, data.num_classes, (64,))
    servers = [ServerProcess("--processes", "1", "--port", "0") for _ in range(3)]
    try:
        addresses = [s.wait_serving() for s in servers]
        config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=1)
        print(f"# 1. accuracy vs communication rounds: {spec.description}, batch "
              f"{config.batch_size} over 2 servers, lr {config.lr}, {args.epochs} epochs")
        ways = {"data parallel (H=1)": None, "local SGD H=4": 4, "local SGD H=16": 16}
        results = {name: run(spec, data, config, addresses[:2], h)
                   for name, h in ways.items()}
        print("epoch | " + " | ".join(f"{name}: rounds, test acc" for name in ways))
        for e in range(args.epochs):
            print(f"{e + 1:5d} | " + " | ".join(
                f"{results[n][0][e][0]:6d}, {results[n][0][e][1]:.3f}" for n in ways))
        base_total = results["data parallel (H=1)"][0][-1][0]
        base_first = next((r for r, a in results["data parallel (H=1)"][0] if a >= TARGET), None)
        for name in ways:
            epochs, steps, _ = results[name]
            first = next((r for r, a in epochs if a >= TARGET), None)
            total = epochs[-1][0]
            print(f"{name}: final test accuracy {epochs[-1][1]:.3f}; {total} rounds for "
                  f"{steps} steps ({base_total / total:.1f}x fewer than data parallelism); "
                  f"first >= {TARGET:.0%} after {first} rounds"
                  + (f" ({base_first / first:.1f}x fewer)" if first and base_first else ""))

        if not args.speed_epochs:
            return
        print(f"\n# 2. steps/s, {args.speed_epochs} epochs per run (data parallelism: a "
              "round per step; H=16: a round per 16 steps)")
        speed = TrainConfig(epochs=args.speed_epochs, batch_size=args.batch_size, lr=args.lr,
                            seed=1)
        ways = [(n, name, h) for n in (2, 3) for name, h in (("data parallel", None),
                                                               ("H=16", 16))]
        rates = {way: [] for way in ways}
        for _ in range(args.repeats):  # interleaved: a slow spell spoils a bit of each
            for way in ways:
                _, steps, seconds = run(spec, data, speed, addresses[:way[0]], way[2])
                rates[way].append(steps / seconds)
        for n in (2, 3):
            dp, local = (statistics.median(rates[n, name, h]) for _, name, h in ways[:2])
            print(f"{n} servers: data parallel {dp:.0f} steps/s, H=16 {local:.0f} steps/s "
                  f"({local / dp:.1f}x; medians of {args.repeats})")
        print(f"\nload average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
              f"({os.cpu_count()} CPUs, shared)")
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
