"""Scale-out: three `gradserve serve` processes on 127.0.0.1, one Client balancing
over all of them with round_robin.

Which replica served a call is read from each replica's own Prometheus counters
(`gradserve_requests_total{method="Differentiate",code="OK"}` on --metrics-port), so
the test sees what the servers did, not what the client believes. Every answer is
checked against the closed form; then one replica is SIGKILLed mid-run and every
call must still complete correctly (UNAVAILABLE is retried, round_robin moves on,
a replica that lacks the graph gets it again).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from support import metrics
from support.server_process import ServerProcess

CALLS = 300
WORKERS = 4


@dataclass
class Replica:
    process: ServerProcess
    address: str
    metrics_port: int

    @property
    def proc(self) -> subprocess.Popen:
        return self.process.proc

    def served(self) -> int:
        """Differentiate calls this replica answered with OK, from its own /metrics."""
        return metrics.served(self.metrics_port)


@pytest.fixture
def replicas():
    """Three `gradserve serve` processes, each with its own gRPC and metrics port."""
    with contextlib.ExitStack() as stack:
        processes = [stack.enter_context(ServerProcess(
            "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--grace", "1"))
            for _ in range(3)]
        yield [Replica(p, p.wait_serving(), p.metrics_port()) for p in processes]


def _seed_graph() -> GraphBuilder:
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g


def _inputs(i: int) -> dict:
    """Distinct inputs per call, so an answer mixed up with another call's shows."""
    return {"x": np.float32([-3.0 + 0.02 * i]), "y": np.float32([0.5 + 0.01 * i])}


def _check(result, inputs: dict) -> None:
    x, y = (float(inputs[k][0]) for k in ("x", "y"))
    expected = {"o": (x + y) * np.sin(x), ("o", "x"): np.sin(x) + (x + y) * np.cos(x),
                ("o", "y"): np.sin(x)}
    assert result.outputs["o"].dtype == np.float32
    np.testing.assert_allclose(result.outputs["o"], [expected["o"]], rtol=1e-5, atol=1e-6)
    for key in (("o", "x"), ("o", "y")):
        assert result.jacobian[key].dtype == np.float32
        np.testing.assert_allclose(result.jacobian[key].ravel(), [expected[key]],
                                   rtol=1e-5, atol=1e-6, err_msg=str(key))


def _run_calls(client: Client, graph, indices, on_done=None, pause: float = 0.0,
               workers: int = WORKERS) -> None:
    """Differentiate once per index on `workers` threads; each answer is checked."""
    def one(i):
        inputs = _inputs(i)
        _check(client.differentiate(graph, inputs), inputs)
        if on_done is not None:
            on_done()
        time.sleep(pause)

    with ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(one, i) for i in indices]:
            future.result()


@pytest.mark.timeout(120)
def test_one_client_spreads_calls_over_every_replica_and_every_answer_is_right(replicas):
    graph = _seed_graph()
    pi = np.float32([np.pi])
    with Client([r.address for r in replicas], timeout=10.0) as client:
        seed = client.differentiate(graph, {"x": pi, "y": pi})
        assert abs(seed.jacobian["o", "x"].item() - (-6.2832)) < 1e-4
        assert abs(seed.jacobian["o", "y"].item() - (-8.7423e-08)) < 1e-11
        # One caller in a loop (an SGD worker), then several at once.
        _run_calls(client, graph, range(CALLS // 3), workers=1)
        sequential = [r.served() for r in replicas]
        _run_calls(client, graph, range(CALLS // 3, CALLS))

    served = [r.served() for r in replicas]
    assert sum(served) == CALLS + 1, f"Differentiate OK per replica: {served}"
    for counts in (sequential, served):
        assert min(counts) >= sum(counts) // 10, (
            f"round_robin should give each replica about a third: {counts}")


@pytest.mark.timeout(120)
def test_calls_complete_correctly_when_a_replica_is_killed_mid_run(replicas):
    graph = _seed_graph()
    victim, survivors = replicas[1], [replicas[0], replicas[2]]
    done = 0
    lock = threading.Lock()
    halfway = threading.Event()

    def on_done():
        nonlocal done
        with lock:
            done += 1
            if done >= CALLS // 3:
                halfway.set()

    with Client([r.address for r in replicas], timeout=10.0) as client:
        runner = ThreadPoolExecutor(1)
        # Paced (about 1 s in all) so that most calls come after the kill.
        run = runner.submit(_run_calls, client, graph, range(CALLS), on_done, 0.01)
        assert halfway.wait(60), "the calls did not get going"
        before = [r.served() for r in survivors]
        assert victim.served() > 0, "the victim served nothing before it was killed"
        victim.proc.send_signal(signal.SIGKILL)
        with lock:
            done_at_kill = done
        run.result(timeout=90)  # re-raises any failed call or wrong answer
        runner.shutdown()
        assert done_at_kill < CALLS * 2 // 3, f"killed too late: {done_at_kill} calls done"
        with lock:
            assert done == CALLS
        after = [r.served() for r in survivors]
        assert victim.proc.wait(timeout=10) == -signal.SIGKILL
        # The survivors carried the rest, and a fresh call still works.
        assert all(b > a for a, b in zip(before, after)), (before, after)
        _check(client.differentiate(graph, _inputs(0)), _inputs(0))
