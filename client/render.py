"""Graphviz DOT of a graph: its structure, or the values and derivatives a server traced.

    graph_dot(graph_proto)            inputs and constants as boxes, nodes with their op
    trace_dot(result.trace, "reverse") values in the nodes, adjoints flowing back on the edges
    trace_dot(result.trace, "forward") values and tangents in the nodes; on each edge the
                                       local partial derivative and the tangent it carries

As in the seed article's pictures: in reverse mode each edge is drawn against the
data flow and labelled with the cotangent it carries back, so the adjoint splits
at a binary op and sums where a value fans out (a value's adjoint is the sum
of the labels of the arrows pointing into it). Values of up to SMALL elements are written in
full with 4 significant digits; larger ones as shape, min, mean and max.

`trace_dot` reads nodes by attribute (name, op, inputs, value, tangent, adjoint,
edges with input, partial, tangent, cotangent), so it draws the client's
NodeTrace records (client) and the engine's alike. Render the text with
`dot -Tpng graph.dot -o graph.png` (Graphviz), or `gradserve graph show`.
"""

from __future__ import annotations

import html
import re
from typing import Iterable, Sequence

import numpy as np

from gradserve.v1 import graph_pb2
from gradserve.v1.codec import DTYPES, attribute_value, from_tensor

SMALL = 6  # values with at most this many elements are written in full
FORWARD_COLOR = "#1f5fbf"
REVERSE_COLOR = "#b22222"
MUTED_COLOR = "#888888"
MODES = ("forward", "reverse", "values")
LEGENDS = {
    "forward": "forward mode: ∂ = local partial derivative, "
               "tan = tangent carried along the edge<br/>"
               "a node's tangent is the sum of the tan arrows pointing into it",
    "reverse": "reverse mode: adj = adjoint flowing back along the edge<br/>"
               "a value's adjoint is the sum of the adj arrows pointing into it",
    "values": "values",
}
_HEADER = ('  graph [rankdir={rankdir}, fontname="Helvetica", fontsize=12, labelloc=t, '
           'nodesep=0.4, ranksep=0.6{label}];\n'
           '  node [fontname="Helvetica", fontsize=11, margin="0.12,0.06"];\n'
           '  edge [fontname="Helvetica", fontsize=10];\n')


def format_number(v) -> str:
    """4 significant digits (integers in full)."""
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.4g}"


def format_array(a, small: int = SMALL) -> str:
    """One element: the number; up to `small`: the nested list; more: shape min/mean/max."""
    a = np.asarray(a)
    if a.size == 0:
        return f"empty {format_shape(a.shape)}"
    if a.size == 1:
        return format_number(a.reshape(())[()])
    if a.size <= small:
        text = np.array2string(a, separator=", ", max_line_width=1 << 30,
                               formatter={"all": format_number})
        return re.sub(r"\s*\n\s*", " ", text)
    return (f"{format_shape(a.shape)} min {format_number(a.min())} "
            f"mean {format_number(a.mean())} max {format_number(a.max())}")


def format_shape(shape: Iterable[int]) -> str:
    dims = ["?" if d < 0 else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


# --- structure ------------------------------------------------------------------

def graph_dot(graph: graph_pb2.Graph, *, rankdir: str = "LR") -> str:
    """DOT of a graph's structure: inputs and constants as boxes, nodes with op and name."""
    outputs = set(graph.outputs)
    lines = []
    for i in graph.inputs:
        detail = f"input {format_shape(i.shape)} {_dtype_name(i.dtype)}"
        lines.append(_node_line(i.name, _label(i.name, detail), True, i.name in outputs))
    for name, t in graph.constants.items():
        value = from_tensor(t, f"constant '{name}'")
        detail = f"constant {format_shape(value.shape)} {value.dtype.name}"
        lines.append(_node_line(name, _label(name, detail, [format_array(value)]), True,
                                name in outputs))
    for n in graph.nodes:
        attrs = " ".join(f"{k}={_attr_text(attribute_value(a))}"
                         for k, a in sorted(n.attrs.items()))
        lines.append(_node_line(n.name, _label(n.op, n.name, [attrs] if attrs else []),
                                False, n.name in outputs))
        for name in n.inputs:
            lines.append(f"  {_id(name)} -> {_id(n.name)};")
    return _digraph(lines, rankdir, None)


# --- traced values and derivatives ---------------------------------------------------

def trace_dot(nodes: Sequence, mode: str = "reverse", *, outputs: Iterable[str] = (),
              rankdir: str = "LR", small: int = SMALL, legend: bool = True) -> str:
    """DOT of a traced computation: op, shape and value in every node; per `mode`, the
    tangents ("forward") or adjoints ("reverse") in the nodes and on the edges, or
    values only ("values"). `outputs` are drawn with a double border."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    _check_has(nodes, mode)
    outputs = set(outputs)
    fmt = lambda a: html.escape(format_array(a, small))  # noqa: E731
    lines = []
    for node in nodes:
        leaf = node.op in ("input", "constant")
        value = node.value
        shape = f"{format_shape(value.shape)} {value.dtype.name}"
        rows = [fmt(value)]
        if mode == "forward" and node.tangent is not None:
            rows.append(_colored(f"tan={fmt(node.tangent)}", FORWARD_COLOR))
        if mode == "reverse" and node.adjoint is not None:
            rows.append(_colored(f"adj={fmt(node.adjoint)}", REVERSE_COLOR))
        title, detail = (node.name, f"{node.op} {shape}") if leaf else (
            node.op, f"{node.name} {shape}")
        lines.append(_node_line(node.name, _label(title, detail, rows, escaped=True), leaf,
                                node.name in outputs))
        for edge in node.edges:
            lines.append(_edge_line(edge, node.name, mode, fmt))
    return _digraph(lines, rankdir, LEGENDS[mode] if legend else None)


def _check_has(nodes, mode):
    if mode == "forward" and not any(n.tangent is not None or any(
            e.partial is not None or e.tangent is not None for e in n.edges) for n in nodes):
        raise ValueError("this trace has no tangents: trace in forward mode (give tangents) "
                         "to draw mode='forward'")
    if mode == "reverse" and not any(n.adjoint is not None for n in nodes):
        raise ValueError("this trace has no adjoints: trace in reverse mode (give "
                         "cotangents, or trace a scalar output) to draw mode='reverse'")


def _edge_line(edge, node: str, mode: str, fmt) -> str:
    parts = []
    if mode == "forward":
        if edge.partial is not None:
            parts.append(f"∂={fmt(edge.partial)}")
        if edge.tangent is not None:
            parts.append(_colored(f"tan={fmt(edge.tangent)}", FORWARD_COLOR))
        color = FORWARD_COLOR if edge.tangent is not None else MUTED_COLOR
        style = f"color=\"{color}\""
    elif mode == "reverse":
        if edge.cotangent is not None:
            parts.append(_colored(f"adj={fmt(edge.cotangent)}", REVERSE_COLOR))
        # Drawn from the input to the node like the data, arrow turned back: the
        # layout stays that of the forward picture while adjoints visibly flow back.
        style = (f"dir=back, color=\"{REVERSE_COLOR}\", penwidth=1.4"
                 if edge.cotangent is not None else "")
    else:
        style = ""
    if not parts:
        style = f"color=\"{MUTED_COLOR}\"" + (", dir=back" if mode == "reverse" else "")
    attrs = [style] if style else []
    if parts:
        attrs.insert(0, "label=<" + "<br/>".join(parts) + ">")
    tail = f" [{', '.join(attrs)}]" if attrs else ""
    return f"  {_id(edge.input)} -> {_id(node)}{tail};"


# --- DOT pieces ------------------------------------------------------------------------

def _digraph(lines, rankdir, legend) -> str:
    label = f", label=<{legend}<br/> >" if legend else ""
    return ("digraph gradserve {\n" + _HEADER.format(rankdir=rankdir, label=label)
            + "\n".join(lines) + "\n}\n")


def _node_line(name, label, leaf, output) -> str:
    shape = 'shape=box, style="rounded"' if leaf else "shape=ellipse"
    extra = ", peripheries=2" if output else ""
    return f"  {_id(name)} [{shape}{extra}, label=<{label}>];"


def _label(title, detail, rows=(), escaped=False) -> str:
    """Bold title, a small grey detail line, then rows (already escaped if `escaped`)."""
    rows = list(rows) if escaped else [html.escape(r) for r in rows]
    head = (f"<b>{html.escape(title)}</b><br/>"
            f"<font point-size=\"9\" color=\"#555555\">{html.escape(detail)}</font>")
    return "<br/>".join([head] + rows)


def _colored(text, color) -> str:
    return f"<font color=\"{color}\">{text}</font>"


def _id(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _dtype_name(code: int) -> str:
    dtype = DTYPES.get(code)
    return dtype.name if dtype is not None else f"dtype {code}"


def _attr_text(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(format_number(v) for v in value) + "]"
    return format_number(value) if isinstance(value, (int, float)) else str(value)
