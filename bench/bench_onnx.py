"""P9: gradients of imported ONNX models through the service against PyTorch eager.

For (a) LeNet-5 on 28x28 images, batch 32, (b) a small ResNet (stem, two basic
blocks with batch norm, 16 channels) on 16x16 images, batch 16, and (c) one
transformer encoder layer (embedding, 4-head attention, GELU feed-forward, layer
norm; d=32) on batch 16 x sequence 7: each model is exported with
torch.onnx.export, imported with gradserve.client.onnx.from_onnx(parameters=
"inputs"), and the gradient of sum(y * w) with respect to every parameter is
asked of a local server through the Client, as the import's own call does it
(`imported.vjp(client, {"x": x}, {"y": w})`: the parameters put once in the server's
tensor store, each call sending x and w; the P9 rows), and, for comparison, with the
parameters sent in every request (`client.vjp(graph, {"x": x, **parameters}, ...)`). The
baseline is the same forward and backward in PyTorch eager in this process
(zero_grad, forward, backward), at torch's faster thread setting. Goal: <= 1.5x
for each. No timed assertion.

Which path a call takes: a `gradserve serve` process runs one BLAS thread, and its lean
path (server/lean.py) answers a call estimated within its inline budget on the event
loop (the encoder's, with its parameters stored); the in-process server runs in this
process, whose BLAS has more threads, so its estimate counts matrix products at the
elementwise rate and its calls go to a worker thread (the hand-off included).

CPU cost, beside the times: on a shared 2-core machine a server in its own process
gets its own share of the CPUs, which flatters it against PyTorch in one process; so
each call through a server process also counts the CPU seconds it took, the client's
(this process, less its OpenBLAS workers' spinning after the in-process rows' products:
the Client runs no product, and the spin is printed apart) and the server's
(/proc/PID/stat, summed over the calls), against torch's own CPU seconds per step, a
ratio that other load does not move much.

Where the time goes: the engine alone (Plan.vjp on the same graph, in this
process, which sets the allocator as `gradserve serve` does) against the whole call,
the fixed cost per call (CPU seconds of client and server process per call, less
Plan.vjp's CPU seconds at one BLAS thread in this process: gRPC, protobuf, the hand-off
to a worker, the server's checks and the request's own glue around the sweeps),
the CPU split above, and the engine's time per op (forward and backward rules timed
one by one). Every gradserve figure is taken twice: with
OpenBLAS's default threads, and with one BLAS thread (threadpoolctl in this
process, OPENBLAS_NUM_THREADS=1 for the server process): these models' matrix
products are small, and on a busy 2-core machine a multi-threaded product waits
for its descheduled helper thread.

    .venv/bin/python bench/bench_onnx.py [--quick] [--json PATH] [--models encoder,...]
"""

from __future__ import annotations

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import collections
import contextlib
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

# numpy starts OpenBLAS's worker threads when it loads (in _timing, above), before gRPC,
# torch or a server start any: every thread but this one is a BLAS worker.
_BLAS_WORKERS = (frozenset(int(t) for t in os.listdir("/proc/self/task"))
                 - {threading.get_native_id()})

from _timing import (environment_lines, fmt_time, load_torch, measure, noise_note, parse_args,
                     print_table, ratio_line, torch_skip_message, write_json)
from gradserve import engine
from gradserve.client import Client
from gradserve.client.onnx import from_onnx
from gradserve.server.allocator import keep_freed_memory
from gradserve.server.app import create_server
from gradserve.server.convert import graph_from_proto

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.server_process import ServerProcess, clean_env  # noqa: E402  (tests/: subprocess helper)

TARGET = 1.5
MODELS = {"lenet5": "LeNet-5, 28x28, batch 32",
          "resnet": "ResNet (2 basic blocks + BN, 16 ch), 16x16, batch 16",
          "encoder": "transformer encoder layer, d=32, batch 16 x seq 7"}


@contextlib.contextmanager
def server_process(**env):
    """(address, pid) of a `gradserve serve` process (one server process)."""
    with ServerProcess("--port", "0", env=clean_env(**env)) as process:
        yield process.wait_serving(timeout=60), process.proc.pid


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_cpu(path: str) -> float:
    """CPU seconds (user + system) in a /proc stat file."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def process_cpu(pid: int) -> float:
    """CPU seconds process `pid` has used, all its threads."""
    return _stat_cpu(f"/proc/{pid}/stat")


def blas_workers_cpu() -> float:
    """CPU seconds this process's OpenBLAS workers have used. After a multi-threaded
    product they spin (OpenBLAS's thread timeout, ~0.1 s) before they sleep: a call
    measured just after the in-process rows' products would be charged that spinning."""
    return sum(_stat_cpu(f"/proc/self/task/{t}/stat") for t in _BLAS_WORKERS)


class CpuCount:
    """CPU seconds per call of the functions it wraps: this process's, and a server
    process's (clock ticks: exact only summed over many calls), from the second call on.
    A call that runs no product on this process's OpenBLAS (a call through a server
    process: the Client multiplies nothing; torch: its own BLAS and threads) counts this
    process's CPU less what those workers used meanwhile (their spinning after another
    row's products), which `spin` keeps apart."""

    def __init__(self):
        self.totals = collections.defaultdict(lambda: [0.0, 0.0, 0])
        self.spin = collections.Counter()

    def wrap(self, name, f, pid=None, clock=time.process_time, numpy_blas=False):
        """`clock`: this process's CPU seconds, or time.thread_time for work that runs on
        the calling thread alone (the engine at one BLAS thread). `numpy_blas`: f runs
        products on numpy's OpenBLAS in this process (their workers' CPU is f's)."""
        totals, first = self.totals[name], [True]

        def call():
            if first:  # the warm-up call (plans compiled, parameters put): not counted
                first.clear()
                return f()
            # (the /proc reads outside this process's clock: ~10-20 us each, they were
            # charged to the call, the client's and torch's alike; the workers' spin, read
            # around the clock's window, may then include a few us just outside it)
            s0 = process_cpu(pid) if pid else 0.0
            b0 = 0.0 if numpy_blas else blas_workers_cpu()
            c0 = clock()
            f()
            c1 = clock()
            spin = 0.0 if numpy_blas else blas_workers_cpu() - b0
            totals[0] += c1 - c0 - spin
            self.spin[name] += spin
            if pid:
                totals[1] += process_cpu(pid) - s0
            totals[2] += 1
        return call

    def per_call(self, name) -> tuple[float, float]:
        here, server, calls = self.totals[name]
        return here / calls, server / calls

    def spin_per_call(self, name) -> float:
        return self.spin[name] / self.totals[name][2]


_CONTROLLERS: list = []  # one threadpoolctl controller, made on first use


def one_blas_thread(f):
    """f with OpenBLAS limited to one thread in this process for the call. (One
    controller for every call: threadpool_limits() finds the loaded libraries again each
    time, 0.23 ms a call here, which the 1 BLAS thread rows counted as their own.)"""
    def call():
        if not _CONTROLLERS:
            from threadpoolctl import ThreadpoolController
            _CONTROLLERS.append(ThreadpoolController())
        with _CONTROLLERS[0].limit(limits=1, user_api="blas"):
            return f()
    return call


class Case:
    """One model: the PyTorch module, its ONNX import, the request's values."""

    def __init__(self, torch, name):
        # needs torch: imported once torch is known
        from support import exported_models as models

        self.torch, self.name = torch, name
        self.module, self.example = models.make(name)
        self.imported = from_onnx(models.export(self.module, self.example),
                                  parameters="inputs")
        y = self.module(self.example)
        self.w = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        self.params = dict(self.module.named_parameters())
        self.wrt = [n for n in self.params if n in self.imported.parameters]
        if len(self.wrt) != len(self.params):
            raise SystemExit(f"{name}: parameters missing from the import: "
                             f"{sorted(set(self.params) - set(self.wrt))}")
        self.data = {"x": self.example.numpy()}
        self.values = {**self.data, **self.imported.parameters}
        self.cotangent = {"y": self.w.numpy()}

    def torch_step(self):
        for p in self.params.values():
            p.grad = None
        (self.module(self.example) * self.w).sum().backward()

    def gradserve_step(self, client):
        """The import's own call: the parameters put in the server's tensor store once
        (on the first call), each call sending x and the cotangent."""
        return lambda: self.imported.vjp(client, self.data, self.cotangent, wrt=self.wrt)

    def resending_step(self, client):
        """Every parameter in every request."""
        return lambda: client.vjp(self.imported.graph, self.values, self.cotangent,
                                  wrt=self.wrt)

    def plan(self):
        return engine.compile(graph_from_proto(self.imported.graph.build()))

    def engine_step(self, plan):
        return lambda: plan.vjp(self.values, self.cotangent, wrt=self.wrt)

    def check(self, client):
        """The service's gradients agree with PyTorch's (a benchmark of wrong answers
        measures nothing)."""
        self.torch_step()
        _, got = self.imported.vjp(client, self.data, self.cotangent, wrt=self.wrt)
        worst = max(float(np.max(np.abs(got[n] - p.grad.numpy())) /
                          (float(np.max(np.abs(p.grad.numpy()))) or 1.0))
                    for n, p in self.params.items())
        if worst > 1e-3:
            raise SystemExit(f"{self.name}: gradients differ from PyTorch's by {worst:.2e}")
        return worst


@contextlib.contextmanager
def torch_threads(torch, n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def per_op_profile(case, steps: int) -> list[tuple[str, float]]:
    """Engine seconds per call by op and direction: every op's eval and vjp wrapped in
    a timer (a plan compiled while the table holds the wrappers)."""
    seconds = collections.Counter()
    saved = dict(engine.ops.OPS)

    def timed(label, f):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
        return wrapper

    try:
        for name, op in saved.items():
            engine.ops.OPS[name] = dataclasses.replace(
                op, eval=timed((name, "forward"), op.eval), vjp=timed((name, "backward"), op.vjp))
        plan = case.plan()
    finally:
        engine.ops.OPS.clear()
        engine.ops.OPS.update(saved)
    step = case.engine_step(plan)
    for _ in range(3):
        step()
    seconds.clear()
    for _ in range(steps):
        step()
    return sorted(((f"{op} {direction}", t / steps) for (op, direction), t in seconds.items()),
                  key=lambda item: -item[1])


def measure_case(torch, name, settings, addresses, profile_steps) -> dict:
    case = Case(torch, name)
    counts = collections.Counter(n.op for n in case.imported.graph.build().nodes)
    print(f"== {MODELS[name]}: {case.imported.num_parameters:,} parameters in "
          f"{len(case.wrt)} tensors; graph of {sum(counts.values())} nodes ("
          + ", ".join(f"{op} {k}" for op, k in counts.most_common()) + ")")
    funcs, clients, cpu = {}, [], CpuCount()
    try:
        for where, (address, pid) in addresses.items():
            client = Client(address, timeout=60)
            clients.append(client)
            worst = case.check(client)
            funcs[f"gradserve, {where}"] = cpu.wrap(where, case.gradserve_step(client), pid,
                                                    numpy_blas=pid is None)
            funcs[f"gradserve, {where}, parameters sent each call"] = case.resending_step(client)
            if where == "in-process server":
                funcs[f"gradserve, {where}, 1 BLAS thread"] = one_blas_thread(
                    case.gradserve_step(client))
        print(f"   gradients agree with PyTorch's (worst relative difference {worst:.1e})\n")
        plan = case.plan()
        funcs["engine alone (Plan.vjp, this process)"] = case.engine_step(plan)
        # (its CPU counted inside the BLAS limit, on this thread: threadpoolctl's own
        # work per call is no part of the engine's)
        funcs["engine alone, 1 BLAS thread"] = one_blas_thread(
            cpu.wrap("engine", case.engine_step(plan), clock=time.thread_time,
                     numpy_blas=True))
        thread_counts = sorted({1, torch.get_num_threads()})
        for n in thread_counts:
            def step(n=n):
                with torch_threads(torch, n):
                    case.torch_step()
            label = f"torch eager, {n} thread{'s' if n > 1 else ''}"
            funcs[label] = cpu.wrap(label, step)
        timings = measure(funcs, settings)
    finally:
        for client in clients:
            client.close()
    torch_best = min((t for k, t in timings.items() if k.startswith("torch")),
                     key=lambda t: t.median)
    print_table(["call", "time", "min", "vs torch"],
                [(k, fmt_time(t.median), fmt_time(t.min), f"{t.median / torch_best.median:.2f}x")
                 for k, t in timings.items()],
                title="Gradient with respect to every parameter (median of repeats)")
    records = []
    for call in (k for k in timings if k.startswith("gradserve")):
        t = timings[call]
        label = "P9" if "sent each call" not in call else "not P9 (comparison):"
        records.append(ratio_line(f"{label} {name} gradient ({call[11:]})", t.median,
                                  torch_best.median, TARGET,
                                  note=noise_note(t, torch_best)))
    torch_label = min((k for k in timings if k.startswith("torch")),
                      key=lambda k: cpu.per_call(k)[0])
    torch_cpu = cpu.per_call(torch_label)[0]
    print(f"\n   CPU per call (torch's least: {fmt_time(torch_cpu)} a step, {torch_label}; not "
          f"counted: numpy's BLAS workers spinning meanwhile "
          f"{fmt_time(cpu.spin_per_call(torch_label))}):")
    for where in addresses:
        here, server = cpu.per_call(where)
        total = here + server
        split = (f"client {fmt_time(here)} + server {fmt_time(server)}; not counted: this "
                 f"process's BLAS workers spinning from earlier rows "
                 f"{fmt_time(cpu.spin_per_call(where))}" if addresses[where][1]
                 else "client and server in this process")
        print(f"   {where}: {fmt_time(total)} ({split}) = {total / torch_cpu:.2f}x torch's")
        records.append({"name": f"P9 {name} CPU per call ({where})", "value": total,
                        "baseline": torch_cpu, "ratio": total / torch_cpu,
                        "target": TARGET, "met": total / torch_cpu <= TARGET,
                        "client_cpu": here, "server_cpu": server,
                        "blas_spin_cpu": cpu.spin_per_call(where)})
    engine_cpu = cpu.per_call("engine")[0]
    for where in [w for w in addresses if addresses[w][1]]:
        here, server = cpu.per_call(where)
        fixed = here + server - engine_cpu
        print(f"   {where}: fixed cost per call {fmt_time(fixed)} of CPU (client + server, "
              f"less the engine's {fmt_time(engine_cpu)} for Plan.vjp at 1 BLAS thread here)")
        records.append({"name": f"P9 {name} fixed cost per call ({where})", "value": fixed,
                        "engine_cpu": engine_cpu, "client_cpu": here, "server_cpu": server})
    for engine_call, call in (("engine alone (Plan.vjp, this process)",
                               "gradserve, in-process server"),
                              ("engine alone, 1 BLAS thread",
                               "gradserve, in-process server, 1 BLAS thread")):
        engine_t, call_t = timings[engine_call].median, timings[call].median
        print(f"   {call[11:]}: engine {fmt_time(engine_t)} of the {fmt_time(call_t)} call "
              f"({engine_t / call_t:.0%}); the rest (client, protobuf, gRPC, the server's "
              f"checks) {fmt_time(call_t - engine_t)}")
    profile = one_blas_thread(lambda: per_op_profile(case, profile_steps))()
    total = sum(t for _, t in profile)
    print()
    print_table(["engine op", "time", "share"],
                [(op, fmt_time(t), f"{t / total:.0%}") for op, t in profile[:12]]
                + [("all ops", fmt_time(total), "100%")],
                title="Where the engine's time goes (1 BLAS thread; each rule timed, timers add "
                      "overhead)")
    return {"model": name, "description": MODELS[name], "parameters": case.imported.num_parameters,
            "timings": {k: t.as_dict() for k, t in timings.items()}, "p9": records,
            "op_profile": profile}


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, extra=lambda parser: parser.add_argument(
        "--models", default=",".join(MODELS),
        help="the models to measure, comma-separated (default: %(default)s)"))
    names = args.models.split(",")
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"bench_onnx.py: unknown models {unknown} (known: {', '.join(MODELS)})")
    for line in environment_lines():
        print(line)
    print()
    torch = load_torch()
    if torch is None:
        print(torch_skip_message())
        return 0
    profile_steps = 10 if args.settings.quick else 40
    keep_freed_memory()  # as `gradserve serve` does: the in-process rows run as it would
    results = []
    with contextlib.ExitStack() as stack:
        in_process = stack.enter_context(create_server("127.0.0.1:0"))
        addresses = {"in-process server": (f"127.0.0.1:{in_process.port}", None),
                     "server process": stack.enter_context(server_process()),
                     "server process, OPENBLAS_NUM_THREADS=1": stack.enter_context(
                         server_process(OPENBLAS_NUM_THREADS=1))}
        for name in names:
            results.append(measure_case(torch, name, args.settings, addresses, profile_steps))
            print()
    print("P9 summary (goal <= 1.5x torch eager):")
    for r in results:
        for rec in r["p9"]:
            if "ratio" not in rec:
                print(f"  {rec['name']}: {fmt_time(rec['value'])}")
                continue
            print(f"  {rec['name']}: {rec['ratio']:.2f}x {'MET' if rec['met'] else 'NOT MET'}")
    print("(CPU per call rows: CPU seconds, client and server, against torch's; a wall-clock "
          "ratio on a loaded machine flatters a server in its own process)")
    if args.json:
        write_json(args.json, {"environment": environment_lines(), "models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
