"""trace(plan, inputs, mode, ...): one sweep that keeps everything, to draw the computation.

A Plan's own sweeps free values as soon as they are dead and never look at a
single edge. A trace keeps every node's value and, per edge (a node and one of
its input positions), what that edge contributes:

- forward mode, from `tangents` on some inputs: every value's tangent; per edge
  the tangent the input carries into the node (the op's jvp with only that
  input's tangent) and, for elementwise ops, the local partial derivative
  d node / d input (the jvp of that edge alone with a tangent of ones);
- reverse mode, from `cotangents` on some outputs: every value's adjoint; per
  edge the cotangent flowing back from the node into the input (the op's vjp
  for that position). A value's adjoint is the sum of its edges' cotangents:
  the picture shows them splitting at binary ops and summing where a value
  fans out.

The op rules take batched seeds; a trace runs one direction (k = 1), adding
the leading axis before each rule and removing it after. Only floating values
carry derivatives. Nodes no output depends on are pruned by the Plan and do
not appear.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import NamedTuple

import numpy as np

from .errors import DifferentiationError, InputError, ResourceLimitError
from .ir import FLOAT_DTYPES
from .ops import OPS
from .shapes import fill_seed
from .sweeps import CHUNK

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
    """Values and, per node and per edge, the derivatives one sweep computes.

    `mode` "forward" needs `tangents` (input name -> seed shaped like the input),
    "reverse" needs `cotangents` (output name -> seed shaped like the output);
    seeds are unbatched. `max_elements` refuses (ResourceLimitError, before any
    work) a trace that may hold more array elements than that; `max_bytes` and
    `check` are as for the Plan's methods.
    """
    if mode not in MODES:
        raise DifferentiationError(f"unknown trace mode {mode!r} (forward or reverse)",
                                   field="mode")
    forward = mode == "forward"
    seeds_given = tangents if forward else cotangents
    field = "tangents" if forward else "cotangents"
    if not seeds_given:
        raise DifferentiationError(f"a {mode}-mode trace needs {field}", field=field)
    vals, shapes, _ = plan._bind(inputs)
    if forward:
        plan._names(tuple(tangents), plan.input_names, (), "input", field)
    else:
        plan._names(tuple(cotangents), plan.output_names, (), "output", field)
    seeds, _, batched = plan._seeds(seeds_given, None, shapes, field)
    if batched:
        raise InputError("a trace takes one direction: give seeds shaped like their values, "
                         "without a leading axis of directions", field=field)
    steps = plan._steps
    floating = [plan.dtypes[st.node] in FLOAT_DTYPES for st in steps]
    if max_elements is not None:
        need = _elements(plan, steps, floating, shapes, forward)
        if need > max_elements:
            raise ResourceLimitError(
                f"the trace would hold up to {need:,} array elements, over the limit of "
                f"{max_elements:,} (max_trace_elements): trace a smaller graph or smaller "
                "inputs", field="trace")
    plan._check_memory(shapes, 1, max_bytes)

    for start in range(0, len(steps), CHUNK):
        if check is not None:
            check()
        for st in steps[start:start + CHUNK]:
            vals[st.out] = st.eval(*[vals[i] for i in st.ins])
    sweep = _forward if forward else _reverse
    derivs, edges = sweep(steps, floating, vals, seeds, check)

    names = list(plan.slot)  # by slot: inputs, constants, then every node
    nodes = []
    for s in range(len(plan.input_names) + len(plan.graph.constants)):
        kind = "input" if s < len(plan.input_names) else "constant"
        nodes.append(_node(names[s], kind, (), vals[s], derivs[s], (), forward))
    for st, row in zip(steps, edges):
        read = tuple(names[i] for i in st.ins)
        row = tuple(e._replace(input=name) for e, name in zip(row, read))
        nodes.append(_node(st.node, st.op, read, vals[st.out], derivs[st.out], row, forward))
    return Trace(mode, nodes)


def _node(name, op, inputs, value, deriv, edges, forward) -> NodeTrace:
    if deriv is not None:
        deriv = fill_seed(deriv, value.shape)[0]
    if forward:
        return NodeTrace(name, op, inputs, value, tangent=deriv, edges=edges)
    return NodeTrace(name, op, inputs, value, adjoint=deriv, edges=edges)


def _elements(plan, steps, floating, shapes, forward) -> int:
    """An upper bound on the elements a trace holds: values, their derivatives, edges."""
    total = 0
    names = list(plan.slot)
    for name in names[:len(plan.input_names) + len(plan.graph.constants)]:
        size = prod(shapes[name])
        total += size * (2 if plan.dtypes[name] in FLOAT_DTYPES else 1)
    for st, is_float in zip(steps, floating):
        size = prod(shapes[st.node])
        total += size
        if not is_float:
            continue
        total += size
        if forward:
            total += len(st.ins) * size * (2 if OPS[st.op].elementwise else 1)
        else:
            total += sum(prod(shapes[names[i]]) for i in st.ins)
    return total


def _forward(steps, floating, vals, seeds, check):
    """Tangents per value; per edge the partial (elementwise ops) and the tangent carried."""
    tans = [None] * len(vals)
    for s, t in seeds.items():
        tans[s] = t
    edges = []
    for j, st in enumerate(steps):
        if check is not None and j % CHUNK == 0:
            check()
        if not floating[j]:
            edges.append(tuple(EdgeTrace(None) for _ in st.ins))
            continue
        xs = tuple(vals[i] for i in st.ins)
        ans = vals[st.out]
        ts = tuple(tans[i] for i in st.ins)
        elementwise = OPS[st.op].elementwise
        row = []
        for p, x in enumerate(xs):
            partial = tangent = None
            if elementwise:
                ones = np.ones((1,) + x.shape, x.dtype)
                partial = _one(st.jvp(_only(p, ones, len(xs)), xs, ans), ans.shape)
            if ts[p] is not None:
                tangent = _one(st.jvp(_only(p, ts[p], len(xs)), xs, ans), ans.shape)
            row.append(EdgeTrace(None, partial, tangent))
        edges.append(tuple(row))
        if any(t is not None for t in ts):
            tans[st.out] = st.jvp(ts, xs, ans)
    return tans, edges


def _reverse(steps, floating, vals, seeds, check):
    """Adjoints per value, summed over the cotangents flowing back along each edge."""
    adjoints = [None] * len(vals)
    for s, g in seeds.items():
        adjoints[s] = g
    edges = [None] * len(steps)
    for j in range(len(steps) - 1, -1, -1):
        if check is not None and j % CHUNK == 0:
            check()
        st = steps[j]
        g = adjoints[st.out]
        if g is None or not floating[j]:
            edges[j] = tuple(EdgeTrace(None) for _ in st.ins)
            continue
        xs = tuple(vals[i] for i in st.ins)
        ans = vals[st.out]
        row = []
        for p, i in enumerate(st.ins):
            gi = fill_seed(st.vjp(p, g, xs, ans), xs[p].shape)
            prev = adjoints[i]
            adjoints[i] = gi if prev is None else prev + gi
            row.append(EdgeTrace(None, cotangent=gi[0]))
        edges[j] = tuple(row)
    return adjoints, edges


def _only(p, seed, n):
    """A tangent tuple with `seed` at position p and None elsewhere."""
    return tuple(seed if q == p else None for q in range(n))


def _one(t, shape):
    """A rule's batched result (k = 1) as one array shaped like the value."""
    return fill_seed(t, shape)[0]

