"""External data (weights in files beside the model), checked before anything is read.

A model names its external files itself, so a model from elsewhere could name
`/etc/passwd`, `../../secret` or a symlink that leads out of its folder (onnx before
1.21 followed such paths: CVE-2024-27318, CVE-2024-27319 and later ones). Here every
location must be a relative path without `..`, and resolve, symlinks followed, to a
regular file inside the model's folder; only then does onnx read the data.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from .values import OnnxImportError


def external_tensors(model):
    """Every TensorProto of the model stored externally: initializers, sparse ones,
    Constant values and tensors in attributes, in subgraphs and local functions."""
    graphs = [model.graph]
    nodes = [n for f in model.functions for n in f.node]
    while graphs or nodes:
        if graphs:
            g = graphs.pop()
            for t in g.initializer:
                yield t
            for s in g.sparse_initializer:
                yield s.values
                yield s.indices
            nodes.extend(g.node)
            continue
        node = nodes.pop()
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + \
                    list(a.sparse_tensors):
                yield sparse.values
                yield sparse.indices
            if a.HasField("g"):
                graphs.append(a.g)
            graphs.extend(a.graphs)


def check_locations(onnx, model, folder: Path) -> None:
    """Raise OnnxImportError unless every external location stays inside `folder`."""
    root = folder.resolve()
    for tensor in external_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = f"initializer '{tensor.name}'" if tensor.name else "a tensor"
        bad = _bad_location(location)
        if bad:
            raise OnnxImportError(f"{where}: its external data location {location!r} {bad}; "
                                  "external data must be a file inside the model's folder, "
                                  "named by a relative path")
        target = (folder / location).resolve()
        if not target.is_relative_to(root):
            raise OnnxImportError(f"{where}: its external data location {location!r} leads "
                                  f"out of the model's folder (to {target}, through a "
                                  "symlink): refused")
        if not target.is_file():
            raise OnnxImportError(f"{where}: its external data file {location!r} is missing "
                                  "or not a regular file")


def _bad_location(location: str) -> str:
    if not location:
        return "is empty"
    if "\0" in location:
        return "holds a NUL character"
    for pure in (PurePosixPath(location), PureWindowsPath(location)):
        if pure.is_absolute() or pure.anchor:
            return "is an absolute path"
        if ".." in pure.parts:
            return "contains '..'"
    return ""
