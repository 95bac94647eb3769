"""Traces: every value, and every edge's derivative, of one sweep, to draw the computation.

A Plan's sweeps free values as soon as they are dead and never look at a
single edge. Run with a `TraceRecorder` (Plan.trace, or
Plan.differentiate(..., trace=True)), the same sweeps report every step, and
the recorder keeps every node's value and, per edge (a node and one of its
input positions), what that edge contributes:

- forward mode, from tangents on some inputs: every value's tangent; per edge
  the tangent the input carries into the node (the op's jvp with only that
  input's tangent) and, for elementwise ops, the local partial derivative
  d node / d input (the jvp of that edge alone with a tangent of ones);
- reverse mode, from cotangents on some outputs: every value's adjoint; per
  edge the cotangent flowing back from the node into the input (the op's vjp
  for that position). A value's adjoint is the sum of its edges' cotangents:
  the picture shows them splitting at binary ops and summing where a value
  fans out.

The op rules take batched seeds; a trace runs one direction (k = 1), and the
recorder removes the leading axis. Only floating values carry derivatives.
Nodes no output depends on are pruned by the Plan and do not appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple

import numpy as np

from .budget import Budget, Need
from .errors import DifferentiationError, InputError
from .ir import FLOAT_DTYPES
from .ops import OPS
from .shapes import fill_seed
from .sweeps import forward_sweep, reverse_sweep

MODES = ("forward", "reverse")


class EdgeTrace(NamedTuple):
    input: str  # the name the node reads at this position
    partial: np.ndarray | None = None  # forward, elementwise ops: d node / d input, node-shaped
    tangent: np.ndarray | None = None  # forward: the input's tangent pushed into the node
    cotangent: np.ndarray | None = None  # reverse: the node's adjoint pulled back into the input


class NodeTrace(NamedTuple):
    name: str
    op: str  # the op, or "input" / "constant"
    inputs: tuple  # names read, one EdgeTrace each
    value: np.ndarray
    tangent: np.ndarray | None = None  # forward; None: no tangent reaches this value
    adjoint: np.ndarray | None = None  # reverse; None: no cotangent reaches this value
    edges: tuple = ()


@dataclass(frozen=True)
class Trace:
    mode: str  # "forward" or "reverse"
    nodes: list  # NodeTrace: graph inputs, constants, then nodes in topological order

    def __getitem__(self, name: str) -> NodeTrace:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


def trace(plan, inputs, mode: str, *, tangents=None, cotangents=None, budget=None,
          max_elements=None, check=None, **limits) -> Trace:
    """Values and, per node and per edge, the derivatives one sweep computes.

    `mode` "forward" needs `tangents` (input name -> seed shaped like the input),
    "reverse" needs `cotangents` (output name -> seed shaped like the output);
    seeds are unbatched. The budget's max_trace_elements (or `max_elements`) refuses,
    before any work, a trace that may hold more array elements than that.
    """
    if max_elements is not None:
        limits["max_trace_elements"] = max_elements
    budget = Budget.of(budget, check, **limits)
    if mode not in MODES:
        raise DifferentiationError(f"unknown trace mode {mode!r} (forward or reverse)",
                                   field="mode")
    given = tangents if mode == "forward" else cotangents
    bound = plan.bind(inputs)
    return run(plan, bound, mode, prepare(plan, bound.shapes, mode, given, budget), budget)


def recipe(plan, shapes, of, mode, tangents, cotangents):
    """The trace a differentiation request implies: its mode and seeds."""
    if tangents:
        return "forward", tangents
    if cotangents:
        return "reverse", cotangents
    if mode == "forward":
        raise DifferentiationError("a forward-mode trace needs tangents: give a tangent "
                                   "for each input to trace from", field="tangents")
    of = plan.of_names(of)
    sizes = {o: prod(shapes[o]) for o in of}
    if len(of) != 1 or sizes[of[0]] != 1:
        listed = ", ".join(f"'{o}' ({sizes[o]} elements)" for o in of) or "none"
        raise DifferentiationError(
            "a trace without tangents or cotangents needs one output with one element "
            f"(a scalar loss) to start from; outputs: {listed}. Give cotangents "
            "(reverse) or tangents (forward)", field="cotangents")
    return "reverse", {of[0]: np.ones(tuple(shapes[of[0]]), plan.np_dtypes[of[0]])}


def prepare(plan, shapes, mode, given, budget) -> dict:
    """The trace's seeds by slot, checked, and its budget admitted (before any work)."""
    forward = mode == "forward"
    field = "tangents" if forward else "cotangents"
    if not given:
        raise DifferentiationError(f"a {mode}-mode trace needs {field}", field=field)
    if forward:
        plan.names(tuple(given), plan.input_names, (), "input", field)
    else:
        plan.names(tuple(given), plan.output_names, (), "output", field)
    seeds, _, batched = plan.seeds(given, shapes, field)
    if batched:
        raise InputError("a trace takes one direction: give seeds shaped like their "
                         "values, without a leading axis of directions", field=field)
    # one direction of memory; of work one direction, its partials and its tangents
    budget.admit(plan, shapes, Need(1, work_directions=3, reply_what="a trace",
                                    trace=elements(plan, shapes, forward)))
    return seeds


def run(plan, bound, mode, seeds, budget) -> Trace:
    """The trace's sweep on bound inputs (seeds and budget from `prepare`)."""
    vals = bound.vals
    leaves = len(plan.input_names) + len(plan.graph.constants)
    floating = frozenset(n for n, d in plan.dtypes.items() if d in FLOAT_DTYPES)
    recorder = TraceRecorder(mode, list(plan.slot), len(plan.input_names), vals[:leaves],
                             floating, lambda op: OPS[op].elementwise)
    if mode == "forward":
        tans = [None] * plan.n_slots
        for s, t in seeds.items():
            tans[s] = t
        forward_sweep(plan.steps, vals, tans, budget.check, plan.points, recorder)
        return recorder.finish(tans)
    cots = reverse_sweep(plan.steps, vals, seeds, _floating_edges(plan), budget.check,
                         plan.points, recorder)
    return recorder.finish(cots)


def _floating_edges(plan):
    """Per step, the input positions that carry a derivative: floating inputs of a
    floating node (what a reverse trace pulls cotangents along)."""
    floating = [plan.dtypes[name] in FLOAT_DTYPES for name in plan.slot]
    return [tuple(p for p, i in enumerate(st.ins) if floating[i]) if floating[st.out]
            else () for st in plan.steps]


def elements(plan, shapes, forward) -> int:
    """An upper bound on the elements a trace holds: values, their derivatives, edges."""
    total = 0
    names = list(plan.slot)
    for name in names[:len(plan.input_names) + len(plan.graph.constants)]:
        total += prod(shapes[name]) * (2 if plan.dtypes[name] in FLOAT_DTYPES else 1)
    for st in plan.steps:
        size = prod(shapes[st.node])
        total += size
        if plan.dtypes[st.node] not in FLOAT_DTYPES:
            continue
        total += size
        if forward:
            total += len(st.ins) * size * (2 if OPS[st.op].elementwise else 1)
        else:
            total += sum(prod(shapes[names[i]]) for i in st.ins)
    return total


class TraceRecorder:
    """Keeps what a sweep reports (a sweeps.Recorder) and assembles the Trace.

    `names` are the value names by slot (inputs, constants, then nodes);
    `leaf_values` the values of the inputs and constants, by slot; `floating` the names
    whose values are floating (only they carry derivatives); `elementwise`
    tells, by op name, whether the op's partials are node-shaped.
    """

    def __init__(self, mode: str, names: list, n_inputs: int, leaf_values: list,
                 floating: frozenset, elementwise):
        self.mode = mode
        self.names = names
        self.n_inputs = n_inputs
        self.leaves = len(leaf_values)
        self.floating = floating
        self.elementwise = elementwise
        self.values: dict = dict(enumerate(leaf_values))  # slot -> value
        self.derivs: dict = {}  # slot -> tangent or adjoint, batched (k = 1)
        self.edges: dict = {}  # slot -> tuple of EdgeTrace
        self.steps: list = []

    # --- sweeps.Recorder ----------------------------------------------------------

    def value(self, step, xs, ans) -> None:
        self.steps.append(step)
        self.values[step.out] = ans

    def forward(self, step, xs, ans, ts, tangent) -> None:
        self.value(step, xs, ans)
        if step.node not in self.floating:
            return
        if tangent is not None:
            self.derivs[step.out] = tangent
        elementwise = self.elementwise(step.op)
        row = []
        for p, x in enumerate(xs):
            partial = carried = None
            if elementwise:
                ones = np.ones((1,) + x.shape, x.dtype)
                partial = _one(step.jvp(_only(p, ones, len(xs)), xs, ans), ans.shape)
            if ts[p] is not None:
                carried = _one(step.jvp(_only(p, ts[p], len(xs)), xs, ans), ans.shape)
            row.append(EdgeTrace(self.names[step.ins[p]], partial, carried))
        self.edges[step.out] = tuple(row)

    def backward(self, step, g, cotangents) -> None:
        self.derivs[step.out] = g
        values = self.values
        self.edges[step.out] = tuple(
            EdgeTrace(self.names[i], cotangent=_one(cotangents[p], values[i].shape))
            if p in cotangents else EdgeTrace(self.names[i])
            for p, i in enumerate(step.ins))

    # --- the result ---------------------------------------------------------------

    def finish(self, leaf_derivs) -> Trace:
        """The Trace, given the inputs' and constants' tangents or adjoints by slot."""
        forward = self.mode == "forward"
        nodes = []
        for s in range(self.leaves):
            kind = "input" if s < self.n_inputs else "constant"
            nodes.append(self._node(s, kind, (), leaf_derivs[s], (), forward))
        for st in self.steps:
            read = tuple(self.names[i] for i in st.ins)
            row = self.edges.get(st.out) or tuple(EdgeTrace(name) for name in read)
            nodes.append(self._node(st.out, st.op, read, self.derivs.get(st.out), row, forward))
        return Trace(self.mode, nodes)

    def _node(self, slot, op, inputs, deriv, edges, forward) -> NodeTrace:
        value = self.values[slot]
        if deriv is not None:
            deriv = _one(deriv, value.shape)
        if forward:
            return NodeTrace(self.names[slot], op, inputs, value, tangent=deriv, edges=edges)
        return NodeTrace(self.names[slot], op, inputs, value, adjoint=deriv, edges=edges)


def _only(p, seed, n):
    """A tangent tuple with `seed` at position p and None elsewhere."""
    return tuple(seed if q == p else None for q in range(n))


def _one(t, shape):
    """A rule's batched result (k = 1) as one array shaped like the value."""
    return fill_seed(t, shape)[0]
