"""The new ops over real gRPC: a small CNN (conv, relu, max_pool, avg_pool, reshape)
with an embedding lookup (take), a bool mask (where) and a bool output (a
comparison); its gradient against finite differences; an
out-of-range index as INVALID_ARGUMENT naming the node; the new ops in GetServerInfo."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve import engine
from gradserve.client import GraphBuilder
from gradserve.server.convert import graph_from_proto
from support.oracles import numeric_jacobian


def small_cnn():
    g = GraphBuilder()
    image = g.input("image", "float64", [-1, 1, 6, 6])
    kernel = g.input("kernel", "float64", [2, 1, 3, 3])
    table = g.input("table", "float64", [5, 8])
    labels = g.input("labels", "int64", [-1])
    mask = g.input("mask", "bool", [-1, 8])
    h = g.relu(g.conv(image, kernel, pads=[1, 1, 1, 1]))
    h = g.avg_pool(g.max_pool(h, [2, 2], strides=[2, 2]), [2, 2], strides=[2, 2],
                   pads=[0, 0, 1, 1])
    features = g.reshape(h, [-1, 8])
    picked = g.take(table, labels)  # one row of the table per example
    scores = g.where(mask, features * picked, g.erf(features))
    g.output("loss", g.sum(g.clip(scores, min=-1.0, max=1.0) * scores))
    g.output("positive", g.greater(features, 0.0))
    return g


def cnn_inputs(rng, batch=3):
    return {"image": rng.standard_normal((batch, 1, 6, 6)),
            "kernel": rng.standard_normal((2, 1, 3, 3)),
            "table": rng.standard_normal((5, 8)),
            "labels": rng.integers(-5, 5, batch),
            "mask": rng.random((batch, 8)) < 0.5}


def test_small_cnn_gradient_over_grpc(client):
    g = small_cnn()
    inputs = cnn_inputs(np.random.default_rng(3))
    result = client.differentiate(g, inputs, of=["loss"])

    plan = engine.compile(graph_from_proto(g.build()))
    want = plan.evaluate(inputs)
    assert result.outputs["positive"].dtype == np.bool_
    assert_array_equal(result.outputs["positive"], want["positive"])
    assert_allclose(result.outputs["loss"], want["loss"], rtol=1e-12)
    floats = ["image", "kernel", "table"]
    assert {w for _, w in result.jacobian} == set(floats)  # int and bool inputs never are

    def loss(xs):
        return {"loss": plan.evaluate({**inputs, **xs})["loss"]}
    numeric = numeric_jacobian(loss, {n: inputs[n] for n in floats})
    for name in floats:
        assert_allclose(result.jacobian["loss", name], numeric["loss", name],
                        rtol=1e-5, atol=1e-6, err_msg=name)


def test_take_out_of_range_is_invalid_argument_naming_the_node(client):
    g = GraphBuilder()
    table = g.input("table", "float32", [4, 2])
    g.output(g.take(table, g.input("ids", "int32", [2]), name="lookup"))
    with pytest.raises(grpc.RpcError) as info:
        client.evaluate(g, {"table": np.zeros((4, 2), np.float32),
                            "ids": np.array([1, 4], np.int32)})
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'lookup'" in info.value.details() and "out of range" in info.value.details()


def test_server_info_lists_the_new_ops_and_bool(client):
    info = client.server_info()
    ops = {op.name: op for op in info.ops}
    for name in ("conv", "max_pool", "avg_pool", "take", "where", "erf", "clip", "cumsum",
                 "pad", "cast", "min", "prod", "equal", "less"):
        assert name in ops, name
    conv_attrs = {a.name: a for a in ops["conv"].attrs}
    assert set(conv_attrs) == {"strides", "pads", "dilations", "groups"}
    assert ops["cast"].attrs[0].type == "string"
    assert "first maximal element" in ops["max_pool"].description
