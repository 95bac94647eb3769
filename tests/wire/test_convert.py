"""Round trips between the engine, the protos and NumPy: server.convert for graphs and
gradserve.v1.codec for tensors and attributes, with their errors.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gradserve import engine
from gradserve.server.convert import fill_decision, graph_from_proto, op_info
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import (TensorError, TensorLimitError, attribute_value, fill_attribute,
                                from_tensor, from_tensors, to_tensor)

WIRE = {"float32": tensor_pb2.DATA_TYPE_FLOAT32, "float64": tensor_pb2.DATA_TYPE_FLOAT64,
        "int32": tensor_pb2.DATA_TYPE_INT32, "int64": tensor_pb2.DATA_TYPE_INT64}
ITEMSIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8}


# --- graphs --------------------------------------------------------------------------------


def graph_to_proto(graph: engine.Graph) -> graph_pb2.Graph:
    """The inverse of graph_from_proto, for the round trips (the server never needs it)."""
    return graph_pb2.Graph(
        inputs=[graph_pb2.Input(name=i.name, dtype=WIRE[i.dtype], shape=i.shape)
                for i in graph.inputs],
        constants={name: to_tensor(v) for name, v in graph.constants.items()},
        nodes=[graph_pb2.Node(name=n.name, op=n.op, inputs=n.inputs,
                              attrs={k: fill_attribute(graph_pb2.Attribute(), v)
                                     for k, v in n.attrs.items()})
               for n in graph.nodes],
        outputs=graph.outputs)


def every_attribute_graph():
    """A valid graph whose attributes are of every type the engine's ops use (int, ints,
    bool), including an empty list, with constants of every dtype and a -1 input."""
    return engine.Graph(
        inputs=[engine.Input("x", "float64", [-1, 3]), engine.Input("k", "int32", [2]),
                engine.Input("s", "float32", [])],
        nodes=[
            engine.Node("t", "transpose", ["x"], {"perm": [1, 0]}),
            engine.Node("r", "reshape", ["t"], {"shape": [-1]}),
            engine.Node("m", "sum", ["x"], {"axes": [1], "keepdims": True}),
            engine.Node("same", "sum", ["m"], {"axes": []}),  # reduce over no axis
            engine.Node("sm", "softmax", ["x"], {"axis": -1}),
            engine.Node("cat", "concat", ["sm", "x", "x"], {"axis": 0}),
            engine.Node("sl", "slice", ["cat"], {"starts": [1, 0], "stops": [-1, 2],
                                                 "axes": [0, 1]}),
            engine.Node("lse", "logsumexp", ["sl"], {"axis": 1, "keepdims": False}),
            engine.Node("w", "add", ["c64", "lse"]),
            engine.Node("kk", "add", ["k", "c32i"]),
            engine.Node("kl", "mul", ["kk", "kk"]),
            engine.Node("sc", "mul", ["s", "c32"]),
        ],
        outputs=["r", "same", "w", "kl", "sc"],
        constants={"c64": np.float64(0.5), "c32": np.float32([1.5, -2.0]),
                   "c32i": np.int32([7, -8]), "c64i": np.int64([[1, 2], [3, 4]])})


def free_attribute_graph():
    """Attributes of every wire type, float, string and floats included. No op takes
    these, so the graph is not valid, but conversion must keep them as they are."""
    attrs = {"i": -3, "f": 2.5, "b": True, "b0": False, "s": "text", "s0": "", "ints": [1, -2, 3],
             "floats": [0.25, -1.5], "empty": [], "zero": 0, "fzero": 0.0}
    return engine.Graph(inputs=[engine.Input("x", "float32", [2])],
                        nodes=[engine.Node("o", "custom", ["x"], attrs)], outputs=["o"])


def normalized_attrs(attrs):
    return {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in attrs.items()}


def assert_same_graph(a: engine.Graph, b: engine.Graph):
    assert a.inputs == b.inputs
    assert a.outputs == b.outputs
    assert [(n.name, n.op, n.inputs) for n in a.nodes] == [(n.name, n.op, n.inputs)
                                                           for n in b.nodes]
    for na, nb in zip(a.nodes, b.nodes):
        got, want = normalized_attrs(nb.attrs), normalized_attrs(na.attrs)
        assert got == want
        for key in want:  # bool stays bool, int stays int, float stays float
            assert type(got[key]) is type(want[key]) or isinstance(want[key], list)
    assert set(a.constants) == set(b.constants)
    for name, value in a.constants.items():
        assert b.constants[name].dtype == value.dtype
        assert b.constants[name].shape == value.shape
        assert_array_equal(b.constants[name], value)


@pytest.mark.parametrize("make", [every_attribute_graph, free_attribute_graph])
def test_graph_round_trip(make):
    graph = make()
    proto = graph_to_proto(graph)
    back = graph_from_proto(graph_pb2.Graph.FromString(proto.SerializeToString()))
    assert_same_graph(graph, back)
    # and proto -> engine -> proto gives the same message, byte for byte
    again = graph_to_proto(back)
    assert again == proto
    assert again.SerializeToString(deterministic=True) == proto.SerializeToString(
        deterministic=True)


def test_round_tripped_graph_computes_the_same():
    graph = every_attribute_graph()
    back = graph_from_proto(graph_to_proto(graph))
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((4, 3)), "k": np.int32([3, 4]), "s": np.float32(2.0)}
    want, got = engine.compile(graph).evaluate(inputs), engine.compile(back).evaluate(inputs)
    assert set(got) == set(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert_array_equal(got[name], want[name])
    assert_array_equal(got["kl"], (np.int32([3, 4]) + np.int32([7, -8])) ** 2)
    assert_array_equal(got["sc"], np.float32(2.0) * np.float32([1.5, -2.0]))


def test_proto_fields_of_a_converted_graph():
    proto = graph_to_proto(every_attribute_graph())
    assert [(i.name, i.dtype, list(i.shape)) for i in proto.inputs] == [
        ("x", WIRE["float64"], [-1, 3]), ("k", WIRE["int32"], [2]), ("s", WIRE["float32"], [])]
    attrs = {n.name: n.attrs for n in proto.nodes}
    assert attrs["t"]["perm"].WhichOneof("value") == "ints"
    assert list(attrs["t"]["perm"].ints.values) == [1, 0]
    assert attrs["m"]["keepdims"].WhichOneof("value") == "b"
    assert attrs["sm"]["axis"].WhichOneof("value") == "i"
    assert attrs["same"]["axes"].WhichOneof("value") == "ints"  # empty, but set
    assert proto.constants["c64"].shape == [] and proto.constants["c64"].dtype == WIRE["float64"]


def test_unsupported_input_dtype_names_the_input():
    proto = graph_pb2.Graph(inputs=[graph_pb2.Input(name="x", shape=[2])], outputs=["x"])
    with pytest.raises(engine.DTypeError) as info:
        graph_from_proto(proto)
    assert info.value.node == "x" and info.value.field == "dtype"
    assert "DATA_TYPE_UNSPECIFIED" in str(info.value)


def test_attribute_without_value_names_node_and_attribute():
    proto = graph_pb2.Graph(inputs=[graph_pb2.Input(name="x", dtype=WIRE["float32"])],
                            nodes=[graph_pb2.Node(name="o", op="sum", inputs=["x"],
                                                  attrs={"axes": graph_pb2.Attribute()})],
                            outputs=["o"])
    with pytest.raises(engine.GraphError) as info:
        graph_from_proto(proto)
    assert (info.value.node, info.value.op, info.value.field) == ("o", "sum", "attrs.axes")


def test_constant_over_the_limit_is_a_limit_error():
    proto = graph_to_proto(engine.Graph([], [], ["c"], {"c": np.zeros(11)}))
    assert graph_from_proto(proto, max_elements=11).constants["c"].shape == (11,)
    with pytest.raises(TensorLimitError) as info:
        graph_from_proto(proto, max_elements=10)
    assert "constants['c']" in info.value.field


def test_fill_decision():
    d = engine.plan_mode(1000, 1)
    p = pb.PlannerDecision()
    assert fill_decision(p, d) is p
    assert p.mode == pb.MODE_REVERSE and (p.n, p.m) == (1000, 1)
    assert (p.cost_forward, p.cost_reverse, p.reason) == (d.cost_forward, d.cost_reverse, d.reason)
    forward = fill_decision(pb.PlannerDecision(), engine.plan_mode(1, 1000, forced="forward"))
    assert forward.mode == pb.MODE_FORWARD and forward.reason == "forward mode requested by the caller"


def test_op_info_of_concat_and_slice():
    concat, slc = op_info(engine.OPS["concat"]), op_info(engine.OPS["slice"])
    assert (concat.name, concat.min_inputs, concat.max_inputs) == ("concat", 1, -1)
    assert [(a.name, a.type, a.required) for a in concat.attrs] == [("axis", "int", False)]
    assert [(a.name, a.required, a.default == "") for a in slc.attrs] == [
        ("starts", True, True), ("stops", True, True), ("axes", False, False)]


# --- tensors -------------------------------------------------------------------------------

SHAPES = [(), (0,), (5,), (2, 0, 3), (3, 4), (2, 3, 4)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", list(WIRE))
def test_tensor_round_trip(dtype, shape):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(shape) * 1000).astype(dtype)
    t = to_tensor(a)
    assert t.dtype == WIRE[dtype] and list(t.shape) == list(shape)
    assert len(t.data) == a.size * ITEMSIZE[dtype]
    wire = tensor_pb2.Tensor.FromString(t.SerializeToString())
    b = from_tensor(wire)
    assert b.dtype == np.dtype(dtype) and b.shape == shape
    assert_array_equal(b, a)
    assert not b.flags.writeable  # a view of the received bytes


def test_tensor_layout_is_the_documented_one():
    """tensor.proto: [[1, 2], [3, 4]] float32 is shape [2, 2] and the four floats 1, 2, 3, 4
    little-endian, in that order."""
    t = to_tensor(np.float32([[1, 2], [3, 4]]))
    assert t.data == struct.pack("<4f", 1, 2, 3, 4)
    t = to_tensor(np.float64([[1, 2], [3, 4]]).T)  # not C-contiguous: still C order on the wire
    assert t.data == struct.pack("<4d", 1, 3, 2, 4)
    assert to_tensor(np.int64(-2)).data == struct.pack("<q", -2)


@pytest.mark.parametrize("dtype", list(WIRE))
def test_big_endian_arrays_encode_little_endian(dtype):
    big = np.arange(-3, 3).reshape(2, 3).astype(np.dtype(dtype).newbyteorder(">"))
    t = to_tensor(big)
    assert t.dtype == WIRE[dtype]
    assert t.data == big.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = from_tensor(t)
    assert back.dtype.byteorder in ("<", "=") and back.dtype == np.dtype(dtype)
    assert_array_equal(back, np.arange(-3, 3).reshape(2, 3))


@pytest.mark.parametrize("value", [np.int16([1]), np.float16([1.0]), np.complex64([1j]),
                                   np.uint8([1]), np.array(["a"])], ids=lambda v: v.dtype.name)
def test_unsupported_numpy_dtypes_are_refused(value):
    with pytest.raises(TensorError) as info:
        to_tensor(value)
    assert value.dtype.name in str(info.value)


def test_from_tensor_bad_byte_count():
    t = tensor_pb2.Tensor(dtype=WIRE["float32"], shape=[2, 3], data=b"\0" * 20)
    with pytest.raises(TensorError) as info:
        from_tensor(t, "inputs['x']")
    assert not isinstance(info.value, TensorLimitError)
    assert info.value.field == "inputs['x']"
    assert "20" in str(info.value) and "24" in str(info.value)


@pytest.mark.parametrize("shape, data", [((), b""), ((0,), b"\0\0\0\0"), ((3,), b"\0" * 16)])
def test_from_tensor_byte_count_edge_cases(shape, data):
    with pytest.raises(TensorError):
        from_tensor(tensor_pb2.Tensor(dtype=WIRE["float32"], shape=shape, data=data))


def test_from_tensor_negative_dimension():
    with pytest.raises(TensorError) as info:
        from_tensor(tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[2, -1], data=b""), "t")
    assert "negative" in str(info.value) and info.value.field == "t"


@pytest.mark.parametrize("code", [tensor_pb2.DATA_TYPE_UNSPECIFIED, 99])
def test_from_tensor_unsupported_dtype(code):
    with pytest.raises(TensorError) as info:
        from_tensor(tensor_pb2.Tensor(dtype=code, shape=[1], data=b"\0" * 8), "c")
    assert info.value.field == "c"
    assert ("DATA_TYPE_UNSPECIFIED" if code == 0 else "99") in str(info.value)


def test_from_tensor_over_max_elements():
    t = to_tensor(np.zeros((3, 4), np.float32))
    assert from_tensor(t, max_elements=12).shape == (3, 4)
    with pytest.raises(TensorLimitError) as info:
        from_tensor(t, "inputs['x']", max_elements=11)
    assert isinstance(info.value, TensorError)
    assert info.value.field == "inputs['x']"
    # the count is checked before the bytes: a huge claimed shape costs nothing
    huge = tensor_pb2.Tensor(dtype=WIRE["float64"], shape=[1 << 20, 1 << 20])
    with pytest.raises(TensorLimitError):
        from_tensor(huge, max_elements=1 << 25)


def test_from_tensors_names_each_tensor():
    good = {"a": to_tensor(np.float32([1.0]))}
    assert from_tensors(good, "inputs")["a"].tolist() == [1.0]
    bad = {"b": tensor_pb2.Tensor(dtype=WIRE["int32"], shape=[2], data=b"\0")}
    with pytest.raises(TensorError) as info:
        from_tensors(bad, "inputs")
    assert info.value.field == "inputs['b']"


# --- attributes ------------------------------------------------------------------------------


@pytest.mark.parametrize("value, case", [
    (3, "i"), (-1, "i"), (0, "i"), (np.int64(4), "i"), (2.5, "f"), (0.0, "f"),
    (np.float32(0.5), "f"), (True, "b"), (False, "b"), (np.bool_(True), "b"), ("s", "s"),
    ("", "s"), ([1, 2], "ints"), ((3, -4), "ints"), (np.array([5, 6]), "ints"), ([], "ints"),
    ([0.5, 2.0], "floats"), ([1, 2.5], "floats"),
], ids=repr)
def test_attribute_round_trip(value, case):
    attr = graph_pb2.Attribute.FromString(
        fill_attribute(graph_pb2.Attribute(), value).SerializeToString())
    assert attr.WhichOneof("value") == case
    got = attribute_value(attr)
    if case in ("ints", "floats"):
        assert got == [float(v) if case == "floats" else int(v) for v in value]
    else:
        assert got == value and type(got) is {"i": int, "f": float, "b": bool, "s": str}[case]


def test_attribute_without_value():
    assert attribute_value(graph_pb2.Attribute()) is None
