"""A symmetric binary op reading one value in both positions (x * x, x + x, maximum(x,
x), minimum(x, x)): the reverse sweep pulls its cotangent once and doubles it (in place
when the pulled array is its own). The gradients equal the forward mode's, central
finite differences and the closed forms; a caller's cotangent is never changed; and
where the value also reaches the node by another way the sums are as before."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import Graph, Input, Node, compile
from support.oracles import numeric_jvp

# op -> (numpy function of x read twice, its derivative wrt x, closed form)
OPS = {
    "mul": (lambda x: x * x, lambda x: 2 * x),
    "add": (lambda x: x + x, lambda x: np.full_like(x, 2)),
    "maximum": (lambda x: np.maximum(x, x), lambda x: np.ones_like(x)),  # ties split evenly
    "minimum": (lambda x: np.minimum(x, x), lambda x: np.ones_like(x)),
}
# a size under and one over the in-place threshold (65,536 elements)
SIZES = [(3, 4), (300, 300)]


def square_sum(op: str, shape, dtype: str, also_linear: bool = False):
    """loss = sum(op(x, x)) (+ sum(x) when `also_linear`: x's cotangent then has two
    sources)."""
    nodes = [Node("y", op, ("x", "x")), Node("s", "sum", ("y",))]
    out = "s"
    if also_linear:
        nodes += [Node("t", "sum", ("x",)), Node("loss", "add", ("s", "t"))]
        out = "loss"
    return compile(Graph([Input("x", dtype, list(shape))], nodes, [out])), out


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", SIZES, ids=["small", "large"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("also_linear", [False, True], ids=["once", "fan-out"])
def test_gradient_equals_the_oracles(op, shape, dtype, also_linear):
    f, df = OPS[op]
    plan, out = square_sum(op, shape, dtype, also_linear)
    x = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    want = df(x.astype(np.float64)) + (1 if also_linear else 0)
    reverse = plan.jacobian({"x": x}, of=[out], mode="reverse", sparsity="dense").jacobian
    forward = plan.jacobian({"x": x}, of=[out], mode="forward", sparsity="dense").jacobian \
        if x.size <= 12 else None
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)
    grad = reverse[out, "x"]
    assert grad.dtype == np.dtype(dtype) and grad.shape == shape
    assert_allclose(grad, want, **tol)
    if forward is not None:
        assert_allclose(forward[out, "x"], grad, **tol)
    t = np.random.default_rng(2).standard_normal(shape)
    fd = numeric_jvp(lambda v: {"o": np.sum(f(v["x"])) + (np.sum(v["x"]) if also_linear
                                                            else 0)}, {"x": x}, {"x": t})
    assert_allclose(np.sum(grad.astype(np.float64) * t), fd["o"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", list(OPS))
def test_a_callers_cotangent_is_left_as_given(op):
    """o = op(x, x) with a cotangent given for o (add's vjp hands it back unchanged: it
    must not be doubled in place)."""
    shape = SIZES[1]
    plan = compile(Graph([Input("x", "float64", list(shape))], [Node("o", op, ("x", "x"))],
                         ["o"]))
    rng = np.random.default_rng(3)
    x, c = rng.standard_normal(shape), rng.standard_normal((1,) + shape)
    kept = c.copy()
    pulled = plan.vjp({"x": x}, {"o": c}, wrt=["x"]).cotangents["x"]
    assert np.array_equal(c, kept)
    assert_allclose(pulled[0], c[0] * OPS[op][1](x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)], ids=["empty", "empty-inner"])
def test_empty_values_have_empty_gradients(op, shape):
    """sum's cotangent broadcast over no elements at all: an empty gradient."""
    plan, out = square_sum(op, shape, "float32")
    grad = plan.jacobian({"x": np.zeros(shape, np.float32)}, of=[out], mode="reverse",
                         sparsity="dense").jacobian[out, "x"]
    assert grad.shape == shape and grad.dtype == np.float32
