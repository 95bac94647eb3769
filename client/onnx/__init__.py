"""ONNX models as gradserve graphs: `from_onnx(model) -> OnnxImport`.

    imported = from_onnx("model.onnx", parameters="inputs")
    imported.graph        # a GraphBuilder over the engine's ops
    imported.inputs       # the model's data inputs, in order
    imported.outputs      # its outputs, in order
    imported.parameters   # initializers that became graph inputs: name -> array
    imported.grad(client, {"x": x}, of="loss")   # the parameters put once, x sent

parameters="auto" (the default) keeps the initializers as constants unless they are
over half the server's message limit; then they are inputs, kept in the server's
tensor store by the import's calls (model.py).

Each ONNX op becomes one engine op or a small composite of them (Gemm is a
matmul and an add, LayerNormalization a mean, a square, a reciprocal square
root and a few products). Whatever can be computed at import time is: shape
plumbing (Shape, Gather, Concat, Reshape... on shapes), Constant nodes and, with
parameters="constants", anything computed from initializers alone. A dynamic
dimension (a dim_param such as "batch") is carried as a symbol through that
arithmetic and becomes -1 in the graph where the engine allows it (a reshape
may have one).

Names are kept: inputs, outputs and initializers keep the model's names, and
each ONNX node's result is the graph value of its output's name; a composite's
intermediate values are named `output/op`.

Needs the `onnx` package (pip install 'gradserve[onnx]'); never onnxruntime.

The package: model.py (OnnxImport, the result, and its calls with the parameters stored
once), values.py (dynamic dimensions, graph values under import, the errors),
folds.py (the engine's ops in numpy, for what is known at import time: each checked
against the engine by tests/client/test_onnx_folds.py), emitter.py (engine ops over import-time
values: folded or emitted), registry.py (op type -> converter), importer.py (the graph
walker; loading, with external data checked by external.py) and ops/ (the converters, one
module per op family: elementwise, shapes, indexing, reductions, linalg, nn).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..builder import GraphBuilder, Value
from . import ops  # noqa: F401  (importing the converters registers them)
from .importer import Importer, _onnx_dtype, import_optional, load_model
from .registry import CONVERTERS, supported_ops  # noqa: F401
from .values import (DEFAULT_MESSAGE_BYTES, MAX_FOLD_BYTES, PARAMETER_MODES, WIRE_DTYPES, Dim, Dyn, OnnxImport,  # noqa: F401
                     OnnxImportError)

__all__ = ["FoldedParametersWarning", "OnnxImport", "OnnxImportError", "auto_parameter_mode", "from_onnx",
           "import_into", "load_model",
           "model_inputs", "supported_ops"]


def from_onnx(model, parameters: str = "auto", input_shapes: dict | None = None,
              max_fold_bytes: int = MAX_FOLD_BYTES, *, client=None) -> OnnxImport:
    """Import an ONNX model (a path, bytes or onnx.ModelProto) as a gradserve graph.

    parameters="constants": initializers become graph constants (register once, send only
    the data). parameters="inputs": floating initializers become graph inputs, returned with
    their values in `parameters`, so derivatives with respect to them can be asked for; the
    result's calls (`imported.vjp(client, ...)`, `evaluate`, `grad`, `differentiate`) keep
    them in the server's tensor store, put once per client, and send only the data.
    parameters="auto" (the default): "constants" while the initializers total at most half
    the server's max_message_bytes (that of `client`'s server, asked with GetServerInfo;
    without a client, half of gradserve serve's default 64 MiB), else "inputs", so that a
    big model never makes a graph over the message limit. `parameter_mode` says which.
    `input_shapes` ({name: [dims]}, None or -1 for a dynamic size) overrides the model's
    declared input shapes. `max_fold_bytes`: what import-time folding may allocate beyond
    twice the model's initializers (a model asking for more is refused with that advice).
    """
    if parameters not in PARAMETER_MODES:
        raise ValueError(f"parameters must be one of {', '.join(PARAMETER_MODES)}, "
                         f"not {parameters!r}")
    with _one_line_errors():
        proto = load_model(model)
        if parameters == "auto":
            parameters = auto_parameter_mode(proto, client)
        if parameters == "inputs":
            _warn_of_folded_parameters(proto)
        return Importer(proto, parameters, input_shapes, max_fold_bytes=max_fold_bytes).run()


def auto_parameter_mode(proto, client=None) -> str:
    """What parameters="auto" makes of `proto`'s initializers: "inputs" when they total
    more than half the message limit of `client`'s server (or of the default), else
    "constants"."""
    limit = (client.server_info().limits.max_message_bytes if client is not None
             else DEFAULT_MESSAGE_BYTES)
    onnx = import_optional("onnx", "onnx", "ONNX import")
    total = 0
    for tensor in proto.graph.initializer:
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except (KeyError, TypeError, ValueError):
            itemsize = 8
        total += int(np.prod(tensor.dims, dtype=np.int64)) * itemsize
    return "inputs" if total > limit // 2 else "constants"


def import_into(builder: GraphBuilder, model, bound: dict[str, tuple[Value, tuple]],
                parameters: str = "inputs", taken: tuple = (),
                max_fold_bytes: int = MAX_FOLD_BYTES) -> OnnxImport:
    """Import `model` into an existing builder, with some of its inputs bound to values
    already there: {input name: (value, shape)}, shape with None for the dynamic batch.
    Used to wrap a model in a larger graph (a training loss); `taken`: the names the
    builder already uses. The model's outputs are not marked as graph outputs: their
    values are in the result's `values`."""
    with _one_line_errors():
        proto = load_model(model)
        dyn = {name: Dyn(value, [Dim.symbol("batch") if d is None else d for d in shape],
                         value.dtype) for name, (value, shape) in bound.items()}
        if parameters == "auto":
            parameters = auto_parameter_mode(proto)
        return Importer(proto, parameters, None, builder, dyn, tuple(taken),
                        mark_outputs=False, max_fold_bytes=max_fold_bytes).run()


def model_inputs(model) -> list[tuple[str, str, list]]:
    """[(name, dtype, shape)] of the data inputs as the model declares them (None for a
    dynamic dimension)."""
    proto = load_model(model)
    onnx = import_optional("onnx", "onnx", "ONNX import")
    initializers = {t.name for t in proto.graph.initializer}

    def describe(v):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in t.shape.dim]
        return v.name, _onnx_dtype(onnx, t.elem_type, f"'{v.name}'"), dims
    return [describe(v) for v in proto.graph.input if v.name not in initializers]



@contextmanager
def _one_line_errors():
    """Memory and recursion exhausted by a model: an OnnxImportError like any other."""
    try:
        yield
    except MemoryError:
        raise OnnxImportError("the model does not fit in memory while importing it") from None
    except RecursionError:
        raise OnnxImportError("the model is nested too deeply to import") from None


class FoldedParametersWarning(UserWarning):
    """The exporter folded parameters into others (batch norm into the convolution before
    it): gradients under those names are not the framework's gradients for them."""


EXPORT_HINT = ("to export for gradients use gradserve.client.torch.from_module(module, "
               "example_inputs), or torch.onnx.export(..., dynamo=True, optimize=False), or "
               "torch.onnx.export(..., dynamo=False, do_constant_folding=False)")


def folded_parameters(proto) -> list[str]:
    """What can be seen of an exporter's folding in a model: initializers feeding a node
    that the dynamo exporter's optimizer made by fusing a batch norm (its node metadata
    says so) or a node of a batch norm module that is no BatchNormalization, and weights
    that the TorchScript exporter's constant folding computed (named onnx::Conv_N...)."""
    inits = {t.name for t in proto.graph.initializer}
    found = []
    for node in proto.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        rule = meta.get("pkg.onnxscript.rewriter.rule_name", "")
        scope = (meta.get("pkg.torch.onnx.class_hierarchy", "") + meta.get("namespace", ""))
        weights = [i for i in node.input[1:] if i in inits]
        fused = "batchnorm" in rule.lower() or (
            "batchnorm" in scope.lower() and node.op_type in ("Conv", "Gemm", "MatMul"))
        computed = node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose") and any(
            w.startswith("onnx::") for w in weights)
        if fused or computed:
            found.extend(w for w in weights if w not in found)
    return found


def _warn_of_folded_parameters(proto) -> None:
    import warnings

    found = folded_parameters(proto)
    if found:
        shown = ", ".join(f"'{n}'" for n in found[:8]) + (" ..." if len(found) > 8 else "")
        warnings.warn(FoldedParametersWarning(
            f"the ONNX exporter folded batch norms (or other parameters) into {len(found)} "
            f"initializer(s) ({shown}): their gradients are not PyTorch's gradients for the "
            f"parameters of those names, and the folded parameters have none; {EXPORT_HINT}"),
            stacklevel=3)
