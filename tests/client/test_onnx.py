"""ONNX import through a real server: models built with onnx.helper, their values
checked against onnx.reference.ReferenceEvaluator and their derivatives against
central finite differences of that evaluator (float64, the dot-product test
u . J v); shape plumbing, dynamic batch sizes, opsets 13 to 21, both parameter
modes, external data and the errors.

Models exported by PyTorch (torch.onnx.export) are in test_onnx_torch.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package "
                                          "(pip install 'gradserve[onnx]')")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from gradserve.client.onnx import OnnxImportError, from_onnx, supported_ops  # noqa: E402
from support.onnx_models import F32, F64, model, node  # noqa: E402


def run_reference(m, feeds):
    return ReferenceEvaluator(m).run(None, feeds)


def check_values(client, m, feeds, parameters="constants", rtol=1e-6, atol=1e-9):
    imported = from_onnx(m, parameters=parameters)
    expected = run_reference(m, feeds)
    got = client.evaluate(imported.graph, {**feeds, **imported.parameters})
    assert set(got) == set(imported.outputs)
    for name, want in zip(imported.outputs, expected):
        assert got[name].dtype == np.asarray(want).dtype, name
        assert got[name].shape == np.shape(want), name
        assert_allclose(got[name], want, rtol=rtol, atol=atol, err_msg=name)
    return imported


def check_derivatives(client, m, feeds, h=1e-6, rtol=1e-5, seed=0, parameters="constants"):
    """u . J v from the service's VJP against central differences of the reference."""
    rng = np.random.default_rng(seed)
    imported = from_onnx(m, parameters=parameters)
    values = {**feeds, **imported.parameters}
    wrt = [n for n, a in values.items() if a.dtype.kind == "f"]
    outputs = run_reference_named(m, values, imported)
    of = [n for n, a in outputs.items() if a.dtype.kind == "f"]
    v = {n: rng.standard_normal(values[n].shape) for n in wrt}
    u = {n: rng.standard_normal(outputs[n].shape) for n in of}

    def shifted(sign):
        moved = {n: (a + sign * h * v[n] if n in v else a) for n, a in values.items()}
        return run_reference_named(m, moved, imported)

    plus, minus = shifted(1), shifted(-1)
    fd = sum(float(np.sum(u[n] * (plus[n] - minus[n]) / (2 * h))) for n in of)
    _, cotangents = client.vjp(imported.graph, values, u, wrt=wrt)
    service = sum(float(np.sum(cotangents[n] * v[n])) for n in wrt)
    assert_allclose(service, fd, rtol=rtol, atol=rtol * 1e-2)
    return imported


def run_reference_named(m, values, imported):
    """The reference's outputs by name, initializers replaced by `values` where given."""
    m2 = onnx.ModelProto()
    m2.CopyFrom(m)
    for tensor in m2.graph.initializer:
        if tensor.name in values:
            tensor.CopyFrom(numpy_helper.from_array(np.asarray(values[tensor.name]),
                                                    tensor.name))
    feeds = {n: values[n] for n in imported.inputs}
    return dict(zip(imported.outputs, run_reference(m2, feeds)))


# --- one table: every op the importer converts ---------------------------------------------

R = np.random.default_rng(42)


def r(*shape, positive=False):
    a = R.standard_normal(shape)
    return np.abs(a) + 0.5 if positive else a


def i64(*values):
    return np.asarray(values, dtype=np.int64)


# (id, opset, nodes, inputs, initializers, derivative tolerance or None for no check)
CASES = [
    ("relu", 18, [node("Relu", ["x"])], {"x": r(3, 4)}, {}, 1e-5),
    ("sigmoid-tanh-exp", 18, [node("Sigmoid", ["x"], ["s"]), node("Tanh", ["s"], ["t"]),
                              node("Exp", ["t"])], {"x": r(3, 4)}, {}, 1e-5),
    ("log-sqrt-reciprocal", 18, [node("Log", ["x"], ["l"]), node("Sqrt", ["x"], ["s"]),
                                 node("Reciprocal", ["x"], ["q"]), node("Sum", ["l", "s", "q"])],
     {"x": r(5, positive=True)}, {}, 1e-5),
    ("neg-abs-sin-cos", 18, [node("Neg", ["x"], ["n"]), node("Abs", ["n"], ["a"]),
                             node("Sin", ["a"], ["s"]), node("Cos", ["x"], ["c"]),
                             node("Mul", ["s", "c"])], {"x": r(6)}, {}, 1e-5),
    ("erf", 18, [node("Erf", ["x"])], {"x": r(2, 5)}, {}, 2e-3),
    ("gelu-erf", 20, [node("Gelu", ["x"])], {"x": r(2, 5)}, {}, 2e-3),
    ("gelu-tanh", 20, [node("Gelu", ["x"], approximate="tanh")], {"x": r(2, 5)}, {}, 1e-5),
    ("softplus-softsign-mish", 18, [node("Softplus", ["x"], ["a"]), node("Softsign", ["a"], ["b"]),
                                    node("Mish", ["b"])], {"x": r(7)}, {}, 1e-5),
    ("leaky-elu-selu-celu", 18, [node("LeakyRelu", ["x"], ["a"], alpha=0.1),
                                 node("Elu", ["a"], ["b"], alpha=0.7), node("Selu", ["b"], ["c"]),
                                 node("Celu", ["c"], alpha=1.3)], {"x": r(9)}, {}, 1e-5),
    ("prelu", 18, [node("PRelu", ["x", "slope"])], {"x": r(2, 3, 4), "slope": r(3, 1)}, {}, 1e-5),
    ("hardsigmoid-hardswish", 18, [node("HardSigmoid", ["x"], ["a"], alpha=0.3),
                                   node("HardSwish", ["x"], ["b"]), node("Add", ["a", "b"])],
     {"x": r(8)}, {}, 1e-5),
    ("binary-broadcast", 18, [node("Add", ["a", "b"], ["s"]), node("Sub", ["s", "a"], ["d"]),
                              node("Mul", ["d", "b"], ["m"]), node("Div", ["m", "c"], ["q"]),
                              node("Pow", ["c", "b"], ["p"]), node("Add", ["q", "p"])],
     {"a": r(2, 3), "b": r(3), "c": r(2, 1, positive=True)}, {}, 1e-5),
    ("pow-constant-exponents", 18, [node("Pow", ["x", "two"], ["a"]),
                                    node("Pow", ["x", "half"], ["b"]),
                                    node("Pow", ["x", "three"], ["c"]), node("Sum", ["a", "b", "c"])],
     {"x": r(4, positive=True)},
     {"two": np.float64(2), "half": np.float64(0.5), "three": np.int64(3)}, 1e-5),
    ("max-min-mean", 18, [node("Max", ["a", "b", "c"], ["m"]), node("Min", ["a", "b"], ["n"]),
                          node("Mean", ["m", "n", "c"])], {"a": r(4), "b": r(4), "c": r(1)}, {},
     1e-5),
    ("matmul-batched", 18, [node("MatMul", ["a", "b"])], {"a": r(2, 3, 4), "b": r(4, 5)}, {}, 1e-5),
    ("matmul-vector", 18, [node("MatMul", ["a", "b"])], {"a": r(4), "b": r(2, 4, 3)}, {}, 1e-5),
    ("gemm", 18, [node("Gemm", ["a", "b", "c"], transA=1, transB=1, alpha=0.5, beta=2.0)],
     {"a": r(4, 3), "b": r(5, 4), "c": r(5)}, {}, 1e-5),
    ("gemm-no-bias", 13, [node("Gemm", ["a", "b"])], {"a": r(2, 3), "b": r(3, 4)}, {}, 1e-5),
    ("conv-bias-pads-strides", 18, [node("Conv", ["x", "w", "b"], pads=[1, 0, 2, 1],
                                         strides=[2, 1])],
     {"x": r(2, 3, 7, 6), "w": r(4, 3, 3, 2), "b": r(4)}, {}, 1e-5),
    ("conv-groups-dilations", 18, [node("Conv", ["x", "w"], group=2, dilations=[2, 1])],
     {"x": r(1, 4, 7, 5), "w": r(6, 2, 2, 3)}, {}, 1e-5),
    ("conv-same-upper", 18, [node("Conv", ["x", "w"], auto_pad="SAME_UPPER", strides=[2, 2])],
     {"x": r(1, 2, 5, 6), "w": r(3, 2, 3, 3)}, {}, 1e-5),
    ("conv-1d", 18, [node("Conv", ["x", "w", "b"], pads=[1, 1])],
     {"x": r(2, 3, 9), "w": r(2, 3, 3), "b": r(2)}, {}, 1e-5),
    ("maxpool", 18, [node("MaxPool", ["x"], kernel_shape=[2, 2], strides=[2, 2])],
     {"x": r(2, 3, 6, 6)}, {}, 1e-5),
    ("maxpool-ceil-pads", 18, [node("MaxPool", ["x"], kernel_shape=[3, 3], strides=[2, 2],
                                    pads=[1, 1, 1, 1], ceil_mode=1)],
     {"x": r(1, 2, 6, 7)}, {}, 1e-5),
    ("averagepool", 18, [node("AveragePool", ["x"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
     {"x": r(2, 2, 5, 5)}, {}, 1e-5),
    ("averagepool-count-pad", 18, [node("AveragePool", ["x"], kernel_shape=[2, 3],
                                        pads=[1, 1, 1, 1], strides=[2, 2], count_include_pad=1)],
     {"x": r(1, 2, 5, 6)}, {}, 1e-5),
    ("global-pools", 18, [node("GlobalAveragePool", ["x"], ["a"]),
                          node("GlobalMaxPool", ["x"], ["m"]), node("Add", ["a", "m"])],
     {"x": r(2, 3, 4, 5)}, {}, 1e-5),
    ("batchnorm", 18, [node("BatchNormalization", ["x", "s", "b", "mean", "var"], epsilon=1e-3)],
     {"x": r(2, 3, 4, 4)},
     {"s": r(3), "b": r(3), "mean": r(3), "var": r(3, positive=True)}, 1e-5),
    ("layernorm", 18, [node("LayerNormalization", ["x", "s", "b"], epsilon=1e-4)],
     {"x": r(2, 3, 8), "s": r(8), "b": r(8)}, {}, 1e-5),
    ("layernorm-two-axes-no-bias", 18, [node("LayerNormalization", ["x", "s"], axis=-2)],
     {"x": r(2, 3, 4), "s": r(3, 4)}, {}, 1e-5),
    ("instancenorm", 18, [node("InstanceNormalization", ["x", "s", "b"])],
     {"x": r(2, 3, 4, 4), "s": r(3), "b": r(3)}, {}, 1e-5),
    ("softmax", 13, [node("Softmax", ["x"], axis=1)], {"x": r(2, 4, 3)}, {}, 1e-5),
    ("logsoftmax", 18, [node("LogSoftmax", ["x"])], {"x": r(3, 5)}, {}, 1e-5),
    ("flatten-transpose", 18, [node("Transpose", ["x"], ["t"], perm=[0, 2, 3, 1]),
                               node("Flatten", ["t"], axis=2)], {"x": r(2, 3, 4, 5)}, {}, 1e-5),
    ("reshape-zero-and-minus-one", 18, [node("Reshape", ["x", "shape"])],
     {"x": r(2, 3, 4)}, {"shape": i64(0, -1, 2)}, 1e-5),
    ("squeeze-unsqueeze", 18, [node("Unsqueeze", ["x", "axes"], ["u"]),
                               node("Squeeze", ["u", "axes2"])],
     {"x": r(3, 1, 4)}, {"axes": i64(0, -1), "axes2": i64(2)}, 1e-5),
    ("squeeze-all", 18, [node("Squeeze", ["x"])], {"x": r(1, 3, 1)}, {}, 1e-5),
    ("concat-split", 18, [node("Concat", ["a", "b"], ["c"], axis=1),
                          node("Split", ["c", "sizes"], ["y", "z"], axis=1)],
     {"a": r(2, 3), "b": r(2, 4)}, {"sizes": i64(2, 5)}, 1e-5),
    ("sequences", 18, [node("SplitToSequence", ["x", "two"], ["s"], axis=1),
                       node("SequenceAt", ["s", "last"], ["a"]),
                       node("SplitToSequence", ["x"], ["t"], axis=0, keepdims=0),
                       node("SequenceLength", ["t"], ["n"]), node("Cast", ["n"], ["nf"], to=F64),
                       node("ConcatFromSequence", ["t"], ["c"], axis=0, new_axis=1),
                       node("SequenceConstruct", ["a", "a"], ["u"]),
                       node("ConcatFromSequence", ["u"], ["v"], axis=1),
                       node("Mul", ["v", "nf"], ["w"]), node("Transpose", ["c"], ["ct"]),
                       node("MatMul", ["ct", "w"])],
     {"x": r(3, 5)}, {"two": np.int64(2), "last": np.int64(-1)}, 1e-5),
    ("split-num-outputs", 18, [node("Split", ["x"], ["y", "z", "w"], axis=0, num_outputs=3)],
     {"x": r(7, 2)}, {}, 1e-5),
    ("slice-steps", 18, [node("Slice", ["x", "starts", "ends", "axes", "steps"])],
     {"x": r(5, 6, 4)},
     {"starts": i64(1, -1, 0), "ends": i64(100, -100, 3), "axes": i64(0, 1, 2),
      "steps": i64(2, -2, 1)}, 1e-5),
    ("slice-reversed-known-pads", 18, [node("Slice", ["p", "s", "e", "a", "st"], ["pads"]),
                                       node("Pad", ["x", "pads"])], {"x": r(2, 3)},
     {"p": i64(0, 2, 1, 0), "s": i64(-1), "e": i64(-2 ** 63 + 1), "a": i64(0),
      "st": i64(-1)}, 1e-5),
    ("gather", 18, [node("Gather", ["x", "idx"], axis=1)], {"x": r(3, 5)},
     {"idx": i64(4, 0, -1, 4)}, 1e-5),
    ("gather-embedding", 18, [node("Gather", ["table", "ids"])], {"ids": i64(1, 2, 1, 0)},
     {"table": r(4, 3)}, None),
    ("expand-tile", 18, [node("Expand", ["x", "shape"], ["e"]), node("Tile", ["e", "reps"])],
     {"x": r(3, 1)}, {"shape": i64(2, 3, 4), "reps": i64(1, 2, 1)}, 1e-5),
    ("pad-constant", 18, [node("Pad", ["x", "pads", "value"])], {"x": r(2, 3)},
     {"pads": i64(1, 0, 0, 2), "value": np.float64(1.5)}, 1e-5),
    ("pad-reflect", 18, [node("Pad", ["x", "pads"], mode="reflect")], {"x": r(3, 4)},
     {"pads": i64(1, 2, 2, 1)}, 1e-5),
    ("pad-edge-axes", 18, [node("Pad", ["x", "pads", "", "axes"], mode="edge")], {"x": r(2, 3, 4)},
     {"pads": i64(2, 1), "axes": i64(-1)}, 1e-5),
    ("where-comparisons", 18, [node("Less", ["a", "b"], ["lt"]), node("Greater", ["a", "c"], ["gt"]),
                               node("Or", ["lt", "gt"], ["o"]), node("Not", ["o"], ["n"]),
                               node("Where", ["n", "a", "b"])],
     {"a": r(3, 4), "b": r(4), "c": r(3, 1)}, {}, 1e-5),
    ("equal-and-cast", 18, [node("GreaterOrEqual", ["a", "b"], ["ge"]),
                            node("LessOrEqual", ["a", "c"], ["le"]), node("And", ["ge", "le"], ["k"]),
                            node("Equal", ["k", "t"], ["e"]), node("Xor", ["e", "k"], ["x"]),
                            node("Cast", ["x"], ["f"], to=F64), node("Mul", ["f", "a"])],
     {"a": r(5), "b": r(5), "c": r(5)}, {"t": np.asarray(True)}, 1e-5),
    ("clip", 18, [node("Clip", ["x", "lo", "hi"])], {"x": r(4, 4)},
     {"lo": np.float64(-0.5), "hi": np.float64(0.7)}, 1e-5),
    ("clip-data-bounds", 18, [node("Clip", ["x", "lo"])], {"x": r(6), "lo": r(6)}, {}, 1e-5),
    ("cumsum", 18, [node("CumSum", ["x", "axis"], exclusive=1, reverse=1)], {"x": r(3, 4)},
     {"axis": np.int64(1)}, 1e-5),
    ("reduce-axes-input", 18, [node("ReduceSum", ["x", "axes"], ["s"], keepdims=0),
                               node("ReduceMean", ["x", "axes"], ["m"], keepdims=0),
                               node("ReduceMax", ["x", "axes"], ["mx"], keepdims=0),
                               node("ReduceL2", ["x", "axes"], ["l2"], keepdims=0),
                               node("ReduceLogSumExp", ["x", "axes"], ["lse"], keepdims=0),
                               node("Sum", ["s", "m", "mx", "l2", "lse"])],
     {"x": r(3, 4, 5)}, {"axes": i64(0, 2)}, 1e-5),
    ("reduce-axes-attribute", 13, [node("ReduceMean", ["x"], ["m"], axes=[1]),
                                   node("ReduceProd", ["x"], ["p"], axes=[-1], keepdims=1),
                                   node("ReduceSumSquare", ["x"], ["q"], axes=[1]),
                                   node("ReduceMin", ["x"], ["n"], axes=[1]),
                                   node("Sum", ["m", "p", "q", "n"])],
     {"x": r(4, 3)}, {}, 1e-5),
    ("reduce-all", 18, [node("ReduceSum", ["x"], keepdims=0)], {"x": r(3, 4)}, {}, 1e-5),
    ("identity-dropout", 18, [node("Identity", ["x"], ["i"]), node("Dropout", ["i"], ["y", "mask"])],
     {"x": r(3)}, {}, 1e-5),
    ("einsum-attention", 18, [node("Einsum", ["q", "k"], equation="bhqd,bhkd->bhqk")],
     {"q": r(2, 3, 4, 5), "k": r(2, 3, 6, 5)}, {}, 1e-5),
    ("resize-nearest", 18, [node("Resize", ["x", "", "scales"], mode="nearest")],
     {"x": r(1, 2, 3, 4)}, {"scales": np.asarray([1, 1, 2, 2], np.float32)}, 1e-5),
    ("onehot-trilu", 18, [node("OneHot", ["idx", "depth", "vals"], ["h"]),
                          node("Trilu", ["x"], ["t"], upper=0), node("MatMul", ["h", "t"])],
     {"x": r(4, 4)}, {"idx": i64(0, 3, -1), "depth": np.int64(4), "vals": np.asarray([0.0, 2.0])},
     1e-5),
    # index tuples: the relative-position table of a Swin block, slice assignment...
    ("gathernd", 18, [node("GatherND", ["x", "idx"])], {"x": r(3, 4, 5)},
     {"idx": i64(0, 1, 2, -1, 1, 3, 0, 1).reshape(4, 2)}, 1e-5),
    ("gathernd-batch", 18, [node("GatherND", ["x", "idx"], batch_dims=1)], {"x": r(2, 3, 4)},
     {"idx": i64(2, 0, 1, 1).reshape(2, 2, 1)}, 1e-5),
    ("gathernd-dynamic-indices", 18, [node("GatherND", ["x", "idx"])],
     {"x": r(3, 4), "idx": i64(0, 1, 2, -1).reshape(2, 2)}, {}, 1e-5),
    ("scatternd", 18, [node("ScatterND", ["x", "idx", "u"])], {"x": r(4, 3), "u": r(2, 3)},
     {"idx": i64(3, 1).reshape(2, 1)}, 1e-5),
    ("scatternd-add", 18, [node("ScatterND", ["x", "idx", "u"], reduction="add")],
     {"x": r(4, 3), "u": r(3, 3)}, {"idx": i64(1, 1, 0).reshape(3, 1)}, 1e-5),
    ("gather-scatter-elements", 18,
     [node("GatherElements", ["x", "gi"], ["g"], axis=1),
      node("ScatterElements", ["x", "si", "g"], axis=0)], {"x": r(3, 4)},
     {"gi": i64(0, -1, 2, 1, 3, 3).reshape(3, 2),
      "si": i64(2, 0, 0, 1, 1, 2).reshape(3, 2)}, 1e-5),
    ("swish", 24, [node("Swish", ["x"], alpha=1.5)], {"x": r(3, 4)}, {}, 1e-5),
    ("hyperbolic", 18, [node("Sinh", ["x"], ["s"]), node("Cosh", ["x"], ["c"]),
                        node("Asinh", ["x"], ["a"]), node("Atanh", ["t"], ["b"]),
                        node("Acosh", ["p"], ["d"]), node("Sum", ["s", "c", "a", "b", "d"])],
     {"x": r(5), "t": np.linspace(-0.8, 0.8, 5), "p": np.linspace(1.5, 4, 5)}, {}, 1e-5),
    ("shrink", 18, [node("Shrink", ["x"], lambd=0.4, bias=0.1)],
     {"x": np.array([-2.0, -0.7, -0.2, 0.1, 0.6, 1.9])}, {}, 1e-5),
    # opsets 21 and 23 compute the statistics in float32 (stash_type): the reference's
    # differences are float32 noise, so values only (derivatives: the opset 18 row)
    ("group-norm", 21, [node("GroupNormalization", ["x", "g", "b"], num_groups=2)],
     {"x": r(2, 4, 3, 3)}, {"g": r(4), "b": r(4)}, None),
    ("group-norm-18", 18, [node("GroupNormalization", ["x", "g", "b"], num_groups=2)],
     {"x": r(2, 4, 5)}, {"g": r(2), "b": r(2)}, 1e-5),
    ("rms-norm", 23, [node("RMSNormalization", ["x", "g"], axis=-1)], {"x": r(3, 6)},
     {"g": r(6)}, None),
    ("depth-space", 18, [node("SpaceToDepth", ["x"], ["d"], blocksize=2),
                         node("DepthToSpace", ["d"], ["u"], blocksize=2, mode="CRD"),
                         node("DepthToSpace", ["d"], ["v"], blocksize=2),
                         node("Concat", ["u", "v"], axis=1)], {"x": r(2, 3, 4, 6)}, {}, 1e-5),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_op_values_and_derivatives(client, case):
    _, opset, nodes, inputs, initializers, tol = case
    outputs = [o for n in nodes[-1:] for o in n.output]
    m = model(nodes, inputs, initializers, outputs=outputs, opset=opset)
    check_values(client, m, inputs)
    check_values(client, m, inputs, parameters="inputs")
    if tol is not None:
        h = 1e-3 if tol > 1e-4 else 1e-6
        check_derivatives(client, m, inputs, h=h, rtol=tol)
        if any(a.dtype.kind == "f" for a in initializers.values()):
            check_derivatives(client, m, inputs, h=h, rtol=tol, parameters="inputs")


def test_the_table_covers_the_ops_it_claims():
    used = {n.op_type for c in CASES for n in c[2]}
    untested = set(supported_ops()) - used - {
        "Constant", "ConstantOfShape", "Shape", "Size", "Range", "Mod", "Floor", "Ceil", "Round",
        "Sign", "IsNaN", "IsInf", "NonZero", "ArgMax", "ArgMin", "EyeLike", "CastLike",
        "Tan", "ThresholdedRelu", "ReduceL1", "ReduceLogSum"}
    assert not untested, f"ops converted but not in the table: {sorted(untested)}"


# --- shape plumbing and dynamic batch dimensions ---------------------------------------------

def plumbing_model(opset=18):
    """y = reshape(x, [N, -1]) @ W, with the shape computed from Shape as exporters do, plus
    a ConstantOfShape, a Range and a Cast/Mod/Div chain on the shape."""
    nodes = [
        node("Shape", ["x"], ["shape"]),
        node("Gather", ["shape", "zero"], ["n"], axis=0),
        node("Unsqueeze", ["n", "axis0"], ["n1"]),
        node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        node("Reshape", ["x", "target"], ["flat"]),
        node("MatMul", ["flat", "W"], ["h"]),
        node("Shape", ["h"], ["hs"], start=-1),
        node("ConstantOfShape", ["hs"], ["ones"],
             value=numpy_helper.from_array(np.ones(1, np.float32))),
        node("Cast", ["hs"], ["hsf"], to=F32),
        node("Sqrt", ["hsf"], ["scale"]),
        node("Slice", ["shape", "two", "three"], ["s2"]),
        node("Mod", ["s2", "three"], ["m1"]),
        node("Cast", ["m1"], ["m1f"], to=F32),
        node("Range", ["r0", "hs0", "r1"], ["steps"]),
        node("Cast", ["steps"], ["stepsf"], to=F32),
        node("Div", ["h", "scale"], ["hd"]),
        node("Add", ["hd", "ones"], ["h1"]),
        node("Mul", ["h1", "m1f"], ["h2"]),
        node("Add", ["h2", "stepsf"], ["y"]),
    ]
    inits = {"zero": np.int64(0), "axis0": i64(0), "minus_one": i64(-1),
             "W": R.standard_normal((12, 5)).astype(np.float32), "three": i64(3), "two": i64(2), "r0": np.int64(0), "r1": np.int64(1)}
    nodes.insert(7, node("Squeeze", ["hs"], ["hs0"]))
    x = R.standard_normal((4, 3, 4)).astype(np.float32)
    return model(nodes, {"x": x}, inits, opset=opset, dynamic={"x": {0: "N"}}), x


def test_shape_plumbing_is_folded_and_the_batch_stays_dynamic(client):
    m, x = plumbing_model()
    imported = check_values(client, m, {"x": x}, rtol=1e-5)
    assert imported.input_shapes == {"x": (-1, 3, 4)}
    ops = {n.op for n in imported.graph.build().nodes}
    assert ops <= {"reshape", "matmul", "div", "add", "mul"}, ops  # no shape ops left
    for batch in (1, 7):
        other = R.standard_normal((batch, 3, 4)).astype(np.float32)
        got = client.evaluate(imported.graph, {"x": other})["y"]
        assert_allclose(got, run_reference(m, {"x": other})[0], rtol=1e-5, atol=1e-6)


def test_input_shapes_override_the_declared_ones(client):
    m, x = plumbing_model()
    imported = from_onnx(m, input_shapes={"x": [4, 3, 4]})
    assert imported.input_shapes == {"x": (4, 3, 4)}
    assert_allclose(client.evaluate(imported.graph, {"x": x})["y"],
                    run_reference(m, {"x": x})[0], rtol=1e-5)


def test_a_second_dynamic_dimension_in_one_reshape_is_explained():
    nodes = [node("Shape", ["x"], ["s"]), node("Concat", ["s", "one"], ["t"], axis=0),
             node("Reshape", ["x", "t"])]
    m = model(nodes, {"x": r(2, 3)}, {"one": i64(1)}, dynamic={"x": {0: "N", 1: "S"}})
    with pytest.raises(OnnxImportError, match=r"ONNX node 'y' \(Reshape\).*more than one "
                                              r"dynamic dimension.*input_shapes"):
        from_onnx(m)
    assert from_onnx(m, input_shapes={"x": [-1, 3]}).input_shapes == {"x": (-1, 3)}


def mlp_model(opset):
    """x -> Gemm -> Relu -> MatMul -> Add -> ReduceMean over axis 1 (axes as the opset
    wants them) -> Unsqueeze -> Softmax."""
    reduce_axes = ([node("ReduceMean", ["z", "axes"], ["m"], keepdims=0)] if opset >= 18
                   else [node("ReduceMean", ["z"], ["m"], axes=[1], keepdims=0)])
    nodes = [node("Gemm", ["x", "W1", "b1"], ["h"], transB=1), node("Relu", ["h"], ["a"]),
             node("MatMul", ["a", "W2"], ["z0"]), node("Add", ["z0", "b2"], ["z"]),
             *reduce_axes, node("Unsqueeze", ["m", "axes"], ["mu"]),
             node("Sub", ["z", "mu"], ["c"]), node("Softmax", ["c"], ["y"], axis=-1)]
    inits = {"W1": r(6, 4), "b1": r(6), "W2": r(6, 3), "b2": r(3), "axes": i64(1)}
    return model(nodes, {"x": r(5, 4)}, inits, opset=opset, dynamic={"x": {0: "batch"}})


@pytest.mark.parametrize("opset", range(13, 22))
def test_opsets_13_to_21(client, opset):
    m = mlp_model(opset)
    feeds = {"x": r(5, 4)}
    check_values(client, m, feeds)
    imported = check_derivatives(client, m, feeds, parameters="inputs")
    assert imported.opset == opset
    assert list(imported.parameters) == ["W1", "b1", "W2", "b2"]  # the model's names, in order


# --- parameters --------------------------------------------------------------------------------

def test_parameter_modes_keep_the_models_names(client):
    m = mlp_model(18)
    as_constants = from_onnx(m)
    proto = as_constants.graph.build()
    assert [i.name for i in proto.inputs] == ["x"] and as_constants.parameters == {}
    # W1 is transposed for Gemm's transB at import (a constant named after Gemm's output);
    # axes were folded away
    assert {"b1", "W2", "b2", "h/const"} == set(proto.constants)
    as_inputs = from_onnx(m, parameters="inputs")
    proto = as_inputs.graph.build()
    assert [i.name for i in proto.inputs] == ["x", "W1", "b1", "W2", "b2"]
    assert as_inputs.inputs == ["x"] and as_inputs.outputs == ["y"]
    assert as_inputs.num_parameters == 6 * 4 + 6 + 6 * 3 + 3
    for name in ("W1", "b1", "W2", "b2"):
        expected = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == name))
        assert_allclose(as_inputs.parameters[name], expected)
    node_names = {n.name for n in proto.nodes}
    assert {"h", "a", "z", "y"} <= node_names  # each ONNX node's output keeps its name


def test_gradient_with_respect_to_parameters_matches_finite_differences(client):
    m = mlp_model(18)
    check_derivatives(client, m, {"x": r(3, 4)}, parameters="inputs", seed=3)


def test_bad_parameters_mode():
    with pytest.raises(ValueError, match="parameters must be one of auto, constants, inputs"):
        from_onnx(mlp_model(18), parameters="weights")


# --- loading -------------------------------------------------------------------------------------

def test_path_bytes_and_external_data(client, tmp_path):
    m = mlp_model(18)
    feeds = {"x": r(5, 4)}
    want = run_reference(m, feeds)[0]
    path = tmp_path / "mlp.onnx"
    onnx.save_model(onnx.ModelProto.FromString(m.SerializeToString()), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mlp.weights", size_threshold=0)
    assert (tmp_path / "mlp.weights").exists()
    for source in (path, str(path)):
        imported = from_onnx(source)
        assert_allclose(client.evaluate(imported.graph, feeds)["y"], want, rtol=1e-6)
    with pytest.raises(OnnxImportError, match=r"initializer 'W1' is stored in an external file "
                                              r"\('mlp.weights'\).*pass the model's path"):
        from_onnx(path.read_bytes())
    unloaded = onnx.load(str(path), load_external_data=False)
    with pytest.raises(OnnxImportError, match="external file"):
        from_onnx(unloaded)
    imported = from_onnx(m.SerializeToString())
    assert_allclose(client.evaluate(imported.graph, feeds)["y"], want, rtol=1e-6)


def test_not_a_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not protobuf")
    with pytest.raises(OnnxImportError, match="is not an ONNX model"):
        from_onnx(bad)
    with pytest.raises(OnnxImportError, match="no such file"):
        from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="path, bytes or an onnx.ModelProto"):
        from_onnx(42)


# --- errors --------------------------------------------------------------------------------------

def test_an_old_opset_is_refused_with_the_converter_named():
    m = model([node("Upsample", ["x"], scales=[1.0, 2.0])], {"x": r(2, 2)}, opset=9)
    with pytest.raises(OnnxImportError, match=r"opset 9.*oldest supported is 13.*"
                                              r"version_converter.convert_version"):
        from_onnx(m)


@pytest.mark.parametrize("op, attrs, message", [
    ("LSTM", {"hidden_size": 2}, r"ONNX node 'rnn' \(LSTM\): opset 18 LSTM is not supported: "
                                 r"recurrent layers"),
    ("Det", {}, r"ONNX node 'rnn' \(Det\): opset 18 Det is not supported: rewrite"),
])
def test_unsupported_ops_are_named(op, attrs, message):
    n = helper.make_node(op, ["x", "w", "r"] if op == "LSTM" else ["x"], ["y"], name="rnn",
                         **attrs)
    inits = {"w": r(1, 8, 3).astype(np.float32), "r": r(1, 8, 2).astype(np.float32)} \
        if op == "LSTM" else {}
    m = model([n], {"x": r(4, 1, 3).astype(np.float32) if op == "LSTM" else r(3, 3)}, inits)
    with pytest.raises(OnnxImportError, match=message):
        from_onnx(m)


def test_other_domains_and_training_mode_are_explained():
    fused = helper.make_node("FusedMatMul", ["a", "b"], ["y"], domain="com.microsoft",
                             name="fused")
    m = model([fused], {"a": r(2, 2), "b": r(2, 2)})
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(OnnxImportError, match=r"'fused' \(FusedMatMul\): ops of domain "
                                              r"'com.microsoft' are not supported"):
        from_onnx(m)
    bn = node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "rm", "rv"],
              training_mode=1)
    m = model([bn], {"x": r(2, 3, 2)}, {"s": r(3), "b": r(3), "m": r(3), "v": r(3)},
              outputs=("y",))
    with pytest.raises(OnnxImportError, match=r"\(BatchNormalization\): training mode.*"
                                              r"eval mode"):
        from_onnx(m)


def test_a_value_needed_at_import_time_that_depends_on_inputs():
    m = model([node("Reshape", ["x", "shape"])], {"x": r(2, 3), "shape": i64(3, 2)})
    with pytest.raises(OnnxImportError, match=r"\(Reshape\): the target shape must be known at "
                                              r"import time"):
        from_onnx(m)


def test_without_the_onnx_package_the_extra_is_named(monkeypatch):
    from gradserve.client.extras import MissingExtra

    monkeypatch.setitem(__import__("sys").modules, "onnx", None)  # as if not installed
    with pytest.raises(MissingExtra, match=r"ONNX import needs onnx, which is not installed: "
                                           r"pip install 'gradserve\[onnx\]'"):
        from_onnx(b"")


def test_float16_inputs_are_refused_with_advice():
    graph = helper.make_graph([node("Relu", ["x"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(OnnxImportError, match=r"input 'x' is float16.*convert the model"):
        from_onnx(m)
