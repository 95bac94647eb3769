"""Idle DifferentiateStreams over real gRPC on 127.0.0.1: they hold no thread, so
health checks and other calls answer however many are open; they end after
stream_idle_seconds; one client address may open max_streams_per_client of them;
and on SIGTERM they (and health Watch calls) end at once instead of holding the
server for its whole grace.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import Client, GraphBuilder
from gradserve.server.app import create_server
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1.codec import to_tensor

from support.server_process import ServerProcess

ANSWER_WITHIN = 1.0  # seconds: a health check or a seed call with idle streams open


def seed_graph():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g


SEED_INPUTS = {"x": np.float32([np.pi]), "y": np.float32([np.pi])}


def seed_request() -> pb.DifferentiateRequest:
    return pb.DifferentiateRequest(graph=seed_graph().build(),
                                   inputs={k: to_tensor(v) for k, v in SEED_INPUTS.items()})


def check_seed(jacobian) -> None:
    assert abs(jacobian["o", "x"].item() - -6.2832) < 1e-4
    assert abs(jacobian["o", "y"].item() - -8.7423e-08) < 1e-11


class IdleStreams:
    """`count` DifferentiateStreams on one channel, each sending `first` (or nothing)
    and then nothing until released; records how each ended and when."""

    def __init__(self, address: str, count: int, first=None):
        self.channel = grpc.insecure_channel(address)
        stub = pb_grpc.GradientServiceStub(self.channel)
        self.release = threading.Event()
        self.replies = [0] * count
        self.ended: list = [None] * count  # (code name, details, seconds since start)
        self.t0 = time.monotonic()

        def requests():
            if first is not None:
                yield first
            self.release.wait(120)

        def run(i):
            call = stub.DifferentiateStream(requests())
            try:
                for _ in call:
                    self.replies[i] += 1
                self.ended[i] = ("OK", "", time.monotonic() - self.t0)
            except grpc.RpcError as err:
                self.ended[i] = (err.code().name, err.details(), time.monotonic() - self.t0)

        self.threads = [threading.Thread(target=run, args=(i,), daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.release.set()
        self.channel.close()
        for t in self.threads:
            t.join(10)


def open_streams(server) -> int:
    return sum(server.servicer.calls.streams.values())


def wait_until(condition, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.mark.parametrize("workers, streams, per_client", [
    (16, 16, None),  # the default --max-workers: the defect's first case
    (4, 4, None),  # the Kubernetes manifests' workers: the liveness probe's case
    (4, 200, 256),  # 200 streams open at once, all accepted
    (16, 200, None),  # 200 from one address under the default cap: 64 open, 136 refused
], ids=["16-workers-16-streams", "4-workers-4-streams", "200-streams-open",
        "200-streams-default-cap"])
def test_idle_streams_leave_health_and_calls_answering(workers, streams, per_client):
    limits = Limits() if per_client is None else Limits(max_streams_per_client=per_client)
    server = create_server("127.0.0.1:0", limits, max_workers=workers).start()
    address = f"127.0.0.1:{server.port}"
    idle = IdleStreams(address, streams)
    try:
        expect_open = min(streams, limits.max_streams_per_client)
        assert wait_until(lambda: open_streams(server) == expect_open
                          and sum(e is not None for e in idle.ended) == streams - expect_open), \
            f"{open_streams(server)} streams open, ended: {idle.ended[:3]}"
        refused = [e for e in idle.ended if e is not None]
        assert len(refused) == streams - expect_open
        for code, details, _ in refused:
            assert code == "RESOURCE_EXHAUSTED" and "max_streams_per_client" in details, details
        with grpc.insecure_channel(address) as channel, \
                Client(address, timeout=ANSWER_WITHIN, retries=0) as client:
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(5):
                started = time.monotonic()
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=ANSWER_WITHIN)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                started = time.monotonic()
                check_seed(client.differentiate(seed_graph(), SEED_INPUTS).jacobian)
                assert time.monotonic() - started < ANSWER_WITHIN
            # a stream of its own works too, next to the idle ones (on a new channel: the
            # same address, so only under the cap)
            if expect_open < limits.max_streams_per_client:
                with client.stream(seed_graph()) as session:
                    check_seed(session.differentiate(SEED_INPUTS).jacobian)
        assert sum(e is None for e in idle.ended) == expect_open, "an idle stream ended early"
    finally:
        idle.close()
        server.stop(grace=0)


def test_an_idle_stream_ends_after_stream_idle_seconds():
    """One stream answered once and then silent, one silent from the start: both end
    DEADLINE_EXCEEDED "stream idle for 1 s" about a second after their last message;
    a Client session replaces its stream ended so before the next request."""
    server = create_server("127.0.0.1:0", Limits(stream_idle_seconds=1)).start()
    address = f"127.0.0.1:{server.port}"
    answered = IdleStreams(address, 1, first=seed_request())
    silent = IdleStreams(address, 1)
    try:
        assert wait_until(lambda: answered.ended[0] and silent.ended[0], timeout=10)
        for streams in (answered, silent):
            code, details, seconds = streams.ended[0]
            assert code == "DEADLINE_EXCEEDED", (code, details)
            assert details.startswith("stream idle for 1 s") and \
                "stream_idle_seconds" in details, details
            assert 0.9 <= seconds < 3.0, seconds
        assert answered.replies == [1]
        assert open_streams(server) == 0
        with Client(address, timeout=10) as client, client.stream(seed_graph()) as session:
            check_seed(session.differentiate(SEED_INPUTS).jacobian)
            time.sleep(1.6)  # the server ends this stream meanwhile
            check_seed(session.differentiate(SEED_INPUTS).jacobian)
    finally:
        answered.close()
        silent.close()
        server.stop(grace=0)


def test_streams_per_client_address_are_capped():
    server = create_server("127.0.0.1:0", Limits(max_streams_per_client=3)).start()
    address = f"127.0.0.1:{server.port}"
    idle = IdleStreams(address, 3)
    try:
        assert wait_until(lambda: open_streams(server) == 3)
        with grpc.insecure_channel(address) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                list(stub.DifferentiateStream(iter([seed_request()]), timeout=10))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_streams_per_client" in info.value.details()
            assert "3" in info.value.details()
            # unary calls are not streams: still served
            assert stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).limits \
                .max_streams_per_client == 3
            idle.close()  # the three end; the address may open streams again
            assert wait_until(lambda: open_streams(server) == 0)
            replies = list(stub.DifferentiateStream(iter([seed_request()] * 2), timeout=10))
            assert len(replies) == 2
    finally:
        idle.close()
        server.stop(grace=0)


def test_sigterm_with_idle_streams_and_a_health_watch_exits_at_once():
    """With a grace of 20 s, idle streams and a health Watch open: the watch sees
    NOT_SERVING and ends, the idle streams end UNAVAILABLE right after the drain
    (0.5 s), and the process exits 0 within a few seconds, not after the grace."""
    grace = 20.0
    with ServerProcess("--port", "0", "--grace", str(grace)) as server:
        address = server.wait_serving()
        answered = IdleStreams(address, 2, first=seed_request())
        silent = IdleStreams(address, 2)
        watched: list = []

        def watch():
            with grpc.insecure_channel(address) as ch:
                try:
                    for reply in health_pb2_grpc.HealthStub(ch).Watch(
                            health_pb2.HealthCheckRequest(), timeout=60):
                        watched.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                            reply.status))
                    watched.append("OK")
                except grpc.RpcError as err:
                    watched.append(err.code().name)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            assert wait_until(lambda: answered.replies == [1, 1] and watched == ["SERVING"])
            time.sleep(0.2)  # the silent streams are open by now
            started = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            try:
                code = server.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running {grace} s after SIGTERM\n{server.output()}")
            exited = time.monotonic() - started
            assert code == 0, server.output()
            # not held by the idle streams until the grace ends (20 s): well before it,
            # however loaded the machine (~1 s idle; 3.05 s was seen at load 13)
            assert exited < grace / 2, f"exited {exited:.2f} s after SIGTERM\n{server.output()}"
            watcher.join(5)
            assert watched == ["SERVING", "NOT_SERVING", "OK"], watched
            for streams in (answered, silent):
                assert wait_until(lambda: all(streams.ended), timeout=5)
                for code_name, details, _ in streams.ended:
                    assert code_name == "UNAVAILABLE", (code_name, details)
        finally:
            answered.close()
            silent.close()


RACE_RUNS = 12


@pytest.mark.parametrize("run", range(RACE_RUNS))
def test_calls_racing_sigterm_get_ok_or_unavailable_never_cancelled(run, seed_builder,
                                                                    seed_inputs):
    """Clients calling as fast as they can while the server gets SIGTERM: through the
    Client every call ends OK or UNAVAILABLE (after its retries), never CANCELLED
    (which grpc reports for a call the server accepted in its last milliseconds)."""
    with ServerProcess("--port", "0", "--grace", "5") as server:
        address = server.wait_serving()
        outcomes: list = []
        stop = threading.Event()
        lock = threading.Lock()

        def call():
            with Client(address, timeout=10, retries=2, backoff=0.02) as client:
                graph = seed_builder()
                while not stop.is_set():
                    try:
                        if len(outcomes) % 2:
                            client.server_info()
                        else:
                            check_seed(client.differentiate(graph, seed_inputs()).jacobian)
                        outcome = "OK"
                    except grpc.RpcError as err:
                        outcome = err.code().name
                    with lock:
                        outcomes.append((time.monotonic(), outcome))
                    if outcome != "OK":
                        return

        threads = [threading.Thread(target=call, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3 + 0.05 * (run % 4))  # the SIGTERM lands at various points
        sigterm = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(15) == 0
        stop.set()
        for t in threads:
            t.join(30)
    codes = {o for _, o in outcomes}
    assert codes <= {"OK", "UNAVAILABLE"}, sorted(codes)
    assert any(t > sigterm and o == "OK" for t, o in outcomes), \
        "no call was served during the drain"


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
def test_each_event_loop_serves_health_streams_and_calls(event_loop):
    if event_loop == "uvloop":
        pytest.importorskip("uvloop")
    server = create_server("127.0.0.1:0", Limits(stream_idle_seconds=1), max_workers=2,
                           event_loop=event_loop).start()
    address = f"127.0.0.1:{server.port}"
    idle = IdleStreams(address, 4)
    try:
        assert wait_until(lambda: open_streams(server) == 4)
        with grpc.insecure_channel(address) as channel, Client(address, timeout=5) as client:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=ANSWER_WITHIN)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            check_seed(client.differentiate(seed_graph(), SEED_INPUTS).jacobian)
            with client.stream(seed_graph()) as session:
                check_seed(session.differentiate(SEED_INPUTS).jacobian)
        assert wait_until(lambda: all(idle.ended), timeout=5)
        assert {e[0] for e in idle.ended} == {"DEADLINE_EXCEEDED"}
    finally:
        idle.close()
        server.stop(grace=0)
