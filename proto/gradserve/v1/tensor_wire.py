"""The messages that carry large tensors, read from and written to their wire bytes
directly, in the same wire format (any protobuf client reads and writes them as usual).

Through protobuf's Python API a Tensor's `data` is copied whenever it is touched:
parsing copies it into the message, reading the field copies it out, assigning
copies it in, serializing copies it again. For the messages in LAYOUTS the server
and the client skip those copies:

- decode: one walk of the received bytes sets each tensor's dtype, shape and data (a
  memoryview of the received bytes) apart from the other fields, which are copied
  into a small message for the generated code to parse; an array is np.frombuffer
  over its data (read-only, no copy), checked by codec.array_from as every tensor
  is, when its field is first read. A length prefix past the end of its message is
  an error naming the field.
- encode: tensor fields are written as small header bytes plus memoryviews of the
  arrays, merged in field-number order with the generated serialization of the
  other fields, and joined once. Map entries go in the order of upb's deterministic
  serializer, so the bytes equal the generated SerializeToString(deterministic=True).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from google.protobuf import message_factory
from google.protobuf.message import DecodeError

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import TensorError, array_from, fill_tensor, fill_tensors, wire_array

NUMPY_MAX_RANK = 64  # NumPy's array rank limit: a longer shape is refused as soon as read
# Below this many bytes of tensor data a message is written by the generated code (the
# same bytes), and a reply the Client reads is parsed by it: the copies cost less than
# this module's Python walk (the seed example's request and reply: 39 us through the
# generated code, 70 us through the walk, on the 2-core machine).
SMALL_TENSOR_BYTES = 16384
# Each tensor raises that bound by SMALL_TENSOR_BYTES / 2: the walk's cost grows with the
# count of tensors, the copies' with their bytes (a model's 14 gradients in 62 KB: 43 us
# by the generated code against 76 us walked). A reply the Client reads is parsed by the
# generated code below 8 x SMALL_TENSOR_BYTES (its count of tensors is not known before it
# is read; one tensor of 20-120 KB costs 6 us more that way, 14 of them 20 us less).


def by_generated_code(nbytes: int, count: int) -> bool:
    """Whether a message with `count` tensors of `nbytes` in all is written by the
    generated code (see SMALL_TENSOR_BYTES): never at 8 x SMALL_TENSOR_BYTES or more,
    whatever the count, so that its copies stay a few pages (a reply of thousands of
    small tensors is written without them)."""
    return nbytes < SMALL_TENSOR_BYTES * min(2 + count, 16) // 2


@dataclass(frozen=True)
class Layout:
    """The fields of a message whose tensors this module reads and writes itself."""

    maps: tuple = ()  # map<string, Tensor>: {key: array}
    blocks: tuple = ()  # repeated messages with a Tensor `value`: [(message, array)]
    nested: tuple = ()  # (field, Layout) of singular message fields: TensorMessage


LAYOUTS = {
    pb.EvaluateRequest: Layout(maps=("inputs",)),
    pb.EvaluateResponse: Layout(maps=("outputs",)),
    pb.DifferentiateRequest: Layout(maps=("inputs", "tangents", "cotangents"),
                                    nested=(("second_order", Layout(maps=("vectors",))),)),
    pb.DifferentiateResponse: Layout(maps=("outputs", "tangents", "cotangents", "gradient", "hvp"),
                                     blocks=("jacobian", "hessian")),
    pb.TrainStepsRequest: Layout(maps=("parameters", "velocity", "batches")),
    pb.TrainStepsResponse: Layout(maps=("parameters", "velocity", "evaluation")),
}


class _Fields:
    """A message type's layout by field number: number -> (kind, name, detail)."""

    def __init__(self, descriptor, layout: Layout):
        by_name = descriptor.fields_by_name
        self.names = {f.number: f.name for f in descriptor.fields}
        self.by_number = {}
        for kind, names in (("map", layout.maps), ("block", layout.blocks)):
            for name in names:
                detail = None
                if kind == "block":
                    block = by_name[name].message_type
                    detail = (block.fields_by_name["value"].number,
                              message_factory.GetMessageClass(block))
                self.by_number[by_name[name].number] = (kind, name, detail)
        for name, sub in layout.nested:
            detail = _fields(by_name[name].message_type, sub)
            self.by_number[by_name[name].number] = ("nested", name, detail)
        self.by_name = {name: (number, kind, detail)
                        for number, (kind, name, detail) in self.by_number.items()}
        self.layout = layout


@functools.lru_cache(maxsize=None)
def _fields(descriptor, layout: Layout) -> _Fields:
    return _Fields(descriptor, layout)


def _fields_of(message_type) -> _Fields:
    fields = _FIELDS.get(message_type)
    if fields is None:
        fields = _FIELDS[message_type] = _fields(message_type.DESCRIPTOR, LAYOUTS[message_type])
    return fields


_FIELDS: dict = {}  # by message type: looked up on every message


class TensorMessage:
    """A message whose tensor fields (its Layout's) are kept apart from it as arrays:
    maps as {key: array}, blocks as [(message without its value, array)], nested
    messages as TensorMessages. Every other attribute is the message's own, so code
    that reads requests and replies reads it as it reads the generated message."""

    __slots__ = ("message", "_fields", "_tensors", "_raw", "_max_elements", "_written",
                 "_small")

    def __init__(self, message, tensors: dict | None = None):
        """A message to write: `tensors` by field name, as the class says (converted
        and checked here, so a bad array fails where it is given)."""
        self.message, self._fields = message, _fields_of(type(message))
        self._tensors = {name: value for name, value in (tensors or {}).items()
                         if value is not None}
        self._raw, self._max_elements = {}, None
        self._written = self._small = None
        if not any(self._tensors.values()):  # no tensors: the message's own bytes
            return
        if by_generated_code(*_nbytes(self._tensors)):  # the tensors in a generated message
            self._small = _generated(type(message)(), self._fields, self._tensors)
        else:
            self._written = _prepare(self._fields, self._tensors)

    @classmethod
    def _decoded(cls, message, fields: _Fields, raw: dict, max_elements):
        self = cls.__new__(cls)
        self.message, self._fields, self._tensors, self._raw = message, fields, {}, raw
        self._max_elements, self._written, self._small = max_elements, None, None
        for name, sub in fields.layout.nested:
            number, _, sub_fields = fields.by_name[name]
            self._tensors[name] = cls._decoded(getattr(message, name), sub_fields,
                                               raw.pop(name, {}), max_elements)
        return self

    def __getattr__(self, name):
        tensors = self._tensors
        if name in tensors:
            return tensors[name]
        fields = self._fields
        if name in fields.by_name:
            value = tensors[name] = self._arrays(name, fields.by_name[name][1])
            return value
        return getattr(self.message, name)

    def _arrays(self, name: str, kind: str):
        """A tensor field's arrays, from the decoded parts (empty for a message to write
        that was given none)."""
        raw = self._raw.pop(name, None)
        limit = self._max_elements
        if kind == "map":
            return {key: array_from(code, shape, data, f"{name}['{key}']", limit)
                    for key, (code, shape, data) in (raw or {}).items()}
        blocks = []
        for block, (code, shape, data) in raw or ():
            where = ", ".join(str(getattr(block, f.name)) for f in block.DESCRIPTOR.fields
                              if f.message_type is None)  # the names, not a sparse index
            blocks.append((block, array_from(code, shape, data, f"{name}[{where}]", limit)))
        return blocks

    def SerializeToString(self) -> bytes:
        """The message's bytes: what the generated code would write, tensors joined in once."""
        if self._small is not None:
            full = type(self.message)()
            full.CopyFrom(self.message)
            full.MergeFrom(self._small)
            return full.SerializeToString(deterministic=True)
        if self._written is None and not self._raw and not any(self._tensors.values()):
            return self.message.SerializeToString(deterministic=True)  # no tensors
        if self._written is None:  # a decoded message: write what it holds
            fields = self._fields
            for name in fields.by_name:
                getattr(self, name)
            self._written = _prepare(fields, self._tensors)
        return b"".join(_pieces(self.message, self._written)[0])


def _nbytes(tensors: dict) -> tuple[int, int]:
    """The bytes of data in tensor fields given by name (maps, blocks or nested), and the
    count of tensors."""
    total = count = 0
    for value in tensors.values():
        if value is None:
            continue
        if isinstance(value, TensorMessage):
            value = value._tensors
        if isinstance(value, list):
            total += sum(np.asarray(a).nbytes for _, a in value)
            count += len(value)
        elif value and isinstance(next(iter(value.values())), (dict, TensorMessage)):
            nbytes, n = _nbytes(value)
            total, count = total + nbytes, count + n
        else:
            total += sum(np.asarray(a).nbytes for a in value.values())
            count += len(value)
    return total, count


def _generated(message, fields: _Fields, tensors: dict):
    """The generated message with the tensors filled in (copies: for small messages)."""
    full = type(message)()
    full.CopyFrom(message)
    for name, value in tensors.items():
        if value is None:
            continue
        _, kind, detail = fields.by_name[name]
        target = getattr(full, name)
        if kind == "map":
            fill_tensors(target, value)
        elif kind == "block":
            for block, array in value:
                entry = target.add()
                entry.CopyFrom(block)
                fill_tensor(entry.value, array, name)
        else:
            sub = value._tensors if isinstance(value, TensorMessage) else value
            target.CopyFrom(_generated(target, detail, sub))
    return full


# --- writing ---------------------------------------------------------------------------


def encode(message, tensors: dict) -> bytes:
    """`message` with its tensor fields (by name, as TensorMessage takes them) in the wire
    format, equal to the generated SerializeToString(deterministic=True)."""
    return TensorMessage(message, tensors).SerializeToString()


def _prepare(fields: _Fields, tensors: dict) -> dict:
    """Tensor fields ready to write: number -> (pieces, length), or for a nested message
    number -> (fields, prepared) (its other fields are known only when it is written)."""
    written = {}
    for name, value in tensors.items():
        if value is None:
            continue
        number, kind, detail = fields.by_name[name]
        if kind == "map":
            written[number] = _map_pieces(number, name, value)
        elif kind == "block":
            written[number] = _block_pieces(number, name, detail[0], value)
        else:
            sub = value._tensors if isinstance(value, TensorMessage) else value
            written[number] = (detail, _prepare(detail, sub))
    return written


def _pieces(message, written: dict) -> tuple[list, int]:
    """The message's pieces and length: its generated serialization's fields with the
    tensor fields merged in, in field-number order."""
    small = message.SerializeToString(deterministic=True)
    view = memoryview(small)
    pieces, length, i, end = [], 0, 0, len(small)
    pending = sorted(written)
    while i < end:
        start = i
        key, i = _varint(small, i, end, "message")
        number = key >> 3
        i = _skip(small, i, end, key & 7, "message")
        while pending and pending[0] <= number:
            length += _emit(message, pending.pop(0), written, pieces)
        if number not in written:
            pieces.append(view[start:i])
            length += i - start
    for number in pending:
        length += _emit(message, number, written, pieces)
    return pieces, length


def _emit(message, number: int, written: dict, pieces: list) -> int:
    entry = written[number]
    if isinstance(entry[0], _Fields):  # a nested message: its own fields and tensors
        fields, prepared = entry
        name = message.DESCRIPTOR.fields_by_number[number].name
        sub_pieces, sub_length = _pieces(getattr(message, name), prepared)
        head = _key(number) + _varint_bytes(sub_length)
        pieces.append(head)
        pieces.extend(sub_pieces)
        return len(head) + sub_length
    pieces.extend(entry[0])
    return entry[1]


def _map_pieces(number: int, name: str, arrays) -> tuple[list, int]:
    pieces, length, tag = [], 0, _key(number)
    for key in sorted(arrays, key=_upb_order):
        head, data, size = _tensor_parts(arrays[key], f"{name}['{key}']")
        key_bytes = key.encode()
        entry = (b"\x0a" + _varint_bytes(len(key_bytes)) + key_bytes
                 + b"\x12" + _varint_bytes(size) + head)
        entry_length = len(entry) + len(data)
        entry = tag + _varint_bytes(entry_length) + entry
        pieces.append(entry)
        if data:
            pieces.append(data)
        length += len(entry) + len(data)
    return pieces, length


def _upb_order(key: str) -> bytes:
    """The order of map keys in protobuf's (upb's) deterministic serialization: by UTF-8
    bytes, a key before its own prefixes ("aa", "a", ""). 0xFF is never in UTF-8."""
    return key.encode() + b"\xff"


def _block_pieces(number: int, name: str, value_number: int, blocks) -> tuple[list, int]:
    pieces, length, tag = [], 0, _key(number)
    for block, array in blocks:
        head, data, size = _tensor_parts(array, name)
        small = block.SerializeToString(deterministic=True)
        entry = small + _key(value_number) + _varint_bytes(size) + head
        entry = tag + _varint_bytes(len(entry) + len(data)) + entry
        pieces.append(entry)
        if data:
            pieces.append(data)
        length += len(entry) + len(data)
    return pieces, length


def _tensor_parts(array, field: str) -> tuple[bytes, memoryview | bytes, int]:
    """A Tensor message as (dtype and shape fields with data's key and length, data, its
    serialized length); the data is a memoryview of the array (no copy when it is
    little-endian and C-contiguous)."""
    code, a = wire_array(array, field)
    head = b"\x08" + _varint_bytes(code)
    if a.ndim:
        packed = b"".join([_varint_bytes(d) for d in a.shape])
        head += b"\x12" + _varint_bytes(len(packed)) + packed
    data = b""
    if a.nbytes:
        head += b"\x1a" + _varint_bytes(a.nbytes)
        data = memoryview(a.reshape(-1).view(np.uint8))
    return head, data, len(head) + len(data)


_SMALL_VARINTS = [bytes([n]) for n in range(128)]


def read_varint(buf, i: int) -> tuple[int, int]:
    """(the varint at buf[i], the index after it), for readers that check bounds by
    catching IndexError (past the end) and ValueError (over 10 bytes)."""
    b = buf[i]
    if b < 0x80:  # most keys and lengths: one byte
        return b, i + 1
    result = shift = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")


def _varint_bytes(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire: int = 2) -> bytes:
    return _varint_bytes(number << 3 | wire)


# --- reading ---------------------------------------------------------------------------


def decode(message_type, data: bytes, max_elements: int | None = None,
           small_by_protobuf: bool = False) -> TensorMessage:
    """The message in `data` with its tensors left in `data` (see the module's
    docstring); arrays over `max_elements` are refused when read. Raises TensorError
    naming the field for a tensor field that is not well formed, and
    google.protobuf.message.DecodeError for other bytes that do not parse. With
    `small_by_protobuf`, a message under 8 x SMALL_TENSOR_BYTES is parsed by the generated
    code instead (its arrays then views of copies; malformed framing is DecodeError)."""
    fields = _fields_of(message_type)
    if small_by_protobuf and len(data) < 8 * SMALL_TENSOR_BYTES:
        message = message_type.FromString(data)
        return TensorMessage._decoded(message, fields, _parts_of(message, fields),
                                      max_elements)
    rest, raw = _split(data, memoryview(data), 0, len(data), fields, "")
    message = message_type.FromString(rest)
    return TensorMessage._decoded(message, fields, raw, max_elements)


def _parts_of(message, fields: _Fields) -> dict:
    """The tensor fields' parts, as _split gives them, taken out of a parsed message."""
    raw = {}
    for number, (kind, name, detail) in fields.by_number.items():
        if kind == "map":
            tensors = getattr(message, name)
            if not tensors:  # (read as empty: nothing to take out)
                continue
            raw[name] = {k: (t.dtype, tuple(t.shape), t.data) for k, t in tensors.items()}
        elif kind == "block":
            blocks = []
            for block in getattr(message, name):
                t = block.value
                parts = (t.dtype, tuple(t.shape), t.data)
                block.ClearField("value")
                blocks.append((block, parts))
            raw[name] = blocks
        else:
            raw[name] = _parts_of(getattr(message, name), detail)
            continue
        message.ClearField(name)
    return raw


def _split(buf: bytes, view: memoryview, i: int, end: int, fields: _Fields,
           prefix: str) -> tuple[bytes, dict]:
    """The fields of buf[i:end] that are not tensor fields, as bytes, and the tensor
    fields' parts: maps {key: (code, shape, data)}, blocks [(message, parts)], nested
    messages {field: parts}."""
    by_number = fields.by_number
    rest, run = [], i  # run: where the current stretch of other fields began
    raw: dict = {}
    nested: dict = {}
    while i < end:
        start = i
        try:  # outside the tensor fields, malformed bytes are protobuf's kind of error
            key = buf[i]  # inside the loop, i < end: most keys take one byte
            if key < 0x80:
                i += 1
            else:
                key, i = _varint(buf, i, end, prefix + "message")
            number, wire = key >> 3, key & 7
            spec = by_number.get(number) if wire == 2 else None
            if spec is None:
                i = _skip(buf, i, end, wire, prefix + fields.names.get(number, f"field {number}"))
                continue
        except TensorError as err:
            raise DecodeError(str(err)) from None
        kind, name, detail = spec
        length, i = _varint(buf, i, end, prefix + name)
        if length > end - i:
            raise TensorError(prefix + name, f"a length prefix of {length:,} bytes runs past "
                              f"the end of the message ({end - i:,} bytes left)")
        if kind == "map":
            entry = _entry(buf, view, i, i + length, name)
            if entry is None:  # kept as an unknown field of the message, as upb keeps it
                i += length
                continue
            raw.setdefault(name, {})[entry[0]] = entry[1]  # the last of a key wins
        if start > run:
            rest.append(view[run:start])
        run = i + length
        if kind == "block":
            raw.setdefault(name, []).append(_block(buf, view, i, run, name, *detail))
        elif kind == "nested":
            nested.setdefault(number, []).append((i, run))
        i = run
    if end > run:
        rest.append(view[run:end])
    for number, ranges in nested.items():
        _, name, sub = by_number[number]
        if len(ranges) == 1:  # the usual case: parsed where it lies
            sub_rest, sub_raw = _split(buf, view, *ranges[0], sub, prefix + name + ".")
        else:  # occurrences of a message field merge: parse them as one
            joined = b"".join(view[a:b] for a, b in ranges)
            sub_rest, sub_raw = _split(joined, memoryview(joined), 0, len(joined), sub,
                                       prefix + name + ".")
        rest.append(_key(number) + _varint_bytes(len(sub_rest)) + sub_rest)
        raw[name] = sub_raw
    return b"".join(rest), raw


def _entry(buf, view, i: int, end: int, name: str):
    """A map<string, Tensor> entry: (key, (code, shape, data)); None for an entry holding
    unknown fields, which protobuf (upb) keeps whole as an unknown field of the message
    rather than in the map."""
    key, tensor, where, unknown = b"", (0, [], b""), name, False
    while i < end:
        k = buf[i]  # inside the loop, i < end: most keys take one byte
        if k < 0x80:
            i += 1
        else:
            k, i = _varint(buf, i, end, where)
        number, wire = k >> 3, k & 7
        if wire != 2 or number not in (1, 2):
            i = _skip(buf, i, end, wire, where)
            unknown = True
            continue
        length, i = _varint(buf, i, end, where)
        if length > end - i:
            raise TensorError(where, f"a length prefix of {length:,} bytes runs past the end "
                              f"of its map entry ({end - i:,} bytes left)")
        if number == 1:
            key = buf[i:i + length]
            try:
                where = f"{name}['{key.decode()}']"
            except UnicodeDecodeError:
                raise TensorError(name, "a map key is not valid UTF-8") from None
        else:
            tensor = _tensor(buf, view, i, i + length, where, tensor)
        i += length
    if unknown:
        return None
    code, shape, data = tensor
    return key.decode(), (code, tuple(shape), data)


def _block(buf, view, i: int, end: int, name: str, value_number: int, block_class):
    """A repeated message holding one Tensor `value`: (message without it, parts)."""
    rest, tensor, run = [], (0, [], b""), i
    while i < end:
        start = i
        k = buf[i]  # inside the loop, i < end: most keys take one byte
        if k < 0x80:
            i += 1
        else:
            k, i = _varint(buf, i, end, name)
        number, wire = k >> 3, k & 7
        if number != value_number or wire != 2:
            i = _skip(buf, i, end, wire, name)
            continue
        length, i = _varint(buf, i, end, name)
        if length > end - i:
            raise TensorError(name, f"a length prefix of {length:,} bytes runs past the end "
                              f"of its message ({end - i:,} bytes left)")
        rest.append(view[run:start])
        tensor = _tensor(buf, view, i, i + length, name, tensor)
        i = run = i + length
    rest.append(view[run:end])
    code, shape, data = tensor
    return block_class.FromString(b"".join(rest)), (code, tuple(shape), data)


def _tensor(buf, view, i: int, end: int, where: str, tensor):
    """Read a Tensor message into (code, shape, data), continuing `tensor` (occurrences of
    a message field merge: dtype and data last one wins, shape entries accumulate)."""
    code, shape, data = tensor
    while i < end:
        k = buf[i]  # inside the loop, i < end: most keys take one byte
        if k < 0x80:
            i += 1
        else:
            k, i = _varint(buf, i, end, where)
        number, wire = k >> 3, k & 7
        if wire == 0 and number in (1, 2):
            value, i = _varint(buf, i, end, where)
            if number == 1:
                code = _int32(value)
            else:
                _append_dim(shape, value, where)
        elif wire == 2 and number in (2, 3):
            length, i = _varint(buf, i, end, where)
            part = "shape" if number == 2 else "data"
            if length > end - i:
                raise TensorError(where, f"its {part}'s length prefix of {length:,} bytes runs "
                                  f"past the end of the tensor ({end - i:,} bytes left)")
            if number == 3:
                data = view[i:i + length]
                i += length
            else:
                packed_end = i + length
                while i < packed_end:
                    value, i = _varint(buf, i, packed_end, where)
                    _append_dim(shape, value, where)
        else:
            i = _skip(buf, i, end, wire, where)
    return code, shape, data


def _append_dim(shape: list, value: int, where: str) -> None:
    if len(shape) >= NUMPY_MAX_RANK:
        raise TensorError(where, f"a shape of rank over {NUMPY_MAX_RANK} cannot be an array")
    shape.append(value - (1 << 64) if value >= 1 << 63 else value)


def _int32(value: int) -> int:
    """An enum's varint as protobuf reads it: the low 32 bits, signed."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _skip(buf, i: int, end: int, wire: int, where: str) -> int:
    """The index past a field's value of wire type `wire` starting at i."""
    if wire == 0:
        return _varint(buf, i, end, where)[1]
    if wire == 2:
        length, i = _varint(buf, i, end, where)
        i += length
    elif wire == 1:
        i += 8
    elif wire == 5:
        i += 4
    else:
        raise TensorError(where, f"wire type {wire} (groups) is not used by gradserve.v1")
    if i > end:
        raise TensorError(where, "a field runs past the end of its message")
    return i


def _varint(buf, i: int, end: int, where: str) -> tuple[int, int]:
    if i >= end:
        raise TensorError(where, "the message ends inside a field")
    b = buf[i]
    if b < 0x80:  # most keys and lengths: one byte
        return b, i + 1
    result, shift = b & 0x7F, 7
    i += 1
    while True:
        if i >= end or shift > 63:
            raise TensorError(where, "a varint runs past the end of its message or past "
                              "10 bytes")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i
        shift += 7
