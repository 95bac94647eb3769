"""The proxy recipe (deploy/haproxy/haproxy.cfg) with a real HAProxy in front of
three real `gradserve serve` processes.

- A client that does no balancing (one connection to the proxy) has its calls
  spread over all three replicas, counted on each replica's own /metrics, and
  grpc.health.v1 answers through the proxy (`gradserve health --server PROXY`).
- HAProxy's own check of each backend is a grpc.health.v1 Check in raw HTTP/2
  frames: a replica shutting down (NOT_SERVING, still serving during --drain) is
  taken out of the rotation before it refuses anything; no call fails.
- The check's bytes in the config are the ones built here from the HTTP/2 and
  HPACK specifications (RFC 9113, RFC 7541), and a server answers them SERVING.

HAProxy comes from Debian's package (.ci/run installs it); where it is missing
the tests skip, unless GRADSERVE_REQUIRE_HAPROXY=1 (set by .ci/run) makes that a
failure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import Client, GraphBuilder
from support import metrics
from support.server_process import ServerProcess, clean_env, free_port
from support import REPO

CONFIG = REPO / "deploy" / "haproxy" / "haproxy.cfg"


def _haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                        if os.path.exists("/usr/sbin/haproxy") else None)
    if found is None:
        reason = "HAProxy is not installed (Debian: apt-get install haproxy)"
        if os.environ.get("GRADSERVE_REQUIRE_HAPROXY") == "1":
            pytest.fail(f"{reason}; GRADSERVE_REQUIRE_HAPROXY=1: the proxy test must run")
        pytest.skip(reason)
    return found


class Proxy:
    """`haproxy -db -f deploy/haproxy/haproxy.cfg` on a free port before `backends`;
    its stderr (server state changes) collected."""

    def __init__(self, binary: str, backends: list[str]):
        self.port = free_port()
        env = dict(os.environ, GRADSERVE_PROXY_BIND=f"127.0.0.1:{self.port}",
                   **{f"GRADSERVE_BACKEND_{i + 1}": b for i, b in enumerate(backends)})
        self.proc = subprocess.Popen([binary, "-db", "-f", str(CONFIG)], env=env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                break
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.05)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output()):
            assert time.monotonic() < deadline, f"no {pattern!r} from haproxy:\n{self.output()}"
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def proxied():
    binary = _haproxy()
    with contextlib.ExitStack() as stack:
        # the second one, shut down by a test, serves new calls 10 s after SIGTERM
        servers = [stack.enter_context(ServerProcess(
            "--port", "0", "--metrics-port", "0", "--grace", "12", "--drain", drain))
            for drain in ("0.5", "10", "0.5")]
        addresses = [s.wait_serving() for s in servers]
        ports = [s.metrics_port() for s in servers]
        proxy = Proxy(binary, addresses)
        stack.callback(proxy.close)
        yield proxy, servers, ports


def _graph() -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", "float32", [3])
    g.output("o", g.sum(g.exp(x) * x))
    return g


def _call(client: Client, g, i: int) -> None:
    x = np.float32([0.1, -0.2, 0.3]) + np.float32(0.001 * i)
    r = client.differentiate(g, {"x": x})
    np.testing.assert_allclose(r.jacobian[("o", "x")], np.exp(x) * (1 + x), rtol=1e-5)


def test_calls_through_the_proxy_spread_over_replicas_and_health_answers(proxied):
    proxy, servers, ports = proxied
    target = f"127.0.0.1:{proxy.port}"
    # health through the proxy: grpc's own stub, and the CLI
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    done = subprocess.run([sys.executable, "-m", "gradserve.cli", "health", "--server", target],
                          env=clean_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # one client, one connection (to the proxy), 60 calls
    g, before = _graph(), [metrics.served(p) for p in ports]
    with Client(target) as c:
        for i in range(60):
            _call(c, g, i)
    counts = [metrics.served(p) - b for p, b in zip(ports, before)]
    print(f"\n60 calls through HAProxy over one connection: per replica {counts}")
    assert sum(counts) == 60 and min(counts) >= 10, counts


def test_a_replica_shutting_down_leaves_the_rotation_by_the_health_check(proxied):
    proxy, servers, ports = proxied
    target = f"127.0.0.1:{proxy.port}"
    g = _graph()
    with Client(target) as c:
        for i in range(9):
            _call(c, g, i)
        leaving = servers[1]
        leaving.proc.terminate()  # SIGTERM: NOT_SERVING, new calls still served for 10 s
        proxy.wait_for(r"gradserve/gradserve-2 is DOWN")
        served_before = [metrics.served(p) for p in ports]
        for i in range(30):
            _call(c, g, i)
        counts = [metrics.served(p) - b for p, b in zip(ports, served_before)]
        print(f"\n30 calls after HAProxy's check saw NOT_SERVING: per replica {counts}")
        assert leaving.proc.poll() is None  # still serving (its drain), yet no call came
        with Client(leaving.wait_serving()) as direct:
            _call(direct, g, 0)
        assert counts[1] == 0 and counts[0] + counts[2] == 30, counts


def _hpack_literal(index: int, value: bytes) -> bytes:
    """Literal header field without indexing, name from the static table (RFC 7541
    6.2.2), 4-bit index prefix (index < 15, or 15 followed by index - 15 < 128)."""
    prefix = bytes([index]) if index < 15 else bytes([15, index - 15])
    return prefix + bytes([len(value)]) + value


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream.to_bytes(4, "big") + payload)


def test_the_configs_health_check_bytes_are_a_grpc_health_check():
    headers = (b"\x83"  # :method POST (static table 3)
               + b"\x86"  # :scheme http (6)
               + _hpack_literal(4, b"/grpc.health.v1.Health/Check")  # :path (4)
               + _hpack_literal(1, b"localhost")  # :authority (1)
               + _hpack_literal(31, b"application/grpc")  # content-type (31)
               + b"\x00\x02te\x08trailers")  # te: trailers (new name)
    request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")  # SETTINGS
               + _frame(1, 0x4, 1, headers)  # HEADERS, END_HEADERS
               + _frame(0, 0x1, 1, b"\x00" + (0).to_bytes(4, "big")))  # DATA, END_STREAM
    config = CONFIG.read_text()
    sent = re.search(r"^\s*tcp-check send-binary ([0-9a-f]+)$", config, re.M).group(1)
    expected = re.search(r"^\s*tcp-check expect binary ([0-9a-f]+)$", config, re.M).group(1)
    assert bytes.fromhex(sent) == request
    serving = health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.SERVING).SerializeToString()
    assert bytes.fromhex(expected) == b"\x00" + len(serving).to_bytes(4, "big") + serving
    # and a real server answers those bytes with that message
    with ServerProcess("--port", "0") as server:
        host, port = server.address()
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(request)
            received, deadline = b"", time.monotonic() + 10
            while bytes.fromhex(expected) not in received and time.monotonic() < deadline:
                received += s.recv(65536)
        assert bytes.fromhex(expected) in received
