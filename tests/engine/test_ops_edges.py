"""The new ops' conventions and edge cases, beyond the table in test_ops.py: erf's
accuracy, max-pool and min ties, prod with zeros, clip at its bounds, take's indices,
cast between kinds, comparisons feeding where, bool values, zero-size matmul, int sums,
the scratch estimates, and a conv big enough to go through the fast path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.engine import (OPS, DifferentiationError, DTypeError, Graph, Input, InputError,
                              Node, ResourceLimitError, compile)
from gradserve.engine.special import erf
from support.oracles import numeric_jacobian, reference
from support.op_table import TABLE, check_gradients, one_op, setup


def plan_of(nodes, inputs, outputs=("y",), constants=None):
    """Compile nodes over `inputs` (name -> array): the Input dtypes and shapes come from
    the arrays."""
    graph = Graph([Input(n, a.dtype.name, a.shape) for n, a in inputs.items()],
                  [Node(*spec) for spec in nodes], list(outputs), constants or {})
    return compile(graph)


def both_jacobians(plan, inputs, **kwargs):
    forward = plan.jacobian(inputs, mode="forward", **kwargs).jacobian
    reverse = plan.jacobian(inputs, mode="reverse", **kwargs).jacobian
    assert set(forward) == set(reverse)
    for key in forward:
        assert_allclose(forward[key], reverse[key], rtol=1e-12, atol=1e-14, err_msg=str(key))
    return forward


# --- erf -----------------------------------------------------------------------------


def test_erf_matches_math_erf_to_float64_accuracy():
    x = np.concatenate([np.linspace(-8, 8, 40001), np.geomspace(1e-300, 30, 4001)])
    x = np.concatenate([x, -x])
    want = np.array([math.erf(v) for v in x])
    got = erf(x)
    assert_allclose(got, want, rtol=1e-15, atol=0)
    assert_array_equal(erf(np.array([0.0, -0.0, np.inf, -np.inf, 40.0])),
                       [0.0, -0.0, 1.0, -1.0, 1.0])
    assert np.signbit(erf(np.array([-0.0])))[0]
    assert np.isnan(erf(np.array([np.nan])))[0]


def test_erf_float32_within_a_few_float32_ulps():
    x = np.concatenate([np.linspace(-6, 6, 20001), np.geomspace(1e-30, 6, 2001)])
    x = np.concatenate([x, -x]).astype(np.float32)
    want = np.array([math.erf(float(v)) for v in x])
    got = erf(x)
    assert got.dtype == np.float32
    assert_allclose(got, want, rtol=5e-7, atol=0)
    assert_array_equal(erf(np.float32([0.0, np.inf, -np.inf])), [0.0, 1.0, -1.0])
    assert np.isnan(erf(np.float32([np.nan])))[0]


# --- ties, zeros and bounds follow PyTorch ---------------------------------------------


@pytest.mark.parametrize("x, attrs, grad", [
    ([1.0, 3.0, 1.0], {}, [0.5, 0.0, 0.5]),
    ([[1.0, 1.0], [0.0, 2.0]], {"axes": [1]}, [[0.5, 0.5], [1.0, 0.0]]),
    ([[-4.0, 1.0], [-4.0, -4.0]], {"keepdims": True}, [[1 / 3, 0.0], [1 / 3, 1 / 3]]),
])
def test_min_reduction_tie_shares_evenly(x, attrs, grad):
    plan, inputs = one_op("min", x, **attrs)
    check_gradients(plan, inputs, {"a": grad})


@pytest.mark.parametrize("x, attrs, grad", [
    ([2.0, 3.0, 4.0], {}, [12.0, 8.0, 6.0]),
    ([2.0, 0.0, 4.0], {}, [0.0, 8.0, 0.0]),  # one zero: only it gets the product of the rest
    ([0.0, 3.0, 0.0], {}, [0.0, 0.0, 0.0]),  # two zeros: every partial is zero
    ([[0.0, 5.0], [2.0, 3.0], [0.0, 0.0]], {"axes": [1]}, [[5.0, 0.0], [3.0, 2.0], [0.0, 0.0]]),
    ([[0.0, 5.0], [2.0, 3.0]], {"axes": [0], "keepdims": True}, [[2.0, 3.0], [0.0, 5.0]]),
])
def test_prod_derivative_with_zeros(x, attrs, grad):
    plan, inputs = one_op("prod", x, **attrs)
    check_gradients(plan, inputs, {"a": grad})


def test_prod_with_zeros_matches_finite_differences():
    x = np.array([[0.0, 1.5, -2.0], [0.0, 0.0, 3.0], [0.7, -1.1, 2.0]])
    plan, inputs = one_op("prod", x, axes=[1])
    numeric = numeric_jacobian(lambda xs: {"y": np.prod(xs["a"], axis=1)}, inputs)
    assert_allclose(both_jacobians(plan, inputs)["y", "a"], numeric["y", "a"], atol=1e-8)


def test_max_pool_tie_goes_to_the_first_maximum_in_row_major_order():
    x = np.array([[[[1.0, 5.0, 5.0, 0.0],
                    [5.0, 2.0, 1.0, 5.0],
                    [3.0, 3.0, 4.0, 4.0],
                    [3.0, 3.0, 4.0, 4.0]]]])
    plan, inputs = one_op("max_pool", x, kernel_shape=[2, 2], strides=[2, 2])
    want = np.zeros_like(x)
    want[0, 0, 0, 1] = want[0, 0, 0, 2] = want[0, 0, 2, 0] = want[0, 0, 2, 2] = 1.0
    check_gradients(plan, inputs, {"a": want})


def test_max_pool_overlapping_windows_sum_on_a_shared_maximum():
    x = np.array([[[0.0, 1.0, 9.0, 2.0, 3.0]]])
    plan, inputs = one_op("max_pool", x, kernel_shape=[3], strides=[1])
    assert_array_equal(plan.evaluate(inputs)["y"], [[[9.0, 9.0, 9.0]]])
    check_gradients(plan, inputs, {"a": [[[0.0, 0.0, 3.0, 0.0, 0.0]]]})


def test_max_pool_nan_is_the_maximum_and_its_last_one_gets_the_derivative():
    x = np.array([[[np.nan, 1.0, np.nan, 0.0, 2.0, 3.0]]])
    plan, inputs = one_op("max_pool", x, kernel_shape=[3], strides=[3])
    y = plan.evaluate(inputs)["y"]
    assert np.isnan(y[0, 0, 0]) and y[0, 0, 1] == 3.0
    grad = plan.vjp(inputs, {"y": np.ones_like(y)}).cotangents["a"]
    assert_array_equal(grad, [[[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]]])


def test_max_pool_window_of_minus_infinity_sends_the_derivative_to_a_real_element():
    x = np.array([[[-np.inf, -np.inf, 1.0]]])
    plan, inputs = one_op("max_pool", x, kernel_shape=[2], pads=[1, 0])
    y = plan.evaluate(inputs)["y"]
    assert_array_equal(y, [[[-np.inf, -np.inf, 1.0]]])
    grad = plan.vjp(inputs, {"y": np.ones_like(y)}).cotangents["a"]
    assert_array_equal(grad, [[[2.0, 0.0, 1.0]]])  # never into the padding


def test_max_pool_padding_is_minus_infinity():
    x = -np.ones((1, 1, 3))
    plan, inputs = one_op("max_pool", x, kernel_shape=[2], pads=[1, 1])
    assert_array_equal(plan.evaluate(inputs)["y"], [[[-1.0, -1.0, -1.0, -1.0]]])
    check_gradients(plan, inputs, {"a": [[[2.0, 1.0, 1.0]]]})


@pytest.mark.parametrize("include, want", [(False, [1.5, 2.0, 2.5]), (True, [1.0, 2.0, 5 / 3])])
def test_avg_pool_count_include_pad(include, want):
    x = np.array([[[1.0, 2.0, 3.0]]])
    plan, inputs = one_op("avg_pool", x, kernel_shape=[3], pads=[1, 1],
                          count_include_pad=include)
    assert_allclose(plan.evaluate(inputs)["y"][0, 0], want, rtol=1e-15)


def test_clip_derivative_passes_at_the_bounds():
    plan, inputs = one_op("clip", [-2.0, -1.0, 0.0, 1.0, 2.0], min=-1.0, max=1.0)
    assert_array_equal(plan.evaluate(inputs)["y"], [-1.0, -1.0, 0.0, 1.0, 1.0])
    check_gradients(plan, inputs, {"a": [0.0, 1.0, 1.0, 1.0, 0.0]})


def test_clip_keeps_integers_and_float32():
    x = np.array([-3, 0, 3], np.int32)
    plan = plan_of([("y", "clip", ["x"], {"min": -1.5, "max": 2.5})], {"x": x})
    got = plan.evaluate({"x": x})["y"]
    assert got.dtype == np.int32
    assert_array_equal(got, [-1, 0, 2])
    x32 = np.float32([-3, 0.25, 3])
    plan = plan_of([("y", "clip", ["x"], {"min": 0})], {"x": x32})
    assert plan.evaluate({"x": x32})["y"].dtype == np.float32


# --- take --------------------------------------------------------------------------------


def embedding(indices, table=np.arange(12.0).reshape(4, 3)):
    return plan_of([("y", "take", ["w", "i"], {"axis": 0})],
                   {"w": table, "i": np.asarray(indices)}), {"w": table,
                                                             "i": np.asarray(indices)}


def test_take_negative_and_repeated_indices_scatter_add():
    plan, inputs = embedding(np.array([[1, -1], [1, 0]], np.int32))
    assert_array_equal(plan.evaluate(inputs)["y"], np.arange(12.0).reshape(4, 3)[[[1, 3], [1, 0]]])
    grad = plan.vjp(inputs, {"y": np.ones((2, 2, 3))}).cotangents
    assert set(grad) == {"w"}  # integer indices are never differentiated
    assert_array_equal(grad["w"], [[1.0] * 3, [2.0] * 3, [0.0] * 3, [1.0] * 3])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_vjp_of_several_directions_equals_the_transposed_copy_matrix(axis, dtype):
    """A gather is a 0/1 matrix; its VJP is that matrix transposed applied to each
    seed direction: repeated and negative indices summed, on any axis."""
    rng = np.random.default_rng(axis)
    data = rng.standard_normal((3, 5, 4)).astype(dtype)
    size = data.shape[axis]
    indices = np.array([[0, -1, 2], [size - 1, 0, 0]], np.int64)
    plan = plan_of([("y", "take", ["w", "i"], {"axis": axis})], {"w": data, "i": indices})
    out_shape = plan.evaluate({"w": data, "i": indices})["y"].shape
    copy = np.zeros((math.prod(out_shape), data.size))
    positions = np.arange(data.size).reshape(data.shape)
    for row, column in enumerate(np.take(positions, indices, axis=axis).reshape(-1)):
        copy[row, column] = 1.0
    seeds = rng.standard_normal((4,) + out_shape).astype(dtype)
    got = plan.vjp({"w": data, "i": indices}, {"y": seeds}).cotangents["w"]
    want = (seeds.reshape(4, -1).astype(np.float64) @ copy).reshape((4,) + data.shape)
    assert got.dtype == dtype
    assert_allclose(got, want, rtol=1e-6 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("index", [1, -1])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_take_of_one_index_from_a_strided_value(axis, index):
    """ONNX's Gather of a scalar (q, k and v from one transposed tensor): the value is
    np.take's, the VJP puts each direction's seed in the index's slice, zeros elsewhere
    (checked against a finite-difference Jacobian)."""
    rng = np.random.default_rng(axis)
    x = rng.standard_normal((4, 3, 5))
    i = np.array(index, np.int64)
    plan = plan_of([("t", "transpose", ["x"], {"perm": [2, 0, 1]}),
                    ("y", "take", ["t", "i"], {"axis": axis})], {"x": x, "i": i})
    want = np.take(x.transpose(2, 0, 1), index, axis=axis)
    assert_array_equal(plan.evaluate({"x": x, "i": i})["y"], want)
    jac = both_jacobians(plan, {"x": x, "i": i}, wrt=["x"])["y", "x"]
    numeric = numeric_jacobian(
        lambda xs: {"y": np.take(xs["x"].transpose(2, 0, 1), index, axis=axis)}, {"x": x})
    assert_allclose(jac, numeric["y", "x"], atol=1e-8)


@pytest.mark.parametrize("bad", [4, -5])
def test_take_index_out_of_range_names_node_and_field(bad):
    plan, inputs = embedding(np.array([0, bad]))
    with pytest.raises(InputError) as info:
        plan.evaluate(inputs)
    e = info.value
    assert (e.node, e.op, e.field) == ("y", "take", "inputs[1]")
    assert "'y'" in str(e) and str(bad) in str(e)


def test_take_refuses_float_indices_and_differentiating_indices():
    with pytest.raises(DTypeError) as info:
        plan_of([("y", "take", ["w", "i"])], {"w": np.ones(3), "i": np.ones(2)})
    assert info.value.field == "inputs[1]"
    plan, inputs = embedding(np.array([0, 2]))
    with pytest.raises(DifferentiationError):
        plan.jacobian(inputs, wrt=["i"])


def test_take_with_indices_computed_from_a_differentiated_input():
    """Indices cast from a float input: the input is active, the indices carry nothing."""
    x = np.array([0.2, 2.7, 1.1])
    plan = plan_of([("i", "cast", ["x"], {"dtype": "int64"}),
                    ("t", "take", ["x", "i"]),
                    ("y", "mul", ["t", "x"])], {"x": x})
    jac = both_jacobians(plan, {"x": x})["y", "x"]
    numeric = numeric_jacobian(lambda xs: {"y": np.take(xs["x"], [0, 2, 1]) * xs["x"]},
                               {"x": x})
    assert_allclose(jac, numeric["y", "x"], atol=1e-8)


# --- cast, comparisons, where, bool ------------------------------------------------------


def test_cast_between_floats_passes_the_derivative_in_the_new_dtype():
    x = np.array([1.0, 2.0])
    plan = plan_of([("y", "cast", ["x"], {"dtype": "float32"})], {"x": x})
    assert plan.evaluate({"x": x})["y"].dtype == np.float32
    assert plan.jvp({"x": x}, {"x": np.ones(2)}).tangents["y"].dtype == np.float32
    g = plan.vjp({"x": x}, {"y": np.float32([1, 2])}).cotangents["x"]
    assert g.dtype == np.float64
    assert_array_equal(g, [1.0, 2.0])
    assert_array_equal(plan.jacobian({"x": x}, mode="forward").jacobian["y", "x"], np.eye(2))


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool"])
def test_cast_through_integer_or_bool_has_no_derivative(dtype):
    x = np.array([0.5, 2.5, -1.5])
    plan = plan_of([("n", "cast", ["x"], {"dtype": dtype}),
                    ("f", "cast", ["n"], {"dtype": "float64"}),
                    ("y", "add", ["f", "x"])], {"x": x})
    assert_allclose(plan.evaluate({"x": x})["y"], x.astype(dtype).astype(np.float64) + x)
    assert_array_equal(both_jacobians(plan, {"x": x})["y", "x"], np.eye(3))
    assert_array_equal(plan.jvp({"x": x}, {"x": np.ones(3)}).tangents["y"], np.ones(3))


@pytest.mark.parametrize("op", ["equal", "not_equal", "less", "less_equal", "greater",
                                "greater_equal"])
def test_comparison_selects_without_a_derivative_of_its_own(op):
    a, b = np.array([1.0, -2.0, 3.0, 0.5]), np.array([1.0, 0.0, 2.0, 4.0])
    plan = plan_of([("c", op, ["a", "b"]), ("y", "where", ["c", "a", "b"])], {"a": a, "b": b})
    mask = reference(op, [a, b])
    assert mask.dtype == np.bool_
    assert_array_equal(plan.evaluate({"a": a, "b": b})["y"], np.where(mask, a, b))
    jac = both_jacobians(plan, {"a": a, "b": b})
    assert_array_equal(jac["y", "a"], np.diag(mask.astype(float)))
    assert_array_equal(jac["y", "b"], np.diag((~mask).astype(float)))


def test_comparison_output_is_bool_and_not_differentiable():
    a = np.array([1.0, 2.0])
    plan = plan_of([("y", "less", ["a", "a"])], {"a": a})
    assert plan.evaluate({"a": a})["y"].dtype == np.bool_
    with pytest.raises(DifferentiationError):
        plan.jacobian({"a": a}, of=["y"])


def test_bool_inputs_flow_through_shape_ops_and_where():
    c = np.array([[True, False, True]])
    x = np.array([1.0, 2.0, 3.0])
    plan = plan_of([("t", "transpose", ["c"]), ("r", "reshape", ["t"], {"shape": [3]}),
                    ("e", "equal", ["r", "r"]), ("y", "where", ["e", "x", "x"])],
                   {"c": c, "x": x})
    assert_array_equal(plan.evaluate({"c": c, "x": x})["y"], x)


@pytest.mark.parametrize("op", ["add", "mul", "neg", "sum", "max", "relu", "cumsum"])
def test_arithmetic_on_bool_is_refused(op):
    c = np.array([True, False])
    arity = OPS[op].arity
    attrs = {"axis": 0} if op == "cumsum" else {}
    with pytest.raises(DTypeError) as info:
        plan_of([("y", op, ["c"] * arity, attrs)], {"c": c})
    assert "bool" in str(info.value) and "'y'" in str(info.value)


def test_where_needs_a_bool_condition():
    x = np.ones(2)
    with pytest.raises(DTypeError) as info:
        plan_of([("y", "where", ["x", "x", "x"])], {"x": x})
    assert info.value.field == "inputs[0]"


# --- dtypes and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize("op", ["sum", "prod", "cumsum", "min", "max"])
@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_integer_reductions_keep_their_dtype(op, dtype):
    x = np.arange(6, dtype=dtype).reshape(2, 3)
    attrs = {"axis": 1} if op == "cumsum" else {"axes": [1]}
    got = plan_of([("y", op, ["x"], attrs)], {"x": x}).evaluate({"x": x})["y"]
    assert got.dtype == np.dtype(dtype)
    assert_array_equal(got, reference(op, [x], attrs))


@pytest.mark.parametrize("a_shape, b_shape", [((4, 0, 2), (2, 5)), ((3, 0), (0,)),
                                              ((2, 0), (0, 3)), ((0,), (0, 3)),
                                              ((0, 3), (3,)), ((3,), (3, 0))])
def test_zero_size_matmul_derivatives(a_shape, b_shape):
    rng = np.random.default_rng(0)
    inputs = {"a": rng.standard_normal(a_shape), "b": rng.standard_normal(b_shape)}
    plan = plan_of([("y", "matmul", ["a", "b"])], inputs)
    y = plan.evaluate(inputs)["y"]
    assert_array_equal(y, inputs["a"] @ inputs["b"])
    jac = both_jacobians(plan, inputs)
    for name, x in inputs.items():
        assert jac["y", name].shape == y.shape + x.shape
        assert np.all(np.isfinite(jac["y", name]))
    tangents = {n: np.ones((2,) + x.shape) for n, x in inputs.items()}
    assert_array_equal(plan.jvp(inputs, tangents).tangents["y"],
                       np.broadcast_to(np.ones(a_shape) @ inputs["b"]
                                       + inputs["a"] @ np.ones(b_shape), (2,) + y.shape))
    grads = plan.vjp(inputs, {"y": np.ones((2,) + y.shape)}).cotangents
    for name, x in inputs.items():
        assert grads[name].shape == (2,) + x.shape


# --- conv at a realistic size, and the scratch estimates ------------------------------------


def test_conv_batch_of_directions_matches_reference_at_a_larger_size():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 12, 12))
    w = rng.standard_normal((8, 3, 3, 3))
    attrs = {"strides": [2, 1], "pads": [1, 1, 0, 1], "groups": 2}
    plan = plan_of([("y", "conv", ["x", "w"], attrs)], {"x": x, "w": w})
    want = reference("conv", [x, w], attrs)
    assert_allclose(plan.evaluate({"x": x, "w": w})["y"], want, rtol=1e-12, atol=1e-12)
    tx, tw = rng.standard_normal((5,) + x.shape), rng.standard_normal((5,) + w.shape)
    got = plan.jvp({"x": x, "w": w}, {"x": tx, "w": tw}).tangents["y"]
    for i in range(5):  # conv is bilinear: its JVP is conv(tx, w) + conv(x, tw)
        assert_allclose(got[i], reference("conv", [tx[i], w], attrs)
                        + reference("conv", [x, tw[i]], attrs), rtol=1e-10, atol=1e-10)
    g = rng.standard_normal((5,) + want.shape)
    back = plan.vjp({"x": x, "w": w}, {"y": g}).cotangents
    def dot(a, b):
        return (a * b).reshape(len(a), -1).sum(axis=1)
    lhs = dot(g, got)
    rhs = dot(back["x"], tx) + dot(back["w"], tw)
    assert_allclose(lhs, rhs, rtol=1e-10)


def test_conv_with_an_empty_batch():
    x, w = np.ones((0, 2, 5)), np.ones((3, 2, 2))
    plan = plan_of([("y", "conv", ["x", "w"])], {"x": x, "w": w})
    assert plan.evaluate({"x": x, "w": w})["y"].shape == (0, 3, 4)
    jac = both_jacobians(plan, {"x": x, "w": w})
    assert jac["y", "w"].shape == (0, 3, 4, 3, 2, 2)


def test_conv_whose_gathered_windows_exceed_the_limit_is_refused_before_running():
    """Output 1 MB, gathered windows 51 MB: the memory estimate counts the scratch."""
    x, w = np.zeros((1, 64, 64, 64), np.float32), np.zeros((64, 64, 7, 7), np.float32)
    plan = plan_of([("y", "conv", ["x", "w"], {"pads": [3, 3, 3, 3]})], {"x": x, "w": w})
    with pytest.raises(ResourceLimitError):
        plan.evaluate({"x": x, "w": w}, max_bytes=20_000_000)
    assert plan.evaluate({"x": x, "w": w}, max_bytes=80_000_000)["y"].shape == (1, 64, 64, 64)


NEW_OPS = {"conv", "max_pool", "avg_pool", "take", "where", "clip", "cumsum", "pad", "cast",
           "min", "prod", "erf"}
EMPTY_ROWS = [r._replace(shapes=((0,) + r.shapes[0][1:],) + r.shapes[1:]) for r in TABLE
              if r.op in NEW_OPS and r.shapes[0] and r.op not in ("take", "min", "where")]


@pytest.mark.parametrize("r", EMPTY_ROWS, ids=[r.id for r in EMPTY_ROWS])
def test_new_ops_with_an_empty_first_axis(r):
    """Zero elements in, every derivative still has its shape (no reshape of -1 into 0)."""
    plan, inputs, _ = setup(r)
    y = plan.evaluate(inputs)["y"]
    assert_array_equal(y, reference(r.op, [inputs[n] for n in r.names], r.attrs))
    floats = {n: inputs[n] for n in r.floats}
    for mode in ("forward", "reverse"):
        for (_, n), block in plan.jacobian(inputs, mode=mode).jacobian.items():
            assert block.shape == y.shape + floats[n].shape
    tangents = plan.jvp(inputs, {n: np.ones((2,) + x.shape) for n, x in floats.items()})
    assert tangents.tangents["y"].shape == (2,) + y.shape
    for n, g in plan.vjp(inputs, {"y": np.ones((2,) + y.shape)}).cotangents.items():
        assert g.shape == (2,) + floats[n].shape
