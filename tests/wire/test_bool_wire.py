"""The bool dtype on the wire: DATA_TYPE_BOOL <-> np.bool_, one byte per element, each
0 or 1; a bool graph input built by the client, converted by the server and run by the
engine."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gradserve import engine
from gradserve.client import GraphBuilder
from gradserve.server.convert import graph_from_proto
from gradserve.v1 import tensor_pb2
from gradserve.v1.codec import WIRE_DTYPES, TensorError, from_tensor, to_tensor


@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3)], ids=str)
def test_bool_round_trip(shape):
    a = np.random.default_rng(0).random(shape) < 0.5
    t = tensor_pb2.Tensor.FromString(to_tensor(a).SerializeToString())
    assert t.dtype == tensor_pb2.DATA_TYPE_BOOL and WIRE_DTYPES["bool"] == t.dtype
    assert t.data == a.astype(np.uint8).tobytes()
    b = from_tensor(t)
    assert b.dtype == np.bool_ and b.shape == shape
    assert_array_equal(b, a)


def test_bool_bytes_other_than_0_or_1_are_refused():
    t = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_BOOL, shape=[3], data=b"\x00\x01\x02")
    with pytest.raises(TensorError) as info:
        from_tensor(t, "inputs", key="mask")
    assert info.value.field == "inputs['mask']" and "0 or 1" in str(info.value)


def test_bool_input_from_the_builder_to_the_engine():
    g = GraphBuilder()
    x = g.input("x", "float64", [3])
    mask = g.input("mask", "bool", [3])
    g.output("y", g.where(mask, x, g.neg(x)))
    plan = engine.compile(graph_from_proto(g.build()))
    inputs = {"x": np.array([1.0, 2.0, 3.0]), "mask": np.array([True, False, True])}
    assert_array_equal(plan.evaluate(inputs)["y"], [1.0, -2.0, 3.0])
    jac = plan.jacobian(inputs).jacobian
    assert set(jac) == {("y", "x")}  # bool inputs are never differentiated
    assert_array_equal(jac["y", "x"], np.diag([1.0, -1.0, 1.0]))
