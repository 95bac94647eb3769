"""A registered graph as a PyTorch function whose derivatives come from the service.

    from gradserve.client.torch import remote_function

    f = remote_function(client, graph)     # graph: a GraphBuilder or Graph proto
    loss = f(x, y).sum()                   # torch tensors in, torch tensors out
    loss.backward()                        # the VJP comes from the service

`remote_function` returns a callable around a torch.autograd.Function:

- forward: one Evaluate round trip; when grad is enabled and an input requires grad,
  the server keeps what the backward needs (EvaluateRequest.keep_residuals);
- backward: one Differentiate round trip, reverse mode (a VJP) for exactly the inputs
  that require grad, sending the kept residuals' handle instead of the inputs: the
  server runs only the reverse sweep (if the handle expired, the inputs are sent and
  it runs the forward sweep again);
- jvp (torch.func.jvp, torch.autograd.forward_ad): one Differentiate round trip,
  forward mode, after the forward's Evaluate.

Devices: the service computes on its own CPUs, so tensors on another device (CUDA,
MPS) are copied to host memory for the request, and the results copied back to the
device of the arguments (outputs: the first floating argument's; gradients: each
input's).
float32 and float64 are kept as they are; an argument of another dtype than the
graph declares is a TypeError (the service never casts).

Batching (torch.func.vmap): tangents and cotangents batched along any dim become the
service's leading axis of directions, one request for the whole batch
(torch.func.jacrev and jacfwd, gradcheck's batched checks); a vmap over the primal
inputs is refused with an error that says what to do instead. First derivatives
only: differentiating the backward again (create_graph=True, hessians) raises.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from gradserve.client._remote import RemoteError, RemoteGraph
from gradserve.client.onnx import OnnxImport

__all__ = ["ModuleImport", "RemoteError", "from_module", "remote_function"]

_NUMPY = {torch.float32: np.dtype("float32"), torch.float64: np.dtype("float64"),
          torch.int32: np.dtype("int32"), torch.int64: np.dtype("int64"),
          torch.bool: np.dtype("bool")}
_TORCH = {np_dtype: torch_dtype for torch_dtype, np_dtype in _NUMPY.items()}

_PRIMAL_VMAP = ("gradserve: torch.func.vmap over the primal inputs of a remote function "
                "is not supported: the service batches derivative directions (tangents, "
                "cotangents), not inputs. Give the graph a batch dimension instead (declare "
                "it -1) and call the function on the whole batch, or loop in Python (one "
                "round trip per element)")

_LEGACY_VMAP = ("gradserve: a remote function's derivatives batch under torch.func.vmap "
                "(torch.func.jacrev, jacfwd), not under PyTorch's older vmap, which "
                "torch.autograd.grad(is_grads_batched=True) and gradcheck's "
                "check_batched_grad use")


def remote_function(client, graph, outputs=None):
    """The graph as a function of torch tensors (one per graph input, by position or by
    name) returning one tensor for one output, else a tuple in the order of `outputs`
    (default: the graph's outputs). Differentiable in both modes; see the module docs.

    Registers the graph at once (one round trip); service errors raise RemoteError
    (a grpc.RpcError) with the server's message, which names the node and field.
    """
    remote = RemoteGraph(client, graph, outputs)

    def call(*args, **kwargs):
        values = [torch.as_tensor(v) if hasattr(v, "dtype")  # tensors, NumPy arrays
                  else torch.as_tensor(v, dtype=_TORCH[s.dtype])  # Python numbers, lists
                  for v, s in zip(remote.bind(args, kwargs), remote.inputs)]
        remote.check_dtypes([_numpy_dtype(v) for v in values])
        # A backward will follow: let the server keep what it needs (one forward sweep).
        keep = torch.is_grad_enabled() and any(v.requires_grad for v in values)
        _KEEP.value, _KEEP.handle = keep, ""
        try:
            out = _Evaluate.apply(remote, *values)
        finally:
            _KEEP.value, _KEEP.handle = False, ""
        return out[0] if len(out) == 1 else out

    call.remote = remote
    call.__doc__ = f"{remote!r} as a PyTorch function."
    return call


# Per thread, around one call: `value` (will a backward follow? set around
# _Evaluate.apply), `handle` (the residuals forward kept, read by setup_context) and
# `residuals` (the handle backward passes to _VJP.forward).
_KEEP = threading.local()


def _numpy_dtype(t: torch.Tensor) -> np.dtype:
    try:
        return _NUMPY[t.dtype]
    except KeyError:
        raise TypeError(f"gradserve takes float32, float64, int32, int64 and bool tensors, "
                        f"not {t.dtype}") from None


def _numpy(t: torch.Tensor) -> np.ndarray:
    functorch = torch._C._functorch
    if functorch.is_legacy_batchedtensor(t) or functorch.is_batchedtensor(t):
        raise NotImplementedError(_LEGACY_VMAP)  # torch.func.vmap reaches our vmap rules
    return t.detach().cpu().numpy()


def _tensor(a: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.array(a)).to(device)  # a writable copy of the reply's bytes


def _device(values) -> torch.device:
    """Where outputs go: the first floating argument's device (else the first's)."""
    for v in values:
        if v.is_floating_point():
            return v.device
    return values[0].device if values else torch.device("cpu")


def _floating(remote, i: int) -> bool:
    return remote.inputs[i].floating


class _Evaluate(torch.autograd.Function):
    """The graph's values; backward and jvp ask the service for derivatives."""

    @staticmethod
    def forward(remote, *values):
        arrays = [_numpy(v) for v in values]
        if getattr(_KEEP, "value", False):
            outs, _KEEP.handle = remote.evaluate_keeping(arrays)
        else:
            outs = remote.evaluate(arrays)
        return tuple(_tensor(o, _device(values)) for o in outs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        remote, *values = inputs
        ctx.remote = remote
        ctx.residuals = getattr(_KEEP, "handle", "")  # set by forward, in this thread
        ctx.save_for_backward(*values)
        ctx.save_for_forward(*values)
        ctx.mark_non_differentiable(*(o for o in output if not o.is_floating_point()))
        ctx.set_materialize_grads(False)  # None for outputs that do not reach the loss
        ctx.output_meta = [(o.shape, o.dtype, o.device) for o in output]

    @staticmethod
    def backward(ctx, *grads):
        remote, values = ctx.remote, ctx.saved_tensors
        wrt = tuple(i for i, need in enumerate(ctx.needs_input_grad[1:])
                    if need and _floating(remote, i))
        given = [(j, g) for j, g in enumerate(grads) if g is not None]
        result = [None] * len(values)
        if wrt and given:
            _KEEP.residuals = ctx.residuals  # read by _VJP.forward, inside this call
            try:
                cots = _VJP.apply(remote, wrt, tuple(j for j, _ in given), (), *values,
                                  *(g for _, g in given))
            finally:
                _KEEP.residuals = ""
            for i, c in zip(wrt, cots):
                result[i] = c
        return (None, *result)

    @staticmethod
    def jvp(ctx, _, *tangents):
        remote, values = ctx.remote, ctx.saved_tensors
        wrt = tuple(i for i, t in enumerate(tangents)
                    if t is not None and _floating(remote, i))
        of = tuple(j for j, (_, dtype, _) in enumerate(ctx.output_meta) if dtype.is_floating_point)
        result = [None] * len(ctx.output_meta)
        if wrt and of:
            tans = _JVP.apply(remote, wrt, of, (), *values, *(tangents[i] for i in wrt))
            for j, t in zip(of, tans):
                result[j] = t
        for j, (shape, dtype, device) in enumerate(ctx.output_meta):
            if result[j] is None and dtype.is_floating_point:
                result[j] = torch.zeros(shape, dtype=dtype, device=device)
        return tuple(result)

    @staticmethod
    def vmap(info, in_dims, remote, *values):
        raise NotImplementedError(_PRIMAL_VMAP)


class _Seeded(torch.autograd.Function):
    """A JVP or VJP request: the primal values, then the seeds (tangents of the inputs
    `wrt`, or cotangents of the outputs `of`), each with the leading direction dims
    `batch`. Linear in the seeds; a vmap over them joins `batch` (one request)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("gradserve: second derivatives of a remote function are "
                                  "not supported (its derivative has no derivative here)")

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("gradserve: second derivatives of a remote function are "
                                  "not supported (its derivative has no derivative here)")

    @classmethod
    def vmap(cls, info, in_dims, remote, wrt, of, batch, *tensors):
        n = len(remote.inputs)
        dims = in_dims[4:]
        if any(d is not None for d in dims[:n]):
            raise NotImplementedError(_PRIMAL_VMAP)
        size = info.batch_size
        seeds = [s.expand(size, *s.shape) if d is None else s.movedim(d, 0)
                 for s, d in zip(tensors[n:], dims[n:])]
        out = cls.apply(remote, wrt, of, (size, *batch), *tensors[:n], *seeds)
        return out, (0,) * len(out)


class _JVP(_Seeded):
    @staticmethod
    def forward(remote, wrt, of, batch, *tensors):
        n = len(remote.inputs)
        values, tangents = tensors[:n], tensors[n:]
        out = remote.jvp([_numpy(v) for v in values],
                         {i: _numpy(t) for i, t in zip(wrt, tangents)}, batch)
        return tuple(_tensor(out[j], tangents[0].device) for j in of)


class _VJP(_Seeded):
    @staticmethod
    def forward(remote, wrt, of, batch, *tensors):
        n = len(remote.inputs)
        values, cotangents = tensors[:n], tensors[n:]
        out = remote.vjp([_numpy(v) for v in values],
                         {j: _numpy(c) for j, c in zip(of, cotangents)}, wrt, batch,
                         residuals=getattr(_KEEP, "residuals", "") or "")
        return tuple(_tensor(g, values[i].device) for i, g in zip(wrt, out))


# --- a torch.nn.Module as an imported graph ----------------------------------------------------

def from_module(module, example_inputs, *, input_names=None, output_names=None,
                dynamic_batch: bool = True, exporter: str = "torchscript",
                opset: int | None = None, strict: bool = True):
    """Export `module` (a torch.nn.Module in eval mode) to ONNX with settings that keep
    every parameter as itself, import it, and return a ModuleImport whose `parameters`
    are keyed by `module.named_parameters()` names (and `named_buffers()` names for the
    buffers the graph reads, listed in `buffers`), each checked equal to the module's.

    exporter="torchscript" (torch.onnx.export(dynamo=False, do_constant_folding=False):
    no batch norm folded into convolutions, no pre-transposed weights) or "dynamo"
    (dynamo=True, optimize=False). Equal initializers that the exporter merged into one
    are split again, each under its own name. A parameter that cannot be found under its
    own name with its own value (folded, fused, transposed or unused) is an error naming
    it; strict=False leaves such parameters out instead (never under a wrong name).

    example_inputs: a tensor or a tuple of tensors; the graph's inputs are named
    `input_names` (default x, or x0, x1...) and its outputs `output_names` (y, or y0...).
    dynamic_batch: the first axis of every input and output stays free.

    The result's calls (`imported.vjp(client, {"x": x}, {"y": dy})`, `grad`, `evaluate`,
    `differentiate`) keep the parameters and buffers in the server's tensor store, put
    once per client, send only the data, and differentiate with respect to `trainable`.
    """
    onnx = _import_onnx()
    from gradserve.client.onnx import OnnxImportError, from_onnx

    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, not {type(module).__name__}")
    if module.training:
        raise ValueError("from_module differentiates the module in eval mode (batch norm's "
                         "running statistics, no dropout): call module.eval() first")
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'torchscript' or 'dynamo', not {exporter!r}")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) \
        else tuple(example_inputs)
    input_names = list(input_names or (["x"] if len(args) == 1 else
                                       [f"x{i}" for i in range(len(args))]))
    try:
        data = _export(module, args, input_names, output_names, dynamic_batch, exporter, opset)
    except Exception as err:  # torch's own errors, many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise OnnxImportError(
            f"torch.onnx.export ({exporter}) failed: {type(err).__name__}: {first}"
            + ("; a model that fixes its batch size exports with dynamic_batch=False"
               if dynamic_batch else "")
            + f"; exporter={'dynamo' if exporter == 'torchscript' else 'torchscript'!r} "
            "may work") from err
    proto = onnx.load_model_from_string(data)
    if output_names is None:  # y, or y0, y1...: known once exported (no extra forward)
        _rename_outputs(proto)

    params = {n: p.detach().cpu() for n, p in module.named_parameters()}
    buffers = {n: b.detach().cpu() for n, b in module.named_buffers()}
    _keep_only_module_initializers(onnx, proto, set(params) | set(buffers))
    _padding_rows_get_no_gradient(onnx, proto, module)
    imported = from_onnx(proto, parameters="inputs")

    wrong, missing = [], []
    for name, tensor in {**params, **buffers}.items():
        if name not in imported.parameters:
            if name in params and (tensor.is_floating_point() or tensor.is_complex()):
                missing.append(name)
            continue
        value = imported.parameters[name]
        mine = tensor.numpy()
        if value.shape != mine.shape or not np.array_equal(value, mine):
            wrong.append(name)
    problems = []
    if wrong:
        problems.append("the exported values of " + ", ".join(f"'{n}'" for n in wrong)
                        + " differ from the module's (the exporter changed them)")
    if missing:
        problems.append("no input of the exported graph is " + ", ".join(
            f"'{n}'" for n in missing) + " (unused in forward, or folded into another value "
            "by the exporter)")
    if wrong or (missing and strict):  # never a value under a torch name it does not have
        raise OnnxImportError("from_module cannot give these parameters their own gradients: "
                              + "; ".join(problems)
                              + ("; strict=False leaves the missing ones out" if not wrong
                                 else ""))
    order = [n for n in (*params, *buffers) if n in imported.parameters]
    return ModuleImport(**{f.name: getattr(imported, f.name)
                           for f in dataclasses.fields(imported)},
                        buffers=[n for n in order if n in buffers],
                        trainable=[n for n in order if n in params])


def _import_onnx():
    from gradserve.client.onnx import import_optional
    import_optional("onnxscript", "onnxscript", "from_module (torch.onnx.export)")
    return import_optional("onnx", "onnx", "from_module")


def _export(module, args, input_names, output_names, dynamic_batch, exporter, opset) -> bytes:
    import io
    import warnings

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            shapes = None
            if dynamic_batch:
                batch = torch.export.Dim("batch")
                shapes = tuple({0: batch} if a.dim() else None for a in args)
            program = torch.onnx.export(module, args, input_names=input_names,
                                        output_names=output_names, dynamo=True,
                                        optimize=False, dynamic_shapes=shapes, verbose=False,
                                        opset_version=opset)
            program.save(f)
        else:
            axes = {n: {0: "batch"} for n in input_names} if dynamic_batch else None
            torch.onnx.export(module, args, f, input_names=input_names,
                              output_names=output_names, dynamic_axes=axes, dynamo=False,
                              do_constant_folding=False, opset_version=opset or 18,
                              training=torch.onnx.TrainingMode.EVAL)
    return f.getvalue()


def _rename_outputs(proto) -> None:
    graph = proto.graph
    n = len(graph.output)
    names = ["y"] if n == 1 else [f"y{i}" for i in range(n)]
    taken = {t for node in graph.node for t in (*node.input, *node.output)} | \
        {i.name for i in graph.input} | {t.name for t in graph.initializer}
    old = [o.name for o in graph.output]
    if len(set(old)) != n or any(name in taken and name not in old for name in names):
        return  # the exporter's own names then
    rename = dict(zip(old, names))
    for node in graph.node:
        for i, t in enumerate(node.output):
            node.output[i] = rename.get(t, t)
        for i, t in enumerate(node.input):
            node.input[i] = rename.get(t, t)
    for o in graph.output:
        o.name = rename[o.name]


def _keep_only_module_initializers(onnx, proto, names: set[str]) -> None:
    """Undo what stands between a module's tensors and the graph's inputs: initializers
    the exporter merged (`Identity(bn1.weight) -> ln.weight`) become separate again, and
    initializers that are no module tensor (exporter constants) become Constant nodes, so
    that the import's parameters are exactly the module's tensors."""
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    merged = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits
              and n.output[0] in names and n.output[0] not in inits]
    for node in merged:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    constants = []
    for tensor in list(graph.initializer):
        if tensor.name not in names:
            constants.append(onnx.helper.make_node("Constant", [], [tensor.name],
                                                   value=tensor))
            graph.initializer.remove(tensor)
    for i, node in enumerate(constants):
        graph.node.insert(i, node)
    kept = {t.name for t in graph.initializer}
    for inp in list(graph.input):  # old exporters list initializers as inputs too
        if inp.name in {c.output[0] for c in constants} and inp.name not in kept:
            graph.input.remove(inp)


def _padding_rows_get_no_gradient(onnx, proto, module) -> None:
    """PyTorch gives an nn.Embedding's padding_idx row no gradient (a convention the ONNX
    graph does not carry): the graph reads W * keep + row instead of W, keep 0 on that row
    and row its (constant) value: the same values, and that row's gradient 0."""
    from onnx import numpy_helper

    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    added = []
    for prefix, m in module.named_modules():
        name = f"{prefix}.weight" if prefix else "weight"
        if not isinstance(m, torch.nn.Embedding) or m.padding_idx is None or name not in inits:
            continue
        weight = m.weight.detach().cpu().numpy()
        keep = np.ones((weight.shape[0], 1), weight.dtype)
        keep[m.padding_idx] = 0
        row = np.zeros_like(weight)
        row[m.padding_idx] = weight[m.padding_idx]
        padded = f"{name}/padding_row_without_gradient"
        for node in graph.node:
            for i, inp in enumerate(node.input):
                if inp == name:
                    node.input[i] = padded
        for value, what in ((keep, "keep"), (row, "row")):
            added.append(onnx.helper.make_node("Constant", [], [f"{padded}/{what}"],
                                               value=numpy_helper.from_array(value)))
        added.append(onnx.helper.make_node("Mul", [name, f"{padded}/keep"],
                                           [f"{padded}/kept"]))
        added.append(onnx.helper.make_node("Add", [f"{padded}/kept", f"{padded}/row"],
                                           [padded]))
    for i, node in enumerate(added):
        graph.node.insert(i, node)


@dataclasses.dataclass
class ModuleImport(OnnxImport):
    """An OnnxImport of a torch.nn.Module whose `parameters` are the module's own tensors
    under their names: `trainable` (from named_parameters(), in that order) and `buffers`
    (from named_buffers(): inputs of the graph, but not parameters to train)."""
    buffers: list = dataclasses.field(default_factory=list)
    trainable: list = dataclasses.field(default_factory=list)

    def default_wrt(self) -> list[str] | None:
        """The import's calls (`vjp`, `grad`, `differentiate`: parameters and buffers put
        once in the server's tensor store, only the data sent) differentiate with respect
        to the trainable parameters by default, not the buffers."""
        return list(self.trainable) or None
