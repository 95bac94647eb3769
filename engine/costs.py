"""What a request costs, declared before anything runs: memory and work, from each op row.

A row declares its cost in every mode (`MODES`): "values" (its eval), "forward" (a
jvp), "reverse" (a vjp, into each input) and "second" (the second-order step of
forward-over-reverse: its curvature term beside the vjp of a tangent). A row's `cost`,
when it has one, is

    cost(mode, shapes, out, dtype, **attrs) -> OpCost

with `shapes` the input shapes, `out` the output's shape and `dtype` the output's
NumPy dtype. For "values" an OpCost is the whole eval's; for the other modes it is
per seed direction. A row without `cost` is costed from its `scratch` (elements per
direction) and `flops` (eval) fields: up to TEMPORARIES arrays of its output's size
plus its scratch, and about one FLOP per element read or written, twice that per
direction.

`plan_costs` aggregates the rows of one plan at one set of shapes (one pass over the
nodes); `estimate_bytes` and `estimate_flops` turn that into the bounds a request is
checked against. tests/engine/test_costs.py proves, op by op and mode by mode, that what a
row declares is no less than what its kernels really allocate (tracemalloc) and do
(FLOP formulas, and Python-level loop iterations counted by `iteration()`).

A kernel whose Python loop runs a number of times the request controls (kernel
offsets, groups) calls `iteration()` once per pass: it runs the sweep's deadline and
cancellation check (sweeps.checkpoint) and counts the pass when a test is counting.
Each pass is also charged LOOP_FLOPS of work, so the work bound covers the
interpreter's own time as well as the arithmetic.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from math import prod
from typing import NamedTuple

from .sweeps import checkpoint

MODES = ("values", "forward", "reverse", "second")
TEMPORARIES = 3  # arrays of its output's size an op's rule may hold at once
ARRAY_OVERHEAD = 1024  # bytes an array takes beyond its data, per op
# NumPy's iterator buffers for a ufunc that broadcasts or casts: up to 8,192 elements
# of up to 8 bytes per operand (three, say), held by the one op running, counted once
# per request (a comparison of broadcast float64 operands took 54 KiB for a 6 KiB result).
BUFFER_ELEMENTS = 8192
BUFFER_OPERANDS = 3


def numpy_buffers(largest: int) -> int:
    """Bytes of NumPy's iterator buffers for an op whose largest operand has `largest`
    elements."""
    return BUFFER_OPERANDS * 8 * min(largest, BUFFER_ELEMENTS)
# One pass of a kernel's Python loop (a few NumPy calls on views: 2-10 us here) counted
# as this many floating-point operations of work.
LOOP_FLOPS = 10_000


class OpCost(NamedTuple):
    """One op's cost in one mode (per seed direction, except in "values")."""

    scratch: int  # bytes the op holds at its peak beyond its inputs and its output
    flops: int  # floating-point operations
    loops: int = 0  # passes of its Python-level loops


class Costs(NamedTuple):
    """A plan's costs at one set of shapes."""

    values: int  # bytes of every node's value
    values_transient: int  # bytes the costliest op's eval holds beyond the values
    transient: int  # the same in any mode, derivatives included (per seed direction)
    flops: int  # the values' sweep: FLOPs plus LOOP_FLOPS per loop pass
    direction_flops: int  # the same per seed direction, in its costliest mode
    loops: int  # the values' sweep's loop passes
    direction_loops: int  # loop passes per seed direction, in its costliest mode
    nodes: int
    buffers: int = 0  # NumPy's iterator buffers of the op with the largest operand


def default_cost(op, mode, shapes, out, dtype, attrs) -> OpCost:
    """A row without a `cost` of its own: TEMPORARIES arrays of its largest operand's
    size (its output's, or an input's for a reduction) plus its `scratch` elements, and
    its `flops` (about one per element read or written by default), twice that per
    direction."""
    size = prod(out)
    scratch = TEMPORARIES * max([size] + [prod(s) for s in shapes]) * dtype.itemsize
    if op.scratch:
        scratch += dtype.itemsize * op.scratch(shapes, **attrs)
    flops = (op.flops(shapes, out, **attrs) if op.flops is not None
             else size + sum(prod(s) for s in shapes))
    return OpCost(scratch, flops if mode == "values" else 2 * flops)


def op_cost(op, mode, shapes, out, dtype, attrs) -> OpCost:
    """The row's declared cost of one node (attrs without "node") in `mode`."""
    rule = getattr(op, "cost", None)
    if rule is None:
        return default_cost(op, mode, shapes, out, dtype, attrs)
    return rule(mode, shapes, out, dtype, **attrs)


def plan_costs(nodes, np_dtypes, shapes) -> Costs:
    """The costs of a plan's prepared nodes ((node, op, attrs) each) at `shapes`
    (name -> shape), each node's output of dtype np_dtypes[name]. One pass over the
    nodes; a row without a `cost` is costed once (default_cost: the same memory in
    every mode, twice the FLOPs per direction)."""
    values = values_transient = transient = flops = loops = 0
    direction = {m: [0, 0] for m in MODES[1:]}
    plain = 0  # FLOPs of the rows costed by default_cost, per direction in every mode
    largest = 0  # elements of the largest operand of any op
    for node, op, attrs in nodes:
        dtype = np_dtypes[node.name]
        out = tuple(shapes[node.name])
        values += prod(out) * dtype.itemsize
        ins = [tuple(shapes[r]) for r in node.inputs]
        largest = max([largest, prod(out)] + [prod(s) for s in ins])
        rule_attrs = {k: v for k, v in attrs.items() if k != "node"} if attrs else {}
        rule = getattr(op, "cost", None)
        if rule is None:
            cost = default_cost(op, "values", ins, out, dtype, rule_attrs)
            values_transient = max(values_transient, cost.scratch)
            transient = max(transient, cost.scratch)
            flops += cost.flops
            plain += 2 * cost.flops
            continue
        for mode in MODES:
            cost = rule(mode, ins, out, dtype, **rule_attrs)
            transient = max(transient, cost.scratch)
            if mode == "values":
                values_transient = max(values_transient, cost.scratch)
                flops += cost.flops
                loops += cost.loops
            else:
                direction[mode][0] += cost.flops
                direction[mode][1] += cost.loops
    return Costs(values, values_transient, transient, flops + LOOP_FLOPS * loops,
                 plain + max(f + LOOP_FLOPS * n for f, n in direction.values()), loops,
                 max(n for _, n in direction.values()), len(nodes), numpy_buffers(largest))


def estimate_bytes(costs: Costs, directions: int = 0) -> int:
    """An upper bound of the memory a request with `directions` seed directions takes:
    every node's value and its seeds, plus what the one op running at a time holds
    beyond them, per direction (only the values' sweep runs when there are none)."""
    transient = costs.transient if directions else costs.values_transient
    return ((costs.values + transient) * (1 + directions)
            + ARRAY_OVERHEAD * (costs.nodes + 1) + costs.buffers)


def estimate_flops(costs: Costs, directions: int = 0) -> int:
    """Work of the values' sweep plus each seed direction's."""
    return costs.flops + directions * costs.direction_flops


# --- loop passes ------------------------------------------------------------------------

_COUNTER: ContextVar = ContextVar("gradserve_loop_counter", default=None)


def iteration() -> None:
    """One pass of a kernel's request-sized Python loop: the deadline and cancellation
    check, and the pass counted when `counting()` is on."""
    checkpoint()
    counter = _COUNTER.get()
    if counter is not None:
        counter[0] += 1


@contextmanager
def counting():
    """with counting() as passes: ... -> passes[0] is the number of loop passes run."""
    counter = [0]
    token = _COUNTER.set(counter)
    try:
        yield counter
    finally:
        _COUNTER.reset(token)
