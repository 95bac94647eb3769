"""What the server tells operators: Prometheus metrics and one log line per request.

Metrics (on --metrics-port, Prometheus text format at /metrics):
  gradserve_request_seconds{method}            latency histogram per RPC
  gradserve_requests_total{method,code}        requests by status code
  gradserve_differentiations_total{mode}       Differentiate replies by mode used
  gradserve_graph_cache_graphs, _bytes         compiled graphs cached, their memory
  gradserve_graph_cache_lookups_total{result}  cache hits and misses (hit rate)
Each server has its own registry, so several servers can live in one process;
`gradserve serve --processes N` serves one /metrics per process, each sample
labelled process="I" (see serve_metrics).
Request logs go to the "gradserve.requests" logger at INFO (quiet by default):
one JSON object per line with method, graph_id, mode, code and milliseconds.
"""

from __future__ import annotations

import json
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


class Telemetry:
    def __init__(self, cache):
        self.registry = CollectorRegistry()
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
        self._http, _ = start_http_server(port, addr=host, registry=registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None

    def record(self, method: str, code: str, started: float, request=None, reply=None,
               mode: str | None = None) -> None:
        seconds = time.perf_counter() - started
        children = self._children.get((method, code, mode))
        if children is None:  # labels() takes a lock and a lookup: do it once per kind
            children = self._children[method, code, mode] = (
                self.latency.labels(method), self.requests.labels(method, code),
                self.modes.labels(mode) if mode else None)
        children[0].observe(seconds)
        children[1].inc()
        if mode:
            children[2].inc()
        if request_log.isEnabledFor(logging.INFO):
            # from the request when it failed: clipped, as anything a client sent
            graph_id = getattr(reply, "graph_id", "") or echo(getattr(request, "graph_id", ""))
            request_log.info(json.dumps({"method": method, "graph_id": graph_id or None,
                                         "mode": mode, "code": code,
                                         "ms": round(seconds * 1e3, 3)}))
