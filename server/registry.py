"""Compiled graphs by id: the id is the sha256 of the graph's deterministic
serialization, so registering twice is idempotent and every replica computes
the same id. Bounded by count and bytes; least recently used go first.

Unknown fields (from a newer client, or garbage) are discarded before hashing:
the id is that of the graph this server understands and compiles, so the same
graph gets the same id however it was sent; protobuf ignores unknown fields
everywhere else too."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from gradserve import engine
from gradserve.engine.errors import echo
from gradserve.v1 import graph_pb2

from .convert import graph_from_proto
from .errors import GraphNotFound, LimitExceeded
from .limits import Limits


# What a compiled plan holds beyond its wire bytes (which cover the constants' data),
# as bench/bench_graph_memory.py measures it (resident set per item of a kept plan:
# ~1,000 B per node, 1,130 with two operands; 640 per constant; 500 per input; 85 per
# output), rounded up: the cache counts these, not only the graph's size on the wire.
PLAN_BYTES_PER_NODE = 1200
PLAN_BYTES_PER_CONSTANT = 700
PLAN_BYTES_PER_INPUT = 550
PLAN_BYTES_PER_OUTPUT = 100
# An input reference (Node.inputs entry) beyond its wire bytes: ~90 B kept per `concat`
# operand (three 4 MB graphs of references held +287 MiB counted as 12 MB).
PLAN_BYTES_PER_REFERENCE = 100


def graph_id(graph: graph_pb2.Graph) -> tuple[str, int]:
    """The graph's id and the memory its compiled plan is counted as in the cache.
    Discards the graph's unknown fields (see above)."""
    graph.DiscardUnknownFields()
    data = graph.SerializeToString(deterministic=True)
    return hashlib.sha256(data).hexdigest(), plan_bytes(graph, len(data))


def plan_bytes(graph: graph_pb2.Graph, wire_bytes: int) -> int:
    """The memory a compiled plan of `graph` is counted as in the cache."""
    return (wire_bytes + PLAN_BYTES_PER_NODE * len(graph.nodes)
            + PLAN_BYTES_PER_CONSTANT * len(graph.constants)
            + PLAN_BYTES_PER_INPUT * len(graph.inputs)
            + PLAN_BYTES_PER_OUTPUT * len(graph.outputs)
            + PLAN_BYTES_PER_REFERENCE * references(graph))


def references(graph: graph_pb2.Graph) -> int:
    """Node.inputs entries of all the graph's nodes."""
    return sum(len(node.inputs) for node in graph.nodes)


def _no_check() -> None:
    pass


# No attribute of any op holds more than two values per axis (pads), so a longer list
# is bad input: refused before it becomes a Python list (a 6 MB list took 190 MB, 5 s).
MAX_ATTRIBUTE_VALUES = 2 * engine.MAX_RANK


def _check_attribute_lengths(graph: graph_pb2.Graph) -> None:
    for node in graph.nodes:
        if not node.attrs:
            continue
        for name, attr in node.attrs.items():
            which = attr.WhichOneof("value")
            if which in ("ints", "floats"):
                count = len(getattr(attr, which).values)
                if count > MAX_ATTRIBUTE_VALUES:
                    raise engine.GraphError(
                        f"attribute '{echo(name)}' has {count:,} values; no attribute takes "
                        f"more than {MAX_ATTRIBUTE_VALUES} (two per axis, rank <= "
                        f"{engine.MAX_RANK})", node=node.name, op=node.op,
                        field=f"attrs.{echo(name)}")


class GraphCache:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # key -> (plan, counted size, size when compiled)
        self._entries: OrderedDict[str, tuple[engine.Plan, int, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, key: str) -> engine.Plan | None:
        """The plan, now the most recently used. Its size is counted again on the way:
        a plan's own caches (Plan.cache_bytes) grew with the calls it served, and the
        cache evicts others to stay within max_bytes."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self.hits += 1
            plan, size, base = entry
            grown = base + plan.cache_bytes
            if grown != size:
                self._entries[key] = (plan, grown, base)
                self._bytes += grown - size
            self._entries.move_to_end(key)
            self._evict(keep=key)
            return plan

    def peek(self, key: str) -> engine.Plan | None:
        """The plan if cached, without counting a lookup or touching its recency (the
        lean path's look before it commits to answering; server.lean)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def put(self, key: str, plan: engine.Plan, size: int) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = (plan, size, size)
            self._bytes += size
            self._evict()

    def _evict(self, keep: str | None = None) -> None:
        """Least recently used first, never `keep` (the plan being handed out)."""
        while len(self._entries) > (1 if keep else 0) and (
                len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            oldest = next(iter(self._entries))
            if oldest == keep:
                break
            _, dropped, _ = self._entries.pop(oldest)
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

    def register(self, graph: graph_pb2.Graph, check=None) -> tuple[str, engine.Plan]:
        """The graph's id and plan, compiled and cached if not yet; `check` (raising
        when the call has ended) runs between the steps of compiling."""
        key, size = graph_id(graph)
        plan = self.cache.get(key)
        if plan is None:
            if size > self.limits.max_cache_bytes:
                raise LimitExceeded(f"the compiled graph would take about {size:,} bytes, "
                                    f"over the cache's limit of {self.limits.max_cache_bytes:,} "
                                    "(max_cache_bytes)", field="graph")
            plan = self._compile(graph, check or _no_check)
            self.cache.put(key, plan, size)
        return key, plan

    def _compile(self, graph: graph_pb2.Graph, check) -> engine.Plan:
        limits = self.limits
        # Requests arriving as bytes were counted on the wire (server.wire); these
        # checks cover graphs built in-process.
        for field, count, limit, name in (
                ("graph.nodes", len(graph.nodes), limits.max_nodes, "max_nodes"),
                ("graph.constants", len(graph.constants), limits.max_constants, "max_constants"),
                ("graph.inputs", len(graph.inputs), limits.max_inputs, "max_inputs"),
                ("graph.nodes.inputs", references(graph), limits.max_references,
                 "max_references")):
            if limit and count > limit:
                raise LimitExceeded(f"{field} has {count:,} entries, over the limit of "
                                    f"{limit:,} ({name})", field=field)
        _check_attribute_lengths(graph)
        check()
        converted = graph_from_proto(graph, limits.max_tensor_elements)
        check()
        # Validation and step building of a 250,000-node graph take seconds: the
        # engine checks between its phases.
        plan = engine.compile(converted, check=check)
        if plan.static:
            need = plan.estimate_bytes(plan.shapes)
            if need > limits.max_intermediate_bytes:
                raise LimitExceeded(
                    f"graph values need about {need:,} bytes, over the limit of "
                    f"{limits.max_intermediate_bytes:,} bytes", field="graph")
        return plan

    def resolve(self, request, check=None) -> tuple[str, engine.Plan]:
        """The plan for a request carrying `graph` inline or `graph_id`."""
        which = request.WhichOneof("graph_ref")
        if which == "graph":
            return self.register(request.graph, check)
        if which == "graph_id":
            plan = self.cache.get(request.graph_id)
            if plan is None:
                raise GraphNotFound(f"unknown graph_id '{echo(request.graph_id)}': register the "
                                    "graph (RegisterGraph) and retry", field="graph_id")
            return request.graph_id, plan
        raise engine.GraphError("request carries neither graph nor graph_id", field="graph_ref")
