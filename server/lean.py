"""The lean path: small Evaluate, Differentiate and TrainSteps requests by graph id,
answered on the event loop where they arrive, without the hand-off to a worker thread
and back.

A seed call's own work is ~40 us (parse, cache lookup, engine, reply) against ~130 us
of thread hand-off and ~35 us of the general path's glue (PERF-NOTES.md), so a
request that qualifies is parsed by the generated code, its plan found in the graph
cache, computed, and its reply built by the generated code (the same bytes as the
general path's: deterministic serialization of the same message).

What qualifies: the request is at most LEAN_MAX_BYTES, names a cached graph by id
(an evaluation: with static shapes; a differentiation: its FLOPs estimated at the
inputs' shapes), uses no field but those of a plain evaluation or differentiation
(no trace, residuals, second order, store_results or inline graph; a
differentiation's tensors may be stored ones, looked up as the general path looks
them up), and its estimated time is within the server's inline budget (TimeModel).
Anything else, and every request that fails
on the way (bad bytes, unknown graph, a bad tensor, an engine error), is answered by
the general path in a worker: so errors are the general path's, by construction, and
the request's outcome (metrics, request log, cache lookup) is recorded once, by the
path that answered it.

The budget bounds how long the event loop (and so health checks and every other
call's I/O) can be held by one request; it is an estimate of time, not of FLOPs:
a 2,000-op scalar chain has few FLOPs and takes milliseconds of per-op Python.
The default, 2 ms, takes medium requests too (a transformer encoder layer's gradient
at batch 16 x 7, parameters stored: estimated 1.7 ms, ~0.8-1 ms of engine), where
the hand-off to a worker cost ~200 us of server CPU and wall time a call; a request
computing in a worker already delays health checks by 4-13 ms (the GIL,
PERF-NOTES.md), so a loop held up to 2 ms is within what health sees anyway.

A Jacobian request (no seeds) of a form answered here before (same graph id, `wrt`,
`of` and mode) is answered by its sweep alone: the engine remembers the request as
planned and admitted (engine.request.repeat), and the reply's bytes are those of the
first answer with the new arrays' bytes in place of the old ones (`ReplyTemplate`,
checked against the generated serialization when made). Its estimate of time, its
checks and its decision are those of the first answer: none of them depends on
anything else.

A Differentiate request with seeds or stored tensors that goes to a worker (over the
budget: a ResNet's gradient, ~5 ms of engine) is answered there by the same code and
templates (`answer_in_worker`, under the call's cancellation): its first request of a
form the long way, the next ones read from their bytes and filled into the reply's
template, without the general path's parse and reply (~0.3 ms a call). Such a form's
templates are marked as over the budget, and the event loop sends its requests on to a
worker at once. Any failure there, too, leaves the request to the general path.

A TrainSteps call (by graph id: on a stored state, or on the parameters it carries) is
run by the general path's own code (server.training, TrainState.call), with a gate
before its minibatches are gathered: its estimated time (TimeModel.train_us: K steps
of the plan's nodes, parameters and FLOPs at the steps' shapes, an evaluation, the
rows gathered) over the budget, or its state locked by a call in a worker (never
waited for on the loop), and a worker answers it. The reply is serialized as the
general path serializes it, so its bytes are the same; exactly once, versions, the
store's bounds and max_request_flops are the same code's.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, replace
from math import prod
from typing import NamedTuple

import numpy as np
from prometheus_client import Counter as Metric

from gradserve.engine import Budget
from gradserve.engine.costs import LOOP_FLOPS, op_cost
from gradserve.engine.request import repeat
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import array_from, fill_tensor, fill_tensors
from gradserve.v1.modes import WIRE_MODES, mode_name
from gradserve.v1.tensor_wire import _varint_bytes, decode
from gradserve.v1.tensor_wire import read_varint as _varint

from .blas import blas_threads
from .convert import fill_decision
from .errors import stop_when_ended
from .training import Declined
from .wire import wire_counter

# Larger requests go to a worker (tensor_wire reads them without copies there); the
# generated code's copies of 64 KiB cost a few microseconds.
LEAN_MAX_BYTES = 65536
DEFAULT_INLINE_BUDGET_US = 2000.0
_PLANNERS_KEPT = 1024  # planner decisions kept as messages (then forgotten, all at once)
# Reply templates (ReplyTemplate), by request form: at most this many and these many bytes
# in all (then forgotten, all at once); a larger one is not kept.
_TEMPLATES_KEPT = 1024
_TEMPLATE_BYTES = 4 << 20
_TEMPLATE_MAX_BYTES = 64 << 10
_PREFIX_BYTES = 64  # request bytes a RequestTemplate is looked up by (a graph id's, mostly)
_FORMS_PER_PREFIX = 8  # RequestTemplates kept per prefix (the oldest dropped)
# Differentiate requests found over the budget, by their first _PREFIX_BYTES (the graph id
# and the first input's shape, mostly) and length: the next of the same goes to a worker
# at once (a 50 KB ResNet request took ~90 us on the loop to be found over it again). A
# request that matches but would fit only misses the loop, never gets a wrong answer.
_OVER_BUDGET_KEPT = 1024  # (then forgotten, all at once)

# The fields a lean request may set; any other (trace, residuals, second_order,
# keep_residuals, an inline graph, fields added later) sends it to the general path.
_EVALUATE_FIELDS = frozenset({"graph_id", "inputs"})
_DIFFERENTIATE_FIELDS = frozenset({"graph_id", "inputs", "wrt", "of", "mode", "tangents",
                                   "cotangents", "request_id", "stored_inputs",
                                   "stored_tangents", "stored_cotangents"})
_JACOBIAN_FIELDS = frozenset({"graph_id", "inputs", "wrt", "of", "mode", "request_id"})
# Ops whose FLOPs are a BLAS product's (TimeModel.dense_mflop_us), far cheaper per FLOP
# than an elementwise op's.
DENSE_OPS = frozenset({"matmul"})
# What BLAS's rate leaves out of a matrix product's time (measured at one BLAS thread:
# a stack of 1x1, 2x2 and 4x4 products 4, 30 and 45 ns a product; (4096, 1) @ (1, 1)
# 2.4 ns an output element, (1, 1) @ (1, 4096) 1.6; the same calls ran up to 1.6x
# slower minutes later on the shared box): ~115 ns a product and ~5 ns an output
# element of a product with an inner dimension under DENSE_MIN_DIM, in FLOPs at the
# other ops' rate (TimeModel.mflop_us, 0.6 ns a FLOP).
DENSE_MIN_DIM = 32
SMALL_PRODUCT = 192
SMALL_OUTPUT = 8
_STEP_COSTS_KEPT = 1024  # (plan, shapes) -> a training step's FLOPs, then forgotten at once


@dataclass(frozen=True)
class TimeModel:
    """Estimated microseconds of a lean request (parse, engine, reply) from the graph's
    node count and the FLOPs of its shapes (seed directions included):
    fixed + per node * nodes + per MFLOP * MFLOPs, a differentiation's per-node cost
    covering both its sweeps. Fitted with `bench/bench_server_model.py --calibrate`
    (scalar chains of 4-2,000 nodes, short chains of 100-100,000 elements) on the
    shared 2-core machine in two runs, load average 3.7 and 4.3: fixed 30-34 us
    (evaluate) and 61-112 us (differentiate), 0.65-1.6 and 3.2-7.5 us per node,
    100-185 us per MFLOP. The constants are the slower run's, rounded up: a short
    estimate holds the loop longer than the budget says, a long one only costs a
    hand-off.

    TrainSteps (train_us) adds a call's fixed cost (parse, store, checks, reply), each
    step's per node (both sweeps) and per parameter (its update), the FLOPs of
    DENSE_OPS at their own rate and the bytes gathered from a stored data set's rows.
    Fitted with `bench/bench_train.py --calibrate` (MLPs of 10-19 nodes, widths
    16-512, batches of 1-256, 1-16 steps a call; one BLAS thread) in two runs, load
    average 3.1 and 3.4: fixed 133-146 us, 2.1-8.7 us per node and 3.7-16.4 per
    parameter a step (the two trade off), 3.3-4.2 us per dense MFLOP; rounded up, the
    dense rate 2.5x (it moves most with the BLAS kernel and the matrices' sizes). It
    holds for one BLAS thread, as `gradserve serve` runs by default (`for_blas`): with
    more, a small product waits on BLAS's helper threads, descheduled on a busy machine
    (a 64-wide MLP step at batch 64 took 0.9-1.4 ms with two against 0.33-0.35 with
    one), and dense FLOPs are costed as any other.

    A differentiation's dense FLOPs (differentiate_dense_mflop_us) go through the
    general sweeps, not a training call's compiled one: a (256, 64) @ (64, 64) layer's
    VJP ran at 14 us per MFLOP (Plan.vjp, one BLAS thread, load ~2); rounded up. Small
    products carry more than their FLOPs (_products, measured by
    tests/server/test_lean_path.py against the engine's CPU time)."""

    fixed_us: float = 60.0
    evaluate_node_us: float = 1.6
    differentiate_node_us: float = 7.5
    mflop_us: float = 600.0
    train_fixed_us: float = 150.0
    step_node_us: float = 9.0
    step_parameter_us: float = 16.0
    dense_mflop_us: float = 10.0
    differentiate_dense_mflop_us: float = 20.0
    gather_mb_us: float = 500.0

    def for_blas(self, threads: int | None) -> "TimeModel":
        """This model for BLAS running `threads` threads (None: unknown)."""
        return self if threads == 1 else replace(self, dense_mflop_us=self.mflop_us,
                                                 differentiate_dense_mflop_us=self.mflop_us)

    def evaluate_us(self, nodes: int, flops: int) -> float:
        return self.fixed_us + self.evaluate_node_us * nodes + self.mflop_us * flops * 1e-6

    def differentiate_us(self, nodes: int, flops: int, dense_flops: int = 0) -> float:
        """`flops` those of other ops, `dense_flops` those of DENSE_OPS."""
        return (self.fixed_us + self.differentiate_node_us * nodes
                + (self.mflop_us * flops + self.differentiate_dense_mflop_us * dense_flops)
                * 1e-6)

    def train_us(self, nodes: int, parameters: int, steps: int, flops: int = 0,
                 dense_flops: int = 0, evaluated: bool = False, gathered: int = 0) -> float:
        """A TrainSteps call of `steps` steps (a differentiation and an update of each
        parameter each) and, if `evaluated`, an evaluation after them; `flops` and
        `dense_flops` (of DENSE_OPS) those of all its sweeps, `gathered` the bytes of
        its minibatches taken from a stored data set's rows."""
        return (self.train_fixed_us
                + steps * (self.step_node_us * nodes + self.step_parameter_us * parameters)
                + (self.evaluate_node_us * nodes if evaluated else 0.0)
                + (self.mflop_us * flops + self.dense_mflop_us * dense_flops
                   + self.gather_mb_us * gathered) * 1e-6)


class LeanPath:
    """Answers qualifying requests inline (see the module's docstring); `counts` says
    how many were answered inline ("inline"), how many went to a worker over the time
    budget ("over_budget") or past their deadline ("expired"), how many a worker
    answered by this code (answer_in_worker: "worker"), also as the
    gradserve_lean_requests metric; `templated` how many of these a ReplyTemplate
    answered."""

    def __init__(self, servicer, budget_us: float = DEFAULT_INLINE_BUDGET_US,
                 model: TimeModel | None = None):
        self.servicer = servicer
        self.budget_us = budget_us
        self.model = model or TimeModel().for_blas(blas_threads())
        self.counts: Counter[str] = Counter()
        self._answer = {"Evaluate": self._evaluate, "Differentiate": self._differentiate,
                        "TrainSteps": self._train_steps}
        limits = servicer.limits
        self._max_elements = limits.max_tensor_elements
        self._counters = {t: wire_counter(t, limits)
                          for t in (pb.EvaluateRequest, pb.DifferentiateRequest)}
        self._train_counter = wire_counter(pb.TrainStepsRequest, limits)
        self._metric = Metric("gradserve_lean_requests",
                              "small requests answered on the event loop (inline), or sent "
                              "to a worker over the time budget (over_budget) or past "
                              "their deadline (expired), or answered in a worker by the "
                              "same code and templates (worker)",
                              ["path"], registry=servicer.telemetry.registry)
        self._children: dict = {}
        self._planners: dict = {}  # engine.PlannerDecision -> its message
        # What the engine is asked to spend, as a Budget (the same for every request)
        self._limits = {**servicer._run_limits, "max_block_elements": limits.max_tensor_elements,
                        "max_trace_elements": limits.max_trace_elements or None}
        self._budget = Budget.of(None, None, **self._limits)
        # (graph_id, wrt, of, wire mode) -> ReplyTemplate of a Jacobian request answered here
        self._templates: dict = {}
        # the first _PREFIX_BYTES of a request's bytes -> RequestTemplates of its forms
        self._requests: dict = {}
        self._template_bytes = 0
        self._seeded_kept = 0  # seeded forms' templates made (kept in _requests only)
        self.templated = 0
        self._step_costs: dict = {}  # (id(plan), id(shapes)) -> (plan, shapes, FLOPs)
        self._train_estimates: dict = {}  # see _train_gate
        self._over_budget: set = set()  # see _OVER_BUDGET_KEPT
        # the same, of requests answer_in_worker leaves to the general path (a Jacobian
        # request's form, fields the lean path does not take)
        self._not_in_worker: set = set()
        # Templates are kept from the event loop and from workers (answer_in_worker)
        self._keeping = threading.RLock()

    def answer(self, method: str, data, started: float,
               time_remaining: float | None = None) -> bytes | None:
        """The reply's bytes if the lean path answered the request, else None (the
        general path answers it). A call whose deadline has passed (`time_remaining`
        0) is left to the general path, where grpc's cancellation ends it."""
        answer = self._answer.get(method)
        if answer is None or not isinstance(data, bytes) or len(data) > LEAN_MAX_BYTES:
            return None
        if time_remaining is not None and time_remaining <= 0:
            self._count("expired")
            return None
        try:
            return answer(method, data, started)
        except Exception:  # noqa: BLE001 - the general path answers, with its own error
            return None

    def answer_in_worker(self, method: str, data, started: float, call) -> bytes | None:
        """In a worker: the reply's bytes to a Differentiate request with seeds or stored
        tensors that went to a worker (over the inline budget, mostly), by the lean path's
        code and templates, under the call's cancellation (`call`: server.calls.CallState),
        or None: the general path answers it, and says why if it fails. The first request
        of a form is parsed and answered the long way and its templates kept, marked for
        a worker when its estimate is over the budget (the event loop then sends the next
        of its form to a worker at once); the next ones are read from their bytes and
        answered by the reply's template, as on the event loop."""
        if method != "Differentiate" or not isinstance(data, bytes) \
                or len(data) > LEAN_MAX_BYTES:
            return None
        try:
            return self._differentiate(method, data, started,
                                       Budget.of(self._budget, stop_when_ended(call)))
        except Exception:  # noqa: BLE001 - the general path answers, with its own error
            return None

    def _count(self, path: str) -> None:
        self.counts[path] += 1
        child = self._children.get(path)
        if child is None:  # labels() takes a lock and a lookup: once per path
            child = self._children[path] = self._metric.labels(path)
        self.servicer.telemetry.count(child)  # (counted with the requests: Telemetry.record)

    def _plan(self, request_type, data, fields, static=True):
        """(request, the names of its fields set, plan) if the request qualifies so far,
        else None; bytes that do not parse raise DecodeError (the general path says why).
        `static`: only a plan with static shapes qualifies."""
        self._counters[request_type].check(data)
        request = request_type.FromString(data)
        present = {field.name for field, _ in request.ListFields()}
        if not present <= fields or "graph_id" not in present:
            return None
        plan = self.servicer.registry.cache.peek(request.graph_id)
        if plan is None or (static and not plan.static):
            return None
        return request, present, plan

    def _arrays(self, request, present, field: str) -> dict:
        """A map of tensors as arrays, checked and named as the general path's codec
        names them (an error sends the request to the general path, which says it)."""
        if field not in present:
            return {}
        limit = self._max_elements
        return {key: array_from(t.dtype, tuple(t.shape), t.data, f"{field}['{key}']", limit)
                for key, t in getattr(request, field).items()}

    def _tensors(self, request, present, field: str, arrays: dict | None = None) -> dict:
        """_arrays (or `arrays`, read already) with the stored tensors its stored_<field>
        names, as the general path reads them (servicer._stored: a lost handle or a key
        given twice raises, and the general path answers with its error)."""
        if arrays is None:
            arrays = self._arrays(request, present, field)
        stored = "stored_" + field
        if stored not in present:
            return arrays
        return self.servicer.store.tensors(getattr(request, stored), stored, arrays)

    def _within_budget(self, estimate_us: float) -> bool:
        if estimate_us > self.budget_us:
            self._count("over_budget")
            return False
        return True

    def _evaluate(self, method: str, data: bytes, started: float) -> bytes | None:
        found = self._plan(pb.EvaluateRequest, data, _EVALUATE_FIELDS)
        if found is None:
            return None
        request, present, plan = found
        graph_id = request.graph_id
        servicer = self.servicer
        model, nodes = self.model, len(plan.graph.nodes)
        # the node count first: FLOPs take a pass over the nodes (once per plan)
        if not (self._within_budget(model.evaluate_us(nodes, 0))
                and self._within_budget(model.evaluate_us(nodes,
                                                          plan.estimate_flops(plan.shapes)))):
            return None
        outputs = plan.evaluate(self._arrays(request, present, "inputs"), check=None,
                                **servicer._run_limits)
        reply = pb.EvaluateResponse(graph_id=graph_id)
        fill_tensors(reply.outputs, outputs)
        return self._answered(method, started, request, None, graph_id,
                              reply.SerializeToString(deterministic=True))

    def _differentiate(self, method: str, data: bytes, started: float,
                       budget: Budget | None = None) -> bytes | None:
        """On the event loop (`budget` None: the lean path's own, no cancellation) or in
        a worker (`budget` with the call's cancellation: answer_in_worker, seeded forms
        only, whatever their estimate)."""
        in_worker = budget is not None
        for known in tuple(self._requests.get(data[:_PREFIX_BYTES], ())):
            seeded = known.seeded
            if not in_worker and seeded is not None and not seeded.inline:
                if known.same(data):  # (its arrays are read in the worker, not here)
                    self._count("over_budget")
                    return None
                continue
            found = known.match(data)
            if found is not None:
                if seeded is None:
                    if in_worker:
                        break
                    reply = self._repeat(method, started, known, *found)
                else:
                    reply = self._repeat_seeded(method, started, known, *found, budget)
                if reply is not None:
                    return reply
                break
        seen = (data[:_PREFIX_BYTES], len(data))
        if seen in (self._not_in_worker if in_worker else self._over_budget):
            if not in_worker:
                self._count("over_budget")
            return None
        found = self._plan(pb.DifferentiateRequest, data, _DIFFERENTIATE_FIELDS, static=False)
        if found is None:
            if in_worker:
                self._remember(self._not_in_worker, seen)
            return None
        request, present, plan = found
        graph_id = request.graph_id
        mode = mode_name(request.mode)
        if mode is None:
            return None
        form = template = None
        if plan.static and present <= _JACOBIAN_FIELDS:  # a Jacobian request: by a template?
            if in_worker:
                self._remember(self._not_in_worker, seen)
                return None
            form = (graph_id, tuple(request.wrt) or None, tuple(request.of) or None,
                    request.mode)
            template = self._templates.get(form)
            if template is not None:
                arrays = self._arrays(request, present, "inputs")
                answer = repeat(plan, arrays, wrt=form[1], of=form[2], mode=mode,
                                budget=self._budget)
                if answer is not None:
                    reply = template.fill({"outputs": answer.outputs,
                                           "jacobian": answer.jacobian},
                                          request.request_id.encode())
                    if reply is not None:
                        self.templated += 1
                        # (by its bytes next time: a request id of a new length, say)
                        self._keep_request(RequestTemplate.of(data, {"inputs": arrays}, form,
                                                              template), data)
                        return self._answered(method, started, request, answer.decision.mode,
                                              graph_id, reply)
                    template = None  # it no longer fits: made again below
        model, nodes = self.model, len(plan.graph.nodes)
        # the node count first: FLOPs take a pass over the nodes (once per shapes)
        inline = model.differentiate_us(nodes, 0) <= self.budget_us
        if not (inline or in_worker):
            self._count("over_budget")
            self._remember(self._over_budget, seen)
            return None
        given = {field: self._arrays(request, present, field)
                 for field in ("inputs", "tangents", "cotangents")}
        tensors = {field: self._tensors(request, present, field, given[field])
                   for field in given}
        inputs, tangents, cotangents = (tensors["inputs"], tensors["tangents"],
                                        tensors["cotangents"])
        # (a plan with dynamic shapes: its FLOPs at the inputs' shapes; an input that does
        # not bind raises, and the general path says why)
        if inline:
            shapes = plan.shapes if plan.static else plan.bind(inputs).shapes
            directions = _directions(plan, shapes, request, present, tangents or cotangents)
            inline = self._differentiate_us(plan, shapes, directions) <= self.budget_us
            if not (inline or in_worker):
                self._count("over_budget")
                self._remember(self._over_budget, seen)
                return None
        wrt = tuple(request.wrt) if "wrt" in present else None
        of = tuple(request.of) if "of" in present else None
        with self._blas(budget, plan, inputs):
            result = plan.differentiate(inputs, wrt=wrt, of=of, mode=mode, tangents=tangents,
                                        cotangents=cotangents, trace=False, residuals=None,
                                        budget=self._budget if budget is None else budget)
        decision = result.decision
        reply_data = self._reply(graph_id, request.request_id, result)
        # (kept once per form: a form the engine does not repeat keeps its first one)
        if decision.sparsity != "sparse":
            if form is not None and template is None and result.jacobian:
                self._keep_template(form, data, {"inputs": inputs}, reply_data, result,
                                    request.request_id.encode())
            elif form is None:
                # a request with seeds or stored tensors: by its bytes next time, its
                # stored tensors looked up again (SeededForm)
                stored = {field: {key: StoredRef(ref.handle, ref.name) for key, ref in
                                  getattr(request, "stored_" + field).items()}
                          for field in given if "stored_" + field in present}
                seeded = SeededForm(stored, _stored_signature(stored, tensors), decision,
                                    inline)
                self._keep_template((graph_id, wrt, of, request.mode, "seeded"), data, given,
                                    reply_data, result, request.request_id.encode(), seeded)
        return self._answered(method, started, request, decision.mode, graph_id, reply_data,
                              "worker" if in_worker else "inline")

    def _blas(self, budget: Budget | None, plan, inputs):
        """In a worker (`budget` given), the BLAS width the general path would give the
        request (server.blas); on the event loop, one thread as ever."""
        return nullcontext() if budget is None else self.servicer.blas_for(plan, inputs, 1)

    def _reply(self, graph_id: str, request_id: str, result) -> bytes:
        """The reply's bytes, by the generated code (deterministic serialization)."""
        decision = result.decision
        reply = pb.DifferentiateResponse(graph_id=graph_id, request_id=request_id,
                                         mode=WIRE_MODES[decision.mode],
                                         planner=self._planner(decision))
        for name in ("outputs", "tangents", "cotangents"):
            arrays = getattr(result, name)
            if arrays:
                fill_tensors(getattr(reply, name), arrays)
        for (of, wrt), block in (result.jacobian or {}).items():
            fill_tensor(reply.jacobian.add(of=of, wrt=wrt).value, block, "jacobian")
        return reply.SerializeToString(deterministic=True)

    @staticmethod
    def _remember(requests: set, seen) -> None:
        if len(requests) >= _OVER_BUDGET_KEPT:
            requests.clear()
        requests.add(seen)

    def _keep_template(self, form, data: bytes, tensors: dict, reply_data: bytes, result,
                       request_id: bytes, seeded: "SeededForm | None" = None) -> None:
        with self._keeping:
            self._keep_template_locked(form, data, tensors, reply_data, result, request_id,
                                       seeded)

    def _keep_template_locked(self, form, data, tensors, reply_data, result, request_id,
                              seeded) -> None:
        """Keep the reply's template for the next requests of its form, if it gives back
        the reply's own bytes (see ReplyTemplate), and the request's (RequestTemplate;
        `tensors` the arrays read from its bytes, by field). A Jacobian request's reply
        template is also kept by form (its request's bytes may differ next time); a
        seeded one's only with its request's."""
        answer = _answer(result)
        template = ReplyTemplate.of(reply_data, answer)
        if template is None or template.nbytes > _TEMPLATE_MAX_BYTES or template.fill(
                answer, request_id) != reply_data:
            return
        known = RequestTemplate.of(data, tensors, form, template, seeded)
        if known is None and seeded is not None:
            return
        size = template.nbytes + (known.nbytes if known is not None else 0)
        if (len(self._templates) + self._seeded_kept >= _TEMPLATES_KEPT
                or self._template_bytes + size > _TEMPLATE_BYTES):
            self._templates.clear()
            self._requests.clear()
            self._template_bytes = self._seeded_kept = 0
        if seeded is None:
            self._templates[form] = template
        else:
            self._seeded_kept += 1
        self._template_bytes += size
        if known is not None:
            self._keep_request(known, data, counted=True)

    def _keep_request(self, known: "RequestTemplate | None", data: bytes,
                      counted: bool = False) -> None:
        """Keep a RequestTemplate of `data` (replacing its form's), its bytes counted
        among the templates' unless `counted` already."""
        if known is None:
            return
        with self._keeping:
            self._keep_request_locked(known, data, counted)

    def _keep_request_locked(self, known, data, counted) -> None:
        same = self._requests.setdefault(data[:_PREFIX_BYTES], [])
        kept = [t for t in same if t.form != known.form][-(_FORMS_PER_PREFIX - 1):]
        freed = sum(t.nbytes for t in same) - sum(t.nbytes for t in kept)
        if not counted:
            if self._template_bytes - freed + known.nbytes > _TEMPLATE_BYTES:
                return
            self._template_bytes += known.nbytes
        self._template_bytes -= freed
        same[:] = kept + [known]

    def _repeat(self, method, started, known: "RequestTemplate", tensors: dict,
                request_id: bytes) -> bytes | None:
        """The reply to a Jacobian request matching `known` (RequestTemplate), or None
        (the request is parsed and answered as any other)."""
        graph_id, wrt, of, wire_mode = known.form
        plan = self.servicer.registry.cache.peek(graph_id)
        if plan is None:
            return None
        answer = repeat(plan, tensors["inputs"], wrt=wrt, of=of, mode=mode_name(wire_mode),
                        budget=self._budget)
        if answer is None:
            return None
        reply = known.reply.fill({"outputs": answer.outputs, "jacobian": answer.jacobian},
                                 request_id)
        if reply is None:
            return None
        self.templated += 1
        return self._answered(method, started, known, answer.decision.mode, graph_id, reply)

    def _repeat_seeded(self, method, started, known: "RequestTemplate", tensors: dict,
                       request_id: bytes, budget: Budget | None = None) -> bytes | None:
        """The reply to a request with seeds or stored tensors matching `known`, or None
        (the request is parsed and answered as any other). Its stored tensors are looked
        up as the first request's were (a lost handle raises: the general path answers
        with its error); while they have the same shapes and dtypes, its estimate is the
        first request's (within the budget) and so is its decision."""
        graph_id, wrt, of, wire_mode, _ = known.form
        plan = self.servicer.registry.cache.peek(graph_id)
        if plan is None:
            return None
        seeded = known.seeded
        store = self.servicer.store
        for field, refs in seeded.stored.items():
            tensors[field] = store.tensors(refs, "stored_" + field, tensors[field])
        if _stored_signature(seeded.stored, tensors) != seeded.signature:
            return None
        with self._blas(budget, plan, tensors["inputs"]):
            result = plan.differentiate(tensors["inputs"], wrt=wrt, of=of,
                                        mode=mode_name(wire_mode), tangents=tensors["tangents"],
                                        cotangents=tensors["cotangents"], trace=False,
                                        residuals=None,
                                        budget=self._budget if budget is None else budget)
        same = result.decision is seeded.decision or result.decision == seeded.decision
        reply = known.reply.fill(_answer(result), request_id) if same else None
        if reply is None:  # (not expected: the same shapes make the same decision)
            reply = self._reply(graph_id, request_id.decode(), result)
        else:
            self.templated += 1
        return self._answered(method, started, known, result.decision.mode, graph_id, reply,
                              "inline" if budget is None else "worker")

    def _train_steps(self, method: str, data: bytes, started: float) -> bytes | None:
        """A TrainSteps call by graph id, run by the general path's own code (TrainState
        .call) with _train_gate before its minibatches are gathered."""
        servicer = self.servicer
        self._train_counter.check(data)
        request = pb.TrainStepsRequest.FromString(data)
        if request.parameters or request.velocity or request.batches:
            # tensors: read as the general path reads them (views of the bytes, checked)
            request = decode(pb.TrainStepsRequest, data, self._max_elements)
        if request.WhichOneof("graph_ref") != "graph_id":
            return None
        graph_id = request.graph_id
        plan = servicer.registry.cache.peek(graph_id)
        if plan is None:
            return None
        # the steps' node count first: before a state, data set or shape is looked at
        steps = (len(request.batch_sizes) if request.data else
                 max((len(b) for b in request.batches.values() if np.ndim(b)), default=1))
        if not self._within_budget(self.model.train_us(len(plan.graph.nodes), 0, steps)):
            return None
        try:
            reply = servicer.training.call(request, graph_id, plan, None, servicer._run_limits,
                                           gate=self._train_gate)
        except Declined:
            return None
        return self._answered(method, started, request, None, graph_id,
                              reply.SerializeToString())

    def _train_gate(self, plan, parameters: dict, request) -> None:
        """TrainState.call's gate: Declined when the call's estimated time is over the
        budget. On a stored state stepping by rows of a stored data set the estimate is
        remembered by the handles and batch sizes it depends on (what a handle holds
        never changes shape)."""
        if request.state and request.data and not (request.batches or request.stored_batches):
            key = (id(plan), request.state, request.data, tuple(request.batch_sizes),
                   request.evaluate_data)
            known = self._train_estimates.get(key)
            if known is not None and known[0] is plan:
                estimate = known[1]
            else:
                estimate = self.train_estimate(plan, parameters, request)
                if len(self._train_estimates) >= _STEP_COSTS_KEPT:
                    self._train_estimates.clear()
                self._train_estimates[key] = (plan, estimate)
        else:
            estimate = self.train_estimate(plan, parameters, request)
        if not self._within_budget(estimate):
            raise Declined("over the inline time budget")

    def train_estimate(self, plan, parameters: dict, request) -> float:
        """TimeModel.train_us of a TrainSteps request on these parameters (the counts
        alone, if they are over the budget already)."""
        model, nodes = self.model, len(plan.graph.nodes)
        forms = self.servicer.training.batch_shapes(request)
        steps = sum(count for count, _ in forms)
        count = len(parameters)
        estimate = model.train_us(nodes, count, steps)
        if estimate > self.budget_us:  # (before any FLOPs are counted)
            return estimate
        flops = dense = gathered = 0
        for k, inputs in forms:
            shapes = plan.bind({**parameters, **_placeholders(inputs)}).shapes
            f, d = self._step_flops(plan, shapes)
            flops, dense = flops + k * f, dense + k * d
            if request.data:
                gathered += k * sum(prod(shape) * dtype.itemsize
                                    for shape, dtype in inputs.values())
        evaluated = bool(request.evaluate_data)
        if evaluated:
            data = self.servicer.store.entry(request.evaluate_data, "evaluate_data").tensors
            shapes = plan.bind({**data, **parameters}).shapes
            d, small = _products(plan, shapes, ("values",))
            flops, dense = flops + plan.estimate_flops(shapes) - d + small, dense + d
        return model.train_us(nodes, count, steps, flops, dense, evaluated, gathered)

    def _differentiate_us(self, plan, shapes, directions: int) -> float:
        """TimeModel.differentiate_us of a differentiation at these shapes with these seed
        directions, the FLOPs of DENSE_OPS at their own rate: those of the values' sweep
        and, per direction, the fewer of their forward and reverse FLOPs (the rest of
        the engine's estimate, which counts the costlier mode, stays at the other ops'
        rate: never a shorter estimate than that split). The split is remembered per
        shapes, as _step_flops's."""
        key = (id(plan), id(shapes), "differentiate")
        known = self._step_costs.get(key)
        if known is not None and known[0] is plan and known[1] is shapes:
            values, per_direction = known[2]
        else:
            values = _products(plan, shapes, ("values",))
            modes = [_products(plan, shapes, (mode,)) for mode in ("forward", "reverse")]
            # (the fewer dense FLOPs, the more small products' time: never shorter)
            per_direction = (min(d for d, _ in modes), max(s for _, s in modes))
            if len(self._step_costs) >= _STEP_COSTS_KEPT:
                self._step_costs.clear()
            self._step_costs[key] = (plan, shapes, (values, per_direction))
        dense = values[0] + directions * per_direction[0]
        small = values[1] + directions * per_direction[1]
        return self.model.differentiate_us(
            len(plan.graph.nodes), plan.estimate_flops(shapes, directions) - dense + small,
            dense)

    def _step_flops(self, plan, shapes) -> tuple[int, int]:
        """A training step's FLOPs at these shapes (the values' sweep and one reverse
        direction): (those of other ops, those of DENSE_OPS); remembered per shapes (a
        plan's specializations are)."""
        key = (id(plan), id(shapes))
        known = self._step_costs.get(key)
        if known is not None and known[0] is plan and known[1] is shapes:
            return known[2]
        dense, small = _products(plan, shapes, ("values", "reverse"))
        # (the engine's estimate counts the costliest mode per direction: >= reverse's)
        found = (plan.estimate_flops(shapes, 1) - dense + small, dense)
        if len(self._step_costs) >= _STEP_COSTS_KEPT:
            self._step_costs.clear()
        self._step_costs[key] = (plan, shapes, found)
        return found

    def _planner(self, decision) -> pb.PlannerDecision:
        """The planner's decision as a message, built once per decision: a graph's calls
        of one kind repeat it."""
        message = self._planners.get(decision)
        if message is None:
            if len(self._planners) >= _PLANNERS_KEPT:
                self._planners.clear()
            message = self._planners[decision] = fill_decision(pb.PlannerDecision(), decision)
        return message

    def _answered(self, method, started, request, mode, graph_id, data: bytes,
                  path: str = "inline") -> bytes:
        # Answered: the lookup is counted (and the graph made most recent) as the general
        # path's would be; a request that fails on the way is counted by that path only.
        self.servicer.registry.cache.get(graph_id)
        # (the request log reads the reply's graph_id: the request's, here)
        self.servicer.telemetry.record(method, "OK", started, request, request, mode)
        self._count(path)
        return data


def _placeholders(inputs: dict) -> dict:
    """Arrays of these (shape, dtype)s without their data (one element, broadcast):
    enough for Plan.bind to find every value's shape."""
    return {name: np.broadcast_to(np.zeros((), dtype), shape)
            for name, (shape, dtype) in inputs.items()}


def _products(plan, shapes, modes) -> tuple[int, int]:
    """(dense, small) of the DENSE_OPS nodes of a plan at these shapes, summed over
    `modes` (one direction each past "values"): `dense` their FLOPs (costed at BLAS's
    rate, TimeModel.dense_mflop_us), `small` what BLAS's rate leaves out, in FLOPs at
    the other ops' rate: SMALL_PRODUCT a product made (a stack of tiny matrices is one
    product each) and SMALL_OUTPUT an output element of a product whose inner dimension
    is under DENSE_MIN_DIM (a stack of 2x2 products ran at ~1,900 us per MFLOP, a
    column times a 1x1 matrix at ~1,200, where BLAS's rate is 10)."""
    dense = small = 0
    for node, op, attrs in plan.nodes:
        if op.name not in DENSE_OPS:
            continue
        ins = [tuple(shapes[r]) for r in node.inputs]
        out = tuple(shapes[node.name])
        kwargs = {key: v for key, v in attrs.items() if key != "node"} if attrs else {}
        a = ins[0] if len(ins[0]) > 1 else (1,) + ins[0]
        b = ins[1] if len(ins[1]) > 1 else ins[1] + (1,)
        m, k, n = a[-2], a[-1], b[-1]
        # (a second operand of two dimensions: one product over the stacked rows)
        count = prod(out[:-2]) if len(b) > 2 else 1
        for mode in modes:
            cost = op_cost(op, mode, ins, out, plan.np_dtypes[node.name], kwargs)
            dense += cost.flops + LOOP_FLOPS * cost.loops
            # the products the mode makes: (count, output elements, inner dimension)
            made = ([(count, prod(out), k)] if mode == "values" else
                    [(count, prod(a), n), (count, prod(b), m)] if mode == "reverse" else
                    [(count, prod(out), k)] * 2)
            small += sum(SMALL_PRODUCT * c + (SMALL_OUTPUT * o if inner < DENSE_MIN_DIM
                                              else 0) for c, o, inner in made)
    return dense, small


def _directions(plan, shapes, request, present, seeds: dict) -> int:
    """Seed directions the request's differentiation sweeps at these shapes: the seeds'
    leading axis (k) when tangents or cotangents are given (`seeds`, stored ones
    included), else the smaller side of the Jacobian (the planner sweeps the cheaper
    way). A seed naming no value counts each of its elements a direction (the engine
    refuses it, and the general path answers with its error)."""
    if seeds:
        return max(a.size // max(1, prod(shapes.get(name, ()))) for name, a in seeds.items())
    wrt = tuple(request.wrt) if "wrt" in present else plan.float_inputs
    of = tuple(request.of) if "of" in present else plan.float_outputs
    return min(sum(prod(shapes[n]) for n in wrt), sum(prod(shapes[n]) for n in of))



_REPLY = pb.DifferentiateResponse.DESCRIPTOR.fields_by_name
_BLOCK = _REPLY["jacobian"].message_type.fields_by_name
_ENTRY = _REPLY["outputs"].message_type.fields_by_name
_TENSOR = _ENTRY["value"].message_type.fields_by_name
# The reply fields a template holds, by number: their kind (arrays by name, or
# Jacobian blocks by (of, wrt)), "" for a field kept as it is
_TEMPLATE_FIELDS = {_REPLY["outputs"].number: "outputs", _REPLY["jacobian"].number: "jacobian",
                    _REPLY["tangents"].number: "tangents",
                    _REPLY["cotangents"].number: "cotangents",
                    _REPLY["mode"].number: "", _REPLY["planner"].number: "",
                    _REPLY["graph_id"].number: ""}
_REQUEST_ID = _REPLY["request_id"].number
_REQUEST_ID_KEY = bytes([_REQUEST_ID << 3 | 2])


class ReplyTemplate:
    """A reply's bytes as the generated code writes them (deterministically: fields by
    number, map entries by key) with a hole for each array's data: `fill` puts another
    answer's arrays of the same sizes and dtypes in the holes, and the request's
    request_id (the last field such a reply holds) at the end. Every length prefix
    stays as it was, since the arrays' sizes do; an array with no data (no elements)
    has no hole and none in any answer of the same form. The answer is a dict by kind
    ("outputs", "jacobian", "tangents", "cotangents") of arrays by name (by (of, wrt)
    for "jacobian")."""

    __slots__ = ("pieces", "holes", "nbytes")

    def __init__(self, pieces: list, holes: tuple):
        self.pieces = pieces  # bytes, or None where an array's data goes
        self.holes = holes  # (index in pieces, kind, key, nbytes, dtype)
        self.nbytes = sum(len(p) for p in pieces if p is not None)

    @classmethod
    def of(cls, data: bytes, answer: dict) -> "ReplyTemplate | None":
        """The template of a DifferentiateResponse's bytes `data` holding these arrays
        (`answer`), a mode, planner, graph_id and request_id only (else None)."""
        pieces, holes, at, end = [], [], 0, len(data)
        for start, number, wire, i, length in _fields(data, 0, end):
            kind = _TEMPLATE_FIELDS.get(number)
            if wire == 0 and kind == "":  # the mode
                continue
            if wire != 2 or i + length > end:
                return None
            if number == _REQUEST_ID:
                if i + length != end:
                    return None
                end = start  # cut off: written per request
                break
            if kind is None:
                return None
            if kind:
                found = _data_of(data, i, i + length, kind)
                if found is None:
                    return None
                if found[0] is not None:
                    name, a, b = found
                    array = answer.get(kind, {}).get(name)
                    if array is None or array.nbytes != b - a:
                        return None
                    pieces.append(data[at:a])
                    holes.append((len(pieces), kind, name, b - a, array.dtype))
                    pieces.append(None)
                    at = b
        pieces.append(data[at:end])
        return cls(pieces, tuple(holes))

    def fill(self, answer: dict, request_id: bytes) -> bytes | None:
        """The reply with these arrays and request_id (UTF-8); None if an array is not of
        the template's size and dtype."""
        pieces = self.pieces[:]
        for at, kind, name, nbytes, dtype in self.holes:
            array = answer[kind].get(name)
            if array is None or array.nbytes != nbytes or array.dtype != dtype:
                return None
            # (a C-contiguous array joined as it is: one copy of its bytes, not two)
            pieces[at] = array if array.flags.c_contiguous else array.tobytes()
        if request_id:
            pieces.append(_REQUEST_ID_KEY + _varint_bytes(len(request_id)) + request_id)
        return b"".join(pieces)


_REQUEST = pb.DifferentiateRequest.DESCRIPTOR.fields_by_name
# The request's maps of tensors whose data are holes of a RequestTemplate, by number
_SEEDED_FIELDS = {_REQUEST[f].number: f for f in ("inputs", "tangents", "cotangents")}
_REQUEST_ID_TAG = _REQUEST["request_id"].number << 3 | 2


class RequestTemplate:
    """A request's bytes as a client sends them call after call: the same fields but for
    its tensors' data (inputs, tangents, cotangents) and its request_id, each of the same
    size. Bytes of the same length that match it outside those holes parse to the same
    request with other arrays and another id, so they need no parsing, no count of their
    fields and no checks of their tensors (all as for the first request); `match` reads
    their arrays (views of the bytes, as the codec's) and request_id. Bool tensors are
    left out (their bytes are checked one by one). `seeded`: what a request with seeds
    or stored tensors keeps beside (SeededForm; None for a Jacobian request's)."""

    __slots__ = ("pieces", "arrays", "id_span", "size", "form", "reply", "graph_id",
                 "nbytes", "seeded")

    def __init__(self, pieces, arrays, id_span, size, form, reply, seeded=None):
        self.pieces = pieces  # (offset, bytes) of the fixed stretches
        self.arrays = arrays  # (field, name, offset, dtype, count, shape)
        self.id_span = id_span  # (start, end) of the request_id's UTF-8, or None
        self.size = size
        self.form, self.reply = form, reply  # (graph_id, wrt, of, wire mode), ReplyTemplate
        self.graph_id = form[0]  # read by the request log
        self.nbytes = sum(len(p) for _, p in pieces)
        self.seeded = seeded

    @classmethod
    def of(cls, data: bytes, tensors: dict, form, reply,
           seeded=None) -> "RequestTemplate | None":
        """The template of a request's bytes `data` whose tensors (`tensors`: by field,
        arrays by name) were read from them; None if it holds a bool tensor or a name
        twice."""
        holes, fixed, id_span = [], set(), None
        for start, number, wire, i, length in _fields(data, 0, len(data)):
            if wire == 0:
                continue
            if wire != 2:
                return None
            if (number << 3 | wire) == _REQUEST_ID_TAG:
                id_span = (i, i + length)
                holes.append(id_span)
                continue
            field = _SEEDED_FIELDS.get(number)
            if field is None:
                continue
            # an entry as the reply's outputs' (a name without data: no template)
            found = _data_of(data, i, i + length, "outputs")
            name = found[0] if found is not None else None
            given = tensors.get(field, {})
            if name is None or (field, name) in fixed or name not in given \
                    or given[name].dtype == bool:
                return None
            fixed.add((field, name))
            holes.append((found[1], found[2], field, name))
        if len(fixed) != sum(len(a) for a in tensors.values()):
            return None
        pieces, at = [], 0
        for hole in sorted(holes):
            pieces.append((at, data[at:hole[0]]))
            at = hole[1]
        pieces.append((at, data[at:]))
        spec = tuple((field, name, a, tensors[field][name].dtype, tensors[field][name].size,
                      tensors[field][name].shape) for a, _, field, name in
                     (h for h in holes if len(h) == 4))
        return cls(tuple(p for p in pieces if p[1]), spec, id_span, len(data), form, reply,
                   seeded)

    def same(self, data: bytes) -> bool:
        """Whether `data` is this request with other arrays and id (as `match` finds it,
        its request_id's UTF-8 included), without reading them."""
        if len(data) != self.size:
            return False
        for at, piece in self.pieces:
            if not data.startswith(piece, at):
                return False
        if self.id_span is not None:
            try:
                data[self.id_span[0]:self.id_span[1]].decode()
            except UnicodeDecodeError:
                return False
        return True

    def match(self, data: bytes):
        """(arrays by field, request_id) if `data` is this request with other arrays and
        id, else None."""
        if len(data) != self.size:
            return None
        for at, piece in self.pieces:
            if not data.startswith(piece, at):
                return None
        request_id = b""
        if self.id_span is not None:
            request_id = data[self.id_span[0]:self.id_span[1]]
            try:
                request_id.decode()  # what the generated code would check
            except UnicodeDecodeError:
                return None
        found = {"inputs": {}, "tangents": {}, "cotangents": {}}
        for field, name, at, dtype, count, shape in self.arrays:
            found[field][name] = np.frombuffer(data, dtype, count, at).reshape(shape)
        return found, request_id


class SeededForm:
    """What a RequestTemplate of a request with seeds (a JVP or VJP) or stored tensors
    keeps beside its bytes: the stored tensors it names (by field: key -> StoredRef),
    their shapes and dtypes when it was answered (its estimate holds for as long as
    they are the same), its decision (that of every answer at those shapes), and
    whether its estimate is within the inline budget (`inline`; if not, the event loop
    sends the next of its form to a worker, where LeanPath.answer_in_worker answers it
    by the templates)."""

    __slots__ = ("stored", "signature", "decision", "inline")

    def __init__(self, stored: dict, signature: tuple, decision, inline: bool = True):
        self.stored, self.signature, self.decision = stored, signature, decision
        self.inline = inline


class StoredRef(NamedTuple):
    """A StoredTensor of a request, as TensorStore.tensors reads it."""

    handle: str
    name: str


def _answer(result) -> dict:
    """A Differentiation's arrays by kind, as ReplyTemplate reads them."""
    return {"outputs": result.outputs, "jacobian": result.jacobian or {},
            "tangents": result.tangents or {}, "cotangents": result.cotangents or {}}


def _stored_signature(stored: dict, tensors: dict) -> tuple:
    """The shapes and dtypes of the stored tensors a request names, field by field."""
    return tuple((tensors[field][key].shape, tensors[field][key].dtype)
                 for field, refs in stored.items() for key in refs)


def _data_of(data: bytes, i: int, end: int, kind: str):
    """In a map entry of tensors (outputs, inputs, seeds) or a Jacobian block at data[i:end]: (its key, the start and
    end of its tensor's data), (None,) when the tensor has no data, None when it holds a
    field other than its names and tensor (a sparse block)."""
    names, value = ((_ENTRY["key"].number,), _ENTRY["value"].number) if kind != "jacobian" \
        else ((_BLOCK["of"].number, _BLOCK["wrt"].number), _BLOCK["value"].number)
    found, span = [], (None,)
    for _, number, wire, i, length in _fields(data, i, end):
        if wire != 2:
            return None
        if number in names:
            found.append(data[i:i + length].decode())
        elif number == value:
            span = _tensor_data(data, i, i + length)
            if span is None:
                return None
        else:
            return None
    if len(found) != len(names) or span[0] is None:
        return None if len(found) != len(names) else (None,)
    return (found[0] if kind != "jacobian" else tuple(found), *span)


def _tensor_data(data: bytes, i: int, end: int):
    """(start, end) of a Tensor's data field in data[i:end], (None,) without one."""
    span = (None,)
    for _, number, wire, i, length in _fields(data, i, end):
        if wire == 0:
            continue
        if wire != 2:
            return None
        if number == _TENSOR["data"].number:
            span = (i, i + length)
    return span


def _fields(data: bytes, i: int, end: int):
    """(start, number, wire type, value's offset, length) of each field of the message
    at data[i:end]: a varint's value is already read (offset past it, length 0); a
    field of another type than varint or length-delimited ends the walk (its offset
    and length not known: the caller gives up on it)."""
    while i < end:
        start = i
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
            yield start, number, 0, i, 0
        elif wire == 2:
            length, i = _varint(data, i)
            yield start, number, 2, i, length
            i += length
        else:
            yield start, number, wire, i, None
            return
