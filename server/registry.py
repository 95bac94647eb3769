"""Compiled graphs by id: the id is the sha256 of the graph's deterministic
serialization, so registering twice is idempotent and every replica computes
the same id. Bounded by count and bytes; least recently used go first."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from gradserve import engine
from gradserve.v1 import graph_pb2

from .convert import graph_from_proto
from .errors import GraphNotFound, LimitExceeded
from .limits import Limits


# A compiled plan holds about this much per node (IR, prepared steps, shapes), measured
# on long chains: the cache counts it, not only the graph's size on the wire.
PLAN_BYTES_PER_NODE = 1200


def graph_id(graph: graph_pb2.Graph) -> tuple[str, int]:
    """The graph's id and the memory its compiled plan is counted as in the cache."""
    data = graph.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest(), len(data) + PLAN_BYTES_PER_NODE * len(graph.nodes)


class GraphCache:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[engine.Plan, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> engine.Plan | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: str, plan: engine.Plan, size: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (plan, size)
            self._bytes += size
            while self._entries and (len(self._entries) > self.max_entries
                                     or self._bytes > self.max_bytes):
                _, (_, dropped) = self._entries.popitem(last=False)
                self._bytes -= dropped

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes


class GraphRegistry:
    """Validates, compiles and caches graphs; resolves a request's graph reference."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self.cache = GraphCache(limits.max_cached_graphs, limits.max_cache_bytes)

    def register(self, graph: graph_pb2.Graph) -> tuple[str, engine.Plan]:
        key, size = graph_id(graph)
        plan = self.cache.get(key)
        if plan is None:
            if size > self.limits.max_cache_bytes:
                raise LimitExceeded(f"the compiled graph would take about {size:,} bytes, "
                                    f"over the cache's limit of {self.limits.max_cache_bytes:,} "
                                    "(max_cache_bytes)", field="graph")
            plan = self._compile(graph)
            self.cache.put(key, plan, size)
        return key, plan

    def _compile(self, graph: graph_pb2.Graph) -> engine.Plan:
        limits = self.limits
        if len(graph.nodes) > limits.max_nodes:
            raise LimitExceeded(f"graph has {len(graph.nodes):,} nodes, over the limit of "
                                f"{limits.max_nodes:,}", field="graph.nodes")
        plan = engine.compile(graph_from_proto(graph, limits.max_tensor_elements))
        if plan.static:
            need = plan.estimate_bytes(plan.shapes)
            if need > limits.max_intermediate_bytes:
                raise LimitExceeded(
                    f"graph values need about {need:,} bytes, over the limit of "
                    f"{limits.max_intermediate_bytes:,} bytes", field="graph")
        return plan

    def resolve(self, request) -> tuple[str, engine.Plan]:
        """The plan for a request carrying `graph` inline or `graph_id`."""
        which = request.WhichOneof("graph_ref")
        if which == "graph":
            return self.register(request.graph)
        if which == "graph_id":
            plan = self.cache.get(request.graph_id)
            if plan is None:
                raise GraphNotFound(f"unknown graph_id '{request.graph_id}': register the "
                                    "graph (RegisterGraph) and retry", field="graph_id")
            return request.graph_id, plan
        raise engine.GraphError("request carries neither graph nor graph_id", field="graph_ref")
