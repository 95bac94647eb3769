"""`gradserve serve --processes 2` over real gRPC on 127.0.0.1, and the Client's
channel pool that reaches both processes.

Which process served a call is read from the one /metrics the supervisor serves
(--metrics-port, here a free port: every process's samples, labelled process="I"),
so the test sees what the servers did. Answers are checked against the seed
example's published figures. A child killed with SIGKILL is restarted while the
others serve (no call on them fails), and only the supervisor's own children may
share its port.
"""

from __future__ import annotations

import os
import re
import signal
import time

import grpc
import pytest
from numpy.testing import assert_allclose

from gradserve.client import Client
from support import metrics
from support.server_process import ServerProcess

PUBLISHED_DODX, PUBLISHED_DODY = -6.2832, -8.7423e-08


def samples(metrics_port: int, name: str, **labels) -> dict[str, float]:
    """From the one /metrics: the samples `name` with `labels`, by their process label."""
    found: dict[str, float] = {}
    for sample in metrics.samples(metrics_port, name, **labels):
        process = sample.labels["process"]
        found[process] = found.get(process, 0) + sample.value
    return found


def served(metrics_port: int, process: int) -> int:
    """Differentiate calls one process answered OK, from the one /metrics."""
    return int(samples(metrics_port, "gradserve_requests_total", method="Differentiate",
                       code="OK").get(str(process), 0))


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in pids if alive(p)], "orphaned server processes"


@pytest.fixture
def two_processes():
    with ServerProcess("--processes", "2", "--port", "0", "--metrics-port", "0",
                       "--grace", "2", "--drain", "0") as server:
        server.wait_serving()
        yield server


def check_seed(result) -> None:
    assert_allclose(result.jacobian["o", "x"].ravel(), [PUBLISHED_DODX], rtol=1e-4)
    assert_allclose(result.jacobian["o", "y"].ravel(), [PUBLISHED_DODY], rtol=1e-3)


def test_a_client_with_four_channels_reaches_both_processes(two_processes, seed_builder,
                                                            seed_inputs):
    port = two_processes.metrics_port()
    with Client(two_processes.wait_serving(), channels=4) as client:
        graph = seed_builder()
        for _ in range(40):  # each process learns the graph after one NOT_FOUND
            check_seed(client.differentiate(graph, seed_inputs()))
    counts = [served(port, i) for i in (0, 1)]
    assert sum(counts) == 40  # one scrape sees every call, whichever process served it
    # Four connections land on one process with probability 2 * 2**-4 (the kernel
    # hashes each to a process): fresh connections up to three more times before calling
    # it a failure (a false failure then 1 in 4,096; one retry failed a whole-suite run).
    for _ in range(3):
        if 0 not in counts:
            break
        with Client(two_processes.wait_serving(), channels=4) as client:
            for _ in range(40):
                check_seed(client.differentiate(seed_builder(), seed_inputs()))
        counts = [served(port, i) for i in (0, 1)]
    assert all(counts), counts


def test_sigterm_stops_every_process_and_exits_0(two_processes, seed_builder, seed_inputs):
    pids = two_processes.child_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    with Client(two_processes.wait_serving(), channels=2) as client:
        check_seed(client.differentiate(seed_builder(), seed_inputs()))
    assert two_processes.terminate(timeout=20) == 0
    wait_gone(pids)
    assert two_processes.output().count("gradserve listening on") == 1


RESTARTED = re.compile(r"server process gradserve-(\d+) restarted \(pid (\d+), restart (\d+)\)")


def test_a_killed_child_is_restarted_while_the_others_serve(two_processes, seed_builder,
                                                            seed_inputs):
    """SIGKILL one child (as the OOM killer would): the supervisor restarts it after a
    backoff; meanwhile every call, each on a new connection (which the kernel gives to
    a process still listening), is answered by the other; the restart is counted in
    the metrics and the new process serves calls too."""
    port, address = two_processes.metrics_port(), two_processes.wait_serving()
    pids = two_processes.child_pids()
    os.kill(pids[0], signal.SIGKILL)
    wait_gone(pids[:1])  # its listening socket is closed now
    calls = failures = 0
    while not RESTARTED.search(two_processes.output()):
        assert two_processes.proc.poll() is None, two_processes.output()
        with Client(address, timeout=30) as client:  # a new connection each time
            try:
                check_seed(client.differentiate(seed_builder(), seed_inputs()))
            except grpc.RpcError:
                failures += 1
        calls += 1
        assert calls < 2000, "not restarted"
    assert failures == 0 and calls >= 1, (failures, calls)
    match = RESTARTED.search(two_processes.output())
    assert (match.group(1), match.group(3)) == ("0", "1") and alive(int(match.group(2)))
    assert samples(port, "gradserve_process_restarts_total") == {"0": 1.0, "1": 0.0}
    assert samples(port, "gradserve_process_up") == {"0": 1.0, "1": 1.0}
    for _ in range(40):  # the new process serves: a fresh connection reaches it soon
        with Client(address, channels=2) as client:
            check_seed(client.differentiate(seed_builder(), seed_inputs()))
        if served(port, 0):
            break
    assert served(port, 0) >= 1
    assert two_processes.terminate(timeout=20) == 0


def test_restarts_that_keep_failing_stop_the_server_with_exit_1(two_processes):
    """A child killed again each time it comes back: after 5 failed restarts in a row
    the supervisor stops the other and exits 1 (the orchestrator's turn)."""
    pid = two_processes.child_pids()[0]
    other = two_processes.child_pids()[1]
    for restart in range(1, 6):
        os.kill(pid, signal.SIGKILL)
        if restart == 5:
            break
        match = two_processes.wait_for(re.compile(
            rf"server process gradserve-0 restarted \(pid (\d+), restart {restart}\)"), 60)
        pid = int(match.group(1))
    assert two_processes.proc.wait(60) == 1
    wait_gone([pid, other])
    assert "restarts in a row failed" in two_processes.output()


def test_only_the_supervisors_children_share_its_port(seed_builder, seed_inputs):
    """grpc sets SO_REUSEPORT on Linux: a second `gradserve serve` on a port in use
    started and took a share of the connections (with a token on the first, 4-5 of 12
    tokenless connections were served by the second). Now a second server on an
    occupied port fails to start, one process or several, whoever holds it."""
    for first_args in (("--processes", "1"), ("--processes", "2")):
        with ServerProcess("--port", "0", "--grace", "1", *first_args) as first:
            port = first.address()[1]
            for second_args in (("--processes", "1"), ("--processes", "2")):
                second = ServerProcess("--port", port, *second_args)
                try:
                    assert second.proc.wait(30) == 1, second.output()
                finally:
                    second.stop()
                assert "cannot" in second.output() and str(port) in second.output()
                assert "in use" in second.output()
            with Client(first.wait_serving()) as client:
                check_seed(client.differentiate(seed_builder(), seed_inputs()))
            assert first.terminate(timeout=20) == 0


def test_a_killed_supervisor_takes_its_children_with_it(two_processes):
    pids = two_processes.child_pids()
    two_processes.kill()
    wait_gone(pids)


def test_health_is_serving_on_every_connection(two_processes):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    address = two_processes.wait_serving()
    for _ in range(8):  # new connections each time: both processes answer
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(address, options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_processes_1_serves_in_the_process_itself(seed_builder, seed_inputs):
    with ServerProcess("--processes", "1", "--port", "0") as server:
        with Client(server.wait_serving()) as client:
            check_seed(client.differentiate(seed_builder(), seed_inputs()))
        assert "server processes" not in server.output()
        assert server.terminate(timeout=15) == 0


def test_the_default_is_the_cpus_this_process_may_use(monkeypatch):
    from gradserve.cli.main import build_parser
    from gradserve.cli.serve import default_processes
    assert 1 <= default_processes() <= len(os.sched_getaffinity(0))
    monkeypatch.delenv("GRADSERVE_PROCESSES", raising=False)
    assert build_parser().parse_args(["serve"]).processes == default_processes()
    assert build_parser().parse_args(["serve", "--processes", "3"]).processes == 3
