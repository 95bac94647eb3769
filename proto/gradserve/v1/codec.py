"""Tensor <-> numpy and Attribute <-> Python values, as the protos define them.

Hand-written, not generated; shared by the server and the client. A Tensor is
little-endian, C order, len(data) == prod(shape) * itemsize. Decoding is
np.frombuffer on the received bytes, with no per-element Python work and no
copy beyond the one protobuf's Python API makes when a bytes field is read;
the result is read-only. gradserve.v1.tensor_wire reads and writes the tensors
of the large messages straight from and to the wire bytes, with these checks.
"""

from __future__ import annotations

from math import prod
from typing import Mapping

import numpy as np

from gradserve.v1 import graph_pb2, tensor_pb2

DTYPES = {
    tensor_pb2.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    tensor_pb2.DATA_TYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DATA_TYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DATA_TYPE_BOOL: np.dtype("bool"),
}
WIRE_DTYPES = {dt.name: code for code, dt in DTYPES.items()}
_CODES = {dt: code for code, dt in DTYPES.items()}  # by np.dtype: no name lookup per call
_BOOL = DTYPES[tensor_pb2.DATA_TYPE_BOOL]


class TensorError(ValueError):
    """A Tensor message that does not describe an array; `field` says which one."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def to_tensor(array) -> tensor_pb2.Tensor:
    return fill_tensor(tensor_pb2.Tensor(), array)


def fill_tensor(t: tensor_pb2.Tensor, array, field: str = "tensor") -> tensor_pb2.Tensor:
    """Write `array` into the (empty) message `t` in place: one copy of the data."""
    code, a = wire_array(array, field)
    t.dtype = code
    t.shape.extend(a.shape)
    t.data = a.tobytes()
    return t


def wire_array(array, field: str = "tensor") -> tuple[int, np.ndarray]:
    """The DataType code of `array` and the array as the wire holds it: little-endian
    (converted if big-endian) and C-contiguous (copied only if it is not)."""
    a = np.asarray(array)
    code = _CODES.get(a.dtype)
    if code is None:
        if a.dtype.byteorder == ">" and a.dtype.newbyteorder("<") in _CODES:
            return wire_array(a.astype(a.dtype.newbyteorder("<")), field)
        raise TensorError(field, f"unsupported dtype {a.dtype.name} "
                          f"(supported: {', '.join(WIRE_DTYPES)})")
    return code, a if a.flags.c_contiguous else np.ascontiguousarray(a)


def from_tensor(t: tensor_pb2.Tensor, field: str = "tensor",
                max_elements: int | None = None, key: str | None = None) -> np.ndarray:
    """The array a Tensor describes; errors name `field` (and the map `key`, if any)."""
    # each read of a bytes field copies it: read once
    return array_from(t.dtype, tuple(t.shape), t.data,
                      field if key is None else f"{field}['{key}']", max_elements)


def array_from(code: int, shape: tuple, data, field: str,
               max_elements: int | None = None) -> np.ndarray:
    """The array of DataType `code`, `shape` and `data` (bytes or a memoryview: the
    array is a read-only view of it, no copy), checked as the Tensor message says;
    errors name `field`."""
    dtype = DTYPES.get(code)
    count = prod(shape)
    nbytes = len(data)
    if (dtype is None or count * dtype.itemsize != nbytes or min(shape, default=0) < 0
            or (max_elements is not None and count > max_elements)):
        _tensor_error(code, shape, count, nbytes, dtype, max_elements, field)
    if dtype is _BOOL and count and np.frombuffer(data, np.uint8).max() > 1:
        raise TensorError(field, "a bool tensor's bytes must each be 0 or 1")
    try:
        return np.frombuffer(data, dtype).reshape(shape)
    except ValueError as err:  # NumPy's own limits: rank over 64, dimensions past 2^63
        raise TensorError(field, f"a shape of rank {len(shape)} with dimensions "
                          f"{_brief(shape)} cannot be an array ({err})") from None


def _brief(shape, most: int = 8) -> str:
    """A shape for a message, cut after `most` dimensions."""
    shown = ", ".join(str(d) for d in shape[:most])
    return f"[{shown}{', ...' if len(shape) > most else ''}]"


def _tensor_error(code, shape, count, nbytes, dtype, max_elements, field):
    if dtype is None:
        name = (tensor_pb2.DataType.Name(code) if code in tensor_pb2.DataType.values()
                else str(code))
        raise TensorError(field, f"unsupported dtype {name}")
    for d in shape:
        if d < 0:
            raise TensorError(field, f"negative dimension {d} in shape {list(shape)}")
    if max_elements is not None and count > max_elements:
        raise TensorLimitError(field, f"{count:,} elements, over the limit of {max_elements:,}")
    raise TensorError(field, f"{nbytes} data bytes, but shape {list(shape)} of "
                      f"{dtype.name} needs {count * dtype.itemsize}")


class TensorLimitError(TensorError):
    """A tensor larger than the receiver accepts."""


def fill_tensors(field, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays into a map<string, Tensor> field of a message."""
    for name, a in arrays.items():
        fill_tensor(field[name], a, name)


def from_tensors(tensors, field: str, max_elements: int | None = None) -> dict:
    return {name: from_tensor(t, field, max_elements, name) for name, t in tensors.items()}


def fill_attribute(attr: graph_pb2.Attribute, value) -> graph_pb2.Attribute:
    """Write a Python value (bool, int, float, str, or a list of ints or floats) into `attr`."""
    if isinstance(value, (bool, np.bool_)):
        attr.b = bool(value)
    elif isinstance(value, (int, np.integer)):
        attr.i = int(value)
    elif isinstance(value, (float, np.floating)):
        attr.f = float(value)
    elif isinstance(value, str):
        attr.s = value
    elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
             for v in value):
        attr.ints.values.extend(int(v) for v in value)
    else:
        attr.floats.values.extend(float(v) for v in value)
    return attr


def attribute_value(attr: graph_pb2.Attribute):
    """The Python value of an Attribute, or None when no value is set."""
    which = attr.WhichOneof("value")
    if which in ("ints", "floats"):
        return list(getattr(attr, which).values)
    return None if which is None else getattr(attr, which)
