"""GradientService: proto in, a call into the engine, proto out.

Requests and replies that carry tensors are TensorMessages (gradserve.v1.tensor_wire):
their tensor fields are dicts of arrays, read from and written to the wire bytes
without protobuf's copies."""

from __future__ import annotations

from gradserve import engine
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1.codec import WIRE_DTYPES
from gradserve.v1.modes import mode_name, sparsity_name
from gradserve.v1.tensor_wire import TensorMessage

from .blas import BlasPolicy, BlasWidth, blas_threads, usable_cpus
from .calls import Calls, rpc, stream_rpc
from .convert import differentiate_response, op_info, second_order_response
from .errors import BadRequest, stop_when_ended
from .lean import DEFAULT_INLINE_BUDGET_US, LEAN_MAX_BYTES, LeanPath
from .limits import Limits
from .registry import GraphRegistry
from .residuals import ResidualStore
from .store import TensorStore, reply_limit_hint
from .store_rpc import get_tensors, put_tensors
from .telemetry import Telemetry
from .training import TrainState

VERSION = "0.1.0"


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Each method answers one request in a worker thread (server.calls); small
    Evaluate, Differentiate and TrainSteps requests by graph id are answered on the
    event loop by `lean` (server.lean), with the same replies and errors."""

    def __init__(self, limits: Limits | None = None, max_workers: int = 16,
                 inline_budget_us: float = DEFAULT_INLINE_BUDGET_US,
                 blas: BlasPolicy | None = None):
        self.limits = limits or Limits()
        self.connection_age = (0.0, 0.0)  # seconds: max connection age and its grace
        self.calls = Calls(self.limits, max_workers)
        self.registry = GraphRegistry(self.limits)
        self.telemetry = Telemetry(self.registry.cache)
        blas, cpus = blas or BlasPolicy(), usable_cpus()
        self.calls.blas = BlasWidth(blas_threads() or cpus,
                                    cpus if blas.alone is None else blas.alone, cpus,
                                    blas.min_flops, blas.max_pressure,
                                    registry=self.telemetry.registry)
        self.residuals = ResidualStore(self.limits.max_residual_sets,
                                       self.limits.max_residual_bytes,
                                       self.limits.residual_seconds)
        self.store = TensorStore(self.limits.max_store_bytes,
                                 self.limits.max_store_bytes_per_client,
                                 self.limits.max_store_handles, self.limits.store_seconds)
        self.training = TrainState(self.store, self.limits)
        self._run_limits = {"max_bytes": self.limits.max_intermediate_bytes,
                            "max_reply_bytes": self.limits.max_message_bytes,
                            "max_flops": self.limits.max_request_flops or None}
        # Small requests within this estimated time are answered on the event loop
        # (server.lean); 0 sends every request to a worker.
        self.lean = LeanPath(self, inline_budget_us) if inline_budget_us > 0 else None

    @rpc
    def RegisterGraph(self, request, context):
        graph_id, _ = self.registry.register(request.graph, stop_when_ended(context))
        return pb.RegisterGraphResponse(graph_id=graph_id)

    @rpc
    def Evaluate(self, request, context):
        check = stop_when_ended(context)
        graph_id, plan = self.registry.resolve(request, check)
        reply = pb.EvaluateResponse(graph_id=graph_id)
        inputs = self._stored(request, "inputs")
        if request.keep_residuals:
            # Kept inputs are copied: a view would pin the whole request (an inline graph
            # too) while the store counts only the array's bytes.
            inputs = {name: a.copy() for name, a in inputs.items()}
            with self.blas_for(plan, inputs, 0):
                kept = plan.residuals(inputs, check=check, **self._run_limits)
            outputs, reply.residuals = kept.outputs, self.residuals.keep(graph_id, kept)
        else:
            with self.blas_for(plan, inputs, 0):
                outputs = plan.evaluate(inputs, check=check, **self._run_limits)
        return TensorMessage(reply, {"outputs": outputs})

    @rpc
    def Differentiate(self, request, context):
        with reply_limit_hint():
            return self._differentiate(request, stop_when_ended(context), context)

    @stream_rpc
    def DifferentiateStream(self, request, context):
        with reply_limit_hint():
            return self._differentiate(request, stop_when_ended(context), context)

    @rpc
    def TrainSteps(self, request, context):
        check = stop_when_ended(context)
        graph_id, plan = self.registry.resolve(request, check)
        return self.training.call(request, graph_id, plan, check, self._run_limits,
                                  width=self.blas_width)

    async def PutTensors(self, requests, context):
        return await put_tensors(self, requests, context)

    async def GetTensors(self, request, context):
        await get_tensors(self, request, context)

    @rpc
    def DeleteTensors(self, request, context):
        return pb.DeleteTensorsResponse(deleted=self.store.delete(request.handle))

    @rpc
    def GetServerInfo(self, request, context):
        limits = pb.Limits(**{f: getattr(self.limits, f)
                              for f in pb.Limits.DESCRIPTOR.fields_by_name})
        reply = pb.GetServerInfoResponse(
            version=VERSION, ops=[op_info(op) for op in engine.OPS.values()], limits=limits,
            dtypes=list(WIRE_DTYPES.values()), planner_ratio=engine.REVERSE_COST_RATIO,
            planner_hvp_ratio=engine.HVP_COST_RATIO,
            max_pattern_entries=engine.MAX_PATTERN_ENTRIES)
        reply.max_connection_age_seconds, reply.max_connection_age_grace_seconds = \
            self.connection_age
        if self.lean is not None:
            reply.inline_budget_us, reply.lean_max_bytes = self.lean.budget_us, LEAN_MAX_BYTES
        blas = self.calls.blas
        reply.blas_threads, reply.blas_threads_alone = blas.threads, blas.alone
        reply.blas_alone_min_flops, reply.blas_alone_max_pressure = \
            blas.min_flops, blas.max_pressure
        return reply

    def _differentiate(self, request, check, context=None) -> TensorMessage:
        graph_id, plan = self.registry.resolve(request, check)
        limit = self.limits.max_tensor_elements
        mode = mode_name(request.mode)
        if mode is None:
            raise BadRequest(f"unknown mode {request.mode}", field="mode")
        try:
            sparsity = sparsity_name(request.sparsity)
        except KeyError:
            raise BadRequest(f"unknown sparsity {request.sparsity}", field="sparsity") from None
        if request.HasField("second_order"):
            return self._second_order(request, graph_id, plan, mode, sparsity, check, context)
        inputs = self._stored(request, "inputs")
        with self.blas_for(plan, inputs, 1):
            result = plan.differentiate(
                inputs, wrt=tuple(request.wrt) or None,
                of=tuple(request.of) or None, mode=mode,
                tangents=self._stored(request, "tangents"),
                cotangents=self._stored(request, "cotangents"),
                trace=request.trace, check=check, **self._limits_for(request),
                residuals=(self.residuals.get(request.residuals, graph_id)
                           if request.residuals else None),
                max_block_elements=limit,
                max_trace_elements=self.limits.max_trace_elements or None,
                sparsity=sparsity)
        reply = differentiate_response(result, graph_id, request.request_id)
        return self._store_results(request, reply, context)

    def _second_order(self, request, graph_id, plan, mode, sparsity, check,
                      context) -> TensorMessage:
        for field in ("tangents", "cotangents", "trace", "residuals"):
            if getattr(request, field):
                raise BadRequest(f"second_order cannot be combined with {field}", field=field)
        limit = self.limits.max_tensor_elements
        vectors = self.store.tensors(request.second_order.stored_vectors,
                                     "second_order.stored_vectors",
                                     request.second_order.vectors)
        inputs = self._stored(request, "inputs")
        with self.blas_for(plan, inputs, 1):
            result = plan.second_order(
                inputs, vectors=vectors, hessian=request.second_order.hessian,
                of=tuple(request.of) or None, wrt=tuple(request.wrt) or None, mode=mode,
                check=check, max_block_elements=limit, sparsity=sparsity,
                **self._limits_for(request))
        reply = second_order_response(result, graph_id, request.request_id)
        return self._store_results(request, reply, context)

    def blas_for(self, plan, inputs, directions: int):
        """The block run at the BLAS width this request may have (server.blas): its
        estimated work that of the values' sweep and `directions` more, a lower bound."""
        return self.blas_width(lambda: plan.estimate_flops(
            plan.shapes if plan.static else plan.bind(inputs).shapes, directions))

    def blas_width(self, flops):
        """The block run at the BLAS width a request of `flops()` estimated work may have."""
        calls = self.calls
        return calls.blas.run(lambda: calls.in_progress, flops)

    def _stored(self, request, name: str) -> dict:
        """A request's tensor map `name` with the tensors its stored_<name> names."""
        refs = getattr(request, "stored_" + name)
        if not refs:
            return getattr(request, name)
        return self.store.tensors(refs, "stored_" + name, getattr(request, name))

    def _limits_for(self, request) -> dict:
        """The run limits; with store_results the derivatives skip the reply's bound
        (the outputs are still bounded by it, in the reply)."""
        if not request.store_results:
            return self._run_limits
        return {**self._run_limits, "max_reply_bytes": None}

    def _store_results(self, request, reply: TensorMessage, context) -> TensorMessage:
        """With store_results: the derivatives into the tensor store, their handle in the
        reply (server.store keys: "jacobian/OF/WRT", "gradient/WRT", ...)."""
        if not request.store_results:
            return reply
        kept = {}
        tensors = reply._tensors
        for field in ("tangents", "cotangents", "gradient", "hvp"):
            for name, array in (tensors.pop(field, None) or {}).items():
                kept[f"{field}/{name}"] = array
        # sparse blocks stay in the reply: their values mean nothing without their indices,
        # and they are small by construction
        for field, key in (("jacobian", lambda b: f"jacobian/{b.of}/{b.wrt}"),
                           ("hessian", lambda b: f"hessian/{b.wrt_a}/{b.wrt_b}")):
            sparse = []
            for block, array in tensors.pop(field, None) or ():
                if block.HasField("sparse"):
                    sparse.append((block, array))
                else:
                    kept[key(block)] = array
            if sparse:
                tensors[field] = sparse
        message = reply.message
        if kept:
            owner = getattr(context, "peer", "")  # the client's address (server.calls)
            message.results_handle = self.store.keep(owner, kept, "store_results")
        return TensorMessage(message, tensors)
