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
gRPC's own floor in the same rounds: a bare echo (grpc.aio server in its own process,
answering on its event loop; the sync client) of a K=1 TrainSteps call's request and
reply sizes (measured from `gradserve train`'s calls), one call per step.
The unary rows train on a state kept in the server's tensor store (the Trainer's
default against one server: TrainSteps by rows of the stored data set, the short
last batch and the evaluation in the epoch's last call); the stream rows send the
parameters with every step, as before.
The unary and K=16 rows send their calls as `gradserve train` does: against the
server process pipelined (two in flight: call n+1 sent before n's reply is read),
against the in-process server one at a time (client and server share one interpreter
lock there). The other way is one more row of each, in the same rounds, and the
pipelined calls' gain over one at a time is printed per round.
Targets (P8, the MLP 64-64-64-10): gradserve steps/s >= 0.5x torch's with one step
per call, >= 1.0x with 16 steps per call; each round's ratio is taken against that
round's faster torch, and the lines give their median and spread (min-max).
`--only-p8` measures the P8 model alone.

Then (issue 20 item 5) one SGD step in the engine, engine.sgd_steps with the
server's limits (one step per call, and 16), against the same step written by hand
in numpy (checked equal first) and against one Plan.jacobian plus the update per
step: CPU time of the measuring thread, one BLAS thread, rounds interleaved, ratios
to the hand-written step per round (median and spread). `--engine-step` measures
only that. Last, one step of `gradserve train` with one step per call (TrainSteps on
the stored state) is split into its parts, CPU timers around each, against an
in-process server. Never asserts on time.
"""

from __future__ import annotations

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import contextlib
import os
import statistics
from dataclasses import replace
import sys
import time
from pathlib import Path

import numpy as np

from _timing import (RunClock, environment_lines, load_torch, parse_args, print_table,
                     ratio_line, torch_skip_message, write_json)
from gradserve import engine
from gradserve.client.datasets import load_dataset
from gradserve.client.gradients import remote_gradient
from gradserve.client.models import LOSS, ModelSpec
from gradserve.client.training import Trainer, TrainConfig
from gradserve.cli.in_process import server_address
from gradserve.server.app import create_server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.server_process import ServerProcess  # noqa: E402  (tests/: the one subprocess helper)

TARGET = 0.5
SEQUENTIAL = "one call at a time"  # TrainConfig(pipeline=False): each call waits for the last
# `gradserve train`'s default: calls pipelined against a --server, one at a time against
# its in-process server (one interpreter lock for both sides: nothing to overlap)
CLI_PIPELINE = {"in-process server": False, "server process": True}
OTHER = {"in-process server": "pipelined", "server process": SEQUENTIAL}
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

    def __init__(self, spec, data, config, address, stream, steps_per_call=1, pipeline=True):
        self.gradient = remote_gradient([address], spec.build_graph(), spec.param_names,
                                        stream=stream)
        self.trainer = Trainer(spec, data, self.gradient,
                               replace(config, steps_per_call=steps_per_call,
                                       pipeline=pipeline))

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


# --- gRPC's own round trip at a K=1 call's sizes -----------------------------------------------

ECHO_METHOD = "/bench.Echo/Call"


def _echo_serve(reply_size: int, conn) -> None:
    """Child process: a grpc.aio server (gradserve's server model) whose one method
    answers any request with `reply_size` bytes on the event loop: no protobuf, no work."""
    import asyncio
    import grpc

    async def serve():
        reply = bytes(reply_size)

        async def call(request, context):
            return reply
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
        await server.stop(1.0)
    asyncio.run(serve())


@contextlib.contextmanager
def echo_server(reply_size: int):
    """A bare echo server in a spawned process; yields its address."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    process = ctx.Process(target=_echo_serve, args=(reply_size, child), daemon=True)
    process.start()
    try:
        if not conn.poll(60):
            raise RuntimeError("the echo server did not start")
        yield f"127.0.0.1:{conn.recv()}"
    finally:
        conn.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()


def train_call_sizes(spec, data, config) -> tuple[int, int]:
    """The bytes of a K=1 TrainSteps request and its reply as `gradserve train` sends
    and gets them (the median over one epoch's calls, on the stored state; read on the
    lean path, which answers them at one BLAS thread, as `gradserve serve` runs)."""
    from threadpoolctl import threadpool_limits

    sizes = []
    with threadpool_limits(limits=1, user_api="blas"), create_server("127.0.0.1:0") as server:
        lean = server.servicer.lean
        answer = lean.answer

        def recorded(method, data, *args, **kwargs):
            reply = answer(method, data, *args, **kwargs)
            if method.endswith("TrainSteps") and reply is not None:
                sizes.append((len(data), len(reply)))
            return reply
        lean.answer = recorded
        gradient = remote_gradient([f"127.0.0.1:{server.port}"], spec.build_graph(),
                                   spec.param_names)
        trainer = Trainer(spec, data, gradient, replace(config, epochs=1))
        trainer.run(trainer.initial_state())
        gradient.close()
    if not sizes:
        raise RuntimeError("no TrainSteps call reached the lean path")
    return (int(statistics.median(r for r, _ in sizes)),
            int(statistics.median(a for _, a in sizes)))


class EchoRun:
    """One round trip per step through a bare gRPC echo (sync client, as the Client's):
    what gRPC alone costs a K=1 training loop of the same number of calls."""

    def __init__(self, address: str, request_size: int, steps: int):
        import grpc

        self.channel = grpc.insecure_channel(address)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.call = self.channel.unary_unary(ECHO_METHOD, _registered_method=True)
        self.request, self.steps = bytes(request_size), steps

    def __call__(self):
        call, request = self.call, self.request
        for _ in range(self.steps):
            call(request, timeout=30.0)

    def close(self):
        self.channel.close()


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


# --- one SGD step in the engine against the same step by hand in numpy ----------------------

def hand_step(widths):
    """The MLP's SGD step written by hand in numpy (ReLU layers, softmax cross-entropy,
    momentum): forward, backward, update in place. Returns step(params, velocity, X, Y,
    lr, mu) -> (loss, gradients)."""
    layers = len(widths) - 1

    def step(params, velocity, X, Y, lr, mu):
        hs, pre = [X], []
        for k in range(1, layers + 1):
            a = hs[-1] @ params[f"W{k}"] + params[f"b{k}"]
            pre.append(a)
            hs.append(np.maximum(a, 0) if k < layers else a)
        z = hs[-1]
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        loss = -float(np.mean(np.sum(Y * (z - np.log(s)), axis=1)))
        g = (e / s - Y) / np.float32(len(X))
        grads = {}
        for k in range(layers, 0, -1):
            grads[f"W{k}"] = hs[k - 1].T @ g
            grads[f"b{k}"] = g.sum(axis=0)
            if k > 1:
                g = g @ params[f"W{k}"].T
                g *= pre[k - 2] > 0
        for name, p in params.items():
            v = velocity[name]
            v *= mu
            v += grads[name]
            p -= lr * v
        return loss, grads
    return step


def engine_step(spec, data, config, rounds: int) -> list[dict]:
    """One SGD step of the P8 model in the engine (engine.sgd_steps with the server's
    limits, as a TrainSteps call runs it) against the same step written by hand in
    numpy, and against one Plan.jacobian of the loss plus the update per step (the
    per-step path sgd_steps took before it ran the loss's reverse sweep itself).
    Per-round ratios to the hand-written step, rounds interleaved; CPU time of this
    thread (other tenants' load barely moves it), one BLAS thread."""
    from threadpoolctl import threadpool_limits
    from gradserve.server.convert import graph_from_proto
    from gradserve.server.limits import Limits

    plan = engine.compile(graph_from_proto(spec.build_graph().build()))
    limits = Limits()
    budget = engine.Budget(max_bytes=limits.max_intermediate_bytes,
                           max_reply_bytes=limits.max_message_bytes,
                           max_flops=limits.max_request_flops or None,
                           max_block_elements=limits.max_tensor_elements)
    trainer_like = np.random.default_rng(0)
    params = spec.init_params(trainer_like)
    rows = trainer_like.permutation(len(data.y_train))[:config.batch_size]
    X = data.X_train[rows]
    Y = np.eye(spec.num_classes, dtype=np.float32)[data.y_train[rows]]
    names = tuple(params)
    lr, mu = np.float32(config.lr), np.float32(config.momentum)
    zeros = {n: np.zeros_like(p) for n, p in params.items()}

    # The hand-written step is checked against the engine's before it is timed.
    by_hand = hand_step(spec.widths)
    loss, grads = by_hand({n: p.copy() for n, p in params.items()},
                          {n: v.copy() for n, v in zeros.items()}, X, Y, lr, mu)
    reference = plan.jacobian({"X": X, "Y": Y, **params}, wrt=names, of=[LOSS])
    for name in names:
        np.testing.assert_allclose(grads[name], reference.jacobian[LOSS, name], rtol=1e-4,
                                   atol=1e-6)
    np.testing.assert_allclose(loss, float(reference.outputs[LOSS]), rtol=1e-5)

    stacked = {"X": np.stack([X] * STEPS_PER_CALL), "Y": np.stack([Y] * STEPS_PER_CALL)}
    hand_params = {n: p.copy() for n, p in params.items()}
    hand_velocity = {n: v.copy() for n, v in zeros.items()}
    jac_params = {n: p.copy() for n, p in params.items()}
    jac_velocity = {n: v.copy() for n, v in zeros.items()}

    def engine_one():
        engine.sgd_steps(plan, params, {"X": X[None], "Y": Y[None]}, learning_rate=config.lr,
                         momentum=config.momentum, velocity=zeros, loss=LOSS, budget=budget)

    def engine_sixteen():
        engine.sgd_steps(plan, params, stacked, learning_rate=config.lr,
                         momentum=config.momentum, velocity=zeros, loss=LOSS, budget=budget)

    def jacobian_and_update():
        r = plan.jacobian({"X": X, "Y": Y, **jac_params}, wrt=names, of=[LOSS],
                          budget=budget)
        for name, p in jac_params.items():
            v = jac_velocity[name]
            v *= mu
            v += r.jacobian[LOSS, name]
            p -= lr * v

    def numpy_step():
        by_hand(hand_params, hand_velocity, X, Y, lr, mu)

    runs = {"engine: sgd_steps, one step per call": (engine_one, 1),
            f"engine: sgd_steps, {STEPS_PER_CALL} steps per call": (engine_sixteen,
                                                                     STEPS_PER_CALL),
            "engine: Plan.jacobian + update, per step": (jacobian_and_update, 1),
            "hand-written numpy step": (numpy_step, 1)}
    per_round = {name: [] for name in runs}
    with threadpool_limits(limits=1, user_api="blas"):
        for f, _ in runs.values():
            for _ in range(20):
                f()
        for _ in range(rounds):
            for name, (f, steps) in runs.items():
                calls = max(1, 200 // steps)
                start = time.thread_time()
                for _ in range(calls):
                    f()
                per_round[name].append((time.thread_time() - start) / (calls * steps))
    hand = per_round["hand-written numpy step"]
    rows_out, records = [], []
    for name, times in per_round.items():
        ratios = [t / h for t, h in zip(times, hand)]
        rows_out.append((name, f"{statistics.median(times) * 1e6:,.0f}",
                         f"{min(times) * 1e6:,.0f}-{max(times) * 1e6:,.0f}",
                         f"{statistics.median(ratios):.2f}x",
                         f"{min(ratios):.2f}-{max(ratios):.2f}x"))
        records.append({"name": name, "seconds_per_step": times, "vs_hand": ratios})
    print_table(["one SGD step", "us (median)", "min-max", "vs hand", "spread"], rows_out,
                title=f"One step of {spec.description}, batch {config.batch_size}, momentum "
                      f"{config.momentum} (CPU time of this thread, {rounds} interleaved "
                      "rounds, one BLAS thread; ratios per round)")
    return records


# --- where a K=1 TrainSteps step goes ---------------------------------------------------------

class CPUTimers:
    """CPU seconds of the calling thread inside wrapped functions, by part."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, part: str, f):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return f(*args, **kwargs)
            finally:
                self.seconds[part] = self.seconds.get(part, 0.0) + time.thread_time() - start
        return timed


def step_breakdown(spec, data, config, epochs: int) -> list[tuple[str, float]]:
    """`gradserve train`'s loop with one step per call (TrainSteps on the stored state,
    the epoch's evaluation in its last call) against an in-process server whose parts
    are wrapped in CPU timers: CPU seconds per step, by part, and the wall time."""
    from threadpoolctl import threadpool_limits
    from gradserve.client import client as client_module
    from gradserve.server import calls as calls_module, training as training_module

    timers = CPUTimers()
    patched = [(client_module.Client, "_call"), (calls_module, "parse"),
               (training_module, "run_steps")]
    saved = [(owner, name, getattr(owner, name)) for owner, name in patched]
    try:
        with threadpool_limits(limits=1, user_api="blas"), \
                create_server("127.0.0.1:0") as server:
            servicer = server.servicer
            in_worker = servicer.calls.in_worker

            async def timed_in_worker(fn, *args):
                return await in_worker(timers.wrap("worker", fn), *args)

            servicer.calls.in_worker = timed_in_worker
            if servicer.lean is not None:  # small calls: answered on the event loop
                servicer.lean.answer = timers.wrap("lean", servicer.lean.answer)
            steps_in = {name: timers.wrap(f"TrainState.steps ({name})", servicer.training.steps)
                        for name in ("worker", "lean")}

            def timed_steps(*args, **kwargs):  # which path ran it: the lean one has a gate
                gate = args[5] if len(args) > 5 else kwargs.get("gate")
                return steps_in["worker" if gate is None else "lean"](*args, **kwargs)
            servicer.training.steps = timed_steps
            servicer.registry.resolve = timers.wrap("resolve", servicer.registry.resolve)
            client_module.Client._call = timers.wrap("client call", saved[0][2])
            calls_module.parse = timers.wrap("parse", saved[1][2])
            training_module.run_steps = timers.wrap("engine", saved[2][2])
            gradient = remote_gradient([f"127.0.0.1:{server.port}"], spec.build_graph(),
                                       spec.param_names)
            # one call at a time: a pipelined call's reply completes on grpc's thread
            trainer = Trainer(spec, data, gradient, replace(config, epochs=epochs,
                                                            pipeline=False))
            trainer.run(trainer.initial_state())  # warm-up
            timers.seconds.clear()
            cpu, main, wall = time.process_time(), time.thread_time(), time.perf_counter()
            trainer.run(trainer.initial_state())
            cpu, main, wall = (time.process_time() - cpu, time.thread_time() - main,
                               time.perf_counter() - wall)
            steps = trainer.total_steps
            gradient.close()
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
    s = {k: v / steps for k, v in timers.seconds.items()}
    for part in ("worker", "lean", "parse", "resolve", "engine", "TrainState.steps (worker)",
                 "TrainState.steps (lean)"):
        s.setdefault(part, 0.0)
    cpu, main, wall = cpu / steps, main / steps, wall / steps
    in_steps = s["TrainState.steps (worker)"] + s["TrainState.steps (lean)"]
    return [("client: Trainer loop, request and reply (Python)", main - s["client call"]),
            ("client: the gRPC call (its thread's CPU)", s["client call"]),
            ("server: event loop, gRPC threads", cpu - main - s["worker"] - s["lean"]),
            ("server: store, rows, checks, evaluation, reply message (either path)",
             in_steps - s["engine"]),
            ("server: engine (sgd_steps; either path)", s["engine"]),
            ("server worker: parse, resolve, serialize, telemetry",
             s["worker"] - s["TrainState.steps (worker)"]),
            ("server lean path: parse, gate, serialize, telemetry",
             s["lean"] - s["TrainState.steps (lean)"]),
            ("wall time per step", wall)]


# --- the lean path's time model for TrainSteps -------------------------------------------------

def calibrate(quick: bool) -> None:
    """Time the lean path's answer to TrainSteps calls on a stored state (parse, store,
    rows, steps, reply: server.lean with an unlimited budget, in this process, one BLAS
    thread) for MLPs of 1-4 hidden layers of 16-512, batches of 1-256 rows and 1-16
    steps a call, and fit server.lean.TimeModel's TrainSteps constants (least squares on
    relative error; the other FLOPs' and the gathered bytes' rates held at the shipped
    model's): printed beside the shipped model's estimates. Never asserts on time."""
    from gradserve.server.servicer import GradientServicer
    from gradserve.v1 import gradient_service_pb2 as pb

    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")  # as `gradserve serve` (--blas-threads 1)
    servicer = GradientServicer(inline_budget_us=1e12)
    lean, model = servicer.lean, servicer.lean.model
    rng = np.random.default_rng(0)
    X = rng.standard_normal((2048, 64)).astype(np.float32)
    cases = [((16,), 1, 1), ((64,), 1, 1), ((64, 64), 64, 1), ((64, 64), 1, 1),
             ((64, 64), 16, 1), ((64, 64), 256, 1), ((64, 64), 64, 4), ((64, 64), 1, 16),
             ((256, 256), 64, 1), ((256, 256), 16, 1), ((128,) * 4, 32, 1), ((16,) * 4, 1, 4),
             ((32,) * 3, 8, 2), ((256,), 256, 1), ((512,), 64, 1)]
    if quick:
        cases = cases[::2]
    print(f"lean TrainSteps calibration (load average {os.getloadavg()[0]:.2f}); median "
          f"of {3 if quick else 7} blocks")
    rows = []
    for hidden, batch, steps in cases:
        spec = ModelSpec.mlp(64, 10, hidden)
        graph_id, plan = servicer.registry.register(spec.build_graph().build())
        params = spec.init_params(rng)
        Y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, len(X))]
        state = servicer.store.keep("bench", dict(params), "state")
        data = servicer.store.keep("bench", {"X": X, "Y": Y}, "data")
        entry = servicer.store.entry(state, "state")

        def request() -> bytes:
            picked = rng.integers(0, len(X), batch * steps)
            return pb.TrainStepsRequest(
                graph_id=graph_id, state=state, state_version=entry.version, data=data,
                rows=picked.tolist(), batch_sizes=[batch] * steps, learning_rate=0.01,
                momentum=0.9, loss=LOSS).SerializeToString()
        first = request()
        parsed = pb.TrainStepsRequest.FromString(first)
        estimate = lean.train_estimate(plan, params, parsed)
        calls = max(3, int(3000 / (steps * (1 + batch * sum(hidden) / 2000))))
        times = []
        for _ in range(3 if quick else 7):
            elapsed = 0.0
            for _ in range(calls):
                data_bytes = request()
                start = time.perf_counter()
                if lean.answer("TrainSteps", data_bytes, start) is None:
                    raise RuntimeError(f"the lean path did not answer {hidden} {batch}x{steps}")
                elapsed += time.perf_counter() - start
            times.append(elapsed / calls * 1e6)
        nodes = len(plan.graph.nodes)
        forms = servicer.training.batch_shapes(parsed)
        shapes = plan.bind({**params, **{n: np.broadcast_to(np.zeros((), d), s)
                                         for n, (s, d) in forms[0][1].items()}}).shapes
        flops, dense = lean._step_flops(plan, shapes)
        gathered = batch * steps * (64 + 10) * 4
        rows.append((nodes, len(params), steps, flops * steps, dense * steps, gathered,
                     statistics.median(times), estimate))
        print(f"  MLP 64-{'-'.join(map(str, hidden))}-10 ({nodes} nodes), batch {batch:3d}, "
              f"{steps:2d} steps: {flops * steps:10,d} + {dense * steps:11,d} dense FLOPs: "
              f"{statistics.median(times):8.1f} us (model {estimate:8.1f} us)")
    print("fitted (fixed us, us per node and step, us per parameter and step, us per dense "
          f"MFLOP); shipped: {model.train_fixed_us}, {model.step_node_us}, "
          f"{model.step_parameter_us}, {model.dense_mflop_us}")
    t = np.array([r[6] for r in rows])
    known = np.array([(model.mflop_us * r[3] + model.gather_mb_us * r[5]) * 1e-6 for r in rows])
    a = np.array([[1.0, r[0] * r[2], r[1] * r[2], r[4] * 1e-6] for r in rows])
    coef = np.linalg.lstsq(a / t[:, None], 1 - known / t, rcond=None)[0]
    print("  " + ", ".join(f"{c:.1f}" for c in coef))
    worst = max(r[6] / r[7] for r in rows)
    print(f"  the shipped model's worst case: measured {worst:.2f}x its estimate")


# --- main ---------------------------------------------------------------------------------------

def measure_model(hidden, data, torch, rounds: int, breakdown_epochs: int) -> dict:
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
            for stream in (False, True):  # unary: pipelined as `gradserve train` has it
                run = GradserveRun(spec, data, config, address, stream,
                                   pipeline=CLI_PIPELINE[where])
                stack.callback(run.close)
                runs[f"gradserve, {where}, {'stream' if stream else 'unary'}"] = run
            run = GradserveRun(spec, data, config, address, False, STEPS_PER_CALL,
                               pipeline=CLI_PIPELINE[where])
            stack.callback(run.close)
            runs[f"gradserve, {where}, {STEPS_PER_CALL} steps per call"] = run
            run = GradserveRun(spec, data, config, address, False,
                               pipeline=not CLI_PIPELINE[where])
            stack.callback(run.close)
            runs[f"gradserve, {where}, unary, {OTHER[where]}"] = run
        trainer = next(iter(runs.values())).trainer
        request_size, reply_size = train_call_sizes(spec, data, config)
        echo = EchoRun(stack.enter_context(echo_server(reply_size)), request_size,
                       trainer.total_steps)
        stack.callback(echo.close)
        runs[f"bare gRPC echo, {request_size} B in, {reply_size} B out, a call a step"] = echo
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
    echo_loop = next(loop for loop in rates if loop.startswith("bare gRPC echo"))
    for where in addresses:
        ours = f"gradserve, {where}, unary"
        over = [1e6 / g - 1e6 / e for g, e in zip(per_round[ours], per_round[echo_loop])]
        print(f"{ours}: {1e6 / rates[ours]:,.0f} us a step, of which the bare echo's round "
              f"trip {1e6 / rates[echo_loop]:,.0f} us; the rest (engine, both sides' Python, "
              f"gRPC's per-call Python over the echo's) {statistics.median(over):,.0f} us "
              f"(rounds {min(over):,.0f}-{max(over):,.0f})")
    for where in addresses:  # the pipelined calls over the same calls one at a time
        unary, other = f"gradserve, {where}, unary", f"gradserve, {where}, unary, {OTHER[where]}"
        piped, one = (unary, other) if CLI_PIPELINE[where] else (other, unary)
        gains = [a / b for a, b in zip(per_round[piped], per_round[one])]
        print(f"gradserve, {where}: unary calls pipelined (two in flight) over {SEQUENTIAL}: "
              f"steps/s {statistics.median(gains):.2f}x (rounds {min(gains):.2f}-"
              f"{max(gains):.2f}x)")
    if baseline:
        print(f"the echo alone is {rates[echo_loop] / baseline:.2f}x torch's steps/s (round "
              f"ratios {spread_note(round_ratios(per_round, echo_loop))})")
    print()

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

    steps = engine_step(spec, data, config, rounds)

    parts = step_breakdown(spec, data, config, breakdown_epochs)
    cpu_parts, (_, wall) = parts[:-1], parts[-1]
    total = sum(t for _, t in cpu_parts)
    print_table(["part of one step", "CPU us", "share"],
                [(part, f"{t * 1e6:,.0f}", f"{t / total:.0%}") for part, t in cpu_parts]
                + [("total CPU", f"{total * 1e6:,.0f}", "100%"),
                   ("wall time", f"{wall * 1e6:,.0f}", "")],
                title="Where one step goes (`gradserve train`, one step per call: TrainSteps "
                      "on the stored state, one call at a time; in-process server; CPU "
                      "timers around each part; "
                      "the per-epoch evaluation spread over the epoch's steps)")
    return {"model": name, "steps_per_second": rates, "p8": records, "engine_step": steps,
            "breakdown_seconds": dict(parts)}


def main(argv=None) -> int:
    def options(parser):
        parser.add_argument("--only-p8", action="store_true",
                            help="only the P8 model, MLP 64-64-64-10")
        parser.add_argument("--engine-step", action="store_true",
                            help="only the P8 model's engine step against numpy by hand")
        parser.add_argument("--calibrate", action="store_true",
                            help="fit the lean path's TrainSteps time model (server.lean)")
    args = parse_args(__doc__, argv, extra=options)
    if args.calibrate:
        calibrate(args.settings.quick)
        return 0
    rounds, breakdown_epochs = (5, 2) if args.settings.quick else (15, 6)
    clock = RunClock()
    for line in environment_lines():
        print(line)
    print()
    torch = load_torch()
    if torch is None:
        print(torch_skip_message() + "\n")
    data = load_dataset("digits", test_fraction=0.2, seed=0)
    print(f"data: {data.description}\n")
    if args.engine_step:
        spec = ModelSpec.mlp(data.num_features, data.num_classes, (64, 64))
        config = TrainConfig(epochs=EPOCHS_PER_ROUND, batch_size=64, lr=0.1, momentum=0.9)
        steps = engine_step(spec, data, config, 3 * rounds)
        run = clock.print_summary()
        if args.json:
            write_json(args.json, {"environment": environment_lines(), "run": run,
                                   "engine_step": steps})
        return 0
    # The MLP 64-64-10 (64 inputs, one hidden layer of 64), then the
    # README's sample command (--hidden 64 --hidden 64).
    results = [measure_model(hidden, data, torch, rounds, breakdown_epochs)
               for hidden in ([(64, 64)] if args.only_p8 else [(64,), (64, 64)])]
    run = clock.print_summary()
    if args.json:
        write_json(args.json, {"environment": environment_lines(), "run": run,
                               "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
