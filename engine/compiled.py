"""compile(graph) -> Plan: a validated graph, ready to evaluate and differentiate.

(The mode planner, which picks forward or reverse mode, is engine/planner.py.)

Compiling does all the analysis once: validation, op lookup, attribute binding,
dead-node pruning, each value's last use, and which values the reverse sweep
needs. Running a Plan is then a loop over prepared steps.

Values live in a list of slots (inputs, constants, then nodes). Seeds carry a
leading axis of k directions, so a whole Jacobian is one sweep.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from math import prod
from typing import Mapping, NamedTuple

import numpy as np

from .errors import DifferentiationError, InputError, ResourceLimitError
from .ir import FLOAT_DTYPES, Graph
from . import sparse
from .ops import OPS
from .planner import PlannerDecision, plan_mode, plan_second_order
from .second import (HessianResult, HVPResult, SecondOrder, bind_curvatures,
                     forward_over_reverse)
from .shapes import MAX_SPAN, fill_seed, fmt_shape, span
from .sweeps import (Step, backward_sweep, check_points, forward_sweep, residual_sweep,
                     reverse_sweep, values_sweep)
from .trace import MODES as TRACE_MODES
from .trace import Trace, TraceRecorder
from .validate import infer_shapes, validate

# Per-plan caches are bounded by count and, for arrays, by bytes (PLAN_CACHE_BYTES
# in all), so what a compiled graph may grow to is known when it is cached.
_SPECIALIZATION_CACHE = 64  # distinct input-shape signatures remembered per plan
_ACTIVITY_CACHE = 16  # distinct `wrt` sets whose active steps are remembered per plan
PLAN_CACHE_BYTES = 1 << 20  # identity seeds kept per plan, in all
_ARRAY_OVERHEAD = 1024  # bytes an array takes beyond its data, per op
_TEMPORARIES = 3  # arrays of its output's size an op's rule may hold at once
# What one entry of a plan's caches holds (measured: a dict entry with its shape tuple
# per node, a positions tuple per step, a Jacobian setup's records), for cache_bytes.
_SPECIALIZATION_BYTES = 200
_ACTIVITY_BYTES = 72
_SETUP_BYTES = 4096
_HEAVY_ELEMENTS = 1 << 16  # a value this large is a point where cancellation is checked


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


class _Block(NamedTuple):
    """Where one Jacobian block d(of)/d(wrt) sits in a sweep's result."""

    key: tuple  # (of, wrt)
    slot: int  # the result slot holding it: the output (forward) or the input (reverse)
    start: int  # its first and stop rows among the swept directions
    stop: int
    flat: tuple  # the slot's result as a 2-D (directions, elements) array
    shape: tuple  # of.shape + wrt.shape
    transpose: bool  # forward mode sweeps d(of)/d(wrt) with the wrt axis first
    dtype: np.dtype


class _JacobianSetup(NamedTuple):
    wrt: tuple
    of: tuple
    seed_names: tuple  # the wrt inputs (forward) or the of outputs (reverse)
    offsets: dict  # seed name -> its first direction
    directions: int
    seeds: dict  # slot -> read-only identity seed, filled on first use when small
    decision: PlannerDecision
    blocks: list  # _Block per (of, wrt)
    result_bytes: int
    seed_bytes: int
    largest_block: int  # elements


class JacobianResult(NamedTuple):
    outputs: dict
    jacobian: dict  # (of, wrt) -> array shaped of.shape + wrt.shape
    mode: str
    decision: PlannerDecision


class Differentiation(NamedTuple):
    """Plan.differentiate's answer: what one request asked for, and why that mode."""

    outputs: dict  # every output's value
    jacobian: dict  # Jacobian requests: (of, wrt) -> block shaped of.shape + wrt.shape
    tangents: dict  # JVP requests: output name -> tangent
    cotangents: dict  # VJP requests: input name -> cotangent
    decision: PlannerDecision
    trace: Trace | None = None


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
        self._np_dtypes = {name: np.dtype(d) for name, d in self.dtypes.items()}
        self.static = all(d is not None for n in self.input_names for d in self.shapes[n])

        names = list(self.input_names) + list(graph.constants)
        self.slot = {name: i for i, name in enumerate(names)}
        for node in graph.nodes:
            self.slot[node.name] = len(self.slot)
        self._n_slots = len(self.slot)
        self._template = [None] * self._n_slots
        for name, value in graph.constants.items():
            self._template[self.slot[name]] = value

        live = self._live_nodes(graph)
        self._nodes = [(node, op, attrs) for node, op, attrs, keep
                       in zip(graph.nodes, checked.ops, checked.attrs, live) if keep]
        if check is not None:
            check()
        self._build_steps()
        self._specializations: dict = {}
        self._jacobian_setups: dict = {}
        self._activity: dict = {}
        self._cost_cache: dict = {}  # id(shapes) -> (shapes, _costs(shapes))
        self._patterns: dict = {}  # sparsity analyses (engine/sparse.py), bounded in bytes
        self._curvatures: list | None = None  # per step, bound on the first second-order call

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
        for j, (node, op, attrs) in enumerate(self._nodes):
            ins = tuple(slot[r] for r in node.inputs)
            out = slot[node.name]
            bind = (lambda f: partial(f, **attrs)) if attrs else (lambda f: f)
            steps.append(Step(node.name, op.name, bind(op.eval), bind(op.jvp), bind(op.vjp),
                              ins, out))
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
        for s, j in last_use.items():
            if s in keep or s < first_node_slot:
                continue
            free[j].append(s)
            if s not in needed_backward:
                drop[j].append(s)
        self._steps = [st._replace(free=tuple(f), drop=tuple(d))
                       for st, f, d in zip(steps, free, drop)]
        # A cancelled call is noticed before each heavy op (matmul, or a value of 64K+
        # elements or of a size known only at run time) and at least every 64 ops.
        self._points = check_points([
            op.name == "matmul" or any(d is None for d in self.shapes[node.name])
            or prod(self.shapes[node.name]) >= _HEAVY_ELEMENTS
            for node, op, _ in self._nodes])

    # --- binding run-time values --------------------------------------------------

    def _bind(self, inputs: Mapping[str, np.ndarray]):
        """Check the inputs against the graph; return the slot list and every value's shape."""
        vals = self._template[:]
        if len(inputs) != len(self.input_names) or not self._input_set.issuperset(inputs):
            self._unknown_inputs(inputs)
        for i, name in enumerate(self.input_names):
            value = inputs.get(name)
            if value is None:
                raise InputError("input is missing", node=name, field="inputs")
            if type(value) is not np.ndarray:
                value = np.asarray(value)
            if value.dtype != self._np_dtypes[name]:
                raise InputError(f"expected dtype {self.dtypes[name]}, got {value.dtype}",
                                 node=name, field="dtype")
            declared = self.shapes[name]
            if value.shape != declared and not _fits(value.shape, declared):
                raise InputError(f"expected shape {fmt_shape(declared)}, got "
                                 f"{fmt_shape(value.shape)}", node=name, field="shape")
            vals[i] = value
        if self.static:
            return vals, self.shapes, None
        signature = tuple(v.shape for v in vals[:len(self.input_names)])
        return vals, self._specialize(signature), signature

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
            infer_shapes([n.name for n, _, _ in self._nodes], [op for _, op, _ in self._nodes],
                         [a for _, _, a in self._nodes], [n.inputs for n, _, _ in self._nodes],
                         shapes)
            _remember(self._specializations, signature, shapes, _SPECIALIZATION_CACHE)
        return shapes

    def estimate_bytes(self, shapes, directions: int = 0) -> int:
        """An upper bound, computed before anything runs, of the memory a request takes
        at these shapes: every node's value and its seeds, plus what the one op running
        at a time holds beyond them (up to _TEMPORARIES arrays of its output's size while
        a rule combines terms, and its scratch buffer, e.g. conv's im2col matrix)."""
        values, transient, _ = self._costs(shapes)
        return ((values + transient) * (1 + directions)
                + _ARRAY_OVERHEAD * (len(self._nodes) + 1))

    def estimate_flops(self, shapes, directions: int = 0) -> int:
        """Floating-point operations of the values' sweep at these shapes, plus about
        twice that per seed direction (each direction's jvp or vjp)."""
        return self._costs(shapes)[2] * (1 + 2 * directions)

    def _costs(self, shapes) -> tuple[int, int, int]:
        """(bytes of every value, the largest op's transient bytes, the values' FLOPs) at
        these shapes: one pass over the nodes, remembered per shapes (a Plan's own static
        shapes, or one of its specializations), so a request does not pay it again."""
        known = self._cost_cache.get(id(shapes))
        if known is not None and known[0] is shapes:
            return known[1]
        values = transient = flops = 0
        for node, op, attrs in self._nodes:
            itemsize = self._np_dtypes[node.name].itemsize
            out = shapes[node.name]
            size = prod(out) * itemsize
            values += size
            ins = [shapes[r] for r in node.inputs]
            rule_attrs = {k: v for k, v in attrs.items() if k != "node"}
            scratch = itemsize * op.scratch(ins, **rule_attrs) if op.scratch else 0
            transient = max(transient, _TEMPORARIES * size + scratch)
            flops += (op.flops(ins, out, **rule_attrs) if op.flops is not None
                      else prod(out) + sum(prod(i) for i in ins))
        costs = (values, transient, flops)
        # the shapes are kept with their costs, so their id cannot be reused meanwhile
        _remember(self._cost_cache, id(shapes), (shapes, costs), _SPECIALIZATION_CACHE)
        return costs

    def _check_work(self, shapes, directions, max_flops):
        if max_flops is None:
            return
        need = self.estimate_flops(shapes, directions)
        if need > max_flops:
            raise ResourceLimitError(
                f"the request needs about {need:,} floating-point operations "
                f"({directions} seed directions), over the limit of {max_flops:,} "
                "(max_request_flops)", field="inputs")

    def _check_memory(self, shapes, directions, max_bytes, extra=0):
        if max_bytes is None:
            return
        need = self.estimate_bytes(shapes, directions) + extra
        if need > max_bytes:
            raise ResourceLimitError(
                f"the request needs about {need:,} bytes of intermediates "
                f"({directions} seed directions), over the limit of {max_bytes:,}",
                field="inputs")

    def _nbytes(self, shapes, names, directions: int = 1) -> int:
        return directions * sum(prod(shapes[n]) * self._np_dtypes[n].itemsize for n in names)

    @staticmethod
    def _check_reply(need, max_reply_bytes, what, field):
        if max_reply_bytes is not None and need > max_reply_bytes:
            raise ResourceLimitError(
                f"the reply would hold about {need:,} bytes of {what}, over the limit of "
                f"{max_reply_bytes:,} (max_reply_bytes): ask for fewer or smaller values",
                field=field)

    def _names(self, names, allowed, default, what, field):
        if names is None:
            return default
        names = tuple(names)
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise DifferentiationError(f"names {twice} more than once; name each {what} "
                                       "once", field=field)
        for name in names:
            if name not in allowed:
                if what == "input" and name in self.slot:
                    why = "is not a graph input (only inputs can be differentiated with respect to)"
                elif what == "input":
                    why = "is not a graph input"
                else:
                    why = "is not a graph output"
                raise DifferentiationError(why, node=name, field=field)
            if self.dtypes[name] not in FLOAT_DTYPES:
                raise DifferentiationError(f"has dtype {self.dtypes[name]}; only floating "
                                           f"{what}s have derivatives", node=name, field=field)
        return names

    def _wrt(self, wrt):
        return self._names(wrt, self.input_names, self.float_inputs, "input", "wrt")

    def _of(self, of):
        return self._names(of, self.output_names, self.float_outputs, "output", "of")

    def _seeds(self, seeds, names, shapes, field):
        """Seeds shaped like their value, or with a leading axis of k directions."""
        out, ks, batched = {}, set(), set()
        for name, seed in seeds.items():
            shape, dtype = tuple(shapes[name]), self._np_dtypes[name]
            seed = np.asarray(seed)
            if seed.dtype != dtype:
                raise InputError(f"seed dtype {seed.dtype} does not match the value's "
                                 f"{dtype}", node=name, field=field)
            if seed.shape == shape:
                seed, is_batched = seed[None], False
            elif seed.shape[1:] == shape:
                is_batched = True
            else:
                raise InputError(f"seed shape {fmt_shape(seed.shape)} is neither "
                                 f"{fmt_shape(shape)} nor (k,) + {fmt_shape(shape)}",
                                 node=name, field=field)
            out[self.slot[name]] = seed
            ks.add(seed.shape[0])
            batched.add(is_batched)
        if len(batched) > 1 or len(ks) > 1:
            raise InputError("seeds must all be batched with the same number of directions, "
                             "or all unbatched", field=field)
        return out, (ks.pop() if ks else 1), (batched.pop() if batched else False)

    def _needs(self, wrt):
        """Per step, the input positions that depend on a `wrt` input (cached per set
        of names, _ACTIVITY_CACHE sets at most)."""
        key = frozenset(wrt)
        needs = self._activity.get(key)
        if needs is None:
            active = [False] * self._n_slots
            for name in key:
                active[self.slot[name]] = True
            needs = []
            for st in self._steps:
                positions = tuple(p for p, i in enumerate(st.ins) if active[i])
                active[st.out] = bool(positions)
                needs.append(positions)
            _remember(self._activity, key, needs, _ACTIVITY_CACHE)
        return needs

    def _outputs(self, vals):
        return {name: vals[self.slot[name]] for name in self.output_names}

    # --- public API --------------------------------------------------------------

    # Every method takes, by keyword: `max_bytes`, a limit on the estimated memory of
    # values and seeds; `max_reply_bytes`, on the arrays the answer holds;
    # `max_flops`, on the estimated floating-point operations (each refused with
    # ResourceLimitError before anything runs); and `check`, a callable run between
    # chunks of ops (and between blocks of a large op) that may raise to stop the
    # computation.

    def evaluate(self, inputs, *, max_bytes=None, max_reply_bytes=None, max_flops=None,
                 check=None) -> dict:
        """Output values: name -> array."""
        vals, shapes, _ = self._bind(inputs)
        reply = self._nbytes(shapes, self.output_names)
        self._check_reply(reply, max_reply_bytes, "outputs", "outputs")
        self._check_work(shapes, 0, max_flops)
        self._check_memory(shapes, 0, max_bytes, extra=reply)
        values_sweep(self._steps, vals, check, self._points)
        return self._outputs(vals)

    def jvp(self, inputs, tangents, *, max_bytes=None, max_reply_bytes=None, max_flops=None,
            check=None) -> JVPResult:
        """Forward mode: push input tangents to every output in the values' sweep."""
        vals, shapes, _ = self._bind(inputs)
        self._names(tuple(tangents), self.input_names, (), "input", "tangents")
        seeds, k, batched = self._seeds(tangents, self.input_names, shapes, "tangents")
        reply = self._nbytes(shapes, self.output_names, 1 + k)
        self._check_reply(reply, max_reply_bytes, "outputs and tangents", "tangents")
        self._check_work(shapes, k, max_flops)
        self._check_memory(shapes, k, max_bytes, extra=reply)
        tans = [None] * self._n_slots
        for s, t in seeds.items():
            tans[s] = t
        forward_sweep(self._steps, vals, tans, check, self._points)
        out = {}
        for name in self.output_names:
            t = tans[self.slot[name]]
            shape = tuple(shapes[name])
            if t is None:
                t = np.zeros((k,) + shape, self.dtypes[name])
            t = fill_seed(t, shape)
            out[name] = t if batched else t[0]
        return JVPResult(self._outputs(vals), out)

    def vjp(self, inputs, cotangents, wrt=None, *, max_bytes=None, max_reply_bytes=None,
            max_flops=None, check=None) -> VJPResult:
        """Reverse mode: pull output cotangents back to the `wrt` inputs."""
        vals, shapes, _ = self._bind(inputs)
        wrt, seeds, k, batched = self._vjp_setup(shapes, cotangents, wrt, max_bytes,
                                                 max_reply_bytes, max_flops)
        cots = reverse_sweep(self._steps, vals, seeds, self._needs(wrt), check, self._points)
        return VJPResult(self._outputs(vals), self._cotangents(cots, wrt, shapes, k, batched))

    def _vjp_setup(self, shapes, cotangents, wrt, max_bytes, max_reply_bytes, max_flops):
        """A VJP's names and seeds, checked, and its limits, before any work."""
        self._names(tuple(cotangents), self.output_names, (), "output", "cotangents")
        wrt = self._wrt(wrt)
        seeds, k, batched = self._seeds(cotangents, self.output_names, shapes, "cotangents")
        reply = self._nbytes(shapes, self.output_names) + self._nbytes(shapes, wrt, k)
        self._check_reply(reply, max_reply_bytes, "outputs and cotangents", "cotangents")
        self._check_work(shapes, k, max_flops)
        self._check_memory(shapes, k, max_bytes, extra=reply)
        return wrt, seeds, k, batched

    def _cotangents(self, cots, wrt, shapes, k, batched) -> dict:
        out = {}
        for name in wrt:
            g = cots[self.slot[name]]
            shape = tuple(shapes[name])
            g = np.zeros((k,) + shape, self.dtypes[name]) if g is None else fill_seed(g, shape)
            out[name] = g if batched else g[0]
        return out

    def residuals(self, inputs, *, max_bytes=None, max_reply_bytes=None, max_flops=None,
                  check=None) -> Residuals:
        """The values' half of a VJP: the outputs, and what a later `vjp_from` needs
        (the values the vjps read; the rest reduced to their shapes), with its size."""
        vals, shapes, _ = self._bind(inputs)
        reply = self._nbytes(shapes, self.output_names)
        self._check_reply(reply, max_reply_bytes, "outputs", "outputs")
        self._check_work(shapes, 0, max_flops)
        self._check_memory(shapes, 0, max_bytes, extra=reply)
        residual_sweep(self._steps, vals, check, self._points)
        kept = {id(v): v.nbytes for v in vals if isinstance(v, np.ndarray)}
        return Residuals(self._outputs(vals), vals, shapes, sum(kept.values()))

    def vjp_from(self, residuals: Residuals, cotangents, wrt=None, *, max_bytes=None,
                 max_reply_bytes=None, max_flops=None, check=None) -> VJPResult:
        """The cotangents' half of a VJP over `residuals` (from this plan's
        `residuals`), which it leaves unchanged: the same as `vjp` on the same inputs."""
        shapes = residuals.shapes
        wrt, seeds, k, batched = self._vjp_setup(shapes, cotangents, wrt, max_bytes,
                                                 max_reply_bytes, max_flops)
        cots = backward_sweep(self._steps, residuals.values, seeds, self._needs(wrt), check,
                              self._points)
        return VJPResult(residuals.outputs,
                         self._cotangents(cots, wrt, shapes, k, batched))

    def jacobian(self, inputs, wrt=None, of=None, mode="auto", *, max_bytes=None,
                 max_block_elements=None, max_reply_bytes=None, max_flops=None, ratio=None,
                 check=None, sparsity=None) -> JacobianResult:
        """d(of)/d(wrt) blocks shaped of.shape + wrt.shape, by the mode the planner picks.

        `max_block_elements` refuses (ResourceLimitError) a Jacobian with a larger
        block, before any work; `max_bytes` counts the identity seeds and the result.
        `sparsity` (engine/sparse.py): None or "auto" let the planner compress the sweeps
        by coloring the Jacobian's pattern when that pays ("auto" also returns
        sparse.SparseBlock values when they are smaller), "sparse" compresses and returns
        SparseBlocks whenever a pattern is found, "dense" never looks for one.
        """
        if ratio is None:
            found = sparse.try_jacobian(
                self, inputs, wrt, of, mode, sparsity,
                {"max_bytes": max_bytes, "max_block_elements": max_block_elements,
                 "max_reply_bytes": max_reply_bytes, "max_flops": max_flops, "check": check})
            if isinstance(found, PlannerDecision):
                dense = self.jacobian(inputs, wrt, of, mode, max_bytes=max_bytes,
                                      max_block_elements=max_block_elements,
                                      max_reply_bytes=max_reply_bytes, max_flops=max_flops,
                                      check=check, sparsity="dense")
                return dense._replace(decision=replace(dense.decision, reason=found.reason,
                                                       nnz=found.nnz))
            if found is not None:
                return found
        vals, shapes, signature = self._bind(inputs)
        key = (signature, None if wrt is None else tuple(wrt), None if of is None else tuple(of),
               mode, ratio)
        setup = self._jacobian_setups.get(key)
        if setup is None:
            setup = self._jacobian_setup(shapes, *key[1:])
            _remember(self._jacobian_setups, key, setup, _SPECIALIZATION_CACHE)
        if max_block_elements is not None and setup.largest_block > max_block_elements:
            raise ResourceLimitError(
                f"a Jacobian block would have {setup.largest_block:,} elements, over the "
                f"limit of {max_block_elements:,}: ask for fewer `of`/`wrt` or use JVPs/VJPs",
                field="of")
        reply = self._nbytes(shapes, self.output_names) + setup.result_bytes
        self._check_reply(reply, max_reply_bytes, "outputs and Jacobian blocks", "of")
        d = setup.decision
        directions = d.n if d.mode == "forward" else d.m
        self._check_work(shapes, directions, max_flops)
        self._check_memory(shapes, directions, max_bytes,
                           extra=setup.result_bytes + setup.seed_bytes + reply)
        seeds = setup.seeds or self._identity_seeds(setup, shapes)
        return self._jacobian_blocks(vals, setup, seeds, check)

    def differentiate(self, inputs, *, wrt=None, of=None, mode="auto", tangents=None,
                      cotangents=None, trace=False, max_bytes=None, max_block_elements=None,
                      max_reply_bytes=None, max_trace_elements=None, max_flops=None,
                      residuals: Residuals | None = None, check=None,
                      sparsity=None) -> Differentiation:
        """One differentiation request, whatever it asks for:

        - `tangents` (input name -> seed): a JVP, forward mode by definition;
        - `cotangents` (output name -> seed): a VJP, reverse mode by definition;
        - neither: the Jacobian blocks d(of)/d(wrt) in the mode the planner picks
          (or `mode`, "forward" or "reverse", when given).

        Seeds are shaped like their value or carry a leading axis of k directions.
        With tangents, `wrt` (if given) must name the same inputs; with cotangents,
        `of` the same outputs. The decision always carries the planner's figures.

        `trace` adds a Trace (see Plan.trace) from the tangents (forward), the
        cotangents (reverse), or with neither from a cotangent of 1 on the one
        one-element output `of` (a scalar loss); its size is checked against
        `max_trace_elements` before any work. The limits are as for the other
        methods; `max_reply_bytes` bounds the arrays the answer holds.

        `residuals` (from Plan.residuals on the same inputs) answers a VJP without
        `inputs` and without its forward sweep.
        """
        if residuals is not None:
            return self._differentiate_residuals(inputs, residuals, wrt, of, mode, tangents,
                                                 cotangents, trace, max_bytes, max_reply_bytes,
                                                 max_flops, check)
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
        limits = {"max_bytes": max_bytes, "max_reply_bytes": max_reply_bytes,
                  "max_flops": max_flops, "check": check}
        recipe = None
        if trace:
            recipe = self._trace_recipe(inputs, of, mode, tangents, cotangents,
                                        max_trace_elements)
        if tangents:
            result = self.jvp(inputs, tangents, **limits)
            n = sum(prod(np.shape(inputs[name])) for name in tangents)
            m = sum(a.size for a in result.outputs.values())
            decision = plan_mode(n, m, forced="forward")
            decision = replace(decision, reason="tangents given: a JVP is forward mode")
            answer = Differentiation(result.outputs, {}, result.tangents, {}, decision)
        elif cotangents:
            result = self.vjp(inputs, cotangents, wrt=wrt, **limits)
            n = sum(prod(np.shape(inputs[name])) for name in self._wrt(wrt))
            m = sum(result.outputs[name].size for name in cotangents)
            decision = plan_mode(n, m, forced="reverse")
            decision = replace(decision, reason="cotangents given: a VJP is reverse mode")
            answer = Differentiation(result.outputs, {}, {}, result.cotangents, decision)
        else:
            if not self._wrt(wrt):
                raise DifferentiationError("the graph has no floating inputs to differentiate "
                                           "with respect to", field="wrt")
            if not self._of(of):
                raise DifferentiationError("the graph has no floating outputs to "
                                           "differentiate", field="of")
            result = self.jacobian(inputs, wrt=wrt, of=of, mode=mode,
                                   max_block_elements=max_block_elements, sparsity=sparsity,
                                   **limits)
            answer = Differentiation(result.outputs, result.jacobian, {}, {}, result.decision)
        if recipe is not None:
            trace_mode, seeds = recipe
            answer = answer._replace(trace=self.trace(
                inputs, trace_mode, **seeds, max_elements=max_trace_elements,
                max_bytes=max_bytes, max_flops=max_flops, check=check))
        return answer

    # --- second order (engine/second.py, engine/curvature.py) ---------------------------

    def hvp(self, inputs, vectors, of=None, wrt=None, *, max_bytes=None, max_flops=None,
            max_reply_bytes=None, check=None) -> HVPResult:
        """The value of the scalar output `of`, its gradient and Hessian-vector products
        H v with respect to the `wrt` inputs, forward-over-reverse in one sweep.

        `vectors` has one array per `wrt` input (default: the inputs it names), shaped
        like it or with a leading axis of k directions (the products are batched the
        same way). `of` defaults to the graph's only output; it must have one element.
        """
        vals, shapes, _ = self._bind(inputs)
        out = self._scalar_of(of, shapes)
        if not vectors:
            raise InputError("give a vector for each wrt input", field="vectors")
        for name in vectors:
            if name not in self._input_set:
                raise InputError("is not an input of the graph (inputs: "
                                 + ", ".join(self.input_names) + ")", node=name,
                                 field="vectors")
        if wrt is None:
            wrt = tuple(n for n in self.input_names if n in vectors)
        wrt = self._second_wrt(wrt)
        if set(vectors) != set(wrt):
            raise InputError(f"vectors are given for {sorted(vectors)} but wrt is "
                             f"{list(wrt)}: give one vector for each wrt input",
                             field="vectors")
        seeds, k, batched = self._seeds(vectors, None, shapes, "vectors")
        n = sum(prod(shapes[w]) for w in wrt)
        decision = plan_second_order(n, k)
        reply = (self._nbytes(shapes, self.output_names) + self._nbytes(shapes, wrt)
                 + self._nbytes(shapes, wrt, k))
        self._check_reply(reply, max_reply_bytes, "outputs, gradients and Hessian-vector "
                          "products", "vectors")
        self._second_limits(shapes, wrt, k, reply, max_bytes, max_flops)
        cots, dots = self._second_sweep(vals, shapes, out, wrt, seeds, check)
        hvp = {}
        for name in wrt:
            shape = tuple(shapes[name])
            d = dots[self.slot[name]]
            d = (np.zeros((k,) + shape, self._np_dtypes[name]) if d is None
                 else fill_seed(d, shape).astype(self._np_dtypes[name], copy=False))
            if d.shape[0] != k:
                d = np.broadcast_to(d, (k,) + shape)
            hvp[name] = d if batched else d[0]
        outputs = self._outputs(vals)
        return HVPResult(outputs[out], self._gradient(cots, shapes, wrt), hvp, decision,
                         outputs)

    def hessian(self, inputs, of=None, wrt=None, mode="auto", *, max_bytes=None,
                max_block_elements=None, max_reply_bytes=None, max_flops=None,
                check=None, sparsity=None) -> HessianResult:
        """The value of the scalar output `of`, its gradient and its Hessian blocks
        d2 of / d wrt_a d wrt_b, each shaped wrt_a.shape + wrt_b.shape: n HVPs with
        the identity's columns as vectors, batched in one forward-over-reverse sweep
        (`mode` "auto" or "forward-over-reverse", the only scheme).

        `max_block_elements` refuses (ResourceLimitError) a larger block, before any
        work; `max_bytes` counts the n tangent directions of every value.
        """
        if mode not in ("auto", "forward-over-reverse"):
            raise DifferentiationError(f"unknown second-order mode {mode!r} (auto or "
                                       "forward-over-reverse)", field="mode")
        found = sparse.try_hessian(
            self, inputs, of, wrt, sparsity,
            {"max_bytes": max_bytes, "max_block_elements": max_block_elements,
             "max_reply_bytes": max_reply_bytes, "max_flops": max_flops, "check": check})
        if isinstance(found, PlannerDecision):
            dense = self.hessian(inputs, of, wrt, mode, max_bytes=max_bytes,
                                 max_block_elements=max_block_elements,
                                 max_reply_bytes=max_reply_bytes, max_flops=max_flops,
                                 check=check, sparsity="dense")
            return dense._replace(decision=replace(dense.decision, reason=found.reason,
                                                   nnz=found.nnz))
        if found is not None:
            return found
        vals, shapes, _ = self._bind(inputs)
        out = self._scalar_of(of, shapes)
        wrt = self._second_wrt(wrt)
        sizes = {w: prod(shapes[w]) for w in wrt}
        n = sum(sizes.values())
        for a in wrt:
            for b in wrt:
                shape = tuple(shapes[a]) + tuple(shapes[b])
                if span(shape) > MAX_SPAN:
                    raise ResourceLimitError(f"the Hessian block d2/d{a} d{b} of shape "
                                             f"{fmt_shape(shape)} is too large for an array",
                                             field="wrt")
        largest = max(sizes[a] * sizes[b] for a in wrt for b in wrt)
        if max_block_elements is not None and largest > max_block_elements:
            raise ResourceLimitError(
                f"a Hessian block would have {largest:,} elements, over the limit of "
                f"{max_block_elements:,}: ask for fewer or smaller `wrt` inputs, or use "
                "Hessian-vector products", field="wrt")
        decision = plan_second_order(n, n, what="a full Hessian, the identity's columns "
                                     "as vectors")
        reply = (self._nbytes(shapes, self.output_names) + self._nbytes(shapes, wrt)
                 + self._nbytes(shapes, wrt, n))
        self._check_reply(reply, max_reply_bytes, "outputs, gradients and Hessian blocks",
                          "wrt")
        self._second_limits(shapes, wrt, n, reply, max_bytes, max_flops)
        seeds, at = {}, 0
        for name in wrt:
            size = sizes[name]
            block = np.zeros((n, size), self._np_dtypes[name])
            block[at:at + size] = np.eye(size, dtype=block.dtype)
            seeds[self.slot[name]] = block.reshape((n,) + tuple(shapes[name]))
            at += size
        cots, dots = self._second_sweep(vals, shapes, out, wrt, seeds, check)
        hessian, offsets, at = {}, {}, 0
        for name in wrt:
            offsets[name] = at
            at += sizes[name]
        # Block (a, b) is the Jacobian of the gradient wrt a with respect to b (as
        # torch.autograd.functional.hessian): the tangents of grad_a along b's columns.
        for a in wrt:
            d = dots[self.slot[a]]
            shape_a, dtype = tuple(shapes[a]), self._np_dtypes[a]
            d = (np.zeros((n, sizes[a]), dtype) if d is None
                 else np.broadcast_to(fill_seed(d, shape_a), (n,) + shape_a).reshape(
                     n, sizes[a]))
            for b in wrt:
                columns = d[offsets[b]:offsets[b] + sizes[b]]
                hessian[a, b] = columns.T.astype(dtype).reshape(shape_a + tuple(shapes[b]))
        outputs = self._outputs(vals)
        return HessianResult(outputs[out], self._gradient(cots, shapes, wrt), hessian,
                             decision, outputs)

    def second_order(self, inputs, *, vectors=None, hessian=False, of=None, wrt=None,
                     mode="auto", max_bytes=None, max_block_elements=None,
                     max_reply_bytes=None, max_flops=None, check=None,
                     sparsity=None) -> SecondOrder:
        """One second-order request: Hessian-vector products (`vectors` given) or the
        Hessian blocks (`hessian`), not both; see hvp and hessian."""
        limits = {"max_bytes": max_bytes, "max_reply_bytes": max_reply_bytes,
                  "max_flops": max_flops, "check": check}
        if hessian and vectors:
            raise DifferentiationError("ask for Hessian-vector products (vectors) or the "
                                       "Hessian, not both", field="vectors")
        if hessian:
            r = self.hessian(inputs, of=of, wrt=wrt, mode=mode,
                             max_block_elements=max_block_elements, sparsity=sparsity,
                             **limits)
            return SecondOrder(r.outputs, r.value, r.gradient, {}, r.hessian, r.decision)
        if mode not in ("auto", "forward-over-reverse"):
            raise DifferentiationError(f"unknown second-order mode {mode!r} (auto or "
                                       "forward-over-reverse)", field="mode")
        r = self.hvp(inputs, vectors, of=of, wrt=wrt, **limits)
        return SecondOrder(r.outputs, r.value, r.gradient, r.hvp, {}, r.decision)

    def _scalar_of(self, of, shapes) -> str:
        """The one output a second-order request differentiates: named by `of` (a name
        or a one-name sequence), or the graph's only output; it must have one element."""
        if of is None:
            if len(self.output_names) != 1:
                raise DifferentiationError(
                    f"the graph has {len(self.output_names)} outputs: name the one scalar "
                    "output to differentiate in `of`", field="of")
            of = self.output_names
        elif isinstance(of, str):
            of = (of,)
        of = self._names(tuple(of), self.output_names, (), "output", "of")
        if len(of) != 1:
            raise DifferentiationError(f"second derivatives are of one scalar output; `of` "
                                       f"names {len(of)}", field="of")
        size = prod(shapes[of[0]])
        if size != 1:
            raise DifferentiationError(
                f"has shape {fmt_shape(shapes[of[0]])} ({size} elements); second "
                "derivatives need a one-element output (a scalar loss)", node=of[0],
                field="of")
        return of[0]

    def _second_wrt(self, wrt) -> tuple:
        if isinstance(wrt, str):
            wrt = (wrt,)
        wrt = self._wrt(wrt)
        if not wrt:
            raise DifferentiationError("the graph has no floating inputs to differentiate "
                                       "with respect to", field="wrt")
        return wrt

    def _second_limits(self, shapes, wrt, k, reply, max_bytes, max_flops):
        """Checked before any work: every value kept with its k tangents, and the
        cotangent with its k tangents (2k + 1 directions beside the values), plus the
        vectors and the reply; 3k + 1 rule applications per op (k jvps, k + 1 vjps,
        k curvature terms), within estimate_flops' two per direction."""
        directions = 2 * k + 1
        self._check_work(shapes, directions, max_flops)
        self._check_memory(shapes, directions, max_bytes,
                           extra=reply + self._nbytes(shapes, wrt, k))

    def _second_sweep(self, vals, shapes, out, wrt, seeds, check):
        """The forward-over-reverse sweep (limits already checked)."""
        if self._curvatures is None:
            self._curvatures = bind_curvatures(self._nodes)
        tans = [None] * self._n_slots
        for s, t in seeds.items():
            tans[s] = t
        seed = np.ones((1,) + tuple(shapes[out]), self._np_dtypes[out])
        return forward_over_reverse(self._steps, self._curvatures, vals, tans,
                                    self.slot[out], seed, self._needs(wrt), check,
                                    self._points)

    def _gradient(self, cots, shapes, wrt) -> dict:
        gradient = {}
        for name in wrt:
            shape = tuple(shapes[name])
            g = cots[self.slot[name]]
            gradient[name] = (np.zeros(shape, self._np_dtypes[name]) if g is None
                              else fill_seed(g, shape)[0].astype(self._np_dtypes[name],
                                                                 copy=False))
        return gradient

    def _differentiate_residuals(self, inputs, residuals, wrt, of, mode, tangents,
                                 cotangents, trace, max_bytes, max_reply_bytes, max_flops,
                                 check) -> Differentiation:
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
        result = self.vjp_from(residuals, cotangents, wrt=wrt, max_bytes=max_bytes,
                               max_reply_bytes=max_reply_bytes, max_flops=max_flops,
                               check=check)
        n = sum(prod(residuals.shapes[name]) for name in self._wrt(wrt))
        m = sum(result.outputs[name].size for name in cotangents)
        decision = replace(plan_mode(n, m, forced="reverse"),
                           reason="cotangents given: a VJP is reverse mode (from kept residuals)")
        return Differentiation(result.outputs, {}, {}, result.cotangents, decision)

    def _trace_recipe(self, inputs, of, mode, tangents, cotangents, max_elements):
        """The trace a differentiation request implies (its mode and seeds), its size
        checked before any work."""
        _, shapes, _ = self._bind(inputs)
        forward = bool(tangents) or (not cotangents and mode == "forward")
        if max_elements is not None:
            self._check_trace_size(shapes, forward, max_elements)
        if tangents:
            return "forward", {"tangents": tangents}
        if cotangents:
            return "reverse", {"cotangents": cotangents}
        if mode == "forward":
            raise DifferentiationError("a forward-mode trace needs tangents: give a tangent "
                                       "for each input to trace from", field="tangents")
        of = self._of(of)
        sizes = {o: prod(shapes[o]) for o in of}
        if len(of) != 1 or sizes[of[0]] != 1:
            listed = ", ".join(f"'{o}' ({sizes[o]} elements)" for o in of) or "none"
            raise DifferentiationError(
                "a trace without tangents or cotangents needs one output with one element "
                f"(a scalar loss) to start from; outputs: {listed}. Give cotangents "
                "(reverse) or tangents (forward)", field="cotangents")
        one = np.ones(tuple(shapes[of[0]]), self._np_dtypes[of[0]])
        return "reverse", {"cotangents": {of[0]: one}}

    def trace(self, inputs, mode: str, *, tangents=None, cotangents=None, max_elements=None,
              max_bytes=None, max_flops=None, check=None) -> Trace:
        """Values and, per node and per edge, the derivatives one sweep computes
        (see engine/trace.py).

        `mode` "forward" needs `tangents` (input name -> seed shaped like the input),
        "reverse" needs `cotangents` (output name -> seed shaped like the output);
        seeds are unbatched. `max_elements` refuses (ResourceLimitError, before any
        work) a trace that may hold more array elements than that.
        """
        if mode not in TRACE_MODES:
            raise DifferentiationError(f"unknown trace mode {mode!r} (forward or reverse)",
                                       field="mode")
        forward = mode == "forward"
        given = tangents if forward else cotangents
        field = "tangents" if forward else "cotangents"
        if not given:
            raise DifferentiationError(f"a {mode}-mode trace needs {field}", field=field)
        vals, shapes, _ = self._bind(inputs)
        if forward:
            self._names(tuple(given), self.input_names, (), "input", field)
        else:
            self._names(tuple(given), self.output_names, (), "output", field)
        seeds, _, batched = self._seeds(given, None, shapes, field)
        if batched:
            raise InputError("a trace takes one direction: give seeds shaped like their "
                             "values, without a leading axis of directions", field=field)
        if max_elements is not None:
            self._check_trace_size(shapes, forward, max_elements)
        self._check_work(shapes, 3, max_flops)  # one direction, its partials, its tangents
        self._check_memory(shapes, 1, max_bytes)

        leaves = len(self.input_names) + len(self.graph.constants)
        floating = frozenset(n for n, d in self.dtypes.items() if d in FLOAT_DTYPES)
        recorder = TraceRecorder(mode, list(self.slot), len(self.input_names), vals[:leaves],
                                 floating, lambda op: OPS[op].elementwise)
        if forward:
            tans = [None] * self._n_slots
            for s, t in seeds.items():
                tans[s] = t
            forward_sweep(self._steps, vals, tans, check, self._points, recorder)
            return recorder.finish(tans)
        cots = reverse_sweep(self._steps, vals, seeds, self._floating_edges(), check,
                             self._points, recorder)
        return recorder.finish(cots)

    def _floating_edges(self):
        """Per step, the input positions that carry a derivative: floating inputs of a
        floating node (what a reverse trace pulls cotangents along)."""
        floating = [self.dtypes[name] in FLOAT_DTYPES for name in self.slot]
        return [tuple(p for p, i in enumerate(st.ins) if floating[i]) if floating[st.out]
                else () for st in self._steps]

    def _check_trace_size(self, shapes, forward, max_elements):
        need = self._trace_elements(shapes, forward)
        if need > max_elements:
            raise ResourceLimitError(
                f"the trace would hold up to {need:,} array elements, over the limit of "
                f"{max_elements:,} (max_trace_elements): trace a smaller graph or smaller "
                "inputs", field="trace")

    def _trace_elements(self, shapes, forward) -> int:
        """An upper bound on the elements a trace holds: values, their derivatives, edges."""
        total = 0
        names = list(self.slot)
        for name in names[:len(self.input_names) + len(self.graph.constants)]:
            size = prod(shapes[name])
            total += size * (2 if self.dtypes[name] in FLOAT_DTYPES else 1)
        for st in self._steps:
            size = prod(shapes[st.node])
            total += size
            if self.dtypes[st.node] not in FLOAT_DTYPES:
                continue
            total += size
            if forward:
                total += len(st.ins) * size * (2 if OPS[st.op].elementwise else 1)
            else:
                total += sum(prod(shapes[names[i]]) for i in st.ins)
        return total

    def _jacobian_setup(self, shapes, wrt, of, mode, ratio) -> "_JacobianSetup":
        """Everything about a Jacobian that depends on shapes only: the mode, the
        identity seeds' layout and where each block sits in the swept result."""
        if mode not in ("auto", "forward", "reverse"):
            raise DifferentiationError(f"unknown mode {mode!r} (auto, forward or reverse)",
                                       field="mode")
        wrt, of = self._wrt(wrt), self._of(of)
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
        seed_bytes = sum(total * sizes[x] * self._np_dtypes[x].itemsize for x in seed_names)
        itemsize = max((self._np_dtypes[x].itemsize for x in wrt + of), default=8)
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
                    slot, at, size, flat = self.slot[o], offsets[w], sizes[w], (n, sizes[o])
                else:
                    slot, at, size, flat = self.slot[w], offsets[o], sizes[o], (m, sizes[w])
                blocks.append(_Block((o, w), slot, at, at + size, flat, shape, forward,
                                     self._np_dtypes[o]))
        largest = max((sizes[o] * sizes[w] for o in of for w in wrt), default=0)
        return _JacobianSetup(wrt, of, seed_names, offsets, total, {}, decision, blocks,
                              n * m * itemsize, seed_bytes, largest)

    def _identity_seeds(self, setup, shapes) -> dict:
        """The identity, split into one seed per name, with a leading axis of directions.
        Kept with the setup (read-only, shared by later calls) while the plan's seeds
        stay within PLAN_CACHE_BYTES in all."""
        seeds = {}
        for name in setup.seed_names:
            at, dtype, shape = setup.offsets[name], self._np_dtypes[name], tuple(shapes[name])
            size = prod(shape)
            block = np.zeros((setup.directions, size), dtype)
            block[at:at + size] = np.eye(size, dtype=dtype)
            block.setflags(write=False)
            seeds[self.slot[name]] = block.reshape((setup.directions,) + shape)
        if self.cache_bytes + setup.seed_bytes <= PLAN_CACHE_BYTES:
            setup.seeds.update(seeds)
        return seeds

    @property
    def cache_bytes(self) -> int:
        """About what this plan's caches hold between calls: identity seeds (at most
        PLAN_CACHE_BYTES), shape specializations and activity lists (bounded by count),
        sparsity patterns and colorings (at most sparse.PATTERN_CACHE_BYTES), as counted
        by a graph cache."""
        seeds = sum(s.seed_bytes for s in self._jacobian_setups.values() if s.seeds)
        # the cost cache may keep specializations alive after their eviction: counted too
        shape_dicts = len(self._specializations) + len(self._cost_cache)
        return (seeds + shape_dicts * len(self._nodes) * _SPECIALIZATION_BYTES
                + len(self._activity) * len(self._steps) * _ACTIVITY_BYTES
                + len(self._jacobian_setups) * _SETUP_BYTES
                + sum(a.nbytes for a in self._patterns.values()))

    def _jacobian_blocks(self, vals, setup, seeds, check) -> JacobianResult:
        decision = setup.decision
        if decision.mode == "forward":
            res = [None] * self._n_slots
            for s, t in seeds.items():
                res[s] = t
            forward_sweep(self._steps, vals, res, check, self._points)
        else:
            res = reverse_sweep(self._steps, vals, seeds, self._needs(setup.wrt), check,
                                self._points)
        jacobian = {}
        for b in setup.blocks:
            r = res[b.slot]
            if r is None:
                jacobian[b.key] = np.zeros(b.shape, b.dtype)
                continue
            r = r.reshape(b.flat)
            if b.start or b.stop != b.flat[0]:
                r = r[b.start:b.stop]
            jacobian[b.key] = (r.T if b.transpose else r).reshape(b.shape)
        return JacobianResult(self._outputs(vals), jacobian, decision.mode, decision)


def _remember(cache: dict, key, value, limit: int) -> None:
    """Insert into a bounded cache, dropping the oldest entry when full."""
    if len(cache) >= limit:
        cache.pop(next(iter(cache)), None)
    cache[key] = value


def _same_names(seeds, names, field, names_field):
    if names is not None and set(names) != set(seeds):
        raise DifferentiationError(f"{field} are given for {sorted(seeds)} but {names_field} "
                                   f"is {list(names)}: they must name the same values",
                                   field=field)


def _implies(mode, implied, field):
    if mode not in ("auto", implied):
        raise DifferentiationError(f"{field} imply {implied} mode, but mode is {mode}",
                                   field="mode")


def _fits(shape, declared) -> bool:
    return len(shape) == len(declared) and all(
        d is None or d == s for s, d in zip(shape, declared))
