"""Reading a server's Prometheus /metrics in tests."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def samples(port: int, name: str, host: str = "127.0.0.1", **labels) -> list:
    """The samples called `name` whose labels include `labels`, from http://host:port/metrics."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def served(port: int, host: str = "127.0.0.1") -> int:
    """Differentiate calls answered OK (all the processes behind that /metrics)."""
    return int(sum(s.value for s in samples(port, "gradserve_requests_total", host,
                                            method="Differentiate", code="OK")))
