"""Serialized requests written directly in the protobuf wire format: building a million
messages with the protobuf API would take minutes, and some of these requests are ones
the API would not build."""

from __future__ import annotations


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


FLOAT32_SCALAR = b"\x08\x01" + field(3, b"\0\0\0\0")  # Tensor: dtype FLOAT32, shape [], 0.0
X_INPUT = field(1, field(1, b"x") + b"\x10\x01" + field(3, b"\x01"))  # Graph.inputs: x f32 [1]
SIN_NODE = field(3, field(1, b"o") + field(2, b"sin") + field(3, b"x"))  # Graph.nodes: o = sin(x)
OUTPUT_O = field(4, b"o")  # Graph.outputs: o
SIN_GRAPH = X_INPUT + SIN_NODE + OUTPUT_O


def map_entries(number: int, count: int, value: bytes = FLOAT32_SCALAR, prefix: str = "k") -> bytes:
    """`count` entries "<prefix>0", "<prefix>1", ... -> `value` of the map field `number`."""
    return b"".join(field(number, field(1, f"{prefix}{k}".encode()) + field(2, value))
                    for k in range(count))


def constants_graph(count: int) -> bytes:
    """A Graph of o = sin(x) and `count` scalar float32 constants c0, c1, ... (unused)."""
    return X_INPUT + map_entries(2, count, prefix="c") + SIN_NODE + OUTPUT_O


def inputs_graph(count: int) -> bytes:
    """A Graph of o = sin(x) with `count` more scalar float32 inputs i0, i1, ... (unused)."""
    extra = b"".join(field(1, field(1, f"i{k}".encode()) + b"\x10\x01") for k in range(count))
    return X_INPUT + extra + SIN_NODE + OUTPUT_O
