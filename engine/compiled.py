"""compile(graph) -> Plan: a validated graph, ready to evaluate and differentiate.

Compiling does all the analysis once: validation, op lookup, attribute binding,
dead-node pruning, each value's last use, and which values the reverse sweep
needs. Running a Plan is then a loop over prepared steps (engine/sweeps.py).

Values live in a list of slots (inputs, constants, then nodes). Seeds carry a
leading axis of k directions, so a whole Jacobian is one sweep.

A Plan binds inputs (`bind`) and runs the three first-order requests on bound
inputs: values, a JVP, a VJP (with its residuals). Everything else is a function
over a plan: Jacobian blocks (engine/jacobian.py), second order (engine/second.py),
traces (engine/tracing.py), and the one request entry that combines them
(engine/request.py); the Plan's methods of those names are thin wrappers. What a
request may spend is one Budget (engine/budget.py), admitted before any work.
"""

from __future__ import annotations

from functools import partial
from math import prod
from typing import Mapping, NamedTuple

import numpy as np

from . import arguments, costs, jacobian, losses, request, second, tracing
from .budget import Budget, Need
from .errors import InputError
from .ir import FLOAT_DTYPES, Graph
from .ops.table import compact_references
from .jacobian import PLAN_CACHE_BYTES  # noqa: F401 (the identity seeds' bound, also read here)
from .shapes import fmt_shape
from .errors import ResourceLimitError
from .sweeps import (Step, backward_sweep, check_points, compiled_reverse, forward_sweep,
                     residual_sweep, reverse_sweep, values_sweep)
from .validate import infer_shapes, validate

# Per-plan caches are bounded by count and, for arrays, by bytes (PLAN_CACHE_BYTES
# in all), so what a compiled graph may grow to is known when it is cached.
_SPECIALIZATION_CACHE = 64  # distinct input-shape signatures remembered per plan
_ACTIVITY_CACHE = 16  # distinct `wrt` sets whose active steps are remembered per plan
_NAMES_CACHE = 64  # name tuples checked (Plan.names), remembered per plan
# What one entry of a plan's caches holds (measured: a dict entry with its shape tuple
# per node, a positions tuple per step, a Jacobian setup's records), for cache_bytes.
_SPECIALIZATION_BYTES = 200
_ACTIVITY_BYTES = 72
_SETUP_BYTES = 4096
_HEAVY_ELEMENTS = 1 << 16  # a value this large is a point where cancellation is checked
_SMALL_BYTES = 256  # a value this small is kept by a reverse sweep: a Stub is about as big
# A VJP's reverse sweep asked again in the same form (`wrt`, the seeded outputs, the check
# points of its shapes) runs as one generated function from that second call on
# (sweeps.compiled_reverse: the same evals, vjps, checks and sums without the per-step
# dispatch; a transformer encoder layer's sweep 625 -> 575 us), for plans short enough
# that a training sweep compiles (losses.COMPILED_MAX_STEPS, _REFERENCES). The compile's
# memory is declared on the call that compiles (a budget without room for it runs the
# interpreter); at most _VJP_SWEEPS_KEPT forms per plan are remembered, each counted in
# cache_bytes (Plan._vjp_sweeps_bytes), a compiled one as a training sweep.
_VJP_SWEEPS_KEPT = 8


class Bound(NamedTuple):
    """Inputs checked against a plan: the slot list (inputs and constants filled in) and
    every value's shape. A sweep fills and frees the slots: `copy` before a second one."""

    vals: list
    shapes: dict
    signature: tuple | None  # the input shapes, for a plan with run-time dimensions

    def copy(self) -> "Bound":
        return self._replace(vals=self.vals[:])


class JVPResult(NamedTuple):
    outputs: dict
    tangents: dict  # output name -> tangent


class Residuals(NamedTuple):
    """What a VJP's backward half needs, kept between calls (Plan.residuals)."""

    outputs: dict
    values: list  # by slot: the values the vjps read, other values' shapes (sweeps.Stub)
    shapes: dict  # every value's shape
    nbytes: int  # the arrays held


class VJPResult(NamedTuple):
    outputs: dict
    cotangents: dict  # input name -> cotangent


def compile(graph: Graph, *, check=None) -> "Plan":
    """Validate `graph` (raising the engine's errors) and prepare it to run.
    `check`, when given, is called between the phases of compiling and may raise
    to stop it (a caller whose deadline passed)."""
    return Plan(graph, check=check)


class Plan:
    def __init__(self, graph: Graph, *, check=None):
        checked = validate(graph)
        if check is not None:
            check()
        self.graph = graph
        self.shapes = checked.shapes  # static; None marks a run-time dimension
        self.dtypes = checked.dtypes
        self.input_names = tuple(i.name for i in graph.inputs)
        self.output_names = tuple(graph.outputs)
        self.float_inputs = tuple(n for n in self.input_names if self.dtypes[n] in FLOAT_DTYPES)
        self.float_outputs = tuple(n for n in self.output_names
                                   if self.dtypes[n] in FLOAT_DTYPES)
        self._input_set = frozenset(self.input_names)
        self.np_dtypes = {name: np.dtype(d) for name, d in self.dtypes.items()}
        self.static = all(d is not None for n in self.input_names for d in self.shapes[n])

        names = list(self.input_names) + list(graph.constants)
        self.slot = {name: i for i, name in enumerate(names)}
        for node in graph.nodes:
            self.slot[node.name] = len(self.slot)
        self.n_slots = len(self.slot)
        self._template = [None] * self.n_slots
        for name, value in graph.constants.items():
            self._template[self.slot[name]] = value

        live = self._live_nodes(graph)
        if check is not None:
            check()
        # a node reading one value many times reads it once (engine/ops/table.py)
        self.nodes = [compact_references(node, op, attrs, self.shapes) for node, op, attrs, keep
                      in zip(graph.nodes, checked.ops, checked.attrs, live) if keep]
        if check is not None:
            check()
        self._build_steps()
        self._specializations: dict = {}
        self.jacobian_setups: dict = {}  # engine/jacobian.py's, per request shape
        self.patterns: dict = {}  # engine/sparse.py's analyses, bounded in bytes
        self._activity: dict = {}
        self._checked_names: dict = {}  # (names, what, of inputs, of outputs) -> True
        # at most one entry's bytes: a key and a tuple of each name once (its string too)
        self._names_entry_bytes = 200 + sum(64 + len(n) for n in
                                            {*self.input_names, *self.output_names})
        self._cost_cache: dict = {}  # id(shapes) -> (shapes, costs at those shapes)
        self._points_cache: dict = {}  # id(shapes) -> (shapes, check points at them)
        self.second_order_steps = None  # engine/second.py's, made on its first call
        self.loss_tails: dict = {}  # engine/losses.py's training sweeps (16 at most)
        # (wrt, seeded slots, check points) -> a VJP's compiled sweep, or False: seen once
        self.vjp_sweeps: dict = {}

    # --- compile-time analysis ------------------------------------------------

    def _live_nodes(self, graph: Graph) -> list[bool]:
        """Nodes some output depends on (one backward pass, no recursion)."""
        needed = set(graph.outputs)
        live = [False] * len(graph.nodes)
        for j in range(len(graph.nodes) - 1, -1, -1):
            node = graph.nodes[j]
            if node.name in needed:
                live[j] = True
                needed.update(node.inputs)
        return live

    def _build_steps(self):
        slot = self.slot
        steps = []
        last_use = {}
        needed_backward = set()
        for j, (node, op, attrs) in enumerate(self.nodes):
            ins = tuple(slot[r] for r in node.inputs)
            out = slot[node.name]
            bind = (lambda f: partial(f, **attrs)) if attrs else (lambda f: f)
            steps.append(Step(node.name, op.name, bind(op.eval), bind(op.jvp), bind(op.vjp),
                              ins, out, twice=op.symmetric and len(set(ins)) == 1))
            for i in ins:
                last_use[i] = j
            if "x" in op.saves:
                needed_backward.update(ins)
            if "ans" in op.saves:
                needed_backward.add(out)
        keep = {slot[o] for o in self.output_names}
        first_node_slot = len(self.input_names) + len(self.graph.constants)
        free = [[] for _ in steps]
        drop = [[] for _ in steps]  # freed during the reverse sweep's forward pass
        names = list(slot)
        for s, j in last_use.items():
            if s in keep or s < first_node_slot:
                continue
            free[j].append(s)
            if s not in needed_backward and not self._small(names[s]):
                drop[j].append(s)
        self.steps = [st._replace(free=tuple(f), drop=tuple(d))
                      for st, f, d in zip(steps, free, drop)]
        # A cancelled call is noticed before each heavy op (matmul, or a value of 64K+
        # elements or of a size known only at run time) and at least every 64 ops.
        self.references = sum(len(st.ins) for st in self.steps)  # (for cache_bytes)
        self.points = check_points([_heavy(op, self.shapes[node.name])
                                    for node, op, _ in self.nodes])

    def points_at(self, shapes) -> tuple:
        """`points` at bound shapes (a specialization): there a value's size is known, so
        it is heavy by its size, not for being unknown (a model with a dynamic batch was
        checked before every step). Remembered per shapes, as `costs`."""
        if shapes is self.shapes:
            return self.points
        known = self._points_cache.get(id(shapes))
        if known is not None and known[0] is shapes:
            return known[1]
        found = check_points([_heavy(op, shapes[node.name]) for node, op, _ in self.nodes])
        remember(self._points_cache, id(shapes), (shapes, found), _SPECIALIZATION_CACHE)
        return found

    def _small(self, name) -> bool:
        """A value of a static size under _SMALL_BYTES: the reverse sweep keeps it (its
        memory is counted among the values anyway) rather than reduce it to a Stub."""
        shape = self.shapes[name]
        return None not in shape and prod(shape) * self.np_dtypes[name].itemsize < _SMALL_BYTES

    # --- binding run-time values --------------------------------------------------

    def bind(self, inputs: Mapping[str, np.ndarray]) -> Bound:
        """Check the inputs against the graph: the slot list and every value's shape."""
        vals = self._template[:]
        if len(inputs) != len(self.input_names) or not self._input_set.issuperset(inputs):
            self._unknown_inputs(inputs)
        for i, name in enumerate(self.input_names):
            value = inputs.get(name)
            if value is None:
                raise InputError("input is missing", node=name, field="inputs")
            if type(value) is not np.ndarray:
                value = np.asarray(value)
            if value.dtype != self.np_dtypes[name]:
                raise InputError(f"expected dtype {self.dtypes[name]}, got {value.dtype}",
                                 node=name, field="dtype")
            declared = self.shapes[name]
            if value.shape != declared and not _fits(value.shape, declared):
                raise InputError(f"expected shape {fmt_shape(declared)}, got "
                                 f"{fmt_shape(value.shape)}", node=name, field="shape")
            vals[i] = value
        if self.static:
            return Bound(vals, self.shapes, None)
        signature = tuple(v.shape for v in vals[:len(self.input_names)])
        return Bound(vals, self._specialize(signature), signature)

    def _unknown_inputs(self, inputs):
        for name in inputs:
            if name not in self._input_set:
                raise InputError("is not an input of the graph (inputs: "
                                 + ", ".join(self.input_names) + ")", node=name,
                                 field="inputs")

    def _specialize(self, signature):
        """Every value's concrete shape for these input shapes (cached per signature)."""
        shapes = self._specializations.get(signature)
        if shapes is None:
            shapes = dict(zip(self.input_names, signature))
            for name, value in self.graph.constants.items():
                shapes[name] = value.shape
            infer_shapes([n.name for n, _, _ in self.nodes], [op for _, op, _ in self.nodes],
                         [a for _, _, a in self.nodes], [n.inputs for n, _, _ in self.nodes],
                         shapes)
            remember(self._specializations, signature, shapes, _SPECIALIZATION_CACHE)
        return shapes

    # --- declared costs (engine/costs.py) -------------------------------------------

    def costs(self, shapes) -> costs.Costs:
        """engine/costs.py's plan_costs at these shapes, remembered per shapes (a Plan's
        own static shapes, or one of its specializations), so a request does not pay it
        again."""
        known = self._cost_cache.get(id(shapes))
        if known is not None and known[0] is shapes:
            return known[1]
        found = costs.plan_costs(self.nodes, self.np_dtypes, shapes)
        # the shapes are kept with their costs, so their id cannot be reused meanwhile
        remember(self._cost_cache, id(shapes), (shapes, found), _SPECIALIZATION_CACHE)
        return found

    def estimate_bytes(self, shapes, directions: int = 0) -> int:
        """An upper bound, computed before anything runs, of the memory a request takes
        at these shapes (every value and its seeds, plus the costliest op's temporaries
        and scratch, as its row declares them)."""
        return costs.estimate_bytes(self.costs(shapes), directions)

    def estimate_flops(self, shapes, directions: int = 0) -> int:
        """Work of the values' sweep at these shapes plus each seed direction's."""
        return costs.estimate_flops(self.costs(shapes), directions)

    @property
    def cache_bytes(self) -> int:
        """About what this plan's caches hold between calls: identity seeds (at most
        jacobian.PLAN_CACHE_BYTES), shape specializations and activity lists (bounded by count),
        sparsity patterns and colorings (at most sparse.PATTERN_CACHE_BYTES), as counted by
        a graph cache."""
        seeds = sum(s.seed_bytes for s in self.jacobian_setups.values() if s.seeds)
        # the cost and points caches may keep specializations alive after their eviction:
        # counted too (a points tuple holds at most an int per step, under an entry's bytes)
        shape_dicts = (len(self._specializations) + len(self._cost_cache)
                       + len(self._points_cache))
        return (seeds + shape_dicts * len(self.nodes) * _SPECIALIZATION_BYTES
                + len(self._activity) * len(self.steps) * _ACTIVITY_BYTES
                + len(self._checked_names) * self._names_entry_bytes
                + len(self.loss_tails) * losses.kept_bytes(self)
                + self._vjp_sweeps_bytes()
                + len(self.jacobian_setups) * _SETUP_BYTES
                + sum(a.nbytes for a in self.patterns.values()))

    def _vjp_sweeps_bytes(self) -> int:
        """What the VJP forms kept hold: each a key (its names, a check point per step at
        most) and, once compiled, a sweep as large as a training one."""
        forms = list(self.vjp_sweeps.values())  # (a copy taken at once: other threads add)
        compiled = sum(1 for sweep in forms if sweep)
        return (len(forms) * (len(self.steps) * _ACTIVITY_BYTES + self._names_entry_bytes)
                + compiled * losses.kept_bytes(self))

    # --- names, seeds, results ----------------------------------------------------

    def names(self, names, allowed, default, what, field) -> tuple:
        """arguments.names; a tuple of this plan's input or output names checked once is
        not checked again (a repeated request's `wrt` and seeds: ~1.5 us each)."""
        if names is None:
            return default
        names = tuple(names)
        key = (names, what, allowed is self.input_names, allowed is self.output_names)
        if key in self._checked_names:
            return names
        checked = arguments.names(self, names, allowed, default, what, field)
        if key[2] or key[3]:
            remember(self._checked_names, key, True, _NAMES_CACHE)
        return checked

    def wrt_names(self, wrt) -> tuple:
        return self.names(wrt, self.input_names, self.float_inputs, "input", "wrt")

    def of_names(self, of) -> tuple:
        return self.names(of, self.output_names, self.float_outputs, "output", "of")

    def seeds(self, given, shapes, field):
        return arguments.seeds(self, given, shapes, field)

    def needs(self, wrt):
        """Per step, the input positions that depend on a `wrt` input (cached per set
        of names, _ACTIVITY_CACHE sets at most)."""
        key = frozenset(wrt)
        needs = self._activity.get(key)
        if needs is None:
            active = [False] * self.n_slots
            for name in key:
                active[self.slot[name]] = True
            needs = []
            for st in self.steps:
                positions = tuple(p for p, i in enumerate(st.ins) if active[i])
                active[st.out] = bool(positions)
                needs.append(positions)
            remember(self._activity, key, needs, _ACTIVITY_CACHE)
        return needs

    def outputs(self, vals) -> dict:
        return {name: vals[self.slot[name]] for name in self.output_names}

    def nbytes(self, shapes, names, directions: int = 1) -> int:
        return directions * sum(prod(shapes[n]) * self.np_dtypes[n].itemsize for n in names)

    # --- the first-order requests on bound inputs ------------------------------------

    def run_values(self, bound: Bound, budget: Budget) -> dict:
        if budget.limited:
            budget.admit(self, bound.shapes,
                         Need(0, self.nbytes(bound.shapes, self.output_names), "outputs",
                              "outputs"))
        values_sweep(self.steps, bound.vals, budget.check, self.points_at(bound.shapes))
        return self.outputs(bound.vals)

    def run_jvp(self, bound: Bound, tangents, budget: Budget) -> JVPResult:
        vals, shapes = bound.vals, bound.shapes
        self.names(tuple(tangents), self.input_names, (), "input", "tangents")
        seeds, k, batched = self.seeds(tangents, shapes, "tangents")
        if budget.limited:
            budget.admit(self, shapes, Need(k, self.nbytes(shapes, self.output_names, 1 + k),
                                            "outputs and tangents", "tangents"))
        tans = [None] * self.n_slots
        for s, t in seeds.items():
            tans[s] = t
        forward_sweep(self.steps, vals, tans, budget.check, self.points_at(shapes))
        return JVPResult(self.outputs(vals),
                         arguments.per_name(self, tans, self.output_names, shapes, k, batched))

    def run_vjp(self, bound: Bound | Residuals, cotangents, wrt, budget: Budget) -> VJPResult:
        """Reverse mode on bound inputs, or on residuals (its backward half only)."""
        shapes = bound.shapes
        self.names(tuple(cotangents), self.output_names, (), "output", "cotangents")
        wrt = self.wrt_names(wrt)
        seeds, k, batched = self.seeds(cotangents, shapes, "cotangents")
        points = self.points_at(shapes)
        kept = isinstance(bound, Residuals)
        form = None if kept or not losses.plan_compiles(self) else (
            wrt, tuple(sorted(seeds)), points)
        sweep = None if form is None else self.vjp_sweeps.get(form)
        compiling = sweep is False
        if budget.limited:
            reply = self.nbytes(shapes, self.output_names) + self.nbytes(shapes, wrt, k)
            need = Need(k, reply, "outputs and cotangents", "cotangents")
            if compiling:
                try:
                    budget.admit(self, shapes, need._replace(
                        extra=need.extra + losses.plan_compile_bytes(self)))
                except ResourceLimitError:
                    compiling = False  # no room to compile: the interpreter, admitted alone
            if not compiling:
                budget.admit(self, shapes, need)
        if kept:
            cots = backward_sweep(self.steps, bound.values, seeds, self.needs(wrt),
                                  budget.check, points)
            return VJPResult(bound.outputs, arguments.per_name(self, cots, wrt, shapes, k,
                                                               batched))
        if compiling:
            wanted = [self.slot[n] for n in self.output_names + wrt]
            sweep = compiled_reverse(self.steps, self.needs(wrt), points, form[1], wanted)
            if form in self.vjp_sweeps:  # (in its place: no other form evicted for it)
                self.vjp_sweeps[form] = sweep
            else:
                remember(self.vjp_sweeps, form, sweep, _VJP_SWEEPS_KEPT)
        elif sweep is None and form is not None:
            remember(self.vjp_sweeps, form, False, _VJP_SWEEPS_KEPT)
        if sweep:
            values, found = sweep(bound.vals, seeds, budget.check)
            n_out = len(self.output_names)
            outputs = dict(zip(self.output_names, values[:n_out]))
            cots = {self.slot[name]: c for name, c in zip(wrt, found[n_out:])}
        else:
            cots = reverse_sweep(self.steps, bound.vals, seeds, self.needs(wrt), budget.check,
                                 points)
            outputs = self.outputs(bound.vals)
        return VJPResult(outputs, arguments.per_name(self, cots, wrt, shapes, k, batched))

    def run_residuals(self, bound: Bound, budget: Budget) -> Residuals:
        vals, shapes = bound.vals, bound.shapes
        if budget.limited:
            budget.admit(self, shapes, Need(0, self.nbytes(shapes, self.output_names)))
        residual_sweep(self.steps, vals, budget.check, self.points_at(shapes))
        kept = {id(v): v.nbytes for v in vals if isinstance(v, np.ndarray)}
        return Residuals(self.outputs(vals), vals, shapes, sum(kept.values()))

    # --- public API ------------------------------------------------------------------
    # Every method takes what the request may spend as `budget` (a Budget), or as its
    # fields by keyword (max_bytes, max_flops, max_reply_bytes, max_block_elements,
    # max_trace_elements, deadline) with `check` its cancellation: refused with
    # ResourceLimitError before anything runs, stopped between ops once `check` raises
    # or the deadline passes.

    def evaluate(self, inputs, *, budget=None, check=None, **limits) -> dict:
        """Output values: name -> array."""
        return self.run_values(self.bind(inputs), Budget.of(budget, check, **limits))

    def jvp(self, inputs, tangents, *, budget=None, check=None, **limits) -> JVPResult:
        """Forward mode: push input tangents to every output in the values' sweep."""
        return self.run_jvp(self.bind(inputs), tangents, Budget.of(budget, check, **limits))

    def vjp(self, inputs, cotangents, wrt=None, *, budget=None, check=None,
            **limits) -> VJPResult:
        """Reverse mode: pull output cotangents back to the `wrt` inputs."""
        return self.run_vjp(self.bind(inputs), cotangents, wrt,
                            Budget.of(budget, check, **limits))

    def residuals(self, inputs, *, budget=None, check=None, **limits) -> Residuals:
        """The values' half of a VJP: the outputs, and what a later `vjp_from` needs
        (the values the vjps read; the rest reduced to their shapes), with its size."""
        return self.run_residuals(self.bind(inputs), Budget.of(budget, check, **limits))

    def vjp_from(self, residuals: Residuals, cotangents, wrt=None, *, budget=None,
                 check=None, **limits) -> VJPResult:
        """The cotangents' half of a VJP over `residuals` (from this plan's
        `residuals`), which it leaves unchanged: the same as `vjp` on the same inputs."""
        return self.run_vjp(residuals, cotangents, wrt, Budget.of(budget, check, **limits))

    def jacobian(self, inputs, wrt=None, of=None, mode="auto", *, ratio=None, sparsity=None,
                 budget=None, check=None, **limits) -> jacobian.JacobianResult:
        """d(of)/d(wrt) blocks shaped of.shape + wrt.shape, by the mode the planner picks
        (engine/jacobian.py), compressed by the sparsity pattern when that pays
        (`sparsity`: None, "auto", "sparse" or "dense": engine/sparse.py)."""
        return jacobian.jacobian(self, self.bind(inputs), wrt, of, mode, ratio,
                                 Budget.of(budget, check, **limits), sparsity)

    def differentiate(self, inputs, *, wrt=None, of=None, mode="auto", tangents=None,
                      cotangents=None, trace=False, residuals: Residuals | None = None,
                      sparsity=None, budget=None, check=None,
                      **limits) -> request.Differentiation:
        """One differentiation request, whatever it asks for (engine/request.py)."""
        return request.differentiate(self, inputs, wrt=wrt, of=of, mode=mode,
                                     tangents=tangents, cotangents=cotangents, trace=trace,
                                     residuals=residuals, sparsity=sparsity,
                                     budget=Budget.of(budget, check, **limits))

    def hvp(self, inputs, vectors, of=None, wrt=None, *, budget=None, check=None,
            **limits) -> second.HVPResult:
        """Hessian-vector products of the scalar output `of` (engine/second.py)."""
        return second.hvp(self, self.bind(inputs), vectors, of, wrt,
                          Budget.of(budget, check, **limits))

    def hessian(self, inputs, of=None, wrt=None, mode="auto", *, sparsity=None, budget=None,
                check=None, **limits) -> second.HessianResult:
        """The Hessian blocks of the scalar output `of` (engine/second.py), from one HVP
        per color of its sparsity pattern when that pays (`sparsity`: engine/sparse.py)."""
        return second.hessian(self, self.bind(inputs), of, wrt, mode,
                              Budget.of(budget, check, **limits), sparsity)

    def second_order(self, inputs, *, vectors=None, hessian=False, of=None, wrt=None,
                     mode="auto", sparsity=None, budget=None, check=None,
                     **limits) -> second.SecondOrder:
        """One second-order request: Hessian-vector products (`vectors` given) or the
        Hessian blocks (`hessian`), not both (engine/request.py)."""
        return request.second_order(self, inputs, vectors=vectors, hessian=hessian, of=of,
                                    wrt=wrt, mode=mode, sparsity=sparsity,
                                    budget=Budget.of(budget, check, **limits))

    def trace(self, inputs, mode: str, *, tangents=None, cotangents=None, max_elements=None,
              budget=None, check=None, **limits) -> tracing.Trace:
        """Values and, per node and per edge, the derivatives one sweep computes
        (engine/tracing.py); `max_elements` is max_trace_elements."""
        if max_elements is not None:
            limits["max_trace_elements"] = max_elements
        return tracing.trace(self, inputs, mode, tangents=tangents, cotangents=cotangents,
                             budget=Budget.of(budget, check, **limits))


def _heavy(op, shape) -> bool:
    """A step a sweep checks before: a matmul, or a value of _HEAVY_ELEMENTS or more, or of
    a size not known."""
    return (op.name == "matmul" or any(d is None for d in shape)
            or prod(shape) >= _HEAVY_ELEMENTS)


def remember(cache: dict, key, value, limit: int) -> None:
    """Insert into a bounded cache, dropping the oldest entry when full."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)), None)
    cache[key] = value


def _fits(shape, declared) -> bool:
    return len(shape) == len(declared) and all(
        d is None or d == s for s, d in zip(shape, declared))
