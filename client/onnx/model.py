"""The import's result, and its calls through a Client with the parameters kept on the
server.

    imported = from_onnx("model.onnx")              # parameters="auto"
    with Client("127.0.0.1:50051") as client:
        imported.evaluate(client, {"x": x})         # {"y": ...}
        y, grads = imported.vjp(client, {"x": x}, {"y": dy})   # grads by parameter name
        grads = imported.grad(client, {"x": x}, of="loss")     # a scalar output

A model whose parameters are graph inputs (parameters="inputs", or "auto" with large
initializers) keeps them in the server's tensor store: the first call through a client
puts them (Client.put, in chunks, so any size up to the store's bounds), and every call
through that client names the stored tensors and sends only the data inputs. A handle
the server has lost (expired, evicted, restarted, another replica) is put again by the
Client and the call made once more. An entry of `inputs` named like a parameter is sent
instead of the stored one for that call. Changed `parameters` in place or by name?
`release(client)`: the next call puts the values as they are then.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from ..builder import GraphBuilder, Value

_PUT_LOCK = threading.Lock()  # one put per model and client, even from several threads


@dataclass
class OnnxImport:
    graph: GraphBuilder
    inputs: list[str]  # data inputs, in the model's order
    outputs: list[str]
    parameters: dict[str, np.ndarray] = field(default_factory=dict)  # name -> value
    input_dtypes: dict[str, str] = field(default_factory=dict)
    input_shapes: dict[str, tuple] = field(default_factory=dict)  # -1: any size
    opset: int = 0
    values: dict[str, Value] = field(default_factory=dict)  # outputs and parameters
    output_shapes: dict[str, tuple] = field(default_factory=dict)  # as imported; -1: dynamic
    # graph node name -> (ONNX node name, op type, torch module path from the exporter's
    # metadata or ()), for pictures grouped by module (gradserve.client.render.model_dot)
    node_origins: dict[str, tuple] = field(default_factory=dict)
    # what the floating initializers became: "constants" or "inputs" (what "auto" chose)
    parameter_mode: str = ""

    @property
    def num_parameters(self) -> int:
        return sum(int(a.size) for a in self.parameters.values())

    # --- calls through a Client, the parameters stored once --------------------------------

    def stored_parameters(self, client) -> Mapping:
        """The parameters as `client`'s calls name them: a TensorHandle (name -> stored
        tensor, for a request's inputs: `{**imported.stored_parameters(client), "x": x}`),
        put on first use and kept for this client; {} for a model without parameters."""
        if not self.parameters:
            return {}
        with _PUT_LOCK:
            handles = self.__dict__.setdefault("_handles", weakref.WeakKeyDictionary())
            handle = handles.get(client)
            if handle is None:
                handle = handles[client] = client.put(self.parameters)
        return handle

    def release(self, client) -> None:
        """Free the parameters `client` stored (the next call puts them again, with the
        values `parameters` holds then)."""
        with _PUT_LOCK:
            handle = self.__dict__.get("_handles", {}).pop(client, None)
        if handle is not None:
            client.delete(handle)

    def evaluate(self, client, inputs) -> dict:
        """The outputs, by name, for the data `inputs` (name -> array; one array for a
        model with one input)."""
        return client.evaluate(self.graph, self._request_inputs(client, inputs))

    def vjp(self, client, inputs, cotangents, *, wrt=None) -> tuple[dict, dict]:
        """Reverse mode: (outputs, cotangents of `wrt`: by default every parameter, or
        the data inputs of a model imported with its parameters as constants)."""
        return client.vjp(self.graph, self._request_inputs(client, inputs), cotangents,
                          wrt=self._wrt(wrt))

    def grad(self, client, inputs, *, of: str | None = None, wrt=None) -> dict:
        """The gradient of the scalar output `of` (default: the only output) with respect
        to `wrt` (default as `vjp`), by name."""
        return client.grad(self.graph, self._request_inputs(client, inputs), of=of,
                           wrt=self._wrt(wrt))

    def differentiate(self, client, inputs, *, wrt=None, **options):
        """Client.differentiate on the model (Jacobians, JVPs, VJPs...; `options` as
        there), `wrt` by default as `vjp`."""
        return client.differentiate(self.graph, self._request_inputs(client, inputs),
                                    wrt=self._wrt(wrt), **options)

    def __getstate__(self) -> dict:
        """Pickled and copied without the handles: they belong to this object's clients."""
        state = dict(self.__dict__)
        state.pop("_handles", None)
        state.pop("_references", None)
        return state

    def default_wrt(self) -> list[str] | None:
        """What the calls differentiate by default: every parameter (None, when there
        are none: the Client's default, every floating input)."""
        return list(self.parameters) or None

    def _wrt(self, wrt):
        return self.default_wrt() if wrt is None else wrt

    def _request_inputs(self, client, inputs) -> dict:
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise TypeError(f"the model has {len(self.inputs)} inputs "
                                f"({', '.join(self.inputs)}): pass a dict of them by name")
            inputs = {self.inputs[0]: inputs}
        handle = self.stored_parameters(client)
        if not handle:
            return dict(inputs)
        # the handle's references as a dict, made once per handle (a call's `{**handle}`
        # made a StoredTensor per parameter)
        kept = self.__dict__.setdefault("_references", weakref.WeakKeyDictionary())
        known = kept.get(client)
        if known is None or known[0] is not handle:
            known = kept[client] = (handle, dict(handle))
        return {**known[1], **inputs}
