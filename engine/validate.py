"""Graph validation: one iterative pass over the nodes in topological order.

Each node's inputs must already be defined (graph input, constant or earlier
node), which rules out cycles and dangling names; then the op, its arity, its
attributes, its dtypes and its shape rule are checked. The pass returns the
static shape and dtype of every value and each node's normalized attributes.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DTypeError, GraphError, RuleError, ShapeError
from .ir import DTYPES, Graph
from .ops import OPS, OpDef, check_attrs, check_dtypes
from .shapes import check_shape


@dataclass
class CheckedGraph:
    """What validation learned: shapes use None for dimensions known only at run time."""

    shapes: dict[str, tuple]
    dtypes: dict[str, str]
    ops: list[OpDef]
    attrs: list[dict]


def _name_ok(name) -> bool:
    return isinstance(name, str) and name != ""


def _reraise(err: RuleError, node: str, op: str):
    raise err.kind(str(err), node=node, op=op, field=err.field) from None


def validate(graph: Graph) -> CheckedGraph:
    shapes: dict[str, tuple] = {}
    dtypes: dict[str, str] = {}

    def define(name, what):
        if not _name_ok(name):
            raise GraphError(f"{what} has an empty or non-string name {name!r}", node=str(name),
                             field="name")
        if name in shapes:
            raise GraphError(f"name is defined more than once (again as {what})", node=name,
                             field="name")

    for inp in graph.inputs:
        define(inp.name, "an input")
        if inp.dtype not in DTYPES:
            raise DTypeError(f"unsupported dtype {inp.dtype!r} (supported: {', '.join(DTYPES)})",
                             node=inp.name, field="dtype")
        for d in inp.shape:
            if d < -1:
                raise ShapeError(f"dimension {d} in shape {list(inp.shape)} is negative "
                                 "(-1 means any size)", node=inp.name, field="shape")
        shapes[inp.name] = tuple(None if d == -1 else d for d in inp.shape)
        _checked(shapes[inp.name], inp.name)
        dtypes[inp.name] = inp.dtype

    for name, value in graph.constants.items():
        define(name, "a constant")
        if value.dtype.name not in DTYPES:
            raise DTypeError(f"unsupported dtype {value.dtype.name!r} "
                             f"(supported: {', '.join(DTYPES)})", node=name, field="dtype")
        shapes[name] = _checked(tuple(value.shape), name)
        dtypes[name] = value.dtype.name

    ops, attrs = [], []
    for node in graph.nodes:
        define(node.name, f"a {node.op} node")
        op = OPS.get(node.op)
        if op is None:
            raise GraphError(f"unknown op {node.op!r}", node=node.name, op=node.op, field="op")
        n_in = len(node.inputs)
        if (op.arity is None and n_in < 1) or (op.arity is not None and n_in != op.arity):
            want = "at least 1" if op.arity is None else str(op.arity)
            raise GraphError(f"takes {want} input(s), got {n_in}", node=node.name, op=node.op,
                             field="inputs")
        for i, ref in enumerate(node.inputs):
            if ref not in shapes:
                where = ("is defined later (nodes must be in topological order; "
                         "a cycle shows up this way)") if _defined_later(graph, node, ref) \
                    else "is not an input, constant or earlier node"
                raise GraphError(f"input '{ref}' {where}", node=node.name, op=node.op,
                                 field=f"inputs[{i}]")
        in_shapes = [shapes[r] for r in node.inputs]
        try:
            resolved = check_attrs(op, node.attrs, in_shapes)
            dtype = check_dtypes(op, node.inputs, [dtypes[r] for r in node.inputs], resolved)
            if op.node_attr:
                resolved["node"] = node.name
            shape = op.shape(in_shapes, None, **resolved)
            check_shape(shape)
        except RuleError as err:
            _reraise(err, node.name, node.op)
        shapes[node.name] = shape
        dtypes[node.name] = dtype
        ops.append(op)
        attrs.append(resolved)

    if not graph.outputs:
        raise GraphError("graph has no outputs", field="outputs")
    seen = set()
    for i, out in enumerate(graph.outputs):
        if out not in shapes:
            raise GraphError("output is not an input, constant or node of the graph", node=out,
                             field=f"outputs[{i}]")
        if out in seen:
            raise GraphError("output is listed more than once", node=out, field=f"outputs[{i}]")
        seen.add(out)
    return CheckedGraph(shapes, dtypes, ops, attrs)


def _checked(shape, name):
    try:
        check_shape(shape, "shape")
    except RuleError as err:
        raise ShapeError(str(err), node=name, field="shape") from None
    return shape


def _defined_later(graph: Graph, node, ref) -> bool:
    # Only reached on the error path, so the linear scan costs nothing normally.
    return any(n.name == ref for n in graph.nodes)


def infer_shapes(names, ops, attrs, ins, shapes: dict) -> dict:
    """Re-run the shape rules with concrete input shapes; `shapes` holds the
    inputs and constants and is filled in for every node."""
    for name, op, resolved, refs in zip(names, ops, attrs, ins):
        try:
            shapes[name] = op.shape([shapes[r] for r in refs], None, **resolved)
            check_shape(shapes[name])
        except RuleError as err:
            _reraise(err, name, op.name)
    return shapes
