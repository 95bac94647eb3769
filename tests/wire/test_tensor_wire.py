"""gradserve.v1.tensor_wire against the generated code, and its errors over real gRPC.

Round trips: random tensors of every dtype (scalars, empty and zero-size ones, maps of
several entries, Jacobian and Hessian blocks, second_order's vectors) written by
tensor_wire equal the generated SerializeToString(deterministic=True) byte for byte and
parse back with the generated FromString; the generated code's bytes (deterministic or
not, with unknown fields anywhere) decode to the same arrays, read-only views of the
received bytes. Malformed tensor fields sent to a real server on 127.0.0.1 are
INVALID_ARGUMENT naming the field, and the server answers the worked example next.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import tensor_pb2
from gradserve.v1.codec import DTYPES, fill_tensor, fill_tensors
from gradserve.v1 import tensor_wire
from gradserve.v1.tensor_wire import LAYOUTS, TensorMessage, decode, encode

from support.requests import INVALID, check_good_request, check_status
from support.wire_bytes import field, varint

RNG = np.random.default_rng(12)
SHAPES = [(), (0,), (3,), (2, 0, 3), (2, 3), (1, 1, 4)]


def random_array(dtype: np.dtype, shape) -> np.ndarray:
    if dtype == np.bool_:
        return RNG.random(shape) < 0.5
    if dtype.kind == "f":
        return RNG.standard_normal(shape).astype(dtype)
    return RNG.integers(-(2 ** 31), 2 ** 31, size=shape).astype(dtype)


def random_map(count: int) -> dict:
    dtypes = list(DTYPES.values())
    keys = ["x", "", "aa", "a", "b", "B", "ünï", "w1"][:count]
    return {k: random_array(dtypes[i % len(dtypes)], SHAPES[i % len(SHAPES)])
            for i, k in enumerate(keys)}


def small_message(message_type):
    """The message's non-tensor fields, set."""
    m = message_type()
    names = message_type.DESCRIPTOR.fields_by_name
    if "graph_id" in names:
        m.graph_id = "a" * 64
    if message_type is pb.DifferentiateRequest:
        m.wrt.extend(["x", "y"])
        m.request_id = "7"
        m.second_order.hessian = True
    if message_type is pb.DifferentiateResponse:
        m.mode, m.request_id, m.planner.reason, m.planner.n = 3, "7", "n > ratio * m", 5
    if message_type is pb.TrainStepsRequest:
        m.learning_rate, m.momentum, m.loss = 0.1, 0.9, "loss"
    if message_type is pb.TrainStepsResponse:
        m.losses.extend([1.5, 0.25])
    if message_type is pb.EvaluateResponse:
        m.residuals = "r1"
    return m


def random_tensors(message_type, count: int) -> dict:
    layout = LAYOUTS[message_type]
    tensors = {name: random_map(count) for name in layout.maps}
    for name in layout.blocks:
        block = getattr(pb, message_type.DESCRIPTOR.fields_by_name[name].message_type.name)
        names = [f.name for f in block.DESCRIPTOR.fields if f.name != "value"]
        tensors[name] = [(block(**{names[0]: f"o{k}", names[1]: "x"}), a)
                         for k, a in enumerate(random_map(count).values())]
    for name, sub in layout.nested:
        tensors[name] = {n: random_map(count) for n in sub.maps}
    return tensors


def generated(message_type, tensors: dict):
    """The same message built with the generated code."""
    m = small_message(message_type)
    for name, value in tensors.items():
        target = getattr(m, name)
        if isinstance(value, list):
            for block, array in value:
                entry = target.add()
                entry.CopyFrom(block)
                fill_tensor(entry.value, array)
        elif name in dict(LAYOUTS[message_type].nested):
            for sub_name, arrays in value.items():
                fill_tensors(getattr(target, sub_name), arrays)
        else:
            fill_tensors(target, value)
    return m


def assert_same_arrays(got, want, data: bytes, view: bool = True):
    assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
    assert_array_equal(got, want)
    assert not got.flags.writeable
    if got.nbytes and view:  # a view of the received bytes, not a copy
        assert np.shares_memory(got, np.frombuffer(data, np.uint8))


def assert_decoded(decoded: TensorMessage, tensors: dict, data: bytes, view: bool = True):
    for name, value in tensors.items():
        got = getattr(decoded, name)
        if isinstance(value, list):
            assert [b for b, _ in got] == [b for b, _ in value]
            for (_, a), (_, b) in zip(got, value):
                assert_same_arrays(a, b, data, view)
        elif isinstance(got, TensorMessage):
            for sub_name, arrays in value.items():
                sub = getattr(got, sub_name)
                assert set(sub) == set(arrays)
                for k in arrays:
                    assert_same_arrays(sub[k], arrays[k], data, view)
        else:
            assert set(got) == set(value)
            for k in value:
                assert_same_arrays(got[k], value[k], data, view)


@pytest.fixture(params=["joined", "generated"])
def write_path(request, monkeypatch):
    """Both ways of writing: arrays joined in (large messages) and the generated code
    (under SMALL_TENSOR_BYTES); the bytes must be the same."""
    monkeypatch.setattr(tensor_wire, "SMALL_TENSOR_BYTES",
                        0 if request.param == "joined" else 1 << 30)
    return request.param


TYPES = list(LAYOUTS)


@pytest.mark.parametrize("count, each, generated", [
    (1, 8 << 10, True), (14, 4 << 10, True), (1, 24 << 10, False),
    (2000, 1 << 10, False)])  # a model's many small gradients; thousands: no copies
def test_many_small_tensors_go_by_the_generated_code_and_a_large_message_never(
        count, each, generated):
    """The generated code writes messages of many small tensors (its copies cost less
    than the walk per tensor), never one of 128 KiB or more; the bytes are the same."""
    arrays = {f"t{i}": np.full(each // 4, i, np.float32) for i in range(count)}
    message = TensorMessage(pb.EvaluateResponse(graph_id="g"), {"outputs": arrays})
    assert (message._small is not None) is generated
    expected = pb.EvaluateResponse(graph_id="g")
    fill_tensors(expected.outputs, arrays)
    assert message.SerializeToString() == expected.SerializeToString(deterministic=True)


@pytest.mark.parametrize("count", [0, 1, 8])
@pytest.mark.parametrize("message_type", TYPES, ids=lambda t: t.DESCRIPTOR.name)
def test_written_bytes_equal_the_generated_deterministic_serialization(message_type, count,
                                                                      write_path):
    tensors = random_tensors(message_type, count)
    want = generated(message_type, tensors)
    mine = encode(small_message(message_type), tensors)
    assert mine == want.SerializeToString(deterministic=True)
    assert message_type.FromString(mine) == want


@pytest.mark.parametrize("message_type", TYPES, ids=lambda t: t.DESCRIPTOR.name)
def test_a_message_without_tensors_is_written_as_the_generated_code_writes_it(message_type):
    """No tensors given (None or empty each: a training call's request and most of its
    replies): the message's own deterministic bytes, with a repeated field of many
    values; decoded and written again, the same bytes."""
    message = small_message(message_type)
    if message_type is pb.TrainStepsRequest:
        message.rows.extend(range(0, 6400, 100))
        message.batch_sizes.append(64)
    want = message.SerializeToString(deterministic=True)
    layout = LAYOUTS[message_type]
    none = dict.fromkeys(layout.maps)
    empty = {**{name: {} for name in layout.maps}, **{name: [] for name in layout.blocks},
             **{name: {} for name, _ in layout.nested}}
    for written in (TensorMessage(message), TensorMessage(message, none),
                    TensorMessage(message, empty)):
        assert written.SerializeToString() == want
    for small_by_protobuf in (False, True):
        decoded = decode(message_type, want, small_by_protobuf=small_by_protobuf)
        assert decoded.SerializeToString() == want


@pytest.mark.parametrize("small_by_protobuf", [False, True])
@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("message_type", TYPES, ids=lambda t: t.DESCRIPTOR.name)
def test_generated_bytes_decode_to_the_same_arrays_and_fields(message_type, deterministic,
                                                              small_by_protobuf, write_path):
    tensors = random_tensors(message_type, 8)
    want = generated(message_type, tensors)
    data = want.SerializeToString(deterministic=deterministic)
    decoded = decode(message_type, data, small_by_protobuf=small_by_protobuf)
    assert_decoded(decoded, tensors, data, view=not small_by_protobuf)
    assert decoded.message == small_message(message_type)
    assert decoded.SerializeToString() == want.SerializeToString(deterministic=True)


UNKNOWN = varint(99 << 3) + varint(5) + field(98, b"later field")  # a newer peer's


def test_unknown_fields_anywhere_are_ignored():
    """Unknown fields in the message and in a Tensor are skipped as protobuf skips them;
    the tensors and the other fields come out the same. A map entry holding unknown
    fields is not in the map, for protobuf (upb) either: it keeps the entry whole as an
    unknown field of the message."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = (b"\x08\x01" + UNKNOWN + field(2, b"\x02\x03") + field(3, x.tobytes()) + UNKNOWN)
    entry = field(1, b"x") + field(2, tensor)
    odd_entry = UNKNOWN + field(1, b"y") + field(2, tensor) + UNKNOWN
    data = (UNKNOWN + field(2, b"gid") + field(3, entry) + UNKNOWN + field(3, odd_entry)
            + b"\x20\x01")
    generated_message = pb.EvaluateRequest.FromString(data)
    decoded = decode(pb.EvaluateRequest, data)
    assert decoded.graph_id == generated_message.graph_id == "gid"
    assert decoded.keep_residuals is generated_message.keep_residuals is True
    assert_same_arrays(decoded.inputs["x"], x, data)
    assert set(decoded.inputs) == set(generated_message.inputs) == {"x"}


def test_a_field_sent_in_pieces_merges_as_protobuf_merges_it():
    """Occurrences of a message field merge: a Tensor value sent in two pieces (dtype and
    shape, then data) and second_order sent twice."""
    x = np.float64([1.0, 2.0])
    entry = (field(1, b"x") + field(2, b"\x08\x02" + field(2, b"\x02"))
             + field(2, field(3, x.tobytes())))
    vectors = field(1, field(1, b"x") + field(2, b"\x08\x02" + field(2, b"\x02")
                                          + field(3, x.tobytes())))
    data = field(3, entry) + field(11, vectors) + field(11, b"\x10\x01")
    want = pb.DifferentiateRequest.FromString(data)
    decoded = decode(pb.DifferentiateRequest, data)
    assert_same_arrays(decoded.inputs["x"], x, data)
    assert decoded.second_order.hessian is want.second_order.hessian is True
    assert_array_equal(decoded.second_order.vectors["x"], x)


def test_non_contiguous_and_big_endian_arrays_are_written_as_the_generated_code_writes_them(
        write_path):
    a = np.arange(12, dtype=">f8").reshape(3, 4)[:, ::2]
    want = pb.EvaluateResponse()
    fill_tensors(want.outputs, {"o": a})
    assert encode(pb.EvaluateResponse(), {"outputs": {"o": a}}) == want.SerializeToString()


# --- malformed tensor fields over real gRPC ------------------------------------------------

# (method, request type, map field, its number, how it is nested: None or the outer number)
FIELDS = [
    ("Evaluate", pb.EvaluateRequest, "inputs", 3, None),
    ("Differentiate", pb.DifferentiateRequest, "inputs", 3, None),
    ("Differentiate", pb.DifferentiateRequest, "tangents", 7, None),
    ("Differentiate", pb.DifferentiateRequest, "cotangents", 8, None),
    ("Differentiate", pb.DifferentiateRequest, "vectors", 1, 11),
    ("DifferentiateStream", pb.DifferentiateRequest, "inputs", 3, None),
    ("TrainSteps", pb.TrainStepsRequest, "parameters", 4, None),
    ("TrainSteps", pb.TrainStepsRequest, "velocity", 5, None),
    ("TrainSteps", pb.TrainStepsRequest, "batches", 6, None),
]
F32 = b"\x08\x01"


def dims(*shape) -> bytes:
    return field(2, b"".join(varint(d & (2 ** 64 - 1)) for d in shape))


# (id, the entry's Tensor bytes, or None for a map entry whose length runs past the end;
#  what the message says)
MALFORMED = [
    ("length-prefix-past-the-end", None, ["runs past the end"]),
    ("truncated-data", F32 + dims(4) + b"\x1a" + varint(16) + bytes(6),
     ["data's length prefix", "past the end"]),
    ("byte-count-vs-shape", F32 + dims(3) + field(3, bytes(8)), ["8 data bytes", "needs 12"]),
    ("bad-dtype", b"\x08\x63" + dims(1) + field(3, bytes(4)), ["unsupported dtype 99"]),
    ("no-dtype", dims(1) + field(3, bytes(4)), ["unsupported dtype DATA_TYPE_UNSPECIFIED"]),
    ("negative-dim", F32 + dims(-2) + field(3, bytes(8)), ["negative dimension -2"]),
    ("huge-dims-next-to-a-zero", F32 + dims(0, 2 ** 62, 2 ** 62), ["cannot be an array"]),
    ("rank-over-64", F32 + dims(*[1] * 65) + field(3, bytes(4)), ["rank over 64"]),
    ("bool-bytes", b"\x08\x05" + dims(2) + field(3, b"\x00\x02"), ["0 or 1"]),
    ("varint-too-long", b"\x08" + b"\xff" * 11, ["varint"]),
    ("shape-varint-cut", F32 + field(2, b"\x80"), ["varint"]),
]


def request_bytes(request_type, number: int, nested, tensor, graph_id: str) -> tuple[bytes, str]:
    """The request with one bad entry "x" in the map field `number`, and the field path
    the error must name."""
    small = request_type(graph_id=graph_id)
    if request_type is pb.TrainStepsRequest:
        small.learning_rate = 0.1
    name = dict((n, f) for _, t, f, n, o in FIELDS if t is request_type and o == nested)[number]
    if tensor is None:
        bad = varint(number << 3 | 2) + varint(1000) + field(1, b"x")
        path = name if nested is None else "second_order." + name
    else:
        bad = field(number, field(1, b"x") + field(2, tensor))
        path = f"{name}['x']"
    if nested is not None:
        bad = field(nested, bad)
    return small.SerializeToString() + bad, path


@pytest.fixture(scope="module")
def seed_id(client, seed_builder):
    return client.register(seed_builder())


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
@pytest.mark.parametrize("where", FIELDS, ids=[f"{m}-{f}" for m, _, f, _, _ in FIELDS])
def test_malformed_tensor_fields_are_invalid_argument_naming_the_field(channel, stub, seed_id,
                                                                       where, case):
    method, request_type, _, number, nested = where
    _, tensor, says = case
    data, path = request_bytes(request_type, number, nested, tensor, seed_id)
    target = f"/gradserve.v1.GradientService/{method}"
    with pytest.raises(grpc.RpcError) as info:
        if method == "DifferentiateStream":
            list(channel.stream_stream(target)(iter([data]), timeout=30))
        else:
            channel.unary_unary(target)(data, timeout=30)
    check_status(info.value, INVALID, says, path)
    check_good_request(stub)


def test_client_results_are_read_only_views_equal_to_the_generated_stubs(client, stub, seed_id):
    """The Client (tensor_wire) and the generated stub get the same figures."""
    g = RNG.standard_normal(1000).astype(np.float32)
    x, y = np.float32(RNG.standard_normal(1)), np.float32(RNG.standard_normal(1))
    result = client.differentiate(seed_id, {"x": x, "y": y}, cotangents={"o": g[:1]})
    request = pb.DifferentiateRequest(graph_id=seed_id, request_id="1")
    fill_tensors(request.inputs, {"x": x, "y": y})
    fill_tensors(request.cotangents, {"o": g[:1]})
    reply = stub.Differentiate(request, timeout=30)
    from gradserve.v1.codec import from_tensors
    for name in ("outputs", "cotangents"):
        want = from_tensors(getattr(reply, name), name)
        got = getattr(result, name)
        assert set(got) == set(want)
        for k in want:
            assert_array_equal(got[k], want[k])
            assert got[k].dtype == want[k].dtype and not got[k].flags.writeable
    assert result.mode == "reverse"


def test_tensor_message_reads_like_the_generated_message():
    m = TensorMessage(pb.EvaluateRequest(graph_id="g"), {"inputs": {"x": np.ones(2)}})
    assert m.graph_id == "g" and m.WhichOneof("graph_ref") == "graph_id"
    assert_array_equal(m.inputs["x"], [1.0, 1.0])
    with pytest.raises(Exception, match="unsupported dtype complex128"):
        TensorMessage(pb.EvaluateRequest(), {"inputs": {"x": np.ones(2, complex)}})
    assert tensor_pb2.Tensor  # the Tensor message is the one the bytes hold
