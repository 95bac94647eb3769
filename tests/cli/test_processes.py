"""`gradserve serve --processes 2` over real gRPC on 127.0.0.1, and the Client's
channel pool that reaches both processes.

Which process served a call is read from each process's own /metrics (child I on
--metrics-port + I, here each on a free port, samples labelled process="I"), so
the test sees what the servers did. Answers are checked against the seed
example's published figures.
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import grpc
import pytest
from numpy.testing import assert_allclose
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import Client
from support.server_process import ServerProcess

PUBLISHED_DODX, PUBLISHED_DODY = -6.2832, -8.7423e-08


def served(metrics_port: int, process: int) -> int:
    """Differentiate calls one process answered OK, from its /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    total = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "gradserve_requests_total"
                    and sample.labels.get("method") == "Differentiate"
                    and sample.labels.get("code") == "OK"):
                assert sample.labels["process"] == str(process)
                total += sample.value
    return int(total)


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
    ports = two_processes.metrics_ports()
    assert sorted(ports) == [0, 1]
    with Client(two_processes.wait_serving(), channels=4) as client:
        graph = seed_builder()
        for _ in range(40):  # each process learns the graph after one NOT_FOUND
            check_seed(client.differentiate(graph, seed_inputs()))
    counts = [served(ports[i], i) for i in (0, 1)]
    assert sum(counts) == 40
    # Four connections land on one process with probability 2 * 2**-4: retry once
    # with fresh connections before calling it a failure.
    if 0 in counts:
        with Client(two_processes.wait_serving(), channels=4) as client:
            for _ in range(40):
                check_seed(client.differentiate(seed_builder(), seed_inputs()))
        counts = [served(ports[i], i) for i in (0, 1)]
    assert all(counts), counts


def test_sigterm_stops_every_process_and_exits_0(two_processes, seed_builder, seed_inputs):
    pids = two_processes.child_pids()
    assert len(pids) == 2 and all(alive(p) for p in pids)
    with Client(two_processes.wait_serving(), channels=2) as client:
        check_seed(client.differentiate(seed_builder(), seed_inputs()))
    assert two_processes.terminate(timeout=20) == 0
    wait_gone(pids)
    assert two_processes.output().count("gradserve listening on") == 1


def test_a_killed_child_stops_the_others_and_the_server_exits_1(two_processes):
    pids = two_processes.child_pids()
    os.kill(pids[0], signal.SIGKILL)
    assert two_processes.proc.wait(20) == 1
    wait_gone(pids)
    assert "exited with code -9: stopping the others" in two_processes.output()


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
