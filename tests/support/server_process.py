"""`gradserve serve` in a subprocess, shared by the tests and the benchmarks that need a
real server process (bench/ puts this folder on sys.path to import it).

    with ServerProcess("--port", "0", "--grace", "1") as server:
        address = server.wait_serving()  # "127.0.0.1:PORT", once health is SERVING
        ...
        assert server.terminate(timeout=15) == 0  # SIGTERM; the exit code

Leaving the block stops a process still running: SIGTERM, then SIGKILL after 5 s.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

COMMAND = [sys.executable, "-m", "gradserve.cli"]
# Logged by `gradserve serve` once the port is bound and health is SERVING.
LISTENING = re.compile(r"gradserve listening on ([^\s:]+):(\d+)")
METRICS = re.compile(r"metrics on http://[^\s:]+:(\d+)/metrics")
# Logged by `gradserve serve --processes N` (N > 1) just before the listening line.
PIDS = re.compile(r"(\d+) server processes, pids ([\d ]+)")


def clean_env(**extra) -> dict:
    """This environment without GRADSERVE_* variables but GRADSERVE_PROCESSES=1, plus
    `extra`: one server process (what most tests measure: its metrics, its memory),
    unless `--processes N` or `extra` says otherwise."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRADSERVE_")}
    env["GRADSERVE_PROCESSES"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`gradserve serve ARGS` in a subprocess (environment: `env`, default this one
    without GRADSERVE_* variables); a thread collects its stderr lines."""

    def __init__(self, *args, env=None):
        self.proc = subprocess.Popen(COMMAND + ["serve", *map(str, args)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True,
                                     env=clean_env() if env is None else env)
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            with self._changed:
                self.stderr.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        return "".join(self.stderr)

    def wait_for(self, pattern: re.Pattern, timeout: float = 30.0) -> re.Match:
        """The first stderr line matching `pattern`; AssertionError if the process exits
        or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for line in self.stderr[seen:]:
                    match = pattern.search(line)
                    if match:
                        return match
                seen = len(self.stderr)
                left = deadline - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    break
                self._changed.wait(min(left, 0.1))
        raise AssertionError(f"no line matching {pattern.pattern!r} from `gradserve serve` "
                             f"(exit code {self.proc.poll()}); stderr:\n{self.output()}")

    def address(self, timeout: float = 30.0) -> tuple[str, int]:
        """(host, port) from the "gradserve listening on HOST:PORT" line."""
        match = self.wait_for(LISTENING, timeout)
        return match.group(1), int(match.group(2))

    def wait_serving(self, timeout: float = 30.0) -> str:
        """"HOST:PORT" once the server is bound and its health is SERVING."""
        return "%s:%d" % self.address(timeout)

    def metrics_port(self, timeout: float = 30.0) -> int:
        """The port of /metrics (with --metrics-port, 0 included)."""
        return int(self.wait_for(METRICS, timeout).group(1))

    def child_pids(self, timeout: float = 30.0) -> list[int]:
        """The server processes' pids under `--processes N` (N > 1)."""
        return [int(pid) for pid in self.wait_for(PIDS, timeout).group(2).split()]

    def terminate(self, timeout: float) -> int:
        """SIGTERM, then the exit code (TimeoutExpired if the process is still running)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, and SIGKILL if the process is still running after `timeout` seconds."""
        if self.proc.poll() is None:
            try:
                self.terminate(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(5)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
