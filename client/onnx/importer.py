"""The graph walker: an onnx.ModelProto's initializers, inputs, nodes (each through its
registered converter) and outputs, in order, into a GraphBuilder."""

from __future__ import annotations

import ast

import importlib
import os
from pathlib import Path

import numpy as np

from ..builder import GraphBuilder
from ..extras import MissingExtra
from .emitter import Emitter
from .external import check_locations
from .registry import CONVERTERS, HINTS
from .values import (MAX_FOLD_BYTES, OLDEST_OPSET, ONNX_EXTRA_HINT, WIRE_DTYPES, Dim, Dyn, OnnxImport,
                     OnnxImportError, Seq, _fail, _FoldError, _has_dim, _shape_of)


class Importer:
    def __init__(self, model, parameters: str, input_shapes: dict | None,
                 builder: GraphBuilder | None = None, bound: dict | None = None,
                 taken: tuple = (), mark_outputs: bool = True,
                 max_fold_bytes: int = MAX_FOLD_BYTES):
        self.onnx = import_optional("onnx", "onnx", "ONNX import")
        self.numpy_helper = import_optional("onnx.numpy_helper", "onnx", "ONNX import")
        self.model = model
        self.mode = parameters
        self.input_shapes = dict(input_shapes or {})
        self.opset = _opset(model)
        graph = model.graph
        names = {i.name for i in graph.input} | {o.name for o in graph.output} | \
            {t.name for t in graph.initializer}
        for n in graph.node:
            names.update(n.input)
            names.update(n.output)
        names.discard("")
        self.g = builder or GraphBuilder()
        self.e = Emitter(self.g, names)
        self.e.used.update(taken)  # names the caller's part of the builder uses
        # folds may take the bound and twice the model's own weights (a folded transpose...)
        self.e.fold_limit = int(max_fold_bytes) + 2 * sum(t.ByteSize() for t in graph.initializer)
        self.env: dict[str, object] = dict(bound or {})
        self.parameters: dict[str, np.ndarray] = {}
        self.dim_counter = 0
        self.mark_outputs = mark_outputs
        self.origins: dict[str, tuple] = {}

    # --- model pieces -----------------------------------------------------------------

    def run(self) -> OnnxImport:
        graph = self.model.graph
        initializers = {t.name: t for t in graph.initializer}
        for tensor in graph.initializer:
            self._initializer(tensor)
        data_inputs, dtypes, shapes = [], {}, {}
        for inp in graph.input:
            if inp.name in initializers:
                continue
            dyn = self.env[inp.name] if inp.name in self.env else self._graph_input(inp)
            for axis, d in enumerate(dyn.shape):
                if isinstance(d, Dim):
                    self.e.dim_sources.setdefault(d, (dyn, axis))
            data_inputs.append(inp.name)
            dtypes[inp.name] = dyn.dtype
            shapes[inp.name] = tuple(-1 if isinstance(d, Dim) else d for d in dyn.shape)
        for node in graph.node:
            self._node(node)
        outputs, values, out_shapes = [], {}, {}
        for out in graph.output:
            outputs.append(out.name)
            values[out.name] = self._output(out.name)
            out_shapes[out.name] = tuple(-1 if isinstance(d, Dim) else int(d)
                                         for d in _shape_of(self.env[out.name]))
        ordered = {name: self.parameters[name] for name in initializers if name in self.parameters}
        values.update((name, self.env[name].value) for name in ordered)
        return OnnxImport(self.g, data_inputs, outputs, ordered, dtypes, shapes, self.opset,
                          values, out_shapes, self.origins, self.mode)

    def _initializer(self, tensor):
        array = _tensor_array(self.numpy_helper, tensor, "initializer")
        if self.mode == "inputs" and array.dtype.kind == "f":
            if array.dtype.name not in WIRE_DTYPES:
                raise OnnxImportError(f"initializer '{tensor.name}' is {array.dtype.name}; "
                                      "gradserve takes float32 and float64: convert the model "
                                      "to float32")
            name = tensor.name

            def make(name=name, array=array):
                self.parameters[name] = array
                self.e.used.add(name)
                return self.g.input(name, array.dtype.name, array.shape)
            self.env[name] = Dyn(None, array.shape, array.dtype, array=array, make=make)
        else:
            self.env[tensor.name] = array
            self.e.register_static(array, tensor.name)

    def _graph_input(self, inp) -> Dyn:
        t = inp.type.tensor_type
        if not inp.type.HasField("tensor_type"):
            raise OnnxImportError(f"input '{inp.name}' is not a tensor (sequences and maps "
                                  "are not supported)")
        dtype = _onnx_dtype(self.onnx, t.elem_type, f"input '{inp.name}'")
        if inp.name in self.input_shapes:
            shape = tuple(Dim.symbol(f"{inp.name}_{i}") if d is None or int(d) < 0 else int(d)
                          for i, d in enumerate(self.input_shapes[inp.name]))
        else:
            if not t.HasField("shape"):
                raise OnnxImportError(f"input '{inp.name}' has no declared shape: pass "
                                      f"input_shapes={{'{inp.name}': [...]}}")
            shape = tuple(self._dim(d) for d in t.shape.dim)
        self.e.used.add(inp.name)
        value = self.g.input(inp.name, dtype, [-1 if isinstance(d, Dim) else d for d in shape])
        dyn = Dyn(value, shape, dtype)
        self.env[inp.name] = dyn
        return dyn

    def _dim(self, d):
        if d.HasField("dim_value") and d.dim_value > 0:
            return int(d.dim_value)
        if d.HasField("dim_value") and d.dim_value == 0 and not d.dim_param:
            return 0
        if d.dim_param:
            return Dim.symbol(d.dim_param)
        self.dim_counter += 1
        return Dim.symbol(f"dim{self.dim_counter}")

    def _output(self, name):
        if name not in self.env:
            raise OnnxImportError(f"output '{name}' is not computed by any node")
        result = self.env[name]
        self.e.out = ""
        if isinstance(result, Seq):
            raise OnnxImportError(f"output '{name}' is a sequence; a gradserve graph outputs "
                                  "tensors (concatenate or stack the sequence in the model)")
        try:
            if isinstance(result, Dyn):
                value = result.value
                if value.name != name:
                    value = self.e.cast(result, result.dtype, name=name).value
            else:
                array = np.asarray(result)
                if array.dtype == object:
                    array = array.astype(np.int64) if not _has_dim(array) else _fail(
                        f"output '{name}'")
                self.e.used.add(name)
                value = self.g.constant(array, name=name) if name not in self.e.promoted \
                    else self.e.promoted[name]
        except _FoldError as err:
            raise OnnxImportError(f"output '{name}': {err}") from None
        if self.mark_outputs:
            self.g.output(value)
        return value

    def _node(self, node):
        where = f"ONNX node '{node.name or node.output[0]}' ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise OnnxImportError(f"{where}: ops of domain '{node.domain}' are not supported "
                                  "(only the standard ai.onnx domain is); export without "
                                  "runtime-specific fusions or optimizations")
        converter = CONVERTERS.get(node.op_type)
        if converter is None:
            hint = HINTS.get(node.op_type, "rewrite that part of the model with supported ops "
                             "(see gradserve.client.onnx.supported_ops()) before exporting, or "
                             "file an issue")
            raise OnnxImportError(f"{where}: opset {self.opset} {node.op_type} is not "
                                  f"supported: {hint}")
        inputs = []
        for name in node.input:
            if name == "":
                inputs.append(None)
            elif name not in self.env:
                raise OnnxImportError(f"{where}: input '{name}' is not defined before the "
                                      "node (nodes must be in topological order)")
            else:
                inputs.append(self.env[name])
        self.e.out = node.output[0] if node.output else ""
        before = len(self.g._nodes)
        try:
            attrs = {a.name: self._attr(a) for a in node.attribute}
            result = converter(self, node, inputs, attrs)
        except (_FoldError, OnnxImportError) as err:
            raise OnnxImportError(f"{where}: {err}") from None
        except MemoryError:
            raise OnnxImportError(f"{where}: out of memory while importing it") from None
        except (ArithmeticError, ValueError, TypeError, IndexError, KeyError, AttributeError,
                RecursionError) as err:  # a gap in a converter: still one clear error
            raise OnnxImportError(f"{where}: cannot be imported ({type(err).__name__}: "
                                  f"{err}); please report this model") from None
        origin = (node.name or node.output[0], node.op_type, _name_scopes(node))
        for value, *_ in self.g._nodes[before:]:
            self.origins[value.name] = origin
        results = result if isinstance(result, (list, tuple)) and not isinstance(result, Seq) \
            else [result]
        for name, r in zip(node.output, results):
            if name:
                if r is None:
                    raise OnnxImportError(f"{where}: output '{name}' is not supported")
                self.env[name] = r
                if not isinstance(r, Dyn):
                    self.e.register_static(r, name)

    def _attr(self, a):
        helper = self.onnx.helper
        value = helper.get_attribute_value(a)
        if a.type == self.onnx.AttributeProto.TENSOR:
            return _tensor_array(self.numpy_helper, value, f"attribute '{a.name}'")
        if isinstance(value, bytes):
            return value.decode()
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode() for v in value]
        return value

    # --- helpers for converters -------------------------------------------------------------

    def static(self, x, what):
        """A value the op needs at import time (axes, shapes, bounds...)."""
        if x is None:
            return None
        if isinstance(x, Dyn):
            if x.array is not None:
                return x.array
            raise _FoldError(f"{what} must be known at import time (a constant, an "
                             "initializer or computed from shapes), but it depends on the "
                             "graph's inputs")
        return np.asarray(x)

    def ints(self, x, what):
        array = self.static(x, what)
        return None if array is None else [v if isinstance(v, Dim) else int(v)
                                           for v in np.asarray(array).ravel()]


def _tensor_array(numpy_helper, tensor, what) -> np.ndarray:
    if tensor.data_location == 1:  # EXTERNAL, not loaded
        location = next((e.value for e in tensor.external_data if e.key == "location"), "?")
        raise OnnxImportError(
            f"{what} '{tensor.name}' is stored in an external file ('{location}') that was "
            "not loaded: pass the model's path (its directory holds the file), or load it "
            "with onnx.load(path) first; a model given as bytes cannot reach its external data")
    try:
        return np.asarray(numpy_helper.to_array(tensor))
    except MemoryError:
        raise OnnxImportError(f"{what} '{tensor.name}' does not fit in memory") from None
    except Exception as err:  # dims that do not match the data, an unknown type...
        raise OnnxImportError(f"{what} '{tensor.name}' cannot be read ({err})") from None


def _onnx_dtype(onnx, elem_type, what) -> str:
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError):
        dtype = str(elem_type)
    if dtype not in WIRE_DTYPES:
        raise OnnxImportError(f"{what} is {dtype}; gradserve takes "
                              f"{', '.join(WIRE_DTYPES)}: convert the model (e.g. float16 to "
                              "float32) before importing")
    return dtype


def _opset(model) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise OnnxImportError("the model imports no ai.onnx opset")
    version = versions[0]
    newest = import_optional("onnx.defs").onnx_opset_version()
    if version > newest:
        raise OnnxImportError(f"the model uses opset {version}; the newest the installed onnx "
                              f"package knows is {newest}")
    if version < OLDEST_OPSET:
        raise OnnxImportError(
            f"the model uses opset {version}; the oldest supported is {OLDEST_OPSET}: convert "
            f"it with onnx.version_converter.convert_version(model, {OLDEST_OPSET}) or export "
            f"with opset_version >= {OLDEST_OPSET}")
    return version


def import_optional(module: str, package: str = "onnx", needed_for: str = "ONNX import"):
    """Import part of the onnx package, or raise MissingExtra naming the extra."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise MissingExtra(f"{needed_for} needs {package}, which is not installed: "
                           f"{ONNX_EXTRA_HINT}", name=module) from err


def load_model(model):
    """An onnx.ModelProto from a path, bytes or a ModelProto (external data loaded from the
    model's directory when given a path; refused for bytes)."""
    onnx = import_optional("onnx", "onnx", "ONNX import")
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray, memoryview)):
        try:
            proto = onnx.load_model_from_string(bytes(model))
        except Exception as err:  # protobuf's DecodeError and friends
            raise OnnxImportError(f"the bytes are not an ONNX model ({err})") from None
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise OnnxImportError(f"{path}: no such file")
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:
            raise OnnxImportError(f"{path} is not an ONNX model ({err})") from None
        check_locations(onnx, proto, path.parent)  # before onnx reads any of them
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as err:  # OSError, onnx's ValidationError (it refuses symlinks)
            raise OnnxImportError(f"{path}: its external data cannot be read "
                                  f"({' '.join(str(err).split())})") from None
    else:
        raise TypeError(f"model must be a path, bytes or an onnx.ModelProto, not "
                        f"{type(model).__name__}")
    if proto.functions:
        inliner = import_optional("onnx.inliner", "onnx", "ONNX import")
        try:
            proto = inliner.inline_local_functions(proto)
        except (Exception, RecursionError) as err:  # onnx's ValidationError: e.g. recursion
            raise OnnxImportError(f"the model's local functions cannot be inlined: "
                                  f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    return proto



def _name_scopes(node) -> tuple:
    """The module path torch.onnx.export (dynamo) records for a node, e.g. ('layer1',
    'layer1.0', 'layer1.0.conv1'); () without that metadata."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ()
            return tuple(s for s in scopes[:-1] if s)  # the last one names the op
    return ()
