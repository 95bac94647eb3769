"""Forward-over-reverse: the gradient of one scalar and its tangent along k directions.

A hook of the one reverse sweep (engine/sweeps.py), as a trace is: during the
sweep's forward pass it pushes the k direction vectors as tangents (every value
and tangent is kept: the steps it runs over free nothing); during the backward
pass it carries, beside the gradient cotangent g (one direction), its tangent ġ
(k directions). At each step, for each input position i that leads back to a
`wrt` input:

    g_i = vjp(i, g, x, ans)
    ġ_i = vjp(i, ġ, x, ans) + curvature(i, g, x, ans, t, t_ans)

(each op row's curvature and joint rules, engine/ops/table.py), summed where a value
fans out. At the `wrt` inputs, g is the gradient and ġ the Hessian-vector products
H v, one per direction.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import numpy as np

from .planner import PlannerDecision
from .shapes import fill_seed
from .sweeps import reverse_sweep


def bind_curvatures(nodes) -> list:
    """Per prepared step (Plan._nodes order), its row's (curvature, joint) rules with the
    node's attributes bound, None where it has none (see engine/ops/table.py)."""
    rules = []
    for _, op, attrs in nodes:
        bound = {k: v for k, v in attrs.items() if k != "node"}
        pair = []
        for rule in (op.curvature, op.joint):
            if rule is not None and bound:
                rule = partial(rule, **bound)
            pair.append(rule)
        rules.append(tuple(pair))
    return rules


# From this many elements of g, g and ġ go through a vjp stacked (one call, one matrix
# product); below it the copy costs more than the second call (bench P10's chain: 9%).
_STACK_FROM = 64


def forward_over_reverse(steps, curvatures, vals, tans, seed_slot, seed, needs, check=None,
                         points=()):
    """The reverse sweep over `steps` (which must free and drop nothing) with the
    forward-over-reverse hook; return (g, ġ), each a list of per-slot arrays (None where
    nothing flowed). `tans` holds the direction vectors at their slots (k leading),
    `seed` the cotangent of the scalar output at `seed_slot` ((1,) + its shape)."""
    hook = ForwardOverReverse(curvatures, tans)
    cots = reverse_sweep(steps, vals, {seed_slot: seed}, needs, check, points, hook)
    return cots, hook.dots


class ForwardOverReverse:
    """The reverse sweep's hook (a sweeps.Recorder) that makes it forward-over-reverse."""

    def __init__(self, curvatures, tans):
        self.curvatures = curvatures  # per step: (curvature, joint), attributes bound
        self.tans = tans  # per slot: the k tangents, None where none reaches
        self.dots = [None] * len(tans)  # per slot: the tangents of the cotangent

    def value(self, st, xs, ans) -> None:
        """The forward pass: the step's tangent from its inputs' (when any has one)."""
        tans = self.tans
        ts = tuple([tans[i] for i in st.ins])
        for t in ts:
            if t is not None:
                tans[st.out] = st.jvp(ts, xs, ans)
                break

    def backward(self, st, g, cotangents) -> None:
        pass

    def pull(self, j, st, positions, g, xs, ans) -> dict:
        """g pulled into the inputs at `positions` (returned), and its tangents (added
        to self.dots)."""
        ins, out, tans, dots = st.ins, st.out, self.tans, self.dots
        gdot = dots[out]
        dots[out] = None
        curvature, joint = self.curvatures[j]
        ts = t_ans = None
        if curvature is not None or joint is not None:
            ts = tuple(t if t is None or t.shape[1:] == x.shape else fill_seed(t, x.shape)
                       for t, x in zip([tans[i] for i in ins], xs))
            t_ans = tans[out]
            if t_ans is not None and t_ans.shape[1:] != ans.shape:
                t_ans = fill_seed(t_ans, ans.shape)
        # g and its k tangents go through each vjp as one seed of 1 + k directions: one
        # rule call (and one product for a matmul) instead of two (large g only).
        stacked = (gdot is not None and g.size >= _STACK_FROM
                   and gdot.shape[1:] == g.shape[1:])
        if stacked:
            both = np.concatenate((g, gdot))
        vjp = st.vjp
        pulled = {}
        for pos in positions:
            pair = None if joint is None else joint(pos, g, gdot, xs, ans, ts, t_ans)
            if pair is not None:
                gi, di = pair
            elif stacked:
                r = vjp(pos, both, xs, ans)
                if r is None:
                    continue
                gi, di = r[:1], r[1:]
            else:
                gi = vjp(pos, g, xs, ans)
                if gi is None:
                    continue
                di = None if gdot is None else vjp(pos, gdot, xs, ans)
            if curvature is not None and pair is None:
                c = curvature(pos, g, xs, ans, ts, t_ans)
                if c is not None:
                    di = c if di is None else di + c
            pulled[pos] = gi
            if di is not None:
                i = ins[pos]
                prev = dots[i]
                dots[i] = di if prev is None else prev + di
        return pulled


class HVPResult(NamedTuple):
    """Plan.hvp's answer."""

    value: np.ndarray  # the scalar output's value
    gradient: dict  # wrt name -> d value / d wrt, shaped like the input
    hvp: dict  # wrt name -> H v, shaped like the vectors (batched or not)
    decision: PlannerDecision
    outputs: dict  # every output's value


class HessianResult(NamedTuple):
    """Plan.hessian's answer."""

    value: np.ndarray
    gradient: dict
    hessian: dict  # (wrt_a, wrt_b) -> block shaped wrt_a.shape + wrt_b.shape
    decision: PlannerDecision
    outputs: dict


class SecondOrder(NamedTuple):
    """Plan.second_order's answer: one of hvp (vectors given) or hessian."""

    outputs: dict
    value: np.ndarray
    gradient: dict
    hvp: dict
    hessian: dict
    decision: PlannerDecision
