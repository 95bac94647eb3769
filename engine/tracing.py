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
from typing import NamedTuple

import numpy as np

from .shapes import fill_seed

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


def trace(plan, inputs, mode: str, *, tangents=None, cotangents=None, max_elements=None,
          max_bytes=None, check=None) -> Trace:
    """Values and, per node and per edge, the derivatives one sweep computes
    (the same as `plan.trace(...)`; see there)."""
    return plan.trace(inputs, mode, tangents=tangents, cotangents=cotangents,
                      max_elements=max_elements, max_bytes=max_bytes, check=check)


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
