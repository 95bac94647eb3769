"""Issue 19 item 6, over real gRPC: two requests that reached the engine's kernels and
came back INTERNAL.

- `pad` of an integer input with a value its dtype cannot hold (1e308, NaN, inf):
  NumPy raised at run time (INTERNAL); now INVALID_ARGUMENT naming the node and the
  attribute, before any work.
- The Hessian through a conv with 0 input channels: the curvature rule concatenated a
  list of no parts ("need at least one array to concatenate", INTERNAL); now the
  Hessian's empty blocks, shaped as the inputs say.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest

from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import from_tensor, to_tensor

I32, I64, F64 = (tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_INT64,
                 tensor_pb2.DATA_TYPE_FLOAT64)


def _pad_graph(dtype, value):
    node = graph_pb2.Node(name="padded", op="pad", inputs=["x"])
    node.attrs["pads"].ints.values.extend([1, 2])
    node.attrs["value"].f = value
    return graph_pb2.Graph(inputs=[graph_pb2.Input(name="x", dtype=dtype, shape=[3])],
                           nodes=[node], outputs=["padded"])


@pytest.mark.parametrize("dtype, np_dtype", [(I32, np.int32), (I64, np.int64)])
@pytest.mark.parametrize("value", [1e308, math.nan, math.inf, -1e19])
def test_pad_value_an_integer_input_cannot_hold_is_invalid_argument(stub, dtype, np_dtype,
                                                                     value):
    request = pb.EvaluateRequest(graph=_pad_graph(dtype, value),
                                 inputs={"x": to_tensor(np.arange(3, dtype=np_dtype))})
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request, timeout=10)
    err = info.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert "'padded'" in err.details() and "value" in err.details(), err.details()


def test_pad_value_an_integer_input_holds_pads(stub):
    request = pb.EvaluateRequest(graph=_pad_graph(I32, -7.0),
                                 inputs={"x": to_tensor(np.arange(3, dtype=np.int32))})
    reply = stub.Evaluate(request, timeout=10)
    out = from_tensor(reply.outputs["padded"])
    np.testing.assert_array_equal(out, np.pad(np.arange(3, dtype=np.int32), (1, 2),
                                              constant_values=-7))


def test_hessian_through_a_conv_with_no_input_channels(stub):
    """sum(conv(x, w)) with x (1, 0, 5), w (2, 0, 3): every Hessian block is empty (x and
    w have no elements); the value is 0 and the gradients empty."""
    node = graph_pb2.Node(name="c", op="conv", inputs=["x", "w"])
    g = graph_pb2.Graph(inputs=[graph_pb2.Input(name="x", dtype=F64, shape=[1, 0, 5]),
                                graph_pb2.Input(name="w", dtype=F64, shape=[2, 0, 3])],
                        nodes=[node, graph_pb2.Node(name="s", op="sum", inputs=["c"])],
                        outputs=["s"])
    request = pb.DifferentiateRequest(graph=g, inputs={"x": to_tensor(np.ones((1, 0, 5))),
                                                       "w": to_tensor(np.ones((2, 0, 3)))})
    request.second_order.hessian = True
    reply = stub.Differentiate(request, timeout=30)
    shapes = {"x": (1, 0, 5), "w": (2, 0, 3)}
    blocks = {(b.wrt_a, b.wrt_b): from_tensor(b.value) for b in reply.hessian}
    assert set(blocks) == {(a, b) for a in shapes for b in shapes}
    for (a, b), block in blocks.items():
        assert block.shape == shapes[a] + shapes[b]
    assert from_tensor(reply.outputs["s"]) == 0
