"""Proto <-> engine: graphs, attributes, the planner's decision and traces.

Tensors are converted by gradserve.v1.tensors (shared with the client).
"""

from __future__ import annotations

from gradserve import engine
from gradserve.v1 import gradient_service_pb2 as service_pb2
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import (DTYPES, WIRE_DTYPES, attribute_value, fill_attribute,
                                fill_tensor, from_tensor, to_tensor)

MODES = {
    service_pb2.MODE_UNSPECIFIED: "auto",
    service_pb2.MODE_AUTO: "auto",
    service_pb2.MODE_FORWARD: "forward",
    service_pb2.MODE_REVERSE: "reverse",
}
WIRE_MODES = {"forward": service_pb2.MODE_FORWARD, "reverse": service_pb2.MODE_REVERSE,
              "auto": service_pb2.MODE_AUTO}


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


def graph_to_proto(graph: engine.Graph) -> graph_pb2.Graph:
    return graph_pb2.Graph(
        inputs=[graph_pb2.Input(name=i.name, dtype=WIRE_DTYPES[i.dtype], shape=i.shape)
                for i in graph.inputs],
        constants={name: to_tensor(v) for name, v in graph.constants.items()},
        nodes=[graph_pb2.Node(name=n.name, op=n.op, inputs=n.inputs,
                              attrs={k: fill_attribute(graph_pb2.Attribute(), v)
                                     for k, v in n.attrs.items()})
               for n in graph.nodes],
        outputs=graph.outputs)


def fill_decision(p: service_pb2.PlannerDecision, d: engine.ModeDecision,
                  reason: str | None = None) -> service_pb2.PlannerDecision:
    """Write the planner's decision into `p` (in place: no message copy)."""
    p.mode, p.n, p.m = WIRE_MODES[d.mode], d.n, d.m
    p.cost_forward, p.cost_reverse = d.cost_forward, d.cost_reverse
    p.reason = reason or d.reason
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
