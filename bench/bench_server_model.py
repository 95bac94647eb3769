"""Server model benchmark: grpc's asyncio server (today's gradserve) against the sync
thread-pool server it replaced, each next to a bare echo of its own kind.

    python bench/bench_server_model.py [--quick] [--sync-rev REV] [--max-workers 16]

Servers, each in its own process (client and server do not share a GIL):
  - gradserve aio: this tree's create_server (grpc.aio, event loop thread + workers);
  - gradserve aio + uvloop: the same with uvloop's event loop (if uvloop is installed);
  - gradserve sync: create_server of git revision --sync-rev (default: the parent of
    the commit that moved server/app.py to grpc.aio), extracted with `git archive`
    and imported ahead of this tree;
  - echo sync / echo aio: a bare gRPC echo of raw bytes on grpc.server and on
    grpc.aio.server (the transport floor of each model).

Measured, interleaved in one run (quote the ratios; the box is shared):
  latency: the seed example o = (x+y)*sin(x) by graph id through Client.differentiate,
      one call at a time, median; and an echo of the request's size;
  calls/s, 8 in flight: the same through one Client from 8 threads, and a grpc.aio
      stub with 8 tasks (pre-built request); echoes likewise.
CPU columns: CPU time of all threads of the server process per call (from /proc).
Never asserts on time.
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
if kind.startswith("gradserve"):
    from gradserve.server.app import create_server
    options = ({"event_loop": "uvloop" if kind == "gradserve-uvloop" else "asyncio"}
               if kind != "gradserve" else {})  # the sync tree has no event loop
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


class Child:
    """A server process of `kind`; `path` goes ahead of sys.path (another tree)."""

    def __init__(self, kind: str, workers: int, path: str | None = None):
        env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
        if path:
            env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        self.kind = kind
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER_CODE, kind, str(workers)],
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


def sync_revision() -> str:
    """The parent of the commit that replaced grpc.server by grpc.aio in server/app.py."""
    changed = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%H",
         "-Sgrpc.server(futures.ThreadPoolExecutor", "--", "server/app.py"],
        capture_output=True, text=True, check=True).stdout.strip()
    if not changed:
        raise SystemExit("no commit moved server/app.py off grpc.server: pass --sync-rev")
    return changed + "^"


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    parser.add_argument("--sync-rev", default=None,
                        help="git revision of the sync server (default: see the docstring)")
    parser.add_argument("--max-workers", type=int, default=16)
    args = parser.parse_args(argv)
    try:
        import uvloop  # noqa: F401
        kinds = ["gradserve-aio", "gradserve-uvloop"]
    except ImportError:
        kinds = ["gradserve-aio"]
    rev = args.sync_rev or sync_revision()
    rounds, n = (4, 50) if args.quick else (12, 100)
    per_thread = 50 if args.quick else 150
    inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
    loop = Loop()
    with tempfile.TemporaryDirectory() as tmp:
        sync_path = extract(rev, Path(tmp))
        children = [Child(k, args.max_workers) for k in kinds]
        children.append(Child("gradserve", args.max_workers, sync_path))
        children[-1].kind = "gradserve-sync"
        children += [Child("echo-sync", args.max_workers), Child("echo-aio", args.max_workers)]
        try:
            print(f"server models: grpcio {grpc.__version__}, {os.cpu_count()} CPUs, "
                  f"max_workers={args.max_workers}, sync server from {rev} "
                  f"({subprocess.run(['git', '-C', str(ROOT), 'rev-parse', '--short', rev], capture_output=True, text=True).stdout.strip()})")
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
            base = lat["gradserve-sync Client.differentiate"][0]
            print_table(f"latency, seed example by graph id, one call at a time (median of "
                        f"{rounds * n})", ("server", "median us", "vs sync", "server CPU us"),
                        [(k, f"{t * 1e6:.0f}", f"{t / base:.2f}x", f"{s * 1e6:.0f}")
                         for k, (t, s, _) in lat.items()])
            rates = interleaved_rates(rate_rows, 3 if args.quick else 5, 8 * per_thread)
            base = rates["gradserve-sync Client, 8 threads"][0]
            print_table("calls/s, 8 in flight (median of rounds)",
                        ("server, client", "calls/s", "vs sync Client", "server CPU us"),
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
