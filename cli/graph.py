"""`gradserve graph show`: draw a graph, or what a server computed on it, with Graphviz;
`gradserve graph import`: an ONNX model as a saved gradserve graph.

GRAPH is a file:
- `.json`: a gradserve.v1.Graph in protobuf's JSON mapping, as GraphBuilder.save
  writes it for a .json path;
- `.py`: a Python file that defines `graph` (a GraphBuilder or a Graph proto) or a
  function `build()` returning one (`graph` wins when both exist); it is run with
  runpy under the module name `gradserve_graph`, so an `if __name__ ==
  "__main__":` block in it does not run;
- `.onnx`: an ONNX model, imported with its initializers as constants;
- anything else (e.g. `.pb`): the binary Graph proto, as GraphBuilder.save writes it.

Without input values the picture is the structure. With them (`--inputs`,
`--inputs-file`) the server traces the computation: reverse mode (the default)
from a cotangent of ones on each output (or on `--of`), forward mode from a
tangent of ones on each `--wrt` input.
"""

from __future__ import annotations

import argparse
import json
import runpy
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import grpc
import numpy as np

from gradserve.v1 import graph_pb2
from gradserve.v1.codec import DTYPES

from gradserve.client import Client, GraphBuilder, load_graph
from gradserve.client.extras import MissingExtra
from gradserve.client.onnx import MAX_FOLD_BYTES, OnnxImportError, from_onnx
from gradserve.client.render import graph_dot, has_modules, model_dot

from .in_process import server_address

DOT_SUFFIXES = (".dot", ".gv")
RENDERED_SUFFIXES = (".svg", ".png", ".pdf")
NAMED_VALUES = {"pi": np.pi, "-pi": -np.pi, "e": np.e, "-e": -np.e}
GRAPHVIZ_HINT = ("install Graphviz for the `dot` program (Debian/Ubuntu: apt-get install "
                 "graphviz; macOS: brew install graphviz), or render the DOT file elsewhere")


class UsageError(ValueError):
    """Flags or files that do not fit together."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="graph_command", required=True, metavar="COMMAND")
    show = sub.add_parser(
        "show", help="write a graph as Graphviz DOT, SVG or PNG, with values and derivatives",
        description="\n\n".join(__doc__.split("\n\n")[1:3]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = show.add_argument
    add("graph", metavar="GRAPH", help="a .json or binary (.pb) graph file, an ONNX model "
        "(.onnx), or a .py file defining `graph` or `build()`")
    add("--inputs", action="append", metavar="NAME=VALUE,...",
        help="input values: a number (filling the input's declared shape; pi and e allowed) "
             "or a JSON list, e.g. x=pi,y=3.14159 or w=[[1,2],[3,4]]; may be repeated")
    add("--inputs-file", metavar="PATH.npz",
        help="input values from a NumPy .npz file (cast to each input's dtype); "
             "--inputs override it")
    add("--mode", choices=["forward", "reverse"],
        help="forward: tangents from --wrt, with each edge's local partial derivative; "
             "reverse: adjoints flowing back from the outputs (default when values are given)")
    add("--wrt", action="append", metavar="INPUT",
        help="forward mode: an input to push a tangent of ones from; may be repeated "
             "(default: the only floating input)")
    add("--of", action="append", metavar="OUTPUT",
        help="reverse mode: an output to pull a cotangent of ones back from; may be repeated "
             "(default: every floating output)")
    add("--server", metavar="HOST:PORT",
        help="a running server (default: start one in-process on a free port)")
    add("-o", "--output", metavar="FILE",
        help="FILE.dot writes DOT; FILE.svg, FILE.png or FILE.pdf also writes FILE.dot and "
             "runs Graphviz's `dot` on it (default: DOT on stdout)")
    add("--rankdir", choices=["LR", "TB", "RL", "BT"],
        help="layout direction of the data flow (default: TB, top to bottom, for a model "
             "grouped by module; LR, left to right, otherwise)")
    add("--depth", type=int, metavar="N",
        help="a model (an ONNX import, or node names such as /layer1/layer1.0/conv1/Conv) is "
             "drawn one box per ONNX node, in clusters by module path; N module levels are "
             "opened (0: each top-level module is one box) and a block repeating an earlier "
             "one op for op is one box (default: the deepest level that fits on a screen)")
    add("--focus", metavar="NAME",
        help="draw only the module NAME (e.g. layer2.0) or the ONNX node NAME, with what "
             "feeds it and reads it; --depth then counts from NAME")

    imp = sub.add_parser(
        "import", help="import an ONNX model as a gradserve graph (.pb or .json)",
        description="Import an ONNX model (opset 13 or later) as a gradserve graph and save "
                    "it as GraphBuilder.save does: binary for .pb, JSON for .json. Shape "
                    "computations are folded at import time; a dynamic batch dimension "
                    "becomes -1. Prints the inputs, outputs, op counts and parameters.")
    imp.add_argument("model", metavar="MODEL.onnx", help="the ONNX model (external data is "
                     "read from its directory)")
    imp.add_argument("-o", "--output", required=True, metavar="GRAPH.pb|GRAPH.json",
                     help="where to save the graph")
    imp.add_argument("--parameters", choices=["constants", "inputs"], default="constants",
                     help="initializers as graph constants (send only the data) or as graph "
                          "inputs, for derivatives with respect to them; their values are "
                          "then saved next to the graph as GRAPH.params.npz "
                          "(default: %(default)s)")
    imp.add_argument("--max-fold-mib", type=float, default=MAX_FOLD_BYTES / 2 ** 20,
                     metavar="MIB",
                     help="what computing the model's constant parts at import time may "
                          "allocate, beyond twice the model's own weights; a model asking "
                          "for more is refused (default: %(default)g)")


def run(args: argparse.Namespace) -> int:
    command = f"gradserve graph {args.graph_command}"
    try:
        return _import(args) if args.graph_command == "import" else _show(args)
    except (OnnxImportError, MemoryError, RecursionError) as err:  # a model it cannot import
        print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except (UsageError, OSError, OnnxImportError, MissingExtra) as err:
        print(f"{command}: error: {err}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"{command}: error from the server: {err.code().name}: "
              f"{err.details()}", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or {MemoryError: "out of memory while importing the model",
                    RecursionError: "the model is nested too deeply to import"}.get(
                        type(err), type(err).__name__)


def _import(args) -> int:
    output = Path(args.output)
    if output.suffix.lower() not in (".pb", ".json"):
        raise UsageError(f"--output {output}: use a name ending in .pb (binary) or .json")
    if not args.max_fold_mib >= 0:
        raise UsageError(f"--max-fold-mib must be >= 0, not {args.max_fold_mib}")
    imported = from_onnx(args.model, parameters=args.parameters,
                         max_fold_bytes=int(args.max_fold_mib * 2 ** 20))
    imported.graph.save(output)
    graph = imported.graph.build()
    counts = Counter(node.op for node in graph.nodes)
    rows = [("inputs", ", ".join(f"{name} {imported.input_dtypes[name]} "
                                 f"{list(imported.input_shapes[name])}"
                                 for name in imported.inputs)),
            ("outputs", ", ".join(imported.outputs)),
            ("ops", f"{len(graph.nodes)} nodes: "
                    + ", ".join(f"{op} {n}" for op, n in counts.most_common()))]
    if args.parameters == "inputs":
        params = output.with_suffix(".params.npz")
        np.savez(params, **imported.parameters)
        rows.append(("parameters", f"{len(imported.parameters)} graph inputs, "
                                   f"{imported.num_parameters:,} values (saved in {params})"))
    else:
        values = sum(int(np.prod(c.shape)) for c in graph.constants.values())
        rows.append(("parameters", f"{len(graph.constants)} constants, {values:,} values"))
    print(f"imported {args.model} (opset {imported.opset}) as {output}")
    for label, text in rows:
        print(f"{label:10} {text}")
    return 0


def _show(args) -> int:
    output = Path(args.output) if args.output else None
    if output is not None and output.suffix.lower() not in DOT_SUFFIXES + RENDERED_SUFFIXES:
        raise UsageError(f"--output {output}: use a name ending in "
                         + ", ".join(DOT_SUFFIXES + RENDERED_SUFFIXES))
    if args.depth is not None and args.depth < 0:
        raise UsageError(f"--depth {args.depth}: use 0 or more module levels")
    path = Path(args.graph)
    origins = None
    if path.suffix.lower() == ".onnx" and path.exists():
        imported = from_onnx(path, parameters="constants")
        graph, origins = imported.graph.build(), imported.node_origins
    else:
        graph = read_graph(path)
    if not args.inputs and not args.inputs_file:
        if args.mode or args.wrt or args.of:
            raise UsageError("--mode, --wrt and --of need input values (--inputs or "
                             "--inputs-file)")
        if args.depth is not None or args.focus or has_modules(graph, origins):
            try:
                text = model_dot(graph, origins, depth=args.depth, focus=args.focus,
                                 rankdir=args.rankdir or "TB")
            except ValueError as err:
                raise UsageError(str(err)) from None
        else:
            text = graph_dot(graph, rankdir=args.rankdir or "LR")
    else:
        if args.depth is not None or args.focus:
            raise UsageError("--depth and --focus draw a model's structure: leave out "
                             "--inputs and --inputs-file")
        inputs = input_values(graph, args.inputs or [], args.inputs_file)
        with server_address(args.server) as address, Client(address) as client:
            text = _traced_dot(client, graph, inputs, args)
    return _write(text, output)


def _traced_dot(client, graph, inputs, args) -> str:
    mode = args.mode or "reverse"
    if mode == "forward":
        if args.of:
            raise UsageError("--of is for reverse mode; forward mode starts from --wrt")
        floating = [i.name for i in graph.inputs if _dtype(i).kind == "f"]
        wrt = args.wrt or (floating if len(floating) == 1 else None)
        if not wrt:
            raise UsageError("forward mode needs --wrt INPUT (floating inputs: "
                             + (", ".join(floating) or "none") + ")")
        unknown = [name for name in wrt if name not in floating]
        if unknown:
            raise UsageError(f"--wrt {', '.join(unknown)}: not a floating input of the graph "
                             "(floating inputs: " + (", ".join(floating) or "none") + ")")
        tangents = {name: np.ones_like(inputs[name]) for name in wrt}
        result = client.differentiate(graph, inputs, tangents=tangents, trace=True)
    else:
        if args.wrt:
            raise UsageError("--wrt is for forward mode; reverse mode starts from --of")
        outputs = client.evaluate(graph, inputs)
        floating = [name for name, value in outputs.items() if value.dtype.kind == "f"]
        of = args.of or floating
        unknown = [name for name in of if name not in floating]
        if unknown or not of:
            raise UsageError(f"--of {', '.join(unknown)}: not a floating output of the graph "
                             "(floating outputs: " + (", ".join(floating) or "none") + ")")
        cotangents = {name: np.ones_like(outputs[name]) for name in of}
        result = client.differentiate(graph, inputs, of=of, cotangents=cotangents, trace=True)
    return result.to_dot(mode, rankdir=args.rankdir or "LR")


def _write(text: str, output: Path | None) -> int:
    if output is None:
        sys.stdout.write(text)
        return 0
    dot_file = output if output.suffix.lower() in DOT_SUFFIXES else output.with_suffix(".dot")
    dot_file.write_text(text, encoding="utf-8")
    if dot_file == output:
        print(f"wrote {output}", file=sys.stderr)
        return 0
    program = shutil.which("dot")
    if program is None:
        print(f"gradserve graph show: wrote {dot_file}, but not {output}: the `dot` program "
              f"is not installed; {GRAPHVIZ_HINT}", file=sys.stderr)
        return 1
    done = subprocess.run([program, "-T" + output.suffix[1:].lower(), str(dot_file), "-o",
                           str(output)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"gradserve graph show: wrote {dot_file}, but `dot` failed on it: "
              f"{done.stderr.strip()}", file=sys.stderr)
        return 1
    print(f"wrote {dot_file} and {output}", file=sys.stderr)
    return 0


# --- reading graphs and values ------------------------------------------------------

def read_graph(path: Path) -> graph_pb2.Graph:
    """A Graph proto from a .json, binary or .py file (see the module's docstring)."""
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.suffix.lower() == ".onnx":
        return from_onnx(path, parameters="constants").graph.build()
    if path.suffix.lower() != ".py":
        try:
            return load_graph(path)
        except Exception as err:  # protobuf raises several kinds for a bad file
            kind = "JSON" if path.suffix.lower() == ".json" else "binary"
            raise UsageError(f"{path} is not a {kind} gradserve Graph ({err})") from err
    namespace = runpy.run_path(str(path), run_name="gradserve_graph")
    graph = namespace.get("graph")
    if graph is None and callable(namespace.get("build")):
        graph = namespace["build"]()
    if isinstance(graph, GraphBuilder):
        return graph.build()
    if isinstance(graph, graph_pb2.Graph):
        return graph
    raise UsageError(f"{path} must define `graph` (a GraphBuilder or Graph proto) or a "
                     f"function `build()` returning one; got {type(graph).__name__}")


def input_values(graph: graph_pb2.Graph, specs: list[str], npz: str | None) -> dict:
    """Arrays for the graph's inputs from --inputs-file and --inputs, in its dtypes."""
    declared = {i.name: i for i in graph.inputs}
    values = {}
    if npz:
        with np.load(npz) as data:
            for name in data.files:
                if name not in declared:
                    raise UsageError(f"{npz}: '{name}' is not an input of the graph "
                                     f"(inputs: {', '.join(declared)})")
                values[name] = data[name].astype(_dtype(declared[name]))
    for spec in specs:
        for item in _split(spec):
            name, sep, text = item.partition("=")
            name = name.strip()
            if not sep or name not in declared:
                raise UsageError(f"--inputs {item!r}: expected NAME=VALUE with NAME one of "
                                 + ", ".join(declared))
            values[name] = _value(text.strip(), declared[name], item)
    missing = [name for name in declared if name not in values]
    if missing:
        raise UsageError("no value for input " + ", ".join(missing)
                         + ": give --inputs NAME=VALUE or --inputs-file")
    return values


def _split(spec: str) -> list[str]:
    """NAME=VALUE items separated by commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    return [item for item in items if item.strip()]


def _dtype(declared: graph_pb2.Input) -> np.dtype:
    dtype = DTYPES.get(declared.dtype)
    if dtype is None:
        raise UsageError(f"input '{declared.name}' has an unsupported dtype ({declared.dtype})")
    return dtype


def _value(text: str, declared: graph_pb2.Input, item: str) -> np.ndarray:
    dtype = _dtype(declared)
    try:
        if text.lower() in NAMED_VALUES:
            raw = NAMED_VALUES[text.lower()]
        elif text.startswith("["):
            raw = json.loads(text)
        else:
            raw = float(text)
    except ValueError as err:
        raise UsageError(f"--inputs {item!r}: {text!r} is not a number, pi, e or a JSON "
                         "list") from err
    array = np.asarray(raw)
    if array.ndim == 0:
        return np.full([1 if d < 0 else d for d in declared.shape], raw, dtype)
    return array.astype(dtype)
