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


# --- models: nodes grouped by module -----------------------------------------------------
# A picture of a real model (an ONNX import) is drawn in units: one box per ONNX node
# (its composite's gradserve nodes together), placed in nested clusters by module path
# ("layer1" > "layer1.0"); a module deeper than `depth`, or repeating an earlier sibling
# op for op, is one box. Module paths come from the torch exporter's metadata (dynamo) or
# from ONNX node names such as /layer1/layer1.0/conv1/Conv (TorchScript exporter).

# Without a depth: the deepest level whose picture has at most MAX_UNITS boxes and
# MAX_RANKS of them on its longest path (about 55 px each: 20 fit a 1080-line screen).
MAX_UNITS = 40
MAX_RANKS = 20
MODULE_COLOR = "#eef3fb"
CLUSTER_COLOR = "#9aaccc"


def model_dot(graph: graph_pb2.Graph, origins: dict | None = None, *, depth: int | None = None,
              focus: str | None = None, rankdir: str = "TB", max_units: int = MAX_UNITS) -> str:
    """DOT of a model's structure grouped by module: `origins` maps a graph node to its
    ONNX node (name, op type, module path), as OnnxImport.node_origins does; without it
    nodes are grouped by their names (`out/op` belongs to `out`; /a/a.0/conv/Conv is in
    module a.0). `depth`: module levels opened (0: every top-level module is one box;
    None: the deepest with at most `max_units` boxes). `focus`: only that module (or ONNX
    node) and what feeds it or reads it. ValueError for an unknown focus."""
    model = _Model(graph, origins or {})
    keep = model.select(focus)
    base = 0 if focus is None or focus not in model.modules else model.level(focus) + 1
    if depth is None:
        depth = model.auto_depth(keep, base, max_units)
    else:
        depth = base + depth
    return model.dot(keep, depth, base, rankdir, focus)


def has_modules(graph: graph_pb2.Graph, origins: dict | None = None) -> bool:
    """Whether a graph carries module paths (from an ONNX import or in its node names)."""
    if any(scopes or _slash_chain(name) for name, _, scopes in (origins or {}).values()):
        return True
    return any(_slash_chain(n.name) for n in graph.nodes)


class _Model:
    def __init__(self, graph: graph_pb2.Graph, origins: dict):
        self.graph = graph
        self.outputs = set(graph.outputs)
        self.inputs = [i.name for i in graph.inputs]
        self.constants = {name: int(np.prod(t.shape)) for name, t in graph.constants.items()}
        names = {n.name for n in graph.nodes}
        self.unit_of: dict[str, str] = {name: name for name in self.inputs}
        self.units: dict[str, dict] = {}  # key -> op, chain, params, nodes
        for n in graph.nodes:
            if n.name in origins:
                key, op, scopes = origins[n.name]
                chain = _full_paths(scopes) if scopes else _slash_chain(key)
            else:
                key = _composite_root(n.name, names)
                op, chain = None, _slash_chain(key)
            unit = self.units.setdefault(key, {"op": op, "chain": chain, "params": set(),
                                               "nodes": 0})
            if unit["op"] is None and n.name == key:
                unit["op"] = n.op
            unit["nodes"] += 1
            unit["params"].update(i for i in n.inputs if self.constants.get(i, 0) > SMALL)
            self.unit_of[n.name] = key
        for unit in self.units.values():
            unit["op"] = unit["op"] or "?"
        # modules: every path in a chain; a leaf module (no submodules) is not a cluster:
        # its units sit in the parent, titled by the module's short name
        self.modules: dict[str, tuple] = {}
        for unit in self.units.values():
            for i, path in enumerate(unit["chain"]):
                self.modules.setdefault(path, unit["chain"][:i + 1])
        parents = {chain[-2] for chain in self.modules.values() if len(chain) > 1}
        for unit in self.units.values():
            chain = unit["chain"]
            leaf = bool(chain) and chain[-1] not in parents
            unit["place"] = chain[:-1] if leaf else chain
            unit["title"] = _short(chain) if leaf else unit["op"]
        self.clusters = {p: c for p, c in self.modules.items() if p in parents}
        self.repeat_of = self._repeats()
        self.order = {key: i for i, key in enumerate(self.units)}
        self.output_units = {self.unit_of[n] for n in self.outputs if n in self.unit_of}
        self.focus: str | None = None
        self.first_in: dict[tuple, int] = {}  # cluster chain -> its first unit's position
        for key, unit in self.units.items():
            for i in range(1, len(unit["place"]) + 1):
                self.first_in.setdefault(unit["place"][:i], self.order[key])

    def level(self, module: str) -> int:
        return len(self.modules[module]) - 1

    def select(self, focus: str | None) -> set:
        self.focus = focus if focus in self.modules else None
        if focus is None:
            return set(self.units)
        if focus in self.units:
            return {focus}
        if focus in self.clusters or focus in self.modules:
            return {k for k, u in self.units.items() if focus in u["chain"]}
        known = sorted(self.clusters, key=lambda p: (len(self.modules[p]), p))
        raise ValueError(f"--focus {focus}: no module or ONNX node of that name; modules: "
                         + (", ".join(known[:30]) + (", ..." if len(known) > 30 else "")
                            if known else "none (the graph has no module paths)"))

    def _repeats(self) -> dict:
        """Module -> an earlier module at the same level with the same units op for op
        (paths relative to each), e.g. layer2.1 -> layer1.0; top-level modules (a
        model's stages) are never folded."""
        signature: dict[str, list] = {}
        for unit in self.units.values():
            for i, path in enumerate(unit["place"]):
                rest = tuple(p[len(path):] for p in unit["chain"][i + 1:])
                signature.setdefault(path, []).append((rest, unit["title"], unit["op"]))
        first: dict[tuple, str] = {}
        repeats = {}
        for path, sig in signature.items():
            key = (len(self.modules[path]), tuple(sig))
            if key[0] > 1 and key in first:
                repeats[path] = first[key]
            else:
                first.setdefault(key, path)
        return repeats

    def box_of(self, key: str, depth: int) -> tuple[str, tuple]:
        """(the box a unit is drawn in: itself or a closed module, that box's clusters)."""
        place = self.units[key]["place"]
        for i, path in enumerate(place):
            if i >= depth or (path in self.repeat_of and not self._in_focus(path)):
                return path, place[:i]
        return key, place

    def _in_focus(self, path: str) -> bool:
        """Inside the focus, repeated blocks are drawn in full."""
        return self.focus is not None and (path == self.focus
                                           or path.startswith(self.focus + "."))

    def auto_depth(self, keep: set, base: int, max_units: int) -> int:
        """The deepest level whose picture has at most `max_units` boxes and a longest
        path of at most MAX_RANKS of them (its height, top to bottom)."""
        deepest = max((len(self.units[k]["place"]) for k in keep), default=0)
        depth = base
        for d in range(base, deepest + 1):
            boxes, edges, _ = self.layout(keep, d, base)
            if len(boxes) > max_units or _longest_path(edges) > MAX_RANKS:
                break
            depth = d
        return depth

    def layout(self, keep: set, depth: int, base: int = 0) -> tuple[dict, dict, dict]:
        """Boxes (id -> place, units, params), edges between them (and graph inputs) and
        the boxes outside a focus that feed it or read it (closed at level `base`)."""
        boxes: dict[str, dict] = {}
        for key in sorted(keep, key=self.order.__getitem__):
            box, place = self.box_of(key, depth)
            entry = boxes.setdefault(box, {"place": place, "units": [], "params": set()})
            entry["units"].append(key)
            entry["params"] |= self.units[key]["params"]
        edges, context = {}, {}
        for n in self.graph.nodes:
            b = self._drawn(self.unit_of[n.name], keep, depth, base)
            for name in n.inputs:
                if name in self.constants:
                    continue
                a = self._drawn(self.unit_of[name], keep, depth, base)
                if a == b or not (a in boxes or b in boxes):
                    continue
                edges[(a, b)] = True
                for box in (a, b):
                    if box not in boxes and box not in self.inputs:
                        context[box] = True
        return boxes, edges, context

    def dot(self, keep: set, depth: int, base: int, rankdir: str, focus: str | None) -> str:
        boxes, edges, context = self.layout(keep, depth, base)
        lines = []
        tree: dict[tuple, list] = {}
        for box, entry in boxes.items():
            tree.setdefault(entry["place"], []).append(self._box_line(box, entry))
        for name in self.inputs:
            if any(a == name for a, _ in edges):
                tree.setdefault((), []).insert(0, _model_node(
                    name, name, "input", "box", 'style="rounded"'))
        for box in context:
            tree.setdefault((), []).append(_model_node(
                box, box, "outside the focus", "box", f'style="dashed", color="{MUTED_COLOR}", '
                f'fontcolor="{MUTED_COLOR}"'))
        lines += self._clusters((), tree, "  ")
        lines += [f"  {_id(a)} -> {_id(b)};" for a, b in edges]
        title = f"focus: {focus}" if focus else None
        header = _MODEL_HEADER.format(rankdir=rankdir, label=(
            f', label=<{html.escape(title)}>' if title else ""))
        return "digraph gradserve {\n" + header + "\n".join(lines) + "\n}\n"

    def _drawn(self, unit: str, keep: set, depth: int, base: int) -> str:
        """The box drawn for a unit (or graph input); outside the focus, the module at
        the focus's level that holds it."""
        if unit in self.inputs:
            return unit
        return self.box_of(unit, depth if unit in keep else max(base - 1, 0))[0]

    def _box_line(self, box: str, entry: dict) -> str:
        params = sum(self.constants[p] for p in entry["params"])
        detail = [f"{params:,} params"] if params else []
        if box in self.units:
            unit = self.units[box]
            if unit["title"] != unit["op"]:
                detail.insert(0, unit["op"])
            extra = ", peripheries=2" if box in self.output_units else ""
            return _model_node(box, unit["title"], " · ".join(detail), "box",
                               f'style="rounded"{extra}', tooltip=box)
        ops = len(entry["units"])
        detail.insert(0, f"{ops} op" + ("s" if ops != 1 else ""))
        if box in self.repeat_of:
            detail.insert(0, f"as {self.repeat_of[box]}")
        return _model_node(box, _short(self.modules[box]), " · ".join(detail), "box3d",
                           f'style="filled", fillcolor="{MODULE_COLOR}", margin="0.12,0.05"',
                           tooltip=box)

    def _clusters(self, place: tuple, tree: dict, indent: str) -> list:
        lines = [indent + line for line in tree.get(place, [])]
        children = sorted({p[:len(place) + 1] for p in tree if len(p) > len(place)
                           and p[:len(place)] == place}, key=lambda c: self.first_in.get(c, 0))
        for child in children:
            path = child[-1]
            lines.append(f"{indent}subgraph {_id('cluster_' + path)} {{")
            lines.append(f"{indent}  label={_id(path)}; style=\"rounded\"; "
                         f"color=\"{CLUSTER_COLOR}\"; fontcolor=\"#3b4f75\";")
            lines += self._clusters(child, tree, indent + "  ")
            lines.append(f"{indent}}}")
        return lines


_MODEL_HEADER = ('  graph [rankdir={rankdir}, newrank=true, fontname="Helvetica", fontsize=11, '
                 'labelloc=t, nodesep=0.25, ranksep=0.25{label}];\n'
                 '  node [fontname="Helvetica", fontsize=10, height=0.3, margin="0.1,0.03"];\n'
                 '  edge [arrowsize=0.6, color="#555555"];\n')


def _model_node(name, title, detail, shape, style, tooltip=None) -> str:
    label = f"<b>{html.escape(title)}</b>"
    if detail:
        label += f"<br/><font point-size=\"8\" color=\"#555555\">{html.escape(detail)}</font>"
    tip = f", tooltip={_id(tooltip)}" if tooltip else ""
    return f"{_id(name)} [shape={shape}, {style}{tip}, label=<{label}>];"


def _longest_path(edges: dict) -> int:
    """Boxes on the longest path of a DAG given as {(tail, head): True}."""
    heads: dict[str, list] = {}
    indegree: dict[str, int] = {}
    for a, b in edges:
        heads.setdefault(a, []).append(b)
        indegree[b] = indegree.get(b, 0) + 1
        indegree.setdefault(a, 0)
    length = {v: 1 for v in indegree}
    ready = [v for v, d in indegree.items() if d == 0]
    while ready:
        v = ready.pop()
        for w in heads.get(v, ()):
            length[w] = max(length[w], length[v] + 1)
            indegree[w] -= 1
            if indegree[w] == 0:
                ready.append(w)
    return max(length.values(), default=1)


def _full_paths(scopes: Sequence[str]) -> tuple:
    """Module paths as the dynamo exporter records them are already full."""
    return tuple(scopes)


def _slash_chain(name: str) -> tuple:
    """/layer1/layer1.0/conv1/Conv -> (layer1, layer1.0, layer1.0.conv1): the TorchScript
    exporter names each scope relative to its parent, a Sequential's children by the
    Sequential's own name and an index (layer1.0 in layer1, downsample.0 in downsample)."""
    if not name.startswith("/"):
        return ()
    chain, prev_raw, prev_full = [], "", ""
    for raw in name.split("/")[1:-1]:
        if not raw:
            continue
        if prev_raw and raw.startswith(prev_raw + "."):
            full = prev_full[:len(prev_full) - len(prev_raw)] + raw
        else:
            full = f"{prev_full}.{raw}" if prev_full else raw
        chain.append(full)
        prev_raw, prev_full = raw, full
    return tuple(chain)


def _composite_root(name: str, names: set) -> str:
    """`out/op` and `out/op_1` (an imported composite's intermediates) belong to `out`."""
    for i, ch in enumerate(name):
        if ch == "/" and i > 0 and name[:i] in names:
            return name[:i]
    return name


def _short(chain: tuple) -> str:
    """A module's name within its parent: layer1.0.conv1 -> conv1; a Sequential's child
    keeps its parent's name: layer1.0, downsample.0."""
    if len(chain) > 1 and chain[-1].startswith(chain[-2] + "."):
        rest = chain[-1][len(chain[-2]) + 1:]
        return f"{_short(chain[:-1])}.{rest}" if rest.isdigit() else rest  # layer1.0
    return chain[-1] if chain else ""
