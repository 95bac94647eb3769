"""Counting a request's repeated fields on its wire bytes, before parsing them.

Parsing takes 10-30x the wire size (a 20 MiB map of 1,000,000 `inputs` entries
peaked at ~650 MiB and took 6.5 s of CPU), so every repeated field of a request and of
its graph whose count a limit bounds is counted first by walking the protobuf
wire format (tag, length, skip: nothing is decoded or copied), and a request
over a limit is refused with RESOURCE_EXHAUSTED naming the field.

The walk itself is bounded by the limits, not by the message size: it stops at
the first field past its bound, and at a message holding more fields of any kind
(unknown ones included) than its limits allow (32 MB of empty fields would
otherwise take 10 s to walk).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from gradserve.v1.tensor_wire import read_varint as _varint

from .errors import LimitExceeded
from .limits import Limits


class Counted(NamedTuple):
    """A repeated field (or map) whose entries are counted, and its bound."""

    path: str  # as in error messages: "graph.nodes", "inputs", ...
    limit: str  # the Limits field, or the sum of some (see names_limit)
    bound: Callable[[Limits], int]


def _field(name: str) -> Callable[[Limits], int]:
    return lambda limits: getattr(limits, name)


def names_limit(limits: Limits) -> int:
    """The most distinct names a graph can have: each output or cotangent names one
    (0, no limit, when any of the three is unlimited)."""
    parts = (limits.max_inputs, limits.max_constants, limits.max_nodes)
    return sum(parts) if all(parts) else 0


_NAMES = "max_inputs + max_constants + max_nodes"

# By field name in the request (or in its Graph); only the fields a request type has apply.
REQUEST_FIELDS = {
    "inputs": Counted("inputs", "max_inputs", _field("max_inputs")),
    "tangents": Counted("tangents", "max_inputs", _field("max_inputs")),
    "wrt": Counted("wrt", "max_inputs", _field("max_inputs")),
    "cotangents": Counted("cotangents", _NAMES, names_limit),
    "of": Counted("of", _NAMES, names_limit),
    "parameters": Counted("parameters", "max_inputs", _field("max_inputs")),
    "velocity": Counted("velocity", "max_inputs", _field("max_inputs")),
    "batches": Counted("batches", "max_inputs", _field("max_inputs")),
}
SECOND_ORDER_FIELDS = {
    "vectors": Counted("second_order.vectors", "max_inputs", _field("max_inputs")),
}
GRAPH_FIELDS = {
    "inputs": Counted("graph.inputs", "max_inputs", _field("max_inputs")),
    "constants": Counted("graph.constants", "max_constants", _field("max_constants")),
    "nodes": Counted("graph.nodes", "max_nodes", _field("max_nodes")),
    "outputs": Counted("graph.outputs", _NAMES, names_limit),
}
# Inside each of a graph's nodes: its input references, counted over all the nodes
# (a `concat` of 16.8M references parsed into +2.4 GiB and was kept as +1.46 GiB).
NODE_FIELDS = {
    "inputs": Counted("graph.nodes.inputs", "max_references", _field("max_references")),
}


NODE_INPUTS_NUMBER = 3  # Node.inputs
REFERENCE_TAG = bytes([NODE_INPUTS_NUMBER << 3 | 2])
# Requests up to this size have their reference tags counted over all their bytes
# (~0.3 ms per MiB); larger ones over their graph field's bytes only, found by walking
# the request's top level, at most this many fields of it.
TAG_COUNT_WHOLE_BYTES = 1 << 20
TAG_WALK_FIELDS = 4096


@functools.lru_cache(maxsize=64)
def wire_counter(request_type, limits: Limits) -> "WireCounter":
    return WireCounter(request_type, limits)


class _Level:
    """One message level to walk: its counted fields by number, with their bounds, and
    the most fields of any kind it may hold (so that the walk is bounded too)."""

    def __init__(self, where: str, message_type, table: dict, limits: Limits):
        fields = message_type.fields_by_name
        self.where = where
        self.counted = {fields[name].number: (c, c.bound(limits))
                        for name, c in table.items() if name in fields}
        bounds = [b for _, b in self.counted.values()]
        # Past the repeated entries the limits allow, only the few singular fields remain
        # (sent more than once at worst): a request with more fields is refused unwalked.
        self.max_fields = sum(bounds) + 64 if bounds and all(bounds) else None
        # A level walked once per entry of a repeated field (a graph's nodes): its
        # counted fields add up over the entries, its other fields are bounded per entry.
        self.per_entry = False


class WireCounter:
    """Checks one request type's counted fields against `limits` (see check)."""

    def __init__(self, request_type, limits: Limits):
        self._top = _Level(request_type.DESCRIPTOR.name, request_type.DESCRIPTOR,
                           REQUEST_FIELDS, limits)
        fields = request_type.DESCRIPTOR.fields_by_name
        # Messages inside the request whose fields are counted too, by field number.
        self._inner = {fields[name].number: _Level(name, fields[name].message_type, table,
                                                   limits)
                       for name, table in (("graph", GRAPH_FIELDS),
                                           ("second_order", SECOND_ORDER_FIELDS))
                       if name in fields}
        # ... and inside a graph's nodes, their input references
        self._node_level = self._graph_number = None
        if "graph" in fields:
            self._graph_number = fields["graph"].number
            nodes = fields["graph"].message_type.fields_by_name["nodes"]
            level = _Level("graph.nodes", nodes.message_type, NODE_FIELDS, limits)
            bound = level.counted[NODE_INPUTS_NUMBER][1]
            if bound:
                level.per_entry = True
                self._node_level = (nodes.number, level, bound)
        bounds = [b for level in (self._top, *self._inner.values())
                  for _, b in level.counted.values() if b > 0]
        # Every entry takes at least 2 bytes (tag and length), so smaller messages pass.
        self._min_bytes = 2 * min(bounds) if bounds else None

    def _reference_tags(self, data: bytes) -> int:
        """How many reference tag bytes the request's graph field holds (all of its
        occurrences), at least. Small requests and those whose top level does not walk
        in TAG_WALK_FIELDS fields are counted whole (an over-count only walks the
        nodes)."""
        graph = self._graph_number
        if graph is None:
            return 0
        if len(data) <= TAG_COUNT_WHOLE_BYTES:
            return data.count(REFERENCE_TAG)
        count, i, end, fields = 0, 0, len(data), 0
        try:
            while i < end:
                fields += 1
                if fields > TAG_WALK_FIELDS:
                    return data.count(REFERENCE_TAG)
                key, i = _varint(data, i)
                wire = key & 7
                if wire == 2:
                    length, i = _varint(data, i)
                    if key >> 3 == graph:
                        count += data.count(REFERENCE_TAG, i, i + length)
                    i += length
                else:
                    i = _skip_scalar(data, i, wire)
        except (IndexError, ValueError):
            return data.count(REFERENCE_TAG)
        return count if i == end else data.count(REFERENCE_TAG)

    def check(self, data: bytes) -> None:
        """Raise LimitExceeded as soon as a counted field passes its bound (the walk
        stops there: its cost is bounded by the limits, not by the message size). Bytes
        that do not walk are left to the parser, which says what is wrong with them."""
        if self._min_bytes is None or len(data) <= self._min_bytes:
            return
        # Each reference starts with its tag byte (field 3, length-delimited: 0x1a), so
        # a graph holding no more such bytes than the bound holds no more references:
        # counted at C speed over the graph's own bytes (not over a 16 MiB tensor beside
        # it: 4.8 ms), the nodes are walked only when that count is over.
        walk_nodes = (self._node_level is not None
                      and self._reference_tags(data) > self._node_level[2])
        inner = {}
        for number, level in self._inner.items():
            below = None
            if level.where == "graph" and walk_nodes:
                nodes, node_level, _ = self._node_level  # counts shared by all the nodes
                below = {nodes: (node_level, {}, None)}
            inner[number] = (level, {}, below)
        try:
            _walk(data, 0, len(data), self._top, {}, inner)
        except (IndexError, ValueError):
            return


def _walk(buf: bytes, i: int, end: int, level: _Level, counts: dict,
          inner: dict | None = None) -> None:
    """Count `level`'s fields in the message buf[i:end] into `counts` (shared by the
    pieces of a message sent in several pieces, which the parser merges); `inner` maps
    a field number to (level, counts, its own inner): each occurrence of that field
    (counted or not) is walked as a message of that level."""
    counted, max_fields = level.counted, level.max_fields
    total = 0 if level.per_entry else counts.get(None, 0)
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        total += 1
        if max_fields is not None and total > max_fields:
            raise LimitExceeded(f"{level.where} has more than {max_fields:,} fields: the "
                                "limits on its repeated fields allow no more",
                                field=level.where)
        if wire == 2:
            length, i = _varint(buf, i)
            number = key >> 3
            entry = counted.get(number)
            if entry is not None:
                count = counts[number] = counts.get(number, 0) + 1
                if entry[1] and count > entry[1]:
                    _refuse(entry[0], entry[1])
                if inner and number in inner:
                    _walk(buf, i, i + length, *inner[number])
            elif inner and number in inner:
                _walk(buf, i, i + length, *inner[number])
            i += length
        else:
            i = _skip_scalar(buf, i, wire)
    if i != end:
        raise ValueError("truncated")
    if not level.per_entry:
        counts[None] = total


def _skip_scalar(buf: bytes, i: int, wire: int) -> int:
    """The index past a field of wire type 0 (varint), 1 (8 bytes) or 5 (4 bytes) whose
    value starts at buf[i]; ValueError for any other type (groups: never in these
    messages)."""
    if wire == 0:
        return _varint(buf, i)[1]
    if wire in (1, 5):
        return i + (8 if wire == 1 else 4)
    raise ValueError(f"wire type {wire}")


def _refuse(counted: Counted, bound: int) -> None:
    if counted.path == "graph.nodes.inputs":
        raise LimitExceeded(f"the graph's nodes have more than {bound:,} input references "
                            f"in all ({counted.limit})", field=counted.path)
    kind = "nodes" if counted.path == "graph.nodes" else "entries"
    raise LimitExceeded(f"{counted.path} has more than {bound:,} {kind} ({counted.limit})",
                        field=counted.path)
