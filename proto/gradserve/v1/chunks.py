"""Tensors in chunks, for the tensor store's streams (PutTensors, GetTensors): their
TensorChunk messages read and written directly on the wire bytes, so that a chunk's
data is copied once, into its array (protobuf's Python API would copy it three times).

PutTensorsRequest and GetTensorsResponse both hold `repeated TensorChunk chunks = 1`,
so the bytes of either are the same; small tensors share a message. The rules (gradient_service.proto, TensorChunk): a
chunk with offset 0 begins a tensor and carries its name, dtype and shape; the next
chunks carry the same name and the offset where the last one ended, until the
tensor's bytes are complete. Errors are TensorError naming "chunks[i].FIELD".
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np

from .codec import DTYPES, TensorError, TensorLimitError, wire_array
from .tensor_wire import _varint_bytes
from .tensor_wire import read_varint as _varint

# Data per chunk by default, well within any message limit. grpc's Python layer copies
# each message into (and out of) a buffer of its size: 1 MiB ones reuse malloc's heap,
# 4 MiB ones took fresh pages each time (a 102 MB put: 8,600 client page faults).
CHUNK_BYTES = 1 << 20
# Arrays from this size up get pages of their own (an anonymous mmap), returned to the
# system when the array is freed: malloc would keep them in a per-thread arena (the
# store's bytes would then bound nothing the process gives back).
OWN_PAGES_BYTES = 1 << 20
MAX_RANK = 64


@dataclass
class Chunk:
    name: str
    dtype: int
    shape: list
    offset: int
    data: memoryview


def read_chunks(data: bytes, index: int) -> list[Chunk]:
    """The TensorChunks in a PutTensorsRequest's (or GetTensorsResponse's) bytes, the
    first numbered `index` in errors."""
    chunks, i, end = [], 0, len(data)
    view = memoryview(data)
    try:
        while i < end:
            key, i = _varint(data, i)
            if key == 0x0A:  # chunks = 1
                length, i = _varint(data, i)
                if i + length > end:
                    raise ValueError("a chunk runs past the end of the message")
                where = f"chunks[{index + len(chunks)}]"
                chunks.append(_tensor_chunk(data, view, i, i + length, where))
                i += length
            else:
                i = _skip(data, i, key & 7)
    except (IndexError, ValueError) as err:
        raise TensorError(f"chunks[{index + len(chunks)}]",
                          f"not a valid chunk message ({err})") from None
    if i != end:
        raise TensorError(f"chunks[{index + len(chunks)}]",
                          "not a valid chunk message (a field runs past its end)")
    return chunks


def _tensor_chunk(buf, view, i: int, end: int, where: str) -> Chunk:
    chunk = Chunk("", 0, [], 0, view[0:0])
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 2 and number in (1, 3, 5):
            length, i = _varint(buf, i)
            if i + length > end:
                raise ValueError(f"field {number} runs past the end of the chunk")
            if number == 1:
                try:
                    chunk.name = bytes(view[i:i + length]).decode()
                except UnicodeDecodeError:
                    raise TensorError(f"{where}.name", "not valid UTF-8") from None
            elif number == 3:
                j = i
                while j < i + length:
                    value, j = _varint(buf, j)
                    _dim(chunk.shape, value, where)
            else:
                chunk.data = view[i:i + length]
            i += length
        elif wire == 0 and number in (2, 3, 4):
            value, i = _varint(buf, i)
            if number == 2:
                chunk.dtype = value
            elif number == 3:
                _dim(chunk.shape, value, where)
            else:
                chunk.offset = _signed(value)
        else:
            i = _skip(buf, i, wire)
    return chunk


def _dim(shape: list, value: int, where: str) -> None:
    if len(shape) >= MAX_RANK:
        raise TensorError(f"{where}.shape", f"rank over {MAX_RANK}")
    shape.append(_signed(value))


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _skip(buf, i: int, wire: int) -> int:
    if wire == 0:
        return _varint(buf, i)[1]
    if wire == 2:
        length, i = _varint(buf, i)
        return i + length
    if wire in (1, 5):
        return i + (8 if wire == 1 else 4)
    raise ValueError(f"wire type {wire}")


def write_chunks(arrays: Mapping[str, np.ndarray], names: Iterable[str] | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """PutTensorsRequest / GetTensorsResponse bytes for `names` of `arrays` (default
    all): chunks of at most `chunk_bytes` of data each, as many to a message as fit in
    `chunk_bytes` of data (small tensors share one)."""
    pending, size = [], 0
    for piece in _chunk_pieces(arrays, names, chunk_bytes):
        if pending and size + len(piece) > chunk_bytes:
            yield b"".join(pending)
            pending, size = [], 0
        pending.append(piece)
        size += len(piece)
    if pending:
        yield b"".join(pending)


def _chunk_pieces(arrays, names, chunk_bytes) -> Iterator[bytes]:
    """One `chunks` field (key, length, TensorChunk) per chunk."""
    for name in (arrays if names is None else names):
        code, a = wire_array(arrays[name], name)
        raw = memoryview(a.reshape(-1).view(np.uint8)) if a.nbytes else memoryview(b"")
        key = name.encode()
        total, offset = a.nbytes, 0
        while True:
            piece = raw[offset:offset + chunk_bytes]
            head = b"\x0a" + _varint_bytes(len(key)) + key
            if offset == 0:
                head += b"\x10" + _varint_bytes(code)
                if a.ndim:
                    packed = b"".join(_varint_bytes(d) for d in a.shape)
                    head += b"\x1a" + _varint_bytes(len(packed)) + packed
            else:
                head += b"\x20" + _varint_bytes(offset)
            if len(piece):
                head += b"\x2a" + _varint_bytes(len(piece))
            yield b"".join((b"\x0a", _varint_bytes(len(head) + len(piece)), head, piece))
            offset += len(piece)
            if offset >= total:
                break


def empty(shape, dtype) -> np.ndarray:
    """An uninitialized array; from OWN_PAGES_BYTES up, on pages of its own: private
    ones, on huge pages where the kernel gives them (a shared mapping, mmap's default,
    takes no huge pages: writing 102 MB into one took 70 ms of page faults, into a
    private one advised MADV_HUGEPAGE 19 ms, as into numpy's own np.empty)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < OWN_PAGES_BYTES:
        return np.empty(shape, dtype)
    return np.frombuffer(own_pages(nbytes), dtype).reshape(shape)


def own_pages(nbytes: int) -> mmap.mmap:
    """An anonymous private mapping of `nbytes`, advised for huge pages."""
    pages = mmap.mmap(-1, nbytes, flags=_PRIVATE)
    if _HUGE is not None:
        try:
            pages.madvise(_HUGE)
        except OSError:  # a kernel without transparent huge pages: small pages then
            pass
    return pages


_PRIVATE = mmap.MAP_PRIVATE | getattr(mmap, "MAP_ANONYMOUS", 0)
_HUGE = getattr(mmap, "MADV_HUGEPAGE", None)


class Assembler:
    """Chunks in, arrays out. `reserve(nbytes, field)` is called as each tensor begins,
    before its array is allocated (it may raise to refuse it); `max_elements` bounds
    each tensor; `allocate(shape, dtype)` makes each array (default `empty`)."""

    def __init__(self, reserve: Callable[[int, str], None] | None = None,
                 max_elements: int | None = None,
                 allocate: Callable[[list, np.dtype], np.ndarray] | None = None):
        self.reserve, self.max_elements = reserve, max_elements
        self.allocate = allocate or empty
        self.tensors: dict[str, np.ndarray] = {}
        self._current: tuple[str, memoryview, int] | None = None  # name, bytes, filled
        self._index = 0

    def add(self, data: bytes) -> None:
        chunks = read_chunks(data, self._index)
        if not chunks:
            raise TensorError(f"chunks[{self._index}]", "a message without chunks")
        for chunk in chunks:
            self._add(chunk, f"chunks[{self._index}]")
            self._index += 1

    def _add(self, chunk: Chunk, where: str) -> None:
        current = self._current
        if chunk.offset == 0 and (current is None or current[2] == len(current[1])
                                  or chunk.name != current[0]):
            self._begin(chunk, where)
            return
        if current is None:
            raise TensorError(f"{where}.offset", f"offset {chunk.offset:,} continues no "
                              "tensor (a tensor's first chunk has offset 0)")
        name, raw, filled = current
        if chunk.name != name:
            raise TensorError(f"{where}.name", f"'{chunk.name[:200]}', but tensor "
                              f"'{name[:200]}' has {filled:,} of its {len(raw):,} bytes: "
                              "its chunks come first")
        if chunk.offset != filled:
            raise TensorError(f"{where}.offset", f"{chunk.offset:,} for tensor "
                              f"'{name[:200]}', which has {filled:,} bytes so far (chunks "
                              "go in order, each at the offset where the last ended)")
        self._fill(chunk, where)

    def _begin(self, chunk: Chunk, where: str) -> None:
        self._check_complete(where)
        name = chunk.name
        if not name:
            raise TensorError(f"{where}.name", "a tensor's first chunk needs a name")
        if name in self.tensors:
            raise TensorError(f"{where}.name", f"tensor '{name[:200]}' is given twice")
        dtype = DTYPES.get(chunk.dtype)
        if dtype is None:
            raise TensorError(f"{where}.dtype", f"tensor '{name[:200]}': dtype "
                              f"{chunk.dtype} is not a supported DataType (the first "
                              "chunk sets it)")
        if any(d < 0 for d in chunk.shape):
            raise TensorError(f"{where}.shape", f"tensor '{name[:200]}': a negative "
                              f"dimension in {chunk.shape}")
        count = math.prod(chunk.shape)
        if self.max_elements and count > self.max_elements:
            raise TensorLimitError(f"{where}.shape", f"tensor '{name[:200]}' has "
                                   f"{count:,} elements, over the limit of "
                                   f"{self.max_elements:,} (max_tensor_elements)")
        if self.reserve is not None:
            self.reserve(count * dtype.itemsize, f"{where}.shape")
        array = self.allocate(chunk.shape, dtype)
        self.tensors[name] = array
        raw = memoryview(array.reshape(-1).view(np.uint8)) if array.nbytes else memoryview(b"")
        self._current = (name, raw, 0)
        self._fill(chunk, where)

    def _fill(self, chunk: Chunk, where: str) -> None:
        name, raw, filled = self._current
        n = len(chunk.data)
        if not n:
            return
        if filled + n > len(raw):
            raise TensorError(f"{where}.data", f"tensor '{name[:200]}' runs past its "
                              f"{len(raw):,} bytes (the shape and dtype of its first chunk)")
        raw[filled:filled + n] = chunk.data
        self._current = (name, raw, filled + n)

    def _check_complete(self, where: str) -> None:
        if self._current is not None:
            name, raw, filled = self._current
            if filled != len(raw):
                raise TensorError(f"{where}.offset", f"tensor '{name[:200]}' ended after "
                                  f"{filled:,} of its {len(raw):,} bytes")

    def finish(self) -> dict:
        """The arrays, once the last chunk came; TensorError if a tensor is incomplete."""
        self._check_complete(f"chunks[{self._index}]")
        if not self.tensors:
            raise TensorError("chunks", "no tensors were sent")
        for a in self.tensors.values():
            a.flags.writeable = False
        return self.tensors
