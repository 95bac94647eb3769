"""ONNX models built with onnx.helper: any op with its inputs and initializers, and the
digits CNN (tests that use them skip without the onnx package)."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper


F64, F32, I64 = TensorProto.DOUBLE, TensorProto.FLOAT, TensorProto.INT64


ONNX_TYPES = {np.dtype("float64"): F64, np.dtype("float32"): F32, np.dtype("int64"): I64,
              np.dtype("bool"): TensorProto.BOOL, np.dtype("int32"): TensorProto.INT32}


def model(nodes, inputs: dict, initializers: dict | None = None, outputs=("y",), opset=18,
          dynamic: dict | None = None):
    """A model of `nodes` with graph inputs named and typed like the arrays in `inputs`
    (`dynamic`: {input: {axis: dim_param}}) and `initializers`."""
    dynamic = dynamic or {}
    graph_inputs = []
    for name, array in inputs.items():
        shape = list(array.shape)
        for axis, param in dynamic.get(name, {}).items():
            shape[axis] = param
        graph_inputs.append(helper.make_tensor_value_info(name, ONNX_TYPES[array.dtype], shape))
    graph = helper.make_graph(
        nodes, "test", graph_inputs,
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in (initializers or {}).items()])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def node(op, inputs, outputs=("y",), **attrs):
    return helper.make_node(op, list(inputs), list(outputs), **attrs)


def digits_cnn_model(seed=0, opset=18):
    """A CNN for the 8x8 digits built with onnx.helper (PyTorch's default initialization):
    image [batch, 1, 8, 8] -> conv 3x3 (8 channels, padded) -> relu -> max pool 2 ->
    flatten -> dense 10 -> logits."""
    rng = np.random.default_rng(seed)

    def uniform(fan_in, *shape):
        bound = 1 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    nodes = [node("Conv", ["image", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1]),
             node("Relu", ["c"], ["r"]),
             node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             node("Flatten", ["p"], ["f"]),
             node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], transB=1)]
    inits = {"conv.weight": uniform(9, 8, 1, 3, 3), "conv.bias": uniform(9, 8),
             "fc.weight": uniform(128, 10, 128), "fc.bias": uniform(128, 10)}
    return model(nodes, {"image": np.zeros((1, 1, 8, 8), np.float32)}, inits,
                 outputs=("logits",), opset=opset, dynamic={"image": {0: "batch"}})
