"""Proto <-> engine: graphs, attributes, differentiation results (first and second
order), the planner's decision and traces.

Tensors and mode names are converted by gradserve.v1.codec and gradserve.v1.modes
(shared with the client).
"""

from __future__ import annotations

from gradserve import engine
from gradserve.v1 import gradient_service_pb2 as service_pb2
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import DTYPES, WIRE_DTYPES, attribute_value, fill_tensor, from_tensor
from gradserve.v1.modes import WIRE_MODES, WIRE_SPARSITY
from gradserve.v1.tensor_wire import TensorMessage


def dtype_name(code: int, where: str, field: str) -> str:
    dtype = DTYPES.get(code)
    if dtype is None:
        name = (tensor_pb2.DataType.Name(code) if code in tensor_pb2.DataType.values()
                else str(code))
        raise engine.DTypeError(f"unsupported dtype {name} (supported: "
                                + ", ".join(WIRE_DTYPES) + ")", node=where, field=field)
    return dtype.name


def attr_from_proto(attr: graph_pb2.Attribute, node: str, op: str, name: str):
    value = attribute_value(attr)
    if value is None:
        raise engine.GraphError(f"attribute '{name}' has no value", node=node, op=op,
                                field=f"attrs.{name}")
    return value


def graph_from_proto(g: graph_pb2.Graph, max_elements: int | None = None) -> engine.Graph:
    inputs = [engine.Input(i.name, dtype_name(i.dtype, i.name, "dtype"), i.shape)
              for i in g.inputs]
    constants = {name: from_tensor(t, f"graph.constants['{name}']", max_elements)
                 for name, t in sorted(g.constants.items())}
    nodes = [engine.Node(n.name, n.op, n.inputs,
                         {k: attr_from_proto(a, n.name, n.op, k) for k, a in n.attrs.items()})
             for n in g.nodes]
    return engine.Graph(inputs, nodes, list(g.outputs), constants)


def differentiate_response(result: engine.Differentiation, graph_id: str,
                           request_id: str) -> TensorMessage:
    """The reply, its tensors as arrays (the trace's small ones go in the message)."""
    reply = service_pb2.DifferentiateResponse(graph_id=graph_id, request_id=request_id)
    reply.mode = fill_decision(reply.planner, result.decision).mode
    if result.trace is not None:
        fill_trace(reply.trace, result.trace)
    return TensorMessage(reply, {
        "outputs": result.outputs, "tangents": result.tangents,
        "cotangents": result.cotangents,
        "jacobian": [block_pair(service_pb2.JacobianBlock(of=o, wrt=w), block)
                     for (o, w), block in result.jacobian.items()]})


def second_order_response(result: engine.SecondOrder, graph_id: str,
                          request_id: str) -> TensorMessage:
    """Outputs, gradient, and the Hessian-vector products or Hessian blocks."""
    reply = service_pb2.DifferentiateResponse(graph_id=graph_id, request_id=request_id)
    reply.mode = fill_decision(reply.planner, result.decision).mode
    return TensorMessage(reply, {
        "outputs": result.outputs, "gradient": result.gradient, "hvp": result.hvp,
        "hessian": [block_pair(service_pb2.HessianBlock(wrt_a=a, wrt_b=b), block)
                    for (a, b), block in result.hessian.items()]})


def block_pair(message, block):
    """(block message, the array for its `value`): a dense block as it is; a sparse one
    (engine.SparseBlock) as its values, with its indices in `sparse`."""
    if not isinstance(block, engine.SparseBlock):
        return message, block
    message.sparse.shape[:] = block.shape
    fill_tensor(message.sparse.rows, block.rows)
    fill_tensor(message.sparse.cols, block.cols)
    return message, block.values


def fill_decision(p: service_pb2.PlannerDecision,
                  d: engine.PlannerDecision) -> service_pb2.PlannerDecision:
    """Write the planner's decision into `p` (in place: no message copy)."""
    p.mode, p.n, p.m = WIRE_MODES[d.mode], d.n, d.m
    p.cost_forward, p.cost_reverse = d.cost_forward, d.cost_reverse
    p.reason = d.reason
    p.sparsity = WIRE_SPARSITY[d.sparsity]
    p.nnz, p.colors_forward, p.colors_reverse = d.nnz, d.colors_forward, d.colors_reverse
    return p


def fill_trace(t: service_pb2.Trace, trace: engine.Trace) -> service_pb2.Trace:
    """Write an engine trace into `t` (in place); absent derivatives stay unset."""
    t.mode = WIRE_MODES[trace.mode]
    for node in trace.nodes:
        n = t.nodes.add(name=node.name, op=node.op, inputs=node.inputs)
        _fill_optional(n, "value", node.value)
        _fill_optional(n, "tangent", node.tangent)
        _fill_optional(n, "adjoint", node.adjoint)
        for edge in node.edges:
            e = n.edges.add(input=edge.input)
            _fill_optional(e, "partial", edge.partial)
            _fill_optional(e, "tangent", edge.tangent)
            _fill_optional(e, "cotangent", edge.cotangent)
    return t


def _fill_optional(message, field: str, array) -> None:
    if array is not None:
        fill_tensor(getattr(message, field), array)


def op_info(op: engine.OpDef) -> service_pb2.OpInfo:
    attrs = []
    for spec in op.attrs:
        required = spec.default is engine.ops.REQUIRED
        default = "" if required else ("absent" if spec.default is None else repr(spec.default))
        attrs.append(service_pb2.AttributeInfo(name=spec.name, type=spec.type,
                                               required=required, default=default,
                                               description=spec.description))
    return service_pb2.OpInfo(name=op.name, min_inputs=op.arity or 1,
                              max_inputs=-1 if op.arity is None else op.arity,
                              attrs=attrs, description=op.description)
