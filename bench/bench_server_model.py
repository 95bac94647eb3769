"""Server model benchmark: where each request's work runs, measured side by side.

    python bench/bench_server_model.py [--quick] [--sync-rev REV] [--max-workers 16]
    python bench/bench_server_model.py --calibrate   # the lean path's time model

Servers, each in its own process (client and server do not share a GIL):
  - gradserve uvloop: this tree's create_server as shipped (grpc.aio on uvloop; small
    requests answered inline on the event loop by the lean path, server.lean);
  - gradserve uvloop, no lean: the same with inline_budget_us=0 (every request handed
    to a worker thread and back);
  - gradserve asyncio: asyncio's own event loop, lean path on;
  - sync + lean (prototype): grpc's sync thread-pool server calling this tree's
    servicer, the lean path in the handler thread, else the general path in the same
    thread (no hand-off); it holds a thread per open stream, which is why it is not
    shipped (README, "Server model");
  - gradserve sync tree (with --sync-rev REV): create_server of that git revision
    (e.g. the parent of the commit that moved server/app.py to grpc.aio), extracted
    with `git archive` and imported ahead of this tree;
  - echo sync / echo aio: a bare gRPC echo of raw bytes on grpc.server and on
    grpc.aio.server (the transport floor of each model).

Measured, interleaved in one run (quote the ratios; the box is shared):
  latency: the seed example o = (x+y)*sin(x) by graph id through Client.differentiate,
      one call at a time, median; and an echo of the request's size;
  calls/s, 8 in flight: the same through one Client from 8 threads, and a grpc.aio
      stub with 8 tasks (pre-built request); echoes likewise.
CPU columns: CPU time of all threads of the server process per call (from /proc).

--calibrate times the lean path's own work in this process (parse, engine, reply) on
scalar chains of 4-2,000 nodes and on short chains of up to 100,000 elements, and fits
server.lean.TimeModel's constants (least squares on relative error), printing them
next to the model's estimates. Never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

from bench_service import (CHANNEL_OPTIONS, Loop, aio_rate, differentiate_request,
                           interleaved_medians, interleaved_rates, print_table, seed_graph,
                           threads_rate)
from gradserve.client import Client

ROOT = Path(__file__).resolve().parent.parent
ECHO = "/bench.Echo/Bytes"
PACKAGES = {"engine": "engine", "server": "server", "client": "client", "cli": "cli",
            "v1": "proto/gradserve/v1"}

# Run in the server process: start one server, print its port, stop when stdin closes.
SERVER_CODE = """
import sys, asyncio
kind, workers = sys.argv[1], int(sys.argv[2])
if kind == "gradserve-sync-tree":
    from gradserve.server.app import create_server
    server = create_server("127.0.0.1:0", max_workers=workers).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop(grace=0)
elif kind.startswith("gradserve-sync"):
    sys.path.insert(0, sys.argv[3])
    from bench_server_model import sync_lean_server
    server, port = sync_lean_server(workers)
    print(port, flush=True)
    sys.stdin.read()
    server.stop(0)
elif kind.startswith("gradserve"):
    from gradserve.server.app import create_server
    options = {"event_loop": "asyncio" if kind == "gradserve-asyncio" else "uvloop"}
    if kind == "gradserve-uvloop-nolean":
        options["inline_budget_us"] = 0
    server = create_server("127.0.0.1:0", max_workers=workers, **options).start()
    print(server.port, flush=True)
    sys.stdin.read()
    server.stop(grace=0)
elif kind == "echo-sync":
    from concurrent import futures
    import grpc
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
        "Bytes": grpc.unary_unary_rpc_method_handler(lambda r, c: r)}),))
    print(server.add_insecure_port("127.0.0.1:0"), flush=True)
    server.start()
    sys.stdin.read()
    server.stop(0)
else:  # echo-aio
    import grpc

    async def echo(request, context):
        return request

    async def main():
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", {
            "Bytes": grpc.unary_unary_rpc_method_handler(echo)}),))
        print(server.add_insecure_port("127.0.0.1:0"), flush=True)
        await server.start()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(0)
    asyncio.run(main())
"""


def sync_lean_server(workers: int):
    """The prototype of the sync model: grpc.server's thread pool runs each unary call of
    this tree's servicer in its own handler thread: the lean path if it answers, else the
    general path (parse, method, reply) in the same thread. Unary methods only (no
    streams, health, admission or drain): enough to measure a unary call's cost."""
    from concurrent import futures

    from gradserve.server import calls
    from gradserve.server.servicer import GradientServicer
    from gradserve.v1 import gradient_service_pb2 as pb

    servicer = GradientServicer(max_workers=1)
    service = pb.DESCRIPTOR.services_by_name["GradientService"]
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            continue
        name = method.name
        body = getattr(type(servicer), name).__wrapped__
        request_type = getattr(pb, method.input_type.name)

        def handle(data, context, name=name, body=body, request_type=request_type):
            started = time.perf_counter()
            reply = servicer.lean.answer(name, data, started)
            if reply is None:
                reply = calls._run(body, name, request_type, servicer, data, context, started)
            return reply
        handlers[name] = grpc.unary_unary_rpc_method_handler(handle)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name,
                                                                          handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class Child:
    """A server process of `kind`; `path` goes ahead of sys.path (another tree)."""

    def __init__(self, kind: str, workers: int, path: str | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
        if path:
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, kind, str(workers),
                                      str(Path(__file__).resolve().parent)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.port = int(self.proc.stdout.readline())
        self.address = f"127.0.0.1:{self.port}"
        self.pid = self.proc.pid

    def stop(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def extract(rev: str, into: Path) -> str:
    """The tree of `rev` as an importable `gradserve` package under `into`."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    package = into / "gradserve"
    package.mkdir()
    for name, where in PACKAGES.items():
        (package / name).symlink_to(src / where)
    return str(into)


def chain_graph(nodes: int, elements: int):
    """x float32 [elements] through `nodes` - 1 alternating multiplies and sines, summed."""
    from gradserve.client import GraphBuilder

    g = GraphBuilder()
    x = g.input("x", "float32", [elements])
    v = x
    for i in range(nodes - 1):
        v = g.sin(v) if i % 2 else v * x
    g.output("o", g.sum(v))
    return g


def calibrate(quick: bool) -> None:
    """Time the lean path's answer (parse, engine, reply) per request kind and shape and
    fit server.lean.TimeModel's constants; print them beside the shipped model's."""
    import statistics

    from gradserve.server import lean as lean_module
    from gradserve.server.servicer import GradientServicer
    from gradserve.v1 import gradient_service_pb2 as pb
    from gradserve.v1.codec import fill_tensors

    lean_module.LEAN_MAX_BYTES = 1 << 30  # calibrate past the size gate too
    servicer = GradientServicer(inline_budget_us=1e12)
    lean, model = servicer.lean, servicer.lean.model
    shapes = [(4, 1), (10, 1), (50, 1), (200, 1), (1000, 1), (2000, 1), (4, 1000),
              (4, 10000), (4, 100000), (20, 10000), (50, 1000), (100, 100)]
    rows = []
    print(f"lean path calibration (load average {os.getloadavg()[0]:.2f}); median of "
          f"{3 if quick else 7} blocks")
    for nodes, elements in shapes:
        graph_id, plan = servicer.registry.register(chain_graph(nodes, elements).build())
        x = np.random.default_rng(0).random(elements).astype(np.float32)
        for kind, request_type in (("Evaluate", pb.EvaluateRequest),
                                   ("Differentiate", pb.DifferentiateRequest)):
            request = request_type(graph_id=graph_id)
            fill_tensors(request.inputs, {"x": x})
            data = request.SerializeToString()
            if lean.answer(kind, data, time.perf_counter()) is None:
                raise RuntimeError(f"the lean path did not answer {kind} {nodes}x{elements}")
            times = []
            calls = max(3, int(20000 / (nodes * (1 + elements / 100))))
            for _ in range(3 if quick else 7):
                t = time.perf_counter()
                for _ in range(calls):
                    lean.answer(kind, data, t)
                times.append((time.perf_counter() - t) / calls * 1e6)
            count = len(plan.graph.nodes)
            directions = 0 if kind == "Evaluate" else 1
            flops = plan.estimate_flops(plan.shapes, directions)
            estimate = (model.evaluate_us if kind == "Evaluate" else model.differentiate_us)(
                count, flops)
            rows.append((kind, count, flops, statistics.median(times), estimate))
            print(f"  {kind:13s} {count:5d} nodes {elements:7d} elements {flops:9,d} FLOPs: "
                  f"{statistics.median(times):8.1f} us (model {estimate:8.1f} us)")
    print("fitted (fixed us, us per node, us per MFLOP); shipped model: "
          f"{model.fixed_us}, {model.evaluate_node_us} / {model.differentiate_node_us}, "
          f"{model.mflop_us}")
    for kind in ("Evaluate", "Differentiate"):
        mine = [r for r in rows if r[0] == kind]
        a = np.array([[1.0, r[1], r[2] * 1e-6] for r in mine])
        t = np.array([r[3] for r in mine])
        coef = np.linalg.lstsq(a / t[:, None], np.ones_like(t), rcond=None)[0]
        print(f"  {kind}: {coef[0]:.1f}, {coef[1]:.2f}, {coef[2]:.0f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--sync-rev", default=None,
                        help="also measure create_server of this git revision (e.g. the "
                             "last sync-server tree)")
    parser.add_argument("--max-workers", type=int, default=16)
    parser.add_argument("--calibrate", action="store_true",
                        help="fit the lean path's time model (server.lean.TimeModel) instead")
    args = parser.parse_args(argv)
    if args.calibrate:
        calibrate(args.quick)
        return
    kinds = ["gradserve-uvloop", "gradserve-uvloop-nolean", "gradserve-asyncio",
             "gradserve-sync-lean", "echo-sync", "echo-aio"]
    rounds, n = (4, 50) if args.quick else (12, 100)
    per_thread = 50 if args.quick else 150
    inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
    loop = Loop()
    with tempfile.TemporaryDirectory() as tmp:
        children = [Child(k, args.max_workers) for k in kinds]
        if args.sync_rev:
            children.append(Child("gradserve-sync-tree", args.max_workers,
                                  extract(args.sync_rev, Path(tmp))))
        try:
            load = os.getloadavg()
            print(f"server models: grpcio {grpc.__version__}, {os.cpu_count()} CPUs, "
                  f"max_workers={args.max_workers}, load average {load[0]:.2f} "
                  f"{load[1]:.2f} {load[2]:.2f}"
                  + (f", sync tree {args.sync_rev}" if args.sync_rev else ""))
            lat_rows, rate_rows = {}, {}
            clients, aio_stubs = [], []
            for child in children:
                if child.kind.startswith("gradserve"):
                    client = Client(child.address)
                    clients.append(client)
                    graph_id = client.register(seed_graph())
                    r = client.differentiate(graph_id, inputs)
                    assert abs(r.jacobian["o", "x"].item() - -6.2832) < 1e-4
                    request = differentiate_request(graph_id, inputs)
                    size = request.ByteSize()

                    async def make(address=child.address, request=request):
                        from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
                        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                        stub = pb_grpc.GradientServiceStub(channel)
                        return channel, lambda: stub.Differentiate(request)
                    channel, afn = loop.run(make())
                    aio_stubs.append(channel)
                    call = (lambda c=client, g=graph_id: c.differentiate(g, inputs))
                    lat_rows[f"{child.kind} Client.differentiate"] = ("sync", call, child.pid)
                    rate_rows[f"{child.kind} Client, 8 threads"] = (
                        lambda call=call: threads_rate(call, 8, per_thread), child.pid)
                    rate_rows[f"{child.kind} grpc.aio stub, 8 tasks"] = (
                        lambda afn=afn: loop.run(aio_rate(afn, 8, per_thread)), child.pid)
                else:
                    channel = grpc.insecure_channel(child.address, options=CHANNEL_OPTIONS)
                    grpc.channel_ready_future(channel).result(timeout=30)
                    echo = channel.unary_unary(ECHO, _registered_method=True)
                    raw = bytes(size)

                    async def make_echo(address=child.address):
                        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
                        return channel, channel.unary_unary(ECHO, _registered_method=True)
                    achannel, aecho = loop.run(make_echo())
                    aio_stubs.append(achannel)
                    call = (lambda e=echo: e(raw))
                    lat_rows[f"{child.kind} {size} B"] = ("sync", call, child.pid)
                    rate_rows[f"{child.kind}, 8 threads"] = (
                        lambda call=call: threads_rate(call, 8, per_thread), child.pid)
                    rate_rows[f"{child.kind} grpc.aio, 8 tasks"] = (
                        lambda aecho=aecho: loop.run(aio_rate(lambda: aecho(raw), 8,
                                                              per_thread)), child.pid)
            t0 = time.perf_counter()
            lat = interleaved_medians(lat_rows, rounds, n, warmup=100, loop=loop)
            base = lat[next(k for k in lat if k.startswith("echo-sync"))][0]
            print_table(f"latency, seed example by graph id, one call at a time (median of "
                        f"{rounds * n})", ("server", "median us", "vs echo-sync", "server CPU us"),
                        [(k, f"{t * 1e6:.0f}", f"{t / base:.2f}x", f"{s * 1e6:.0f}")
                         for k, (t, s, _) in lat.items()])
            rates = interleaved_rates(rate_rows, 3 if args.quick else 5, 8 * per_thread)
            base = rates["echo-sync, 8 threads"][0]
            print_table("calls/s, 8 in flight (median of rounds)",
                        ("server, client", "calls/s", "vs echo-sync threads", "server CPU us"),
                        [(k, f"{r:,.0f}", f"{r / base:.2f}x", f"{s * 1e6:.0f}")
                         for k, (r, s, _) in rates.items()])
            print(f"\ntotal {time.perf_counter() - t0:.0f} s")
        finally:
            for channel in aio_stubs:
                loop.run(channel.close())
            for client in clients:
                client.close()
            for child in children:
                child.stop()
            loop.close()


if __name__ == "__main__":
    main()
