"""Operators' view: Prometheus metrics on --metrics-port and one JSON log line per request."""

from __future__ import annotations

import json
import logging
import urllib.request

import grpc
import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from gradserve.server.app import create_server


def scrape(port: int) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value} (comments dropped)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


@pytest.fixture
def observed(seed_builder, seed_inputs):
    """A server with metrics on a free port that has answered 3 good requests (2 graphs,
    one of them twice: one cache hit) and 1 bad one."""
    server = create_server("127.0.0.1:0")
    server.start(("127.0.0.1", 0))
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            client.differentiate(seed_builder(), seed_inputs())  # n=2, m=1: reverse
            client.differentiate(seed_builder(), seed_inputs())
            g = GraphBuilder()
            t = g.input("t", "float64", [1])
            g.output("wave", g.sin(g.constant(np.linspace(0, 1, 50)) * t))
            client.differentiate(g, {"t": np.float64([0.5])})  # n=1, m=50: forward
            with pytest.raises(grpc.RpcError):
                client.evaluate(seed_builder(), {"x": np.float32([1.0])})  # y missing
        yield server
    finally:
        server.stop(grace=0)


def test_metrics_count_requests_by_status_and_mode_and_report_the_cache(observed):
    m = scrape(observed.metrics_port)
    assert m['gradserve_requests_total{code="OK",method="Differentiate"}'] == 3
    assert m['gradserve_requests_total{code="INVALID_ARGUMENT",method="Evaluate"}'] == 1
    assert m['gradserve_requests_total{code="OK",method="RegisterGraph"}'] == 2
    assert m['gradserve_differentiations_total{mode="reverse"}'] == 2
    assert m['gradserve_differentiations_total{mode="forward"}'] == 1
    assert m['gradserve_request_seconds_count{method="Differentiate"}'] == 3
    assert m['gradserve_request_seconds_sum{method="Differentiate"}'] > 0
    assert m["gradserve_graph_cache_graphs"] == 2
    assert m["gradserve_graph_cache_bytes"] > 0
    # Lookups by id: 3 differentiations and 1 evaluation hit, no miss.
    assert m['gradserve_graph_cache_lookups_total{result="hit"}'] >= 4


def test_each_request_logs_one_json_line_at_info(caplog, seed_builder, seed_inputs, start_server):
    server = start_server()
    with caplog.at_level(logging.INFO, logger="gradserve.requests"):
        with Client(f"127.0.0.1:{server.port}") as client:
            result = client.differentiate(seed_builder(), seed_inputs())
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "gradserve.requests"]
    assert [line["method"] for line in lines] == ["RegisterGraph", "Differentiate"]
    last = lines[-1]
    assert last["graph_id"] == result.graph_id and last["mode"] == result.mode
    assert last["code"] == "OK" and last["ms"] > 0


def test_request_logs_are_quiet_by_default(caplog, seed_builder, seed_inputs, start_server):
    server = start_server()
    with caplog.at_level(logging.WARNING):
        with Client(f"127.0.0.1:{server.port}") as client:
            client.differentiate(seed_builder(), seed_inputs())
    assert not [r for r in caplog.records if r.name == "gradserve.requests"]


def test_requests_recorded_from_many_threads_are_all_counted():
    """Telemetry.record leaves a request's counts pending until the metrics are read (or
    _PENDING_MAX wait): none is lost or counted twice, whichever thread records it."""
    import threading
    import time

    from gradserve.server import telemetry as telemetry_module
    from gradserve.server.registry import GraphCache

    telemetry = telemetry_module.Telemetry(GraphCache(8, 1 << 20))
    lean = telemetry.requests.labels("Evaluate", "OK")  # a counter of the same registry

    def work(n):
        for i in range(n):
            telemetry.record("Differentiate", "OK", time.perf_counter() - 0.002, mode="reverse")
            if i % 3 == 0:
                telemetry.count(lean)
    threads = [threading.Thread(target=work, args=(700,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(telemetry._pending) < telemetry_module._PENDING_MAX  # bounded
    value = telemetry.registry.get_sample_value
    assert value("gradserve_requests_total", {"method": "Differentiate", "code": "OK"}) == 2800
    assert value("gradserve_differentiations_total", {"mode": "reverse"}) == 2800
    assert value("gradserve_request_seconds_count", {"method": "Differentiate"}) == 2800
    assert value("gradserve_request_seconds_bucket",
                 {"method": "Differentiate", "le": "0.001"}) == 0  # each took >= 2 ms
    assert value("gradserve_requests_total", {"method": "Evaluate", "code": "OK"}) == 4 * 234
    assert not telemetry._pending
