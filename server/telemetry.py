"""What the server tells operators: Prometheus metrics and one log line per request.

Metrics (on --metrics-port, Prometheus text format at /metrics):
  gradserve_request_seconds{method}            latency histogram per RPC
  gradserve_requests_total{method,code}        requests by status code
  gradserve_differentiations_total{mode}       Differentiate replies by mode used
  gradserve_graph_cache_graphs, _bytes         compiled graphs cached, their memory
  gradserve_graph_cache_lookups_total{result}  cache hits and misses (hit rate)
Each server has its own registry, so several servers can live in one process;
`gradserve serve --processes N` serves one /metrics for all its processes, each
sample labelled process="I" (the supervisor merges its children's: merge_metrics).
/metrics is served by a few threads at most (MAX_CONNECTIONS; more connections
are closed at once) and a connection that sends no request within
READ_TIMEOUT_SECONDS is closed: idle connections cannot hold a thread each.
Request logs go to the "gradserve.requests" logger at INFO (quiet by default):
one JSON object per line with method, graph_id, mode, code and milliseconds.
"""

from __future__ import annotations

import collections
import http.server
import json
import logging
import socket
import socketserver
import threading
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from gradserve.engine.errors import echo

request_log = logging.getLogger("gradserve.requests")

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            10.0, 30.0)


class _CacheCollector:
    def __init__(self, cache):
        self.cache = cache

    def collect(self):
        yield GaugeMetricFamily("gradserve_graph_cache_graphs", "compiled graphs cached",
                                value=len(self.cache))
        yield GaugeMetricFamily("gradserve_graph_cache_bytes", "memory of the cached compiled graphs, as estimated",
                                value=self.cache.nbytes)
        lookups = CounterMetricFamily("gradserve_graph_cache_lookups", "graph cache lookups",
                                      labels=["result"])
        lookups.add_metric(["hit"], self.cache.hits)
        lookups.add_metric(["miss"], self.cache.misses)
        yield lookups


class _Labelled:
    """`registry`'s metrics with constant `labels` added to every sample."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]):
        self.registry, self.labels = registry, labels

    def collect(self):
        for metric in self.registry.collect():
            metric.samples = [sample._replace(labels={**sample.labels, **self.labels})
                              for sample in metric.samples]
            yield metric


# Requests recorded but not yet counted in the metrics (Telemetry.record): counted when
# the metrics are read, or by the request that finds this many waiting.
_PENDING_MAX = 512


class _Pending:
    """Registered first, so collected first: counts what Telemetry.record left pending
    in the metrics before any of them is read."""

    def __init__(self, telemetry):
        self.telemetry = telemetry

    def collect(self):
        self.telemetry.flush()
        return ()


class Telemetry:
    def __init__(self, cache):
        self.registry = CollectorRegistry()
        # (latency child or None, seconds, counter child, mode counter child or None),
        # appended by any thread and taken one by one (deque: both atomic, none lost)
        self._pending: collections.deque = collections.deque()
        self.registry.register(_Pending(self))
        self.latency = Histogram("gradserve_request_seconds", "time to answer one request",
                                 ["method"], registry=self.registry, buckets=_BUCKETS)
        self.requests = Counter("gradserve_requests", "requests answered",
                                ["method", "code"], registry=self.registry)
        self.modes = Counter("gradserve_differentiations", "differentiations by mode used",
                             ["mode"], registry=self.registry)
        self.registry.register(_CacheCollector(cache))
        self._http = None
        self._children: dict = {}

    def serve_metrics(self, host: str, port: int, labels: dict[str, str] | None = None) -> int:
        """Expose /metrics over HTTP; returns the bound port (0 picks a free one). With
        `labels`, every sample carries them too (only in what is served: recording a
        request costs the same)."""
        registry = self.registry
        if labels:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Labelled(self.registry, labels))
        self._http = MetricsHTTPServer(host, port, lambda: generate_latest(registry))
        return self._http.port

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def record(self, method: str, code: str, started: float, request=None, reply=None,
               mode: str | None = None) -> None:
        seconds = time.perf_counter() - started
        children = self._children.get((method, code, mode))
        if children is None:  # labels() takes a lock and a lookup: do it once per kind
            children = self._children[method, code, mode] = (
                self.latency.labels(method), self.requests.labels(method, code),
                self.modes.labels(mode) if mode else None)
        # counted in the metrics when they are read (_Pending): a request's own cost is
        # an append (the histogram's and counters' locks and bucket search: ~10 us a
        # call after the engine's work had the caches)
        pending = self._pending
        pending.append((children[0], seconds, children[1], children[2] if mode else None))
        if len(pending) >= _PENDING_MAX:
            self.flush()
        if request_log.isEnabledFor(logging.INFO):
            # from the request when it failed: clipped, as anything a client sent
            graph_id = getattr(reply, "graph_id", "") or echo(getattr(request, "graph_id", ""))
            request_log.info(json.dumps({"method": method, "graph_id": graph_id or None,
                                         "mode": mode, "code": code,
                                         "ms": round(seconds * 1e3, 3)}))

    def count(self, child) -> None:
        """`child.inc()` (a counter's labelled child of this registry), counted with the
        recorded requests (record)."""
        pending = self._pending
        pending.append((None, 0.0, child, None))
        if len(pending) >= _PENDING_MAX:
            self.flush()

    def flush(self) -> None:
        """Count every pending request in the metrics (each counter once, by how many)."""
        pending, counts = self._pending, {}
        while True:
            try:
                latency, seconds, counter, mode = pending.popleft()
            except IndexError:
                break
            if latency is not None:
                latency.observe(seconds)
            counts[counter] = counts.get(counter, 0) + 1
            if mode is not None:
                counts[mode] = counts.get(mode, 0) + 1
        for counter, n in counts.items():
            counter.inc(n)


MAX_CONNECTIONS = 8  # connections to /metrics served at once; more are closed at once
READ_TIMEOUT_SECONDS = 5.0  # a connection silent this long is closed


class _Handler(http.server.BaseHTTPRequestHandler):
    timeout = READ_TIMEOUT_SECONDS  # on the socket: reading the request, writing the reply

    def do_GET(self):  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] not in ("/", "/metrics"):
            self.send_error(404)
            return
        body = self.server.render()
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet, as prometheus_client's server is
        pass


class _BoundedHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def __init__(self, address, render, family):
        self.address_family = family
        self.render = render
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__(address, _Handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # at the cap: closed, no thread
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class MetricsHTTPServer:
    """/metrics over HTTP on host:port (0: a free port), the body from `render()`, with
    at most MAX_CONNECTIONS threads and READ_TIMEOUT_SECONDS per connection."""

    def __init__(self, host: str, port: int, render: Callable[[], bytes]):
        family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
        self._server = _BoundedHTTPServer((host.strip("[]"), port), render, family)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="gradserve-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def merge_metrics(texts: Iterable[str], extra: Iterable = ()) -> bytes:
    """Prometheus texts (each process's /metrics, their samples told apart by a label)
    as one exposition: each family once, with every process's samples; `extra`:
    metric families of the caller's own (e.g. the supervisor's restarts)."""
    families: dict[str, object] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            known = families.get(family.name)
            if known is None:
                families[family.name] = family
            else:
                known.samples.extend(family.samples)
    for family in extra:
        families[family.name] = family

    class _Families:
        def collect(self):
            return iter(families.values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families())
    return generate_latest(registry)
