"""GradientService: proto in, a call into the engine, proto out."""

from __future__ import annotations

from math import prod

import numpy as np

from gradserve import engine
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1.codec import WIRE_DTYPES, fill_tensor, fill_tensors, from_tensors

from .convert import MODES, fill_decision, fill_trace, op_info
from .calls import rpc, stream_rpc
from .errors import BadRequest, stop_when_ended
from .limits import Limits
from .registry import GraphRegistry
from .telemetry import Telemetry

VERSION = "0.1.0"


class GradientServicer(pb_grpc.GradientServiceServicer):
    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.registry = GraphRegistry(self.limits)
        self.telemetry = Telemetry(self.registry.cache)

    @rpc
    def RegisterGraph(self, request, context):
        graph_id, _ = self.registry.register(request.graph)
        return pb.RegisterGraphResponse(graph_id=graph_id)

    @rpc
    def Evaluate(self, request, context):
        graph_id, plan = self.registry.resolve(request)
        inputs = from_tensors(request.inputs, "inputs", self.limits.max_tensor_elements)
        outputs = plan.evaluate(inputs, max_bytes=self.limits.max_intermediate_bytes,
                                check=stop_when_ended(context))
        reply = pb.EvaluateResponse(graph_id=graph_id)
        fill_tensors(reply.outputs, outputs)
        return reply

    @rpc
    def Differentiate(self, request, context):
        return self._differentiate(request, stop_when_ended(context))

    @stream_rpc
    def DifferentiateStream(self, requests, context):
        check = stop_when_ended(context)
        for request in requests:
            yield self._differentiate(request, check)

    @rpc
    def GetServerInfo(self, request, context):
        limits = pb.Limits(**{f: getattr(self.limits, f)
                              for f in pb.Limits.DESCRIPTOR.fields_by_name})
        return pb.GetServerInfoResponse(
            version=VERSION, ops=[op_info(op) for op in engine.OPS.values()], limits=limits,
            dtypes=list(WIRE_DTYPES.values()), planner_ratio=engine.REVERSE_COST_RATIO)

    def _differentiate(self, request, check) -> pb.DifferentiateResponse:
        graph_id, plan = self.registry.resolve(request)
        limit = self.limits.max_tensor_elements
        inputs = from_tensors(request.inputs, "inputs", limit)
        wrt = tuple(request.wrt) or None
        of = tuple(request.of) or None
        mode = MODES.get(request.mode)
        if mode is None:
            raise BadRequest(f"unknown mode {request.mode}", field="mode")
        reply = pb.DifferentiateResponse(graph_id=graph_id, request_id=request.request_id)
        run = {"max_bytes": self.limits.max_intermediate_bytes, "check": check}

        if request.tangents and request.cotangents:
            raise BadRequest("give tangents (JVP) or cotangents (VJP), not both",
                             field="tangents")
        if request.tangents:
            _seed_keys(request.tangents, wrt, "tangents", "wrt")
            _seed_mode(mode, "forward", "tangents")
            tangents = from_tensors(request.tangents, "tangents", limit)
            result = plan.jvp(inputs, tangents, **run)
            fill_tensors(reply.tangents, result.tangents)
            n = sum(prod(inputs[name].shape) for name in tangents if name in inputs)
            m = sum(a.size for a in result.outputs.values())
            decision = engine.plan_mode(n, m, forced="forward")
            reason = "tangents given: a JVP is forward mode"
        elif request.cotangents:
            _seed_keys(request.cotangents, of, "cotangents", "of")
            _seed_mode(mode, "reverse", "cotangents")
            cotangents = from_tensors(request.cotangents, "cotangents", limit)
            result = plan.vjp(inputs, cotangents, wrt=wrt, **run)
            fill_tensors(reply.cotangents, result.cotangents)
            n = sum(a.size for a in result.cotangents.values())
            m = sum(result.outputs[name].size for name in cotangents if name in result.outputs)
            decision = engine.plan_mode(n, m, forced="reverse")
            reason = "cotangents given: a VJP is reverse mode"
        else:
            result = plan.jacobian(inputs, wrt=wrt, of=of, mode=mode,
                                   max_block_elements=self.limits.max_tensor_elements, **run)
            for (o, w), block in result.jacobian.items():
                fill_tensor(reply.jacobian.add(of=o, wrt=w).value, block)
            decision, reason = result.decision, None
        fill_tensors(reply.outputs, result.outputs)
        reply.mode = fill_decision(reply.planner, decision, reason).mode
        if request.trace:
            _trace(request, plan, inputs, mode, result.outputs, reply.trace, self.limits, check)
        return reply


def _trace(request, plan, inputs, mode, outputs, into, limits, check) -> None:
    """The request's trace: forward from its tangents, reverse from its cotangents,
    or reverse from a cotangent of 1 on a one-element output (a scalar loss)."""
    limit = limits.max_tensor_elements
    seeds = {}
    if request.tangents:
        trace_mode = "forward"
        seeds["tangents"] = from_tensors(request.tangents, "tangents", limit)
    elif request.cotangents:
        trace_mode = "reverse"
        seeds["cotangents"] = from_tensors(request.cotangents, "cotangents", limit)
    elif mode == "forward":
        raise BadRequest("a forward-mode trace needs tangents: give a tangent for each input "
                         "to trace from", field="tangents")
    else:
        of = tuple(request.of) or plan.float_outputs
        if len(of) != 1 or outputs[of[0]].size != 1:
            sizes = ", ".join(f"'{o}' ({outputs[o].size} elements)" for o in of) or "none"
            raise BadRequest("a trace without tangents or cotangents needs one output with "
                             f"one element (a scalar loss) to start from; outputs: {sizes}. "
                             "Give cotangents (reverse) or tangents (forward)",
                             field="cotangents")
        trace_mode = "reverse"
        seeds["cotangents"] = {of[0]: np.ones_like(outputs[of[0]])}
    result = engine.trace(plan, inputs, trace_mode, **seeds,
                          max_elements=limits.max_trace_elements or None,
                          max_bytes=limits.max_intermediate_bytes, check=check)
    fill_trace(into, result)


def _seed_keys(seeds, names, field, names_field):
    if names is not None and set(names) != set(seeds):
        raise BadRequest(f"{field} are given for {sorted(seeds)} but {names_field} is "
                         f"{list(names)}: they must name the same values", field=field)


def _seed_mode(mode, implied, field):
    if mode not in ("auto", implied):
        raise BadRequest(f"{field} imply {implied} mode, but mode is {mode}", field="mode")
