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

from dataclasses import replace
from functools import partial
from math import prod
from typing import NamedTuple

import numpy as np

from .budget import Budget, Need
from .errors import DifferentiationError, InputError, ResourceLimitError
from .planner import PlannerDecision, plan_second_order
from .shapes import MAX_SPAN, fill_seed, fmt_shape, span
from .sweeps import reverse_sweep


class SecondOrderSteps(NamedTuple):
    """A plan's steps as forward-over-reverse runs them (made once per plan)."""

    steps: list  # the plan's steps, freeing and dropping nothing (the backward pass
    # reads every value and tangent)
    rules: list  # per step, its row's (curvature, joint) with the node's attributes bound


def second_order_steps(plan) -> SecondOrderSteps:
    if plan.second_order_steps is None:
        rules = []
        for _, op, attrs in plan.nodes:
            bound = {k: v for k, v in attrs.items() if k != "node"}
            rules.append(tuple(partial(rule, **bound) if rule is not None and bound else rule
                               for rule in (op.curvature, op.joint)))
        plan.second_order_steps = SecondOrderSteps(
            [st._replace(free=(), drop=()) for st in plan.steps], rules)
    return plan.second_order_steps


# From this many elements of g, g and ġ go through a vjp stacked (one call, one matrix
# product); below it the copy costs more than the second call (bench P10's chain: 9%).
_STACK_FROM = 64


def forward_over_reverse(plan, vals, shapes, out, wrt, seeds, check):
    """The plan's reverse sweep with the forward-over-reverse hook (the budget already
    admitted); return (g, ġ), each a list of per-slot arrays (None where nothing
    flowed). `seeds` holds the direction vectors by slot (k leading); the sweep starts
    from a cotangent of 1 on the scalar output `out`."""
    kept = second_order_steps(plan)
    tans = [None] * plan.n_slots
    for s, t in seeds.items():
        tans[s] = t
    hook = ForwardOverReverse(kept.rules, tans)
    seed = np.ones((1,) + tuple(shapes[out]), plan.np_dtypes[out])
    cots = reverse_sweep(kept.steps, vals, {plan.slot[out]: seed}, plan.needs(wrt), check,
                         plan.points, hook)
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


# --- the requests, over a plan and bound inputs ---------------------------------------------

def hvp(plan, bound, vectors, of, wrt, budget: Budget) -> HVPResult:
    """The value of the scalar output `of`, its gradient and Hessian-vector products
    H v with respect to the `wrt` inputs, forward-over-reverse in one sweep.

    `vectors` has one array per `wrt` input (default: the inputs it names), shaped
    like it or with a leading axis of k directions (the products are batched the
    same way). `of` defaults to the graph's only output; it must have one element.
    """
    vals, shapes = bound.vals, bound.shapes
    out = scalar_of(plan, of, shapes)
    if not vectors:
        raise InputError("give a vector for each wrt input", field="vectors")
    for name in vectors:
        if name not in plan.input_names:
            raise InputError("is not an input of the graph (inputs: "
                             + ", ".join(plan.input_names) + ")", node=name, field="vectors")
    if wrt is None:
        wrt = tuple(n for n in plan.input_names if n in vectors)
    wrt = wrt_names(plan, wrt)
    if set(vectors) != set(wrt):
        raise InputError(f"vectors are given for {sorted(vectors)} but wrt is "
                         f"{list(wrt)}: give one vector for each wrt input", field="vectors")
    seeds, k, batched = plan.seeds(vectors, shapes, "vectors")
    decision = plan_second_order(sum(prod(shapes[w]) for w in wrt), k)
    _admit(plan, shapes, wrt, k, budget, "outputs, gradients and Hessian-vector products",
           "vectors")
    cots, dots = forward_over_reverse(plan, vals, shapes, out, wrt, seeds, budget.check)
    products = {}
    for name in wrt:
        shape, dtype = tuple(shapes[name]), plan.np_dtypes[name]
        d = dots[plan.slot[name]]
        d = (np.zeros((k,) + shape, dtype) if d is None
             else fill_seed(d, shape).astype(dtype, copy=False))
        if d.shape[0] != k:
            d = np.broadcast_to(d, (k,) + shape)
        products[name] = d if batched else d[0]
    outputs = plan.outputs(vals)
    return HVPResult(outputs[out], _gradient(plan, cots, shapes, wrt), products, decision,
                     outputs)


def hessian(plan, bound, of, wrt, mode, budget: Budget, sparsity=None) -> HessianResult:
    """The value of the scalar output `of`, its gradient and its Hessian blocks
    d2 of / d wrt_a d wrt_b, each shaped wrt_a.shape + wrt_b.shape: n HVPs with
    the identity's columns as vectors, batched in one forward-over-reverse sweep
    (`mode` "auto" or "forward-over-reverse", the only scheme). The budget's
    max_block_elements refuses a larger block before any work; its max_bytes counts the
    n tangent directions of every value. `sparsity` (engine/sparse.py): one HVP per color
    of the Hessian's pattern instead of n, when that pays or is asked for."""
    check_mode(mode)
    from . import sparse  # (sparse builds on hvp)
    found = sparse.try_hessian(plan, bound, of, wrt, sparsity, budget)
    if isinstance(found, HessianResult):
        return found
    vals, shapes = bound.vals, bound.shapes
    out = scalar_of(plan, of, shapes)
    wrt = wrt_names(plan, wrt)
    sizes = {w: prod(shapes[w]) for w in wrt}
    n = sum(sizes.values())
    for a in wrt:
        for b in wrt:
            shape = tuple(shapes[a]) + tuple(shapes[b])
            if span(shape) > MAX_SPAN:
                raise ResourceLimitError(f"the Hessian block d2/d{a} d{b} of shape "
                                         f"{fmt_shape(shape)} is too large for an array",
                                         field="wrt")
    decision = plan_second_order(n, n, what="a full Hessian, the identity's columns as "
                                 "vectors")
    _admit(plan, shapes, wrt, n, budget, "outputs, gradients and Hessian blocks", "wrt",
           block=max(sizes[a] * sizes[b] for a in wrt for b in wrt))
    seeds, at = {}, 0
    for name in wrt:
        size = sizes[name]
        block = np.zeros((n, size), plan.np_dtypes[name])
        block[at:at + size] = np.eye(size, dtype=block.dtype)
        seeds[plan.slot[name]] = block.reshape((n,) + tuple(shapes[name]))
        at += size
    cots, dots = forward_over_reverse(plan, vals, shapes, out, wrt, seeds, budget.check)
    blocks, offsets, at = {}, {}, 0
    for name in wrt:
        offsets[name] = at
        at += sizes[name]
    # Block (a, b) is the Jacobian of the gradient wrt a with respect to b (as
    # torch.autograd.functional.hessian): the tangents of grad_a along b's columns.
    for a in wrt:
        d = dots[plan.slot[a]]
        shape_a, dtype = tuple(shapes[a]), plan.np_dtypes[a]
        d = (np.zeros((n, sizes[a]), dtype) if d is None
             else np.broadcast_to(fill_seed(d, shape_a), (n,) + shape_a).reshape(n, sizes[a]))
        for b in wrt:
            columns = d[offsets[b]:offsets[b] + sizes[b]]
            blocks[a, b] = columns.T.astype(dtype).reshape(shape_a + tuple(shapes[b]))
    outputs = plan.outputs(vals)
    if found is not None:  # dense, with the pattern's figures and why
        decision = replace(decision, reason=found.reason, nnz=found.nnz)
    return HessianResult(outputs[out], _gradient(plan, cots, shapes, wrt), blocks, decision,
                         outputs)


def check_mode(mode) -> None:
    if mode not in ("auto", "forward-over-reverse"):
        raise DifferentiationError(f"unknown second-order mode {mode!r} (auto or "
                                   "forward-over-reverse)", field="mode")


def _admit(plan, shapes, wrt, k, budget, what, field, block=None) -> None:
    """Every value kept with its k tangents, and the cotangent with its k tangents (2k + 1
    directions beside the values), plus the vectors and the reply; 3k + 1 rule
    applications per op (k jvps, k + 1 vjps, k curvature terms), within the cost
    model's two per direction."""
    reply = (plan.nbytes(shapes, plan.output_names) + plan.nbytes(shapes, wrt)
             + plan.nbytes(shapes, wrt, k))
    budget.admit(plan, shapes, Need(
        2 * k + 1, reply, what, field, extra=plan.nbytes(shapes, wrt, k), block=block,
        block_what="Hessian", block_hint="ask for fewer or smaller `wrt` inputs, or use "
        "Hessian-vector products"))


def scalar_of(plan, of, shapes) -> str:
    """The one output a second-order request differentiates: named by `of` (a name
    or a one-name sequence), or the graph's only output; it must have one element."""
    if of is None:
        if len(plan.output_names) != 1:
            raise DifferentiationError(
                f"the graph has {len(plan.output_names)} outputs: name the one scalar "
                "output to differentiate in `of`", field="of")
        of = plan.output_names
    elif isinstance(of, str):
        of = (of,)
    of = plan.names(tuple(of), plan.output_names, (), "output", "of")
    if len(of) != 1:
        raise DifferentiationError(f"second derivatives are of one scalar output; `of` "
                                   f"names {len(of)}", field="of")
    size = prod(shapes[of[0]])
    if size != 1:
        raise DifferentiationError(
            f"has shape {fmt_shape(shapes[of[0]])} ({size} elements); second "
            "derivatives need a one-element output (a scalar loss)", node=of[0], field="of")
    return of[0]


def wrt_names(plan, wrt) -> tuple:
    if isinstance(wrt, str):
        wrt = (wrt,)
    wrt = plan.wrt_names(wrt)
    if not wrt:
        raise DifferentiationError("the graph has no floating inputs to differentiate "
                                   "with respect to", field="wrt")
    return wrt


def _gradient(plan, cots, shapes, wrt) -> dict:
    gradient = {}
    for name in wrt:
        shape, dtype = tuple(shapes[name]), plan.np_dtypes[name]
        g = cots[plan.slot[name]]
        gradient[name] = (np.zeros(shape, dtype) if g is None
                          else fill_seed(g, shape)[0].astype(dtype, copy=False))
    return gradient
