"""SIGTERM under a CPU hog, many times: how long `gradserve serve --grace G` takes to
exit after SIGTERM while clients call it as fast as they can (as
tests/server/test_idle_streams.py's racing test does), against the bound G + 2 s.

    .venv/bin/python scripts/sigterm_under_load.py --runs 200 --grace 5

Starts one busy-looping process per CPU (--hogs) for the whole run. A run whose server
is still running at G + 2 s gets SIGUSR1 (the server then dumps every thread's stack
to its stderr, see --dump) and is reported with that stack; SIGKILL at G + 30 s.
Prints each run's exit time and code, then the distribution and the count over the
bound.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from gradserve.client import Client, GraphBuilder  # noqa: E402
from server_process import ServerProcess, clean_env  # noqa: E402

# The server, with faulthandler on SIGUSR1 (every thread's Python stack to stderr).
SERVE = ("import faulthandler, signal, sys; "
         "faulthandler.register(signal.SIGUSR1, all_threads=True); "
         "from gradserve.cli.main import main; sys.exit(main(sys.argv[1:]))")


class DumpableServer(ServerProcess):
    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, "serve", *map(str, args)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=clean_env())
        self.stderr = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()


def seed_graph():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g


def one_run(run: int, grace: float, clients: int) -> tuple[float, int | None, str]:
    with DumpableServer("--port", "0", "--grace", grace) as server:
        address = server.wait_serving(120)
        stop = threading.Event()
        codes: list[str] = []

        def call():
            inputs = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}
            with Client(address, timeout=10, retries=2, backoff=0.02) as client:
                graph = seed_graph()
                while not stop.is_set():
                    try:
                        if len(codes) % 2:
                            client.server_info()
                        else:
                            client.differentiate(graph, inputs)
                        codes.append("OK")
                    except grpc.RpcError as err:
                        codes.append(err.code().name)
                        return

        threads = [threading.Thread(target=call, daemon=True) for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(0.3 + 0.05 * (run % 4))
        sent = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        code, note = None, ""
        try:
            code = server.proc.wait(grace + 2)
        except subprocess.TimeoutExpired:
            server.proc.send_signal(signal.SIGUSR1)
            try:
                code = server.proc.wait(28)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
            time.sleep(0.5)
            note = server.output()
        took = time.monotonic() - sent
        stop.set()
        for t in threads:
            t.join(30)
        return took, code, note


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2,
                        help="busy-looping processes beside the runs (default: one per CPU)")
    args = parser.parse_args()
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.hogs)]
    times, over, bad = [], 0, 0
    try:
        for run in range(args.runs):
            took, code, note = one_run(run, args.grace, args.clients)
            times.append(took)
            late = took > args.grace + 2
            over += late
            bad += code != 0
            load = open("/proc/loadavg").read().split()[0]
            print(f"run {run + 1:3d}: exit {code} after {took:6.2f} s (load {load})"
                  f"{'  OVER THE BOUND' if late else ''}", flush=True)
            if note:
                print(note, flush=True)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    times.sort()
    n = len(times)
    print(f"\n{n} runs, --grace {args.grace:g}, bound {args.grace + 2:g} s, {args.hogs} hogs: "
          f"median {times[n // 2]:.2f} s, p95 {times[int(n * 0.95) - 1]:.2f} s, "
          f"max {times[-1]:.2f} s; over the bound: {over}; exit code not 0: {bad}")
    return 1 if over or bad else 0


if __name__ == "__main__":
    sys.exit(main())
