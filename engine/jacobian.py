"""Jacobian blocks d(of)/d(wrt) over a plan: the mode the planner picks, the identity
seeds' layout, one vectorized sweep, and where each block sits in its result.

Everything that depends on shapes only (a `JacobianSetup`) is kept per request shape
in the plan's `jacobian_setups`; the identity seeds with it while the plan's seeds stay
within PLAN_CACHE_BYTES in all. A setup also remembers under which limits it was
answered densely, and with which decision (`admitted`): `repeat` answers the same
request again by its sweep alone (what a small request's time is mostly spent on
otherwise is planning, admitting and checking what was planned, admitted and
checked before).
"""

from __future__ import annotations

from dataclasses import replace
from math import prod
from typing import NamedTuple

import numpy as np

from . import sparse
from .budget import Budget, Need
from .errors import DifferentiationError, ResourceLimitError
from .planner import PlannerDecision, plan_mode
from .shapes import MAX_SPAN, fmt_shape, span
from .sweeps import forward_sweep, reverse_sweep

SETUP_CACHE = 64  # request shapes whose setups are remembered per plan
PLAN_CACHE_BYTES = 1 << 20  # identity seeds kept per plan, in all
ADMITTED_KEPT = 8  # sets of limits a setup remembers its dense answer under


class Block(NamedTuple):
    """Where one Jacobian block d(of)/d(wrt) sits in a sweep's result."""

    key: tuple  # (of, wrt)
    slot: int  # the result slot holding it: the output (forward) or the input (reverse)
    start: int  # its first and stop rows among the swept directions
    stop: int
    flat: tuple  # the slot's result as a 2-D (directions, elements) array
    shape: tuple  # of.shape + wrt.shape
    transpose: bool  # forward mode sweeps d(of)/d(wrt) with the wrt axis first
    dtype: np.dtype


class JacobianSetup(NamedTuple):
    wrt: tuple
    seed_names: tuple  # the wrt inputs (forward) or the of outputs (reverse)
    offsets: dict  # seed name -> its first direction
    directions: int
    seeds: dict  # slot -> read-only identity seed, filled on first use when small
    decision: PlannerDecision
    blocks: list  # Block per (of, wrt)
    result_bytes: int
    seed_bytes: int
    largest_block: int  # elements
    # Budget.admission key -> the decision of a dense answer under those limits, without
    # a sparsity choice of the caller's own or a ratio (see `repeat`)
    admitted: dict


class JacobianResult(NamedTuple):
    outputs: dict
    jacobian: dict  # (of, wrt) -> array shaped of.shape + wrt.shape
    mode: str
    decision: PlannerDecision


def jacobian(plan, bound, wrt, of, mode, ratio, budget: Budget,
             sparsity=None) -> JacobianResult:
    """d(of)/d(wrt) blocks shaped of.shape + wrt.shape on bound inputs, by the mode the
    planner picks (or `mode`); the budget's max_block_elements refuses a larger block
    before any work, its max_bytes counts the identity seeds and the result.
    `sparsity` (engine/sparse.py): compressed sweeps by the Jacobian's sparsity pattern
    when that pays or is asked for (not with a `ratio` of the caller's own)."""
    found = None
    if ratio is None:
        found = sparse.try_jacobian(plan, bound, wrt, of, mode, sparsity, budget)
        if isinstance(found, JacobianResult):
            return found
    shapes = bound.shapes
    setup = setup_for(plan, bound, wrt, of, mode, ratio)
    d = setup.decision
    if budget.limited:
        admit(plan, shapes, setup, budget)
    seeds = setup.seeds or _identity_seeds(plan, setup, shapes)
    blocks = _swept(plan, setup, seeds, bound.vals, budget.check)
    if found is not None:  # dense, with the pattern's figures and why
        d = replace(d, reason=found.reason, nnz=found.nnz)
    if ratio is None and sparsity is None and setup.seeds:
        if len(setup.admitted) >= ADMITTED_KEPT:
            setup.admitted.clear()
        setup.admitted[budget.admission] = d
    return JacobianResult(plan.outputs(bound.vals), blocks, d.mode, d)


def repeat(plan, bound, wrt, of, mode, budget: Budget) -> JacobianResult | None:
    """`jacobian(plan, bound, wrt, of, mode, None, budget)` for a request it answered
    densely before at the same shapes, `wrt`, `of` and `mode` under the same limits:
    the same sweep, blocks and decision, without planning, sparsity analysis or
    admission again (all depend on nothing else). None when it has not: call
    `jacobian`."""
    setup = plan.jacobian_setups.get(_key(bound, wrt, of, mode, None))
    if setup is None:
        return None
    d = setup.admitted.get(budget.admission)
    if d is None or not setup.seeds:
        return None
    blocks = _swept(plan, setup, setup.seeds, bound.vals, budget.check)
    return JacobianResult(plan.outputs(bound.vals), blocks, d.mode, d)


def _key(bound, wrt, of, mode, ratio) -> tuple:
    return (bound.signature, None if wrt is None else tuple(wrt),
            None if of is None else tuple(of), mode, ratio)


def _swept(plan, setup: JacobianSetup, seeds: dict, vals: list, check) -> dict:
    """The blocks of one sweep of the identity seeds over the bound values."""
    if setup.decision.mode == "forward":
        res = [None] * plan.n_slots
        for s, t in seeds.items():
            res[s] = t
        forward_sweep(plan.steps, vals, res, check, plan.points)
    else:
        res = reverse_sweep(plan.steps, vals, seeds, plan.needs(setup.wrt), check,
                            plan.points)
    blocks = {}
    for b in setup.blocks:
        r = res[b.slot]
        if r is None:
            blocks[b.key] = np.zeros(b.shape, b.dtype)
            continue
        r = r.reshape(b.flat)
        if b.start or b.stop != b.flat[0]:
            r = r[b.start:b.stop]
        blocks[b.key] = (r.T if b.transpose else r).reshape(b.shape)
    return blocks


def setup_for(plan, bound, wrt, of, mode, ratio) -> JacobianSetup:
    """The JacobianSetup of these names at the bound shapes (kept per request shape)."""
    key = _key(bound, wrt, of, mode, ratio)
    setups = plan.jacobian_setups
    setup = setups.get(key)
    if setup is None:
        setup = _setup(plan, bound.shapes, *key[1:])
        if len(setups) >= SETUP_CACHE:
            setups.pop(next(iter(setups)), None)
        setups[key] = setup
    return setup


def admit(plan, shapes, setup: JacobianSetup, budget: Budget, extra: int = 0) -> None:
    """The budget's refusal, before any work, of a Jacobian over a bound (`extra`: bytes
    its caller needs beside it)."""
    d = setup.decision
    reply = plan.nbytes(shapes, plan.output_names) + setup.result_bytes
    budget.admit(plan, shapes, Need(
        d.n if d.mode == "forward" else d.m, reply, "outputs and Jacobian blocks", "of",
        extra=setup.result_bytes + setup.seed_bytes + extra, block=setup.largest_block,
        block_hint="ask for fewer `of`/`wrt` or use JVPs/VJPs"))


def seeds_for(plan, setup: JacobianSetup, shapes) -> dict:
    """The setup's identity seeds (slot -> read-only seed), kept or made now."""
    return setup.seeds or _identity_seeds(plan, setup, shapes)


def _setup(plan, shapes, wrt, of, mode, ratio) -> JacobianSetup:
    """Everything about a Jacobian that depends on shapes only: the mode, the identity
    seeds' layout and where each block sits in the swept result."""
    if mode not in ("auto", "forward", "reverse"):
        raise DifferentiationError(f"unknown mode {mode!r} (auto, forward or reverse)",
                                   field="mode")
    wrt, of = plan.wrt_names(wrt), plan.of_names(of)
    dtypes = plan.np_dtypes
    sizes = {name: prod(shapes[name]) for name in wrt + of}
    n = sum(sizes[w] for w in wrt)
    m = sum(sizes[o] for o in of)
    kwargs = {} if ratio is None else {"ratio": ratio}
    decision = plan_mode(n, m, forced=None if mode == "auto" else mode, **kwargs)
    forward = decision.mode == "forward"
    seed_names, total = (wrt, n) if forward else (of, m)
    offsets, at = {}, 0
    for name in seed_names:
        offsets[name] = at
        at += sizes[name]
    seed_bytes = sum(total * sizes[x] * dtypes[x].itemsize for x in seed_names)
    itemsize = max((dtypes[x].itemsize for x in wrt + of), default=8)
    # Forward mode gives d(of)/d(all wrt) per output (directions first), reverse
    # mode d(all of)/d(wrt) per input.
    blocks = []
    for o in of:
        for w in wrt:
            shape = tuple(shapes[o]) + tuple(shapes[w])
            if span(shape) > MAX_SPAN:
                raise ResourceLimitError(
                    f"the Jacobian block d{o}/d{w} of shape {fmt_shape(shape)} is too "
                    "large for an array", field="of")
            if forward:
                slot, at, size, flat = plan.slot[o], offsets[w], sizes[w], (n, sizes[o])
            else:
                slot, at, size, flat = plan.slot[w], offsets[o], sizes[o], (m, sizes[w])
            blocks.append(Block((o, w), slot, at, at + size, flat, shape, forward, dtypes[o]))
    largest = max((sizes[o] * sizes[w] for o in of for w in wrt), default=0)
    return JacobianSetup(wrt, seed_names, offsets, total, {}, decision, blocks,
                         n * m * itemsize, seed_bytes, largest, {})


def _identity_seeds(plan, setup, shapes) -> dict:
    """The identity, split into one seed per name, with a leading axis of directions.
    Kept with the setup (read-only, shared by later calls) while the plan's seeds
    stay within PLAN_CACHE_BYTES in all."""
    seeds = {}
    for name in setup.seed_names:
        at, dtype, shape = setup.offsets[name], plan.np_dtypes[name], tuple(shapes[name])
        size = prod(shape)
        block = np.zeros((setup.directions, size), dtype)
        block[at:at + size] = np.eye(size, dtype=dtype)
        block.setflags(write=False)
        seeds[plan.slot[name]] = block.reshape((setup.directions,) + shape)
    if plan.cache_bytes + setup.seed_bytes <= PLAN_CACHE_BYTES:
        setup.seeds.update(seeds)
    return seeds
