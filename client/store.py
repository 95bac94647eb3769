"""Tensors kept on the server (the tensor store): handles, and references to them that
requests carry instead of the arrays.

    params = client.put({"w": w, "b": b})       # in chunks: any size up to the store's bounds
    client.grad(graph, {**params, "x": x})     # the request names them, sends only x
    client.get(params)                          # back, in chunks: {"w": ..., "b": ...}

A TensorHandle is a read-only mapping of name -> StoredTensor, so `{**handle, ...}`
puts its tensors into a request's inputs by reference. A handle lives on the server
process that answered the put; one the server no longer holds (evicted, expired,
restarted, another process) makes the request fail NOT_FOUND, and the Client puts
the tensors again from the arrays the handle keeps and retries, once.
"""

from __future__ import annotations

from typing import Iterator, Mapping, NamedTuple

import grpc
import numpy as np

from gradserve.v1.chunks import Assembler, write_chunks

VELOCITY = "velocity/"  # a training state's momentum buffers: VELOCITY + parameter name


class StoredTensor(NamedTuple):
    """One tensor of a handle, for a request's inputs, seeds or batches."""

    handle: "TensorHandle"
    name: str

    @property
    def nbytes(self) -> int:
        """This tensor's data, in bytes (0 where the handle's shapes are unknown)."""
        return self.handle.tensor_bytes(self.name)


class TensorHandle(Mapping):
    """Tensors on the server under one handle (Client.put, or a request's stored
    results). `id` is the server's handle (it changes when the client puts the
    tensors again); `shapes` maps each name to (dtype, shape) where known."""

    def __init__(self, handle_id: str, shapes: dict | None, nbytes: int = 0,
                 source: Mapping | None = None, stub=None):
        self.id, self.shapes, self.nbytes = handle_id, shapes, nbytes
        self._source = source  # the arrays, to put again after a NOT_FOUND (None: cannot)
        self._stub = stub  # the channel's stub that put it: its calls go there
        self._sizes: dict | None = None  # name -> data bytes, computed once (per call is N^2)

    def __getitem__(self, name: str) -> StoredTensor:
        if self.shapes is not None and name not in self.shapes:
            raise KeyError(name)
        return StoredTensor(self, name)

    def __iter__(self) -> Iterator[str]:
        if self.shapes is None:
            raise TypeError("the names of stored results are known once fetched "
                            "(Client.get); index the handle by name instead")
        return iter(self.shapes)

    def __len__(self) -> int:
        return 0 if self.shapes is None else len(self.shapes)

    @property
    def data_bytes(self) -> int:
        """The tensors' data, in bytes (0 where the shapes are unknown)."""
        return sum(self._tensor_sizes().values())

    def tensor_bytes(self, name: str) -> int:
        """One tensor's data, in bytes (0 where unknown)."""
        return self._tensor_sizes().get(name, 0)

    def _tensor_sizes(self) -> dict:
        if self._sizes is None:
            self._sizes = {name: int(np.prod(shape)) * np.dtype(dtype).itemsize
                           for name, (dtype, shape) in (self.shapes or {}).items()}
        return self._sizes

    def __repr__(self) -> str:
        names = "?" if self.shapes is None else ", ".join(self.shapes)
        return f"TensorHandle({self.id[:12]}..., [{names}])"

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other


def split(mapping) -> tuple[dict, dict]:
    """(arrays, references) of a request's tensor map whose values may be
    StoredTensors."""
    if not mapping:
        return mapping, {}
    arrays, refs = {}, {}
    for key, value in mapping.items():
        if isinstance(value, StoredTensor):
            refs[key] = value
        else:
            arrays[key] = value
    return arrays, refs


def fill(field, refs: Mapping[str, StoredTensor]) -> None:
    """Write references into a map<string, StoredTensor> field (current handle ids)."""
    for key, ref in refs.items():
        entry = field[key]
        entry.handle = ref.handle.id
        entry.name = "" if ref.name == key else ref.name


# A request's map<string, StoredTensor> fields, by path from the message.
STORED_FIELDS = ("stored_inputs", "stored_tangents", "stored_cotangents",
                 "second_order.stored_vectors", "stored_batches")


def _stored_fields(message) -> Iterator:
    for path in STORED_FIELDS:
        target = message
        for name in path.split("."):
            if name not in target.DESCRIPTOR.fields_by_name:
                break
            target = getattr(target, name)
        else:
            yield target


def named_ids(message) -> set[str]:
    """The handle ids a request's stored-tensor fields name."""
    return {ref.handle for field in _stored_fields(message) for ref in field.values()}


def rename(message, old: str, new: str) -> None:
    """Point a request's references to handle `old` at handle `new`."""
    for field in _stored_fields(message):
        for ref in field.values():
            if ref.handle == old:
                ref.handle = new


def stored_gone(err: grpc.RpcError) -> bool:
    """NOT_FOUND for a handle of the tensor store (not a graph): put again."""
    return (err.code() == grpc.StatusCode.NOT_FOUND
            and (err.details() or "").startswith("stored tensors"))


def put_chunks(method, arrays: Mapping, chunk_bytes: int, timeout: float, metadata):
    """One PutTensors call with `arrays` in chunks; the PutTensorsResponse."""
    return method(write_chunks(arrays, None, chunk_bytes), timeout=timeout, metadata=metadata)


def assemble(replies, allocate=None) -> dict:
    """GetTensors' stream of chunk bytes as arrays (read-only), by name; `allocate(shape,
    dtype)` makes each array (a PagePool's `empty`)."""
    assembler = Assembler(allocate=allocate)
    for data in replies:
        assembler.add(data)
    return assembler.finish() if assembler.tensors else {}


def shapes_of(arrays: Mapping) -> dict:
    return {name: (np.asarray(a).dtype.name, tuple(np.shape(a))) for name, a in arrays.items()}
