"""The one request entry: bind the inputs once, admit the budget before any work, and
run whatever the request asks through the same sweeps.

`differentiate` answers a differentiation request (a JVP, a VJP, or Jacobian blocks,
with a trace of the same inputs if asked, or a VJP from kept residuals);
`second_order` Hessian-vector products or Hessian blocks. Plan.differentiate and
Plan.second_order are these; the server calls them.
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from math import prod
from typing import NamedTuple

from . import jacobian, second, tracing
from .budget import Budget
from .errors import DifferentiationError
from .planner import PlannerDecision, plan_mode
from .tracing import Trace


class Differentiation(NamedTuple):
    """Plan.differentiate's answer: what one request asked for, and why that mode."""

    outputs: dict  # every output's value
    jacobian: dict  # Jacobian requests: (of, wrt) -> block shaped of.shape + wrt.shape
    tangents: dict  # JVP requests: output name -> tangent
    cotangents: dict  # VJP requests: input name -> cotangent
    decision: PlannerDecision
    trace: Trace | None = None


def differentiate(plan, inputs, *, wrt=None, of=None, mode="auto", tangents=None,
                  cotangents=None, trace=False, residuals=None, sparsity=None,
                  budget: Budget) -> Differentiation:
    """One differentiation request, whatever it asks for:

    - `tangents` (input name -> seed): a JVP, forward mode by definition;
    - `cotangents` (output name -> seed): a VJP, reverse mode by definition;
    - neither: the Jacobian blocks d(of)/d(wrt) in the mode the planner picks
      (or `mode`, "forward" or "reverse", when given).

    Seeds are shaped like their value or carry a leading axis of k directions.
    With tangents, `wrt` (if given) must name the same inputs; with cotangents,
    `of` the same outputs. The decision always carries the planner's figures.

    `trace` adds a Trace (engine/tracing.py) of the same inputs, from the tangents
    (forward), the cotangents (reverse), or with neither from a cotangent of 1 on the
    one one-element output `of` (a scalar loss); it is admitted with the request,
    before any work.

    `residuals` (from Plan.residuals on the same inputs) answers a VJP without
    `inputs` and without its forward sweep.
    """
    if residuals is not None:
        return _from_residuals(plan, inputs, residuals, wrt, of, mode, tangents, cotangents,
                               trace, budget)
    if mode not in ("auto", "forward", "reverse"):
        raise DifferentiationError(f"unknown mode {mode!r} (auto, forward or reverse)",
                                   field="mode")
    if tangents and cotangents:
        raise DifferentiationError("give tangents (JVP) or cotangents (VJP), not both",
                                   field="tangents")
    if tangents:
        _same_names(tangents, wrt, "tangents", "wrt")
        _implies(mode, "forward", "tangents")
    elif cotangents:
        _same_names(cotangents, of, "cotangents", "of")
        _implies(mode, "reverse", "cotangents")
    bound = plan.bind(inputs)
    shapes = bound.shapes
    traced = None
    if trace:
        # the trace's own copy of the bound slots (a sweep fills and frees them)
        traced = bound.copy()
        trace_mode, given = tracing.recipe(plan, shapes, of, mode, tangents, cotangents)
        trace_seeds = tracing.prepare(plan, shapes, trace_mode, given, budget)
    if tangents:
        result = plan.run_jvp(bound, tangents, budget)
        decision = replace(plan_mode(sum(prod(shapes[name]) for name in tangents),
                                     sum(a.size for a in result.outputs.values()),
                                     forced="forward"),
                           reason="tangents given: a JVP is forward mode")
        answer = Differentiation(result.outputs, {}, result.tangents, {}, decision)
    elif cotangents:
        result = plan.run_vjp(bound, cotangents, wrt, budget)
        answer = Differentiation(result.outputs, {}, {}, result.cotangents,
                                 _vjp_decision(plan, shapes, wrt, result, cotangents, "",
                                               bound.signature))
    else:
        if not plan.wrt_names(wrt):
            raise DifferentiationError("the graph has no floating inputs to differentiate "
                                       "with respect to", field="wrt")
        if not plan.of_names(of):
            raise DifferentiationError("the graph has no floating outputs to "
                                       "differentiate", field="of")
        result = jacobian.jacobian(plan, bound, wrt, of, mode, None, budget, sparsity)
        answer = Differentiation(result.outputs, result.jacobian, {}, {}, result.decision)
    if traced is not None:
        answer = answer._replace(trace=tracing.run(plan, traced, trace_mode, trace_seeds,
                                                   budget))
    return answer


def repeat(plan, inputs, *, wrt=None, of=None, mode="auto",
           budget: Budget) -> Differentiation | None:
    """`differentiate(plan, inputs, wrt=wrt, of=of, mode=mode, budget=budget)` for a
    Jacobian request (no seeds, trace, residuals or sparsity of its own) that it has
    answered before at these input shapes, names and mode under the same limits: the
    same answer by the sweep alone (jacobian.repeat); None when it has not."""
    bound = plan.bind(inputs)
    result = jacobian.repeat(plan, bound, wrt, of, mode, budget)
    if result is None:
        return None
    return Differentiation(result.outputs, result.jacobian, {}, {}, result.decision)


def second_order(plan, inputs, *, vectors=None, hessian=False, of=None, wrt=None,
                 mode="auto", sparsity=None, budget: Budget) -> second.SecondOrder:
    """One second-order request: Hessian-vector products (`vectors` given) or the
    Hessian blocks (`hessian`), not both (engine/second.py)."""
    if hessian and vectors:
        raise DifferentiationError("ask for Hessian-vector products (vectors) or the "
                                   "Hessian, not both", field="vectors")
    if hessian:
        r = second.hessian(plan, plan.bind(inputs), of, wrt, mode, budget, sparsity)
        return second.SecondOrder(r.outputs, r.value, r.gradient, {}, r.hessian, r.decision)
    second.check_mode(mode)
    r = second.hvp(plan, plan.bind(inputs), vectors, of, wrt, budget)
    return second.SecondOrder(r.outputs, r.value, r.gradient, r.hvp, {}, r.decision)


def _from_residuals(plan, inputs, residuals, wrt, of, mode, tangents, cotangents, trace,
                    budget) -> Differentiation:
    for given, field, why in ((inputs, "inputs", "the residuals stand for them"),
                              (tangents, "tangents", "residuals serve VJPs only"),
                              (trace, "trace", "a trace needs the inputs")):
        if given:
            raise DifferentiationError(f"give residuals or {field}, not both: {why}",
                                       field=field)
    if not cotangents:
        raise DifferentiationError("residuals serve a VJP: give cotangents",
                                   field="cotangents")
    _same_names(cotangents, of, "cotangents", "of")
    _implies(mode, "reverse", "cotangents")
    result = plan.run_vjp(residuals, cotangents, wrt, budget)
    return Differentiation(result.outputs, {}, {}, result.cotangents,
                           _vjp_decision(plan, residuals.shapes, wrt, result, cotangents,
                                         " (from kept residuals)"))


_VJP_DECISIONS: dict = {}  # (n, m, how) -> the PlannerDecision (immutable: shared)
_VJP_DECISIONS_KEPT = 1024  # (then forgotten, all at once)
# (id(plan), the bound inputs' shapes, wrt, the cotangents' names) -> (a weak reference
# to the plan, its decision): a VJP repeated at the same shapes skips n's and m's sums
# over the names (~10 us a call for a model's 17 parameters); the plan is not kept alive
# (a graph cache's eviction frees it) and its id is checked to be its own
_VJP_FORMS: dict = {}
_NOT_KEPT = object()  # (a signature that keeps no form: residuals)


def _vjp_decision(plan, shapes, wrt, result, cotangents, how,
                  signature=_NOT_KEPT) -> PlannerDecision:
    """The decision of a VJP at these shapes: n the `wrt` inputs' elements, m the
    cotangents' outputs' (Bound.signature, the input shapes those shapes are of, keys it
    by the request's form)."""
    form = None
    if signature is not _NOT_KEPT:
        form = (id(plan), signature, None if wrt is None else tuple(wrt), tuple(cotangents))
        known = _VJP_FORMS.get(form)
        if known is not None and known[0]() is plan:
            return known[1]
    n = sum(prod(shapes[name]) for name in plan.wrt_names(wrt))
    m = sum(result.outputs[name].size for name in cotangents)
    key = (n, m, how)
    decision = _VJP_DECISIONS.get(key)
    if decision is None:  # (dataclasses.replace and the reason's text: ~8 us a call)
        if len(_VJP_DECISIONS) >= _VJP_DECISIONS_KEPT:
            _VJP_DECISIONS.clear()
        decision = _VJP_DECISIONS[key] = replace(
            plan_mode(n, m, forced="reverse"),
            reason=f"cotangents given: a VJP is reverse mode{how}")
    if form is not None:
        if len(_VJP_FORMS) >= _VJP_DECISIONS_KEPT:
            _VJP_FORMS.clear()
        _VJP_FORMS[form] = (weakref.ref(plan), decision)
    return decision


def _same_names(seeds, names, field, names_field):
    if names is not None and set(names) != set(seeds):
        raise DifferentiationError(f"{field} are given for {sorted(seeds)} but {names_field} "
                                   f"is {list(names)}: they must name the same values",
                                   field=field)


def _implies(mode, implied, field):
    if mode not in ("auto", implied):
        raise DifferentiationError(f"{field} imply {implied} mode, but mode is {mode}",
                                   field="mode")
