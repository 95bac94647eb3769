"""P8: SGD training through the service against the same model trained locally with PyTorch.

    python bench/bench_train.py [--quick] [--json PATH]

Two models on scikit-learn's digits, batch 64, lr 0.1, float32: the issue's MLP
64-64-10 (one hidden layer of 64) and the README's sample command's MLP
64-64-64-10 (--hidden 64 --hidden 64). Measured, rounds interleaved so drift on
the shared machine hits every row alike:
  - gradserve: the training loop of `gradserve train` (Trainer + remote_gradient,
    an epoch-end evaluation included), against an in-process server (what the
    command starts without --server: client and server share one GIL) and against
    a `gradserve serve` subprocess; unary calls and DifferentiateStream;
  - torch: the same model, initial parameters, batch order and per-epoch
    evaluation, trained locally with PyTorch eager (nn.Sequential, F.cross_entropy,
    torch.optim.SGD), with 1 thread and with torch's default; the faster of the
    two is the baseline.
Also `--steps-per-call 16` (16 SGD steps per TrainSteps call). Momentum 0.9.
The unary rows train on a state kept in the server's tensor store (the Trainer's
default against one server: TrainSteps by rows of the stored data set, the short
last batch and the evaluation in the epoch's last call); the stream rows send the
parameters with every step, as before.
Targets (P8, the MLP 64-64-64-10): gradserve steps/s >= 0.5x torch's with one step
per call, >= 1.0x with 16 steps per call; each round's ratio is taken against that
round's faster torch, and the lines give their median and spread (min-max).
`--only-p8` measures the P8 model alone. Then one step is split into its parts
(client encode, gRPC transport, server proto work, engine, client decode,
update) with timers around each, against the in-process server. Never asserts
on time.
"""

from __future__ import annotations

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import contextlib
import statistics
from dataclasses import replace
import sys
import time
from pathlib import Path

import numpy as np

from _timing import (environment_lines, load_torch, parse_args, print_table, ratio_line,
                     torch_skip_message, write_json)
from gradserve import engine
from gradserve.client.client import result_from_proto
from gradserve.client.datasets import load_dataset
from gradserve.client.gradients import Gradient, remote_gradient
from gradserve.client.models import LOSS, ModelSpec
from gradserve.client.training import Trainer, TrainConfig
from gradserve.cli.in_process import server_address
from gradserve.server.app import create_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.server_process import ServerProcess  # noqa: E402  (tests/: the one subprocess helper)

TARGET = 0.5
STEPS_PER_CALL = 16  # `gradserve train --steps-per-call 16` (the TrainSteps RPC)
TARGET_STEPS_PER_CALL = 1.0
EPOCHS_PER_ROUND = 2


def fmt_rate(steps_per_second: float) -> str:
    return f"{steps_per_second:,.0f} steps/s"


# --- servers --------------------------------------------------------------------------------

@contextlib.contextmanager
def server_process():
    """A `gradserve serve` subprocess on a free loopback port; yields its address."""
    with ServerProcess("--port", "0") as process:
        yield process.wait_serving(timeout=60)


# --- the two training loops -----------------------------------------------------------------

class GradserveRun:
    """`gradserve train`'s loop; each call trains EPOCHS_PER_ROUND epochs from the start."""

    def __init__(self, spec, data, config, address, stream, steps_per_call=1):
        self.gradient = remote_gradient([address], spec.build_graph(), spec.param_names,
                                        stream=stream)
        self.trainer = Trainer(spec, data, self.gradient,
                               replace(config, steps_per_call=steps_per_call))

    def __call__(self):
        return self.trainer.run(self.trainer.initial_state())

    def close(self):
        self.gradient.close()


class TorchRun:
    """The same model, initial parameters, batch order and evaluation in PyTorch eager."""

    def __init__(self, torch, spec, data, config, trainer: Trainer, threads: int):
        self.torch, self.data, self.config, self.threads = torch, data, config, threads
        self.initial = trainer.initial_state()
        layers = []
        for k in range(1, len(spec.widths)):
            layers.append(torch.nn.Linear(*spec.param_shapes[f"W{k}"]))
            if k < len(spec.widths) - 1:
                layers.append(torch.nn.ReLU())
        self.model = torch.nn.Sequential(*layers)
        self.linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        self.X = torch.from_numpy(data.X_train)
        self.y = torch.from_numpy(data.y_train)
        self.X_test, self.y_test = torch.from_numpy(data.X_test), torch.from_numpy(data.y_test)

    def __call__(self):
        threads = self.torch.get_num_threads()
        self.torch.set_num_threads(self.threads)
        try:
            return self._train()
        finally:
            self.torch.set_num_threads(threads)

    def _train(self):
        torch, F = self.torch, self.torch.nn.functional
        with torch.no_grad():
            for k, linear in enumerate(self.linears, start=1):
                linear.weight.copy_(torch.from_numpy(self.initial.params[f"W{k}"].T))
                linear.bias.copy_(torch.from_numpy(self.initial.params[f"b{k}"]))
        optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr,
                                    momentum=self.config.momentum)
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self.initial.batch_rng_state
        batch = self.config.batch_size
        for _ in range(self.config.epochs):
            order = torch.from_numpy(rng.permutation(len(self.y)))
            for start in range(0, len(order), batch):
                rows = order[start:start + batch]
                optimizer.zero_grad()
                loss = F.cross_entropy(self.model(self.X[rows]), self.y[rows])
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                logits = self.model(self.X_test)
                test_loss = F.cross_entropy(logits, self.y_test).item()
                accuracy = (logits.argmax(1) == self.y_test).float().mean().item()
        return test_loss, accuracy


# --- measurement ----------------------------------------------------------------------------

def measure_rounds(runs: dict, steps: int, rounds: int) -> tuple[dict, dict]:
    """steps/s of each run: the median over `rounds` interleaved rounds (after a
    warm-up), and every round's figure."""
    for run in runs.values():
        run()
    rates = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(steps / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}, rates


def round_ratios(per_round: dict, loop: str) -> list[float]:
    """`loop`'s rate over the same round's faster torch, round by round."""
    torch_loops = [name for name in per_round if name.startswith("torch")]
    return [rate / max(per_round[t][i] for t in torch_loops)
            for i, rate in enumerate(per_round[loop])]


def spread_note(ratios: list[float]) -> str:
    return (f"per-round ratios: median {statistics.median(ratios):.2f}x, spread "
            f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")


class Timers:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start


def step_breakdown(spec, data, config, steps: int) -> list[tuple[str, float]]:
    """One unary step in parts, against an in-process server whose servicer and
    engine are wrapped in timers (the client calls below are Client.differentiate's
    own, spelled out)."""
    timers = Timers()
    with create_server("127.0.0.1:0") as server:
        servicer = server.servicer
        handle = servicer._differentiate
        jacobian = engine.Plan.jacobian

        def timed_handle(*args, **kwargs):
            with timers("server handler"):
                return handle(*args, **kwargs)

        def timed_jacobian(self, *args, **kwargs):
            with timers("engine"):
                return jacobian(self, *args, **kwargs)

        servicer._differentiate = timed_handle
        engine.Plan.jacobian = timed_jacobian
        try:
            gradient = remote_gradient([f"127.0.0.1:{server.port}"], spec.build_graph(),
                                       spec.param_names)
            client = gradient.client
            graph_id = client.register(gradient.graph)
            trainer = Trainer(spec, data, gradient, config)
            state = trainer.initial_state()
            order = np.random.default_rng(0).permutation(len(data.y_train))
            for step in range(steps + 5):
                if step == 5:  # warm-up done
                    timers.seconds.clear()
                start = step * config.batch_size % (len(order) - config.batch_size)
                rows = order[start:start + config.batch_size]
                with timers("client encode"):
                    inputs = {**state.params, "X": data.X_train[rows],
                              "Y": trainer.Y_train[rows]}
                    request = client._differentiate_request(inputs, spec.param_names, [LOSS],
                                                            "auto", None, None)
                    request.message.graph_id = graph_id
                with timers("rpc"):
                    reply = client._tensor_stub.Differentiate(request, timeout=30)
                with timers("client decode"):
                    result = result_from_proto(reply)
                    grads = {p: result.jacobian[LOSS, p] for p in spec.param_names}
                with timers("update"):
                    step_gradient = Gradient(float(result.outputs[LOSS]), grads, result.mode,
                                             result.planner)
                    state = trainer._apply(state, step_gradient, len(rows))
            gradient.close()
        finally:
            engine.Plan.jacobian = jacobian
    s = {k: v / steps for k, v in timers.seconds.items()}
    return [("client: encode request (inputs -> protobuf)", s["client encode"]),
            ("gRPC: transport + protobuf (de)serialization",
             s["rpc"] - s["server handler"]),
            ("server: decode inputs, encode reply", s["server handler"] - s["engine"]),
            ("server: engine (Plan.jacobian, reverse mode)", s["engine"]),
            ("client: decode reply", s["client decode"]),
            ("client: SGD update", s["update"])]


# --- main ---------------------------------------------------------------------------------------

def measure_model(hidden, data, torch, rounds: int, breakdown_steps: int) -> dict:
    spec = ModelSpec.mlp(data.num_features, data.num_classes, hidden)
    config = TrainConfig(epochs=EPOCHS_PER_ROUND, batch_size=64, lr=0.1, momentum=0.9)
    name = "MLP " + "-".join(map(str, spec.widths))
    print(f"== {spec.description}: {spec.num_params:,} parameters, batch "
          f"{config.batch_size}, {EPOCHS_PER_ROUND} epochs per round, {rounds} rounds\n")
    runs = {}
    with contextlib.ExitStack() as stack:
        in_process = stack.enter_context(server_address(None))  # as `gradserve train`
        addresses = {"in-process server": in_process,
                     "server process": stack.enter_context(server_process())}
        for where, address in addresses.items():
            for stream in (False, True):
                run = GradserveRun(spec, data, config, address, stream)
                stack.callback(run.close)
                runs[f"gradserve, {where}, {'stream' if stream else 'unary'}"] = run
            run = GradserveRun(spec, data, config, address, False, STEPS_PER_CALL)
            stack.callback(run.close)
            runs[f"gradserve, {where}, {STEPS_PER_CALL} steps per call"] = run
        trainer = next(iter(runs.values())).trainer
        if torch is not None:
            for threads in sorted({1, torch.get_num_threads()}):
                runs[f"torch eager, local, {threads} thread{'s' if threads > 1 else ''}"] = \
                    TorchRun(torch, spec, data, config, trainer, threads)
        rates, per_round = measure_rounds(runs, trainer.total_steps, rounds)

    # The baseline is torch's faster thread setting: the stricter comparison.
    baseline = max((r for loop, r in rates.items() if loop.startswith("torch")), default=None)
    print_table(["loop", "steps/s", "ms/step", "vs torch"],
                [(loop, f"{r:,.0f}", f"{1000 / r:.2f}",
                  f"{r / baseline:.2f}x" if baseline else "-") for loop, r in rates.items()],
                title="Training steps per second (median of rounds; an epoch-end "
                      "evaluation included)")
    def note(loop):
        return spread_note(round_ratios(per_round, loop)) if torch else None

    records = [ratio_line(f"P8 train {name} digits batch 64 ({where}, unary)",
                          rates[f"gradserve, {where}, unary"], baseline, TARGET, "higher",
                          fmt=fmt_rate, skipped=None if torch else "torch not installed",
                          note=note(f"gradserve, {where}, unary"))
               for where in addresses]
    records += [ratio_line(f"P8 train {name} digits batch 64 ({where}, --steps-per-call "
                           f"{STEPS_PER_CALL})",
                           rates[f"gradserve, {where}, {STEPS_PER_CALL} steps per call"],
                           baseline, TARGET_STEPS_PER_CALL, "higher", fmt=fmt_rate,
                           skipped=None if torch else "torch not installed",
                           note=note(f"gradserve, {where}, {STEPS_PER_CALL} steps per call"))
                for where in addresses]
    print()

    parts = step_breakdown(spec, data, config, breakdown_steps)
    total = sum(t for _, t in parts)
    print_table(["part of one step", "us", "share"],
                [(part, f"{t * 1e6:,.0f}", f"{t / total:.0%}") for part, t in parts]
                + [("total", f"{total * 1e6:,.0f}", "100%")],
                title="Where one step goes (unary call, in-process server, timers around "
                      "each part)")
    return {"model": name, "steps_per_second": rates, "p8": records,
            "breakdown_seconds": dict(parts)}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, extra=lambda p: p.add_argument(
        "--only-p8", action="store_true", help="only the P8 model, MLP 64-64-64-10"))
    rounds, breakdown_steps = (5, 200) if args.settings.quick else (15, 600)
    for line in environment_lines():
        print(line)
    print()
    torch = load_torch()
    if torch is None:
        print(torch_skip_message() + "\n")
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    print(f"data: {data.description}\n")
    # The MLP 64-64-10 (64 inputs, one hidden layer of 64), then the
    # README's sample command (--hidden 64 --hidden 64).
    results = [measure_model(hidden, data, torch, rounds, breakdown_steps)
               for hidden in ([(64, 64)] if args.only_p8 else [(64,), (64, 64)])]
    if args.json:
        write_json(args.json, {"environment": environment_lines(), "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
