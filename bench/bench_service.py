"""Transport benchmark: gradserve over gRPC against a bare gRPC echo of the same sizes.

    python bench/bench_service.py [--quick] [--max-workers 16] [--profile] [--repeat N]
        [--no-p7] [--only-p7] [--no-processes] [--no-malloc-variant]

Two servers, each in its own process (multiprocessing, spawn: client and server
do not share a GIL, as in a deployment on this 2-core box), with the same
max_workers, maximum_concurrent_rpcs and message size options:
  - gradserve: gradserve.server.app.create_server;
  - echo: a grpc.method_handlers_generic_handler service with two methods,
    `Tensor` (a gradserve.v1.Tensor parsed and serialized again, so protobuf
    decode/encode is paid as in the real service) and `Bytes` (identity
    serializers: the transport floor).

Measured, in one run, against the echo as baseline (PERF-NOTES.md, "Transport"):
  P5  seed example o = (x+y)*sin(x), float32 [1], graph by id: median latency
      of Client.differentiate vs an echo of a message of the request's size;
      target <= 1.3x. A raw stub call with a pre-built request separates the
      client library's cost from the server's.
  P6  8 requests in flight over one connection: calls/s vs the echo with 8 in
      flight; target >= 0.8x (per-call server CPU: processes do not help; the
      Client from 8 threads, and its differentiate_async with 8 futures in flight).
      Then `gradserve serve` as a command (--blas-threads 1, its default): calls/s
      with 8 in flight from the Client's defaults (one connection) against the
      service's default process count, and with Client(channels=N) against
      --processes N, each against --processes 1 (reported; no target).
  P7  x float32 [4194304] (16 MiB) in, gradient of sum(x*x) (= 2x, checked) out:
      MB/s = (serialized request bytes + serialized reply bytes) / median round
      trip, 1 MB = 1e6 bytes (gRPC/HTTP2 framing not counted); target >= 0.8x
      the raw-bytes echo's MB/s for the same sizes (no protobuf work: the floor),
      both sides sending pre-serialized bytes: gradserve called with the request's
      bytes and its reply's bytes left unparsed (identity serializers), the faster
      of a sync and a grpc.aio client on each side. Reported beside it: numpy in
      and out (the faster of the sync Client and a grpc.aio client doing the same
      work through gradserve.v1.tensor_wire), the generated stub with a pre-built
      request, and the protobuf Tensor echo. The gradserve server runs as `gradserve
      serve` does: one BLAS thread and its malloc thresholds (server.allocator);
      the echo at glibc's defaults. Repeated, as the "before" variant, with
      gradserve at glibc's defaults (--no-malloc-tuning).

Rounds of the configurations are interleaved so drift on the shared machine
hits every row alike; quote the ratios, not the absolute figures. `--repeat N`
runs it all N times (fresh servers each time) and closes with each ratio's
median and spread (min-max) over the runs, and the load average. The CPU
columns are the CPU time of all threads of the server process (gRPC's C-core
threads included, from /proc) and of this client process, per call: less
sensitive to other load on the box than wall time. `--profile` instead runs P5
and P7 against a gradserve server with cProfile timing thread CPU on every
server thread, and prints where the server's Python time goes. Never asserts
on time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time

import grpc
import numpy as np

from gradserve.client import Client, GraphBuilder
from gradserve.client.client import MAX_MESSAGE_BYTES, _TensorStub, result_from_proto
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import tensor_pb2
from gradserve.v1.codec import fill_tensors
from gradserve.v1.tensor_wire import TensorMessage

ECHO_SERVICE = "bench.Echo"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
BIG = 4194304  # float32 elements: 16 MiB
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


# --- servers (run in spawned child processes) ------------------------------------------


def _serve(kind: str, max_workers: int, conn, profile_path: str | None) -> None:
    """Child process: start one server, report its port, stop when told."""
    profiles = _profile_all_threads() if profile_path else None
    from gradserve.server.app import create_server
    from gradserve.server.limits import Limits

    limits = Limits()
    if kind.startswith("gradserve"):
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=1, user_api="blas")  # gradserve serve's --blas-threads 1
        if kind != "gradserve-default-malloc":  # gradserve serve without --no-malloc-tuning
            from gradserve.server.allocator import keep_freed_memory
            assert keep_freed_memory(), "mallopt refused"
        server = create_server("127.0.0.1:0", limits, max_workers=max_workers).start()
        port, stop = server.port, lambda: server.stop(grace=1.0)
    else:
        server, port = _echo_server(limits, max_workers)
        server.start()
        stop = lambda: server.stop(1.0).wait()  # noqa: E731
    conn.send(port)
    conn.recv()  # "stop"
    stop()
    if profiles is not None:
        import pstats
        threading.setprofile(None)
        stats = None
        for prof in profiles:
            prof.create_stats()
            if not prof.stats:  # a thread that ran nothing profiled
                continue
            if stats is None:
                stats = pstats.Stats(prof)
            else:
                stats.add(prof)
        stats.dump_stats(profile_path)
    conn.send("stopped")
    if profiles is not None:
        os._exit(0)  # the profilers stay installed in idle threads: skip their shutdown


def _echo_server(limits, max_workers: int):
    """A bare gRPC server with gradserve's options and one echo service."""
    from concurrent import futures

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="echo"),
        options=[("grpc.max_receive_message_length", limits.max_message_bytes),
                 ("grpc.max_send_message_length", limits.max_message_bytes)],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs)
    echo = lambda request, context: request  # noqa: E731
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO_SERVICE, {
        "Tensor": grpc.unary_unary_rpc_method_handler(
            echo, request_deserializer=tensor_pb2.Tensor.FromString,
            response_serializer=tensor_pb2.Tensor.SerializeToString),
        "Bytes": grpc.unary_unary_rpc_method_handler(echo),  # identity: bytes in, bytes out
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    return server, port


def _profile_all_threads() -> list:
    """Give every thread started from now on its own cProfile profiler, timing CPU."""
    import cProfile

    profiles: list = []
    lock = threading.Lock()

    def start(frame, event, arg):
        sys.setprofile(None)
        prof = cProfile.Profile(time.thread_time)  # CPU time: GIL waits and idle don't count
        with lock:
            profiles.append(prof)
        prof.enable()

    threading.setprofile(start)
    return profiles


class ServerProcess:
    """One server in a spawned process; `env` is applied to its environment at start
    (a None value unsets a variable)."""

    def __init__(self, kind: str, max_workers: int, env: dict | None = None,
                 profile_path: str | None = None):
        self.kind, self.env = kind, env or {}
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, daemon=True,
                                   args=(kind, max_workers, child, profile_path))
        with _environ(self.env):
            self.process.start()
        if not self._conn.poll(120):
            self.process.terminate()
            raise RuntimeError(f"{kind} server did not start")
        self.port = self._conn.recv()
        self.address = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.is_alive():
            self._conn.send("stop")
            if self._conn.poll(60):
                self._conn.recv()
            self.process.join(10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


@contextlib.contextmanager
def _environ(extra: dict):
    """os.environ with `extra` applied (a None value unsets the variable), then restored."""
    saved = {k: os.environ.get(k) for k in extra}
    for k, v in extra.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def servers(max_workers: int, gradserve_kind: str = "gradserve"):
    """A gradserve and an echo server, both without MALLOC_* variables even when this
    process runs with them: gradserve sets its thresholds as `gradserve serve` does
    (kind "gradserve"), or keeps glibc's defaults ("gradserve-default-malloc",
    `--no-malloc-tuning`); the echo keeps glibc's defaults."""
    env = dict.fromkeys(MALLOC_ENV)
    started = []
    try:
        for kind in (gradserve_kind, "echo"):
            started.append(ServerProcess(kind, max_workers, env))
        yield started
    finally:
        for s in started:
            s.stop()


# --- workloads ---------------------------------------------------------------------------


def seed_graph() -> GraphBuilder:
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g


def square_sum_graph() -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", "float32", [BIG])
    g.output("loss", g.sum(x * x))
    return g


def differentiate_request(graph_id: str, inputs: dict) -> pb.DifferentiateRequest:
    """What Client.differentiate sends for (graph_id, inputs) with default options."""
    request = pb.DifferentiateRequest(graph_id=graph_id, request_id="1")
    fill_tensors(request.inputs, inputs)
    return request


def tensor_of_size(nbytes: int) -> tensor_pb2.Tensor:
    """A Tensor message whose serialization is exactly `nbytes` long."""
    for k in range(max(0, nbytes - 16), nbytes + 1):
        t = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, data=bytes(k))
        if t.ByteSize() == nbytes:
            return t
    raise ValueError(f"no Tensor serializes to {nbytes} bytes")


class Echo:
    """Sync and aio callables for the echo server's two methods."""

    def __init__(self, address: str, pid: int):
        self.address, self.pid = address, pid
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        grpc.channel_ready_future(self.channel).result(timeout=30)
        self.tensor = self.channel.unary_unary(
            f"/{ECHO_SERVICE}/Tensor", request_serializer=tensor_pb2.Tensor.SerializeToString,
            response_deserializer=tensor_pb2.Tensor.FromString, _registered_method=True)
        self.bytes = self.channel.unary_unary(f"/{ECHO_SERVICE}/Bytes", _registered_method=True)

    def aio(self):
        """(aio channel, tensor method, bytes method); call from inside the event loop."""
        channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        tensor = channel.unary_unary(
            f"/{ECHO_SERVICE}/Tensor", request_serializer=tensor_pb2.Tensor.SerializeToString,
            response_deserializer=tensor_pb2.Tensor.FromString, _registered_method=True)
        return channel, tensor, channel.unary_unary(f"/{ECHO_SERVICE}/Bytes",
                                                    _registered_method=True)

    def close(self):
        self.channel.close()


async def aio_differentiate(stub, graph_id: str, inputs: dict):
    """What an aio Client.differentiate would do: numpy in, request built, Result out;
    `stub` a _TensorStub on an aio channel (tensor_wire) or the generated stub."""
    if isinstance(stub, _TensorStub):
        request = TensorMessage(pb.DifferentiateRequest(graph_id=graph_id, request_id="1"),
                                {"inputs": inputs})
    else:
        request = differentiate_request(graph_id, inputs)
    return result_from_proto(await stub.Differentiate(request, timeout=30.0))


# --- timing ------------------------------------------------------------------------------


class Loop:
    """One event loop kept for the whole run, for the grpc.aio clients."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self):
        self.loop.close()


def per_call_times(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


async def aio_per_call_times(afn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await afn()
        times.append(time.perf_counter() - t)
    return times


def process_cpu_ns(pid) -> int:
    """CPU time so far of every thread of a process (or of a tuple of processes), gRPC's
    C-core threads included (Linux /proc; 0 elsewhere)."""
    if isinstance(pid, tuple):
        return sum(process_cpu_ns(p) for p in pid)
    total = 0
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
    return total


def rotated(rows: dict, r: int) -> list:
    """The rows' items, starting at a different row each round: no row always follows
    the same other row (whose leftover memory or queue state it would inherit)."""
    items = list(rows.items())
    k = r % len(items)
    return items[k:] + items[:k]


def interleaved_medians(rows: dict, rounds: int, n: int, warmup: int, loop: Loop) -> dict:
    """rows: name -> ("sync", fn, server pid) or ("aio", async fn, server pid).

    Returns name -> (median seconds per call, server CPU and client CPU seconds per call)."""
    times = {name: [] for name in rows}
    cpu = {name: [0, 0] for name in rows}  # ns over the measured calls: server, client
    for r in range(rounds + 1):
        for name, (kind, fn, pid) in rotated(rows, r):
            count = warmup if r == 0 else n
            server0, client0 = process_cpu_ns(pid), time.process_time_ns()
            got = (per_call_times(fn, count) if kind == "sync"
                   else loop.run(aio_per_call_times(fn, count)))
            if r:
                times[name].extend(got)
                cpu[name][0] += process_cpu_ns(pid) - server0
                cpu[name][1] += time.process_time_ns() - client0
    calls = rounds * n
    return {name: (statistics.median(t), cpu[name][0] / calls / 1e9, cpu[name][1] / calls / 1e9)
            for name, t in times.items()}


def threads_rate(fn, threads: int, calls_per_thread: int) -> float:
    """calls/s of `threads` threads each calling fn() calls_per_thread times."""
    start = threading.Barrier(threads + 1)

    def work():
        start.wait()
        for _ in range(calls_per_thread):
            fn()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return threads * calls_per_thread / (time.perf_counter() - t0)


def futures_rate(future_fn, inflight: int, total: int) -> float:
    """calls/s keeping `inflight` futures outstanding (wait on the oldest, start one)."""
    pending = collections.deque()
    t0 = time.perf_counter()
    for _ in range(total):
        if len(pending) == inflight:
            pending.popleft().result()
        pending.append(future_fn())
    for f in pending:
        f.result()
    return total / (time.perf_counter() - t0)


async def aio_rate(afn, inflight: int, calls_per_task: int) -> float:
    async def work():
        for _ in range(calls_per_task):
            await afn()
    t0 = time.perf_counter()
    await asyncio.gather(*(work() for _ in range(inflight)))
    return inflight * calls_per_task / (time.perf_counter() - t0)


def interleaved_rates(rows: dict, rounds: int, calls: int) -> dict:
    """rows: name -> (fn() making `calls` calls and returning calls/s, server pid).

    Returns name -> (median calls/s over interleaved rounds, the first a warmup; server
    and client CPU seconds per call)."""
    rates = {name: [] for name in rows}
    cpu = {name: [0, 0] for name in rows}
    for r in range(rounds + 1):
        for name, (fn, pid) in rotated(rows, r):
            server0, client0 = process_cpu_ns(pid), time.process_time_ns()
            rate = fn()
            if r:
                rates[name].append(rate)
                cpu[name][0] += process_cpu_ns(pid) - server0
                cpu[name][1] += time.process_time_ns() - client0
    return {name: (statistics.median(v), cpu[name][0] / (rounds * calls) / 1e9,
                   cpu[name][1] / (rounds * calls) / 1e9) for name, v in rates.items()}


# --- output ------------------------------------------------------------------------------


def print_table(title: str, header: tuple, rows: list) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for i, row in enumerate([header, *rows]):
        print("  " + "  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                               for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


RATIOS: dict[str, list] = collections.defaultdict(list)  # label -> ratio of each run


def ratio_line(label: str, ours: float, theirs: float, unit: str, target: float,
               lower_is_better: bool, detail: str = "") -> str:
    ratio = ours / theirs
    RATIOS[label, target, lower_is_better].append(ratio)
    met = ratio <= target if lower_is_better else ratio >= target
    sign = "<=" if lower_is_better else ">="
    return (f"{label}: {ours:,.1f} {unit} vs echo {theirs:,.1f} {unit} = {ratio:.2f}x "
            f"(target {sign} {target}x) {'MET' if met else 'MISSED'}{detail}")


# --- the three measurements -----------------------------------------------------------


def bench_latency(gs: ServerProcess, echo: Echo, loop: Loop, quick: bool):
    inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
    client = Client(gs.address)
    graph_id = client.register(seed_graph())
    result = client.differentiate(graph_id, inputs)
    assert abs(result.jacobian["o", "x"].item() - -6.2832) < 1e-4, result.jacobian
    request = differentiate_request(graph_id, inputs)
    stub = client._stub  # the generated stub on the Client's own channel
    reply = stub.Differentiate(request)
    req_size, rep_size = request.ByteSize(), reply.ByteSize()
    small_req, small_rep = tensor_of_size(req_size), tensor_of_size(rep_size)
    raw = bytes(req_size)

    g, e = gs.process.pid, echo.pid
    rows = {
        "gradserve Client.differentiate(graph_id, numpy)":
            ("sync", lambda: client.differentiate(graph_id, inputs), g),
        "gradserve stub, pre-built request": ("sync", lambda: stub.Differentiate(request), g),
        "gradserve stub, pre-built request, timeout=30":
            ("sync", lambda: stub.Differentiate(request, timeout=30.0), g),
        f"echo Tensor {req_size} B (request size)": ("sync", lambda: echo.tensor(small_req), e),
        f"echo Tensor {rep_size} B (reply size)": ("sync", lambda: echo.tensor(small_rep), e),
        f"echo raw bytes {req_size} B": ("sync", lambda: echo.bytes(raw), e),
    }
    rounds, n = (6, 60) if quick else (24, 100)  # short blocks: the box drifts between regimes
    stats = interleaved_medians(rows, rounds, n, warmup=100, loop=loop)
    med = {name: st[0] for name, st in stats.items()}
    base = med[f"echo Tensor {req_size} B (request size)"]
    print_table(f"P5 latency, seed example by graph id (request {req_size} B, reply "
                f"{rep_size} B); median of {rounds * n} calls per row; CPU = all threads "
                f"of the process, per call", ("configuration", "median us", "vs echo",
                                              "server CPU us", "client CPU us"),
                [(name, f"{t * 1e6:.1f}", f"{t / base:.2f}x", f"{scpu * 1e6:.0f}",
                  f"{ccpu * 1e6:.0f}") for name, (t, scpu, ccpu) in stats.items()])
    client_us = med["gradserve Client.differentiate(graph_id, numpy)"] * 1e6
    stub_us = med["gradserve stub, pre-built request"] * 1e6
    print(f"  client library share: Client - stub = {client_us - stub_us:.1f} us; "
          f"server + transport excess: stub - echo = {stub_us - base * 1e6:.1f} us")
    line = ratio_line("P5 seed round trip (Client.differentiate)", client_us, base * 1e6,
                      "us", 1.3, lower_is_better=True,
                      detail=f"; raw stub {stub_us:.1f} us = {stub_us / (base * 1e6):.2f}x")
    ratio_line("P5 raw stub, pre-built request (reported)", stub_us, base * 1e6, "us", 1.3,
               lower_is_better=True)
    return client, graph_id, inputs, request, small_req, raw, line


def bench_throughput(gs: ServerProcess, echo: Echo, loop: Loop, quick: bool, client,
                     graph_id, inputs, request, small_req, raw):
    inflight = 8
    per_thread = 60 if quick else 150
    total = inflight * per_thread
    stub = client._stub

    async def make_aio():
        channel = grpc.aio.insecure_channel(gs.address, options=CHANNEL_OPTIONS)
        echo_channel, echo_tensor, _ = echo.aio()
        return channel, pb_grpc.GradientServiceStub(channel), echo_channel, echo_tensor

    gs_channel, aio_stub, echo_channel, aio_echo = loop.run(make_aio())

    g, e = gs.process.pid, echo.pid
    rows = {
        "gradserve Client.differentiate, 8 threads, one Client":
            (lambda: threads_rate(lambda: client.differentiate(graph_id, inputs), inflight,
                                  per_thread), g),
        "gradserve Client.differentiate_async, 8 in flight, one Client":
            (lambda: futures_rate(lambda: client.differentiate_async(graph_id, inputs),
                                  inflight, total), g),
        "gradserve stub.Differentiate.future, pre-built, 8 in flight":
            (lambda: futures_rate(lambda: stub.Differentiate.future(request), inflight,
                                  total), g),
        "gradserve grpc.aio stub, pre-built, 8 tasks":
            (lambda: loop.run(aio_rate(lambda: aio_stub.Differentiate(request), inflight,
                                       per_thread)), g),
        "echo Tensor, 8 threads":
            (lambda: threads_rate(lambda: echo.tensor(small_req), inflight, per_thread), e),
        "echo Tensor .future, 8 in flight":
            (lambda: futures_rate(lambda: echo.tensor.future(small_req), inflight, total), e),
        "echo Tensor grpc.aio, 8 tasks":
            (lambda: loop.run(aio_rate(lambda: aio_echo(small_req), inflight, per_thread)), e),
        "echo raw bytes, 8 threads":
            (lambda: threads_rate(lambda: echo.bytes(raw), inflight, per_thread), e),
    }
    rounds = 3 if quick else 5
    stats = interleaved_rates(rows, rounds, total)
    rates = {name: st[0] for name, st in stats.items()}
    loop.run(gs_channel.close())
    loop.run(echo_channel.close())
    base = rates["echo Tensor, 8 threads"]
    print_table(f"P6 throughput, seed example, 8 in flight ({total} calls per measurement, "
                f"median of {rounds})", ("configuration", "calls/s", "vs echo threads",
                                         "server CPU us", "client CPU us"),
                [(name, f"{r:,.0f}", f"{r / base:.2f}x", f"{scpu * 1e6:.0f}",
                  f"{ccpu * 1e6:.0f}") for name, (r, scpu, ccpu) in stats.items()])
    ours = rates["gradserve Client.differentiate, 8 threads, one Client"]
    best_gs = max((r, n) for n, r in rates.items() if n.startswith("gradserve"))
    best_echo = max((r, n) for n, r in rates.items() if n.startswith("echo Tensor"))
    futures = rates["gradserve Client.differentiate_async, 8 in flight, one Client"]
    ratio_line("P6 Client.differentiate_async, 8 in flight (reported)", futures, base,
               "calls/s", 0.8, lower_is_better=False)
    return ratio_line(
        "P6 8 in flight (Client, 8 threads)", ours, base, "calls/s", 0.8,
        lower_is_better=False,
        detail=f"; Client.differentiate_async {futures / base:.2f}x; best each side: "
               f"{best_gs[0]:,.0f} vs {best_echo[0]:,.0f} = "
               f"{best_gs[0] / best_echo[0]:.2f}x"), base


def bench_large(gs: ServerProcess, echo: Echo, loop: Loop, quick: bool, label: str):
    a = np.random.default_rng(0).standard_normal(BIG).astype(np.float32)
    inputs = {"x": a}
    client = Client(gs.address)
    graph_id = client.register(square_sum_graph())
    stub = client._stub
    request = differentiate_request(graph_id, inputs)
    reply = stub.Differentiate(request)
    req_size, rep_size = request.ByteSize(), reply.ByteSize()
    big_tensor = tensor_of_size(req_size)
    raw = bytes(req_size)

    def checked(result):
        grad = result.jacobian["loss", "x"]
        assert grad.shape == (BIG,) and np.array_equal(grad, 2 * a), "wrong gradient"

    checked(client.differentiate(graph_id, inputs))

    # Both sides sending pre-serialized bytes: the request's bytes in, the reply's bytes
    # out unparsed (identity serializers), as the raw-bytes echo does.
    method = "/gradserve.v1.GradientService/Differentiate"
    request_bytes = request.SerializeToString()
    raw_channel = grpc.insecure_channel(gs.address, options=CHANNEL_OPTIONS)
    raw_differentiate = raw_channel.unary_unary(method, _registered_method=True)
    checked(result_from_proto(pb.DifferentiateResponse.FromString(
        raw_differentiate(request_bytes))))

    async def make_aio():
        channel = grpc.aio.insecure_channel(gs.address, options=CHANNEL_OPTIONS)
        aio_stub, aio_tensor_stub = pb_grpc.GradientServiceStub(channel), _TensorStub(channel)
        checked(await aio_differentiate(aio_tensor_stub, graph_id, inputs))
        return (channel, aio_stub, aio_tensor_stub,
                channel.unary_unary(method, _registered_method=True), *echo.aio())

    (channel, aio_stub, aio_tensor_stub, aio_raw, echo_channel, aio_tensor,
     aio_bytes) = loop.run(make_aio())
    g, e = gs.process.pid, echo.pid
    rows = {
        "gradserve Client.differentiate (sync)":
            ("sync", lambda: client.differentiate(graph_id, inputs), g),
        "gradserve sync stub, pre-built request":
            ("sync", lambda: stub.Differentiate(request), g),
        "gradserve grpc.aio: build request + Result":
            ("aio", lambda: aio_differentiate(aio_tensor_stub, graph_id, inputs), g),
        "gradserve grpc.aio stub, pre-built request":
            ("aio", lambda: aio_stub.Differentiate(request), g),
        "gradserve raw bytes (pre-serialized, reply unparsed), sync":
            ("sync", lambda: raw_differentiate(request_bytes), g),
        "gradserve raw bytes (pre-serialized, reply unparsed), grpc.aio":
            ("aio", lambda: aio_raw(request_bytes), g),
        "echo Tensor, sync": ("sync", lambda: echo.tensor(big_tensor), e),
        "echo Tensor, grpc.aio": ("aio", lambda: aio_tensor(big_tensor), e),
        "echo raw bytes, sync": ("sync", lambda: echo.bytes(raw), e),
        "echo raw bytes, grpc.aio": ("aio", lambda: aio_bytes(raw), e),
    }
    rounds = 4 if quick else 21  # one call per row per round; single calls vary 2x
    stats = interleaved_medians(rows, rounds, 1, warmup=1, loop=loop)
    med = {name: st[0] for name, st in stats.items()}
    loop.run(channel.close())
    loop.run(echo_channel.close())
    raw_channel.close()
    client.close()

    def mbps(name):
        sent = rep_size if name.startswith("gradserve") else req_size
        return (req_size + sent) / med[name] / 1e6

    # The target: both sides sending pre-serialized bytes (the server's own cost against
    # the echo's); numpy in and out, what a user of the Client gets, is reported beside it.
    best_gs = max((mbps(n), n) for n in rows if n.startswith("gradserve raw bytes"))
    best_numpy = max((mbps(n), n) for n in ("gradserve Client.differentiate (sync)",
                                            "gradserve grpc.aio: build request + Result"))
    best_echo = max((mbps(n), n) for n in rows if n.startswith("echo raw bytes"))
    print_table(f"P7 16 MiB gradient, {label} (request {req_size:,} B, reply {rep_size:,} B; "
                f"MB/s = (request + reply bytes) / median round trip, 1 MB = 1e6 B; "
                f"median of {rounds})",
                ("configuration", "median ms", "MB/s", "vs best echo raw bytes",
                 "server CPU ms", "client CPU ms"),
                [(n, f"{t * 1e3:.1f}", f"{mbps(n):.0f}", f"{mbps(n) / best_echo[0]:.2f}x",
                  f"{scpu * 1e3:.1f}", f"{ccpu * 1e3:.1f}")
                 for n, (t, scpu, ccpu) in stats.items()])
    for what, sync_row, aio_row in (
            ("gradserve, numpy in/out", "gradserve Client.differentiate (sync)",
             "gradserve grpc.aio: build request + Result"),
            ("gradserve, pre-built request", "gradserve sync stub, pre-built request",
             "gradserve grpc.aio stub, pre-built request"),
            ("gradserve, raw bytes", "gradserve raw bytes (pre-serialized, reply unparsed), sync",
             "gradserve raw bytes (pre-serialized, reply unparsed), grpc.aio"),
            ("echo Tensor", "echo Tensor, sync", "echo Tensor, grpc.aio"),
            ("echo raw bytes", "echo raw bytes, sync", "echo raw bytes, grpc.aio")):
        sync_v, aio_v = mbps(sync_row), mbps(aio_row)
        print(f"  {what}: {'grpc.aio' if aio_v > sync_v else 'sync'} faster "
              f"(sync {sync_v:.0f} MB/s, aio {aio_v:.0f} MB/s, aio/sync {aio_v / sync_v:.2f}x)")
    return best_gs, best_echo, best_numpy


# --- profile mode --------------------------------------------------------------------------


def profile(max_workers: int, quick: bool) -> None:
    import pstats

    for label, n in (("P5 seed example", 300 if quick else 2000),
                     ("P7 16 MiB gradient", 3 if quick else 10)):
        path = tempfile.mktemp(suffix=".pstats")
        gs = ServerProcess("gradserve", max_workers, profile_path=path)
        try:
            with Client(gs.address) as client:
                if label.startswith("P5"):
                    graph_id = client.register(seed_graph())
                    inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
                else:
                    graph_id = client.register(square_sum_graph())
                    inputs = {"x": np.ones(BIG, np.float32)}
                for _ in range(n):
                    client.differentiate(graph_id, inputs)
        finally:
            gs.stop()
        stats = pstats.Stats(path)
        os.unlink(path)
        entries = [(tt, ct, calls, f"{os.path.basename(fn)}:{line}({name})")
                   for (fn, line, name), (_, calls, tt, ct, _) in stats.stats.items()]
        busy = sum(e[0] for e in entries)
        print(f"\nserver profile, {label}: {n} Client.differentiate calls; cProfile timing "
              f"thread CPU on every Python thread of the server; {busy / n * 1e6:,.0f} us CPU "
              f"per call (profiler overhead included; gRPC's C-core threads not seen)")
        print(f"  {'tottime/call us':>15}  {'cumtime/call us':>15}  {'calls':>7}  function")
        for tt, ct, calls, where in sorted(entries, reverse=True)[:18]:
            print(f"  {tt / n * 1e6:>15.1f}  {ct / n * 1e6:>15.1f}  {calls:>7}  {where}")


def bench_processes(quick: bool, echo_rate: float) -> list[str]:
    """P6, second part: `gradserve serve` (the command, --blas-threads 1 by default) with
    one process and with its default count N, loaded with 8 calls in flight through
    Clients of 1 and N channels. Interleaved rounds; server CPU summed over processes."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "tests"))
    from support.server_process import ServerProcess as Command, clean_env

    from gradserve.cli.serve import default_processes

    n = default_processes()
    inflight, per_thread = 8, 60 if quick else 150
    total = inflight * per_thread
    default_env = clean_env()
    del default_env["GRADSERVE_PROCESSES"]  # the service's own default
    inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
    with contextlib.ExitStack() as stack:
        one = stack.enter_context(Command("--port", "0", "--processes", "1"))
        many = stack.enter_context(Command("--port", "0", env=default_env))
        one_pid = (one.proc.pid,)
        many_pids = tuple(many.child_pids()) if n > 1 else (many.proc.pid,)
        clients = {}
        for name, server, channels in (("1", one, 1), ("1 x N", one, n),
                                       ("N", many, 1), ("N x N", many, n)):
            client = clients[name] = stack.enter_context(
                Client(server.wait_serving(), channels=channels))
            graph = seed_graph()
            for _ in range(4 * channels):  # each connection's process learns the graph
                graph_id = client.differentiate(graph, inputs).graph_id
            clients[name] = (client, graph_id)

        def threads(name):
            client, graph_id = clients[name]
            return lambda: threads_rate(lambda: client.differentiate(graph_id, inputs),
                                        inflight, per_thread)

        def futures(name):
            client, graph_id = clients[name]
            return lambda: futures_rate(lambda: client.differentiate_async(graph_id, inputs),
                                        inflight, total)
        rows = {
            "--processes 1, Client() defaults, 8 threads": (threads("1"), one_pid),
            f"--processes 1, Client(channels={n}), 8 threads": (threads("1 x N"), one_pid),
            f"default (--processes {n}), Client() defaults, 8 threads":
                (threads("N"), many_pids),
            f"--processes {n}, Client(channels={n}), 8 threads": (threads("N x N"), many_pids),
            f"--processes {n}, Client(channels={n}), differentiate_async, 8 in flight":
                (futures("N x N"), many_pids),
        }
        rounds = 3 if quick else 5
        stats = interleaved_rates(rows, rounds, total)
    base = stats["--processes 1, Client() defaults, 8 threads"][0]
    print_table(f"P6 processes: `gradserve serve` with 8 in flight ({total} calls per "
                f"measurement, median of {rounds}; default process count here: {n})",
                ("configuration", "calls/s", "vs 1 process", "vs echo", "server CPU us",
                 "client CPU us"),
                [(name, f"{r:,.0f}", f"{r / base:.2f}x", f"{r / echo_rate:.2f}x",
                  f"{scpu * 1e6:.0f}", f"{ccpu * 1e6:.0f}")
                 for name, (r, scpu, ccpu) in stats.items()])
    defaults = stats[f"default (--processes {n}), Client() defaults, 8 threads"][0]
    pooled = stats[f"--processes {n}, Client(channels={n}), 8 threads"][0]
    load = os.getloadavg()
    return [f"P6 defaults: Client() against the default --processes {n}: {defaults:,.0f} "
            f"calls/s = {defaults / base:.2f}x one process, {defaults / echo_rate:.2f}x echo",
            f"P6 channels={n} against --processes {n}: {pooled:,.0f} calls/s = "
            f"{pooled / base:.2f}x one process, {pooled / echo_rate:.2f}x echo "
            f"(load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on "
            f"{len(os.sched_getaffinity(0))} CPUs; the client shares them)"]


# --- main ----------------------------------------------------------------------------------


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--max-workers", type=int, default=16,
                        help="thread pool size of both servers (create_server's default)")
    parser.add_argument("--only-p7", action="store_true",
                        help="only P7 and its malloc variant (skip P5 and P6)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the gradserve server for P5 and P7 instead")
    parser.add_argument("--no-p7", action="store_true",
                        help="skip the 16 MiB measurements (P5 and P6 only)")
    parser.add_argument("--no-processes", action="store_true",
                        help="skip P6's `gradserve serve --processes` comparison")
    parser.add_argument("--no-malloc-variant", action="store_true",
                        help="skip P7's variant with glibc's default malloc thresholds")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="run everything N times and summarize each target's ratio "
                             "(median, min-max)")
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.max_workers, args.quick)
        return

    t_start = time.perf_counter()
    client_malloc = {k: os.environ[k] for k in MALLOC_ENV if k in os.environ}
    print(f"gradserve transport benchmark{' (quick)' if args.quick else ''}: "
          f"grpcio {grpc.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"servers in spawned processes, max_workers={args.max_workers}; client process "
          f"malloc env: {client_malloc or 'default'}; OPENBLAS_CORETYPE="
          f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')} OPENBLAS_L2_SIZE="
          f"{os.environ.get('OPENBLAS_L2_SIZE', '(unset)')}")
    loads = [os.getloadavg()]
    for run in range(args.repeat):
        if args.repeat > 1:
            print(f"\n=== run {run + 1} of {args.repeat} (load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}) ===")
        lines = one_run(args)
        loads.append(os.getloadavg())
        print("\nratios (same run)")
        for line in lines:
            print("  " + line)
    print(f"\nsummary over {args.repeat} run(s), each interleaved (median, min-max); load "
          f"average (1 min) {min(x[0] for x in loads):.2f}-{max(x[0] for x in loads):.2f} "
          f"on {len(os.sched_getaffinity(0))} CPUs shared with the client")
    for (label, target, lower), ratios in RATIOS.items():
        median = statistics.median(ratios)
        met = median <= target if lower else median >= target
        print(f"  {label}: {median:.2f}x ({min(ratios):.2f}-{max(ratios):.2f}; target "
              f"{'<=' if lower else '>='} {target}x) {'MET' if met else 'MISSED'}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


def one_run(args) -> list[str]:
    """P5, P6 and P7 once (each interleaved against its echo); the ratio lines."""
    loop = Loop()
    lines = []
    with servers(args.max_workers) as (gs, echo_server):
        echo = Echo(echo_server.address, echo_server.process.pid)
        if not args.only_p7:
            client, *shared, p5 = bench_latency(gs, echo, loop, args.quick)
            lines.append(p5)
            p6, echo_rate = bench_throughput(gs, echo, loop, args.quick, client, *shared)
            lines.append(p6)
            client.close()
            if not args.no_processes:
                lines.extend(bench_processes(args.quick, echo_rate))
        if args.no_p7:
            echo.close()
            loop.close()
            return lines
        (gs_mbps, gs_name), (echo_mbps, echo_name), (np_mbps, np_name) = bench_large(
            gs, echo, loop, args.quick, "gradserve with its malloc thresholds (gradserve "
            "serve's default), echo at glibc's defaults")
        echo.close()
    lines.append(ratio_line("P7 16 MiB gradient, pre-serialized both sides", gs_mbps,
                            echo_mbps, "MB/s", 0.8, lower_is_better=False,
                            detail=f"; gradserve best: {gs_name}; echo best: {echo_name}"))
    lines.append(ratio_line("P7 numpy in and out (reported, no target)", np_mbps, echo_mbps,
                            "MB/s", 0.8, lower_is_better=False, detail=f"; {np_name}"))
    if not args.no_malloc_variant:
        with servers(args.max_workers, "gradserve-default-malloc") as (gs, echo_server):
            echo = Echo(echo_server.address, echo_server.process.pid)
            (v_mbps, v_name), (ve_mbps, _), _ = bench_large(
                gs, echo, loop, args.quick, "variant: gradserve --no-malloc-tuning (glibc's "
                "defaults), echo at glibc's defaults")
            echo.close()
        lines.append(ratio_line(
            "P7 variant, gradserve --no-malloc-tuning (before; reported)", v_mbps, ve_mbps,
            "MB/s", 0.8, lower_is_better=False,
            detail=f"; the malloc thresholds give {gs_mbps / v_mbps:.2f}x its MB/s"))
    loop.close()
    return lines


if __name__ == "__main__":
    main()
