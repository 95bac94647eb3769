"""max_pool's derivatives on both of its kernels' paths (engine/windows.py): windows that
do not overlap take a masked pass per kernel offset, the rest (overlapping windows, a
NaN maximum, a window of padding and -inf) the general positions. Both are checked
against an oracle written here window by window in plain Python (the element that gets
a window's derivative: its last NaN if it has any, else its first real maximal element
in row-major window order, never padding), against PyTorch's max_pool backward where
its padding rule allows, and against central differences where the maximum is unique.
Inputs are small integers (many ties), with NaN, +-inf and non-finite seeds mixed in.
"""

from __future__ import annotations

import itertools
from math import prod

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.engine import Graph, Input, Node, compile


def _chosen(x, kernel, strides, pads, dilations):
    """x (N, C, *S) -> for every output window, (lead index, spatial index into x) of the
    element that gets its derivative; and the output's spatial shape."""
    d = len(kernel)
    spatial = x.shape[2:]
    out = tuple((s + pads[i] + pads[d + i] - dilations[i] * (kernel[i] - 1) - 1)
                // strides[i] + 1 for i, s in enumerate(spatial))
    picks = {}
    for lead in itertools.product(*map(range, x.shape[:2])):
        for o in itertools.product(*map(range, out)):
            real = []
            for off in itertools.product(*map(range, kernel)):  # row-major window order
                pos = tuple(o[i] * strides[i] - pads[i] + off[i] * dilations[i]
                            for i in range(d))
                if all(0 <= p < s for p, s in zip(pos, spatial)):
                    real.append(pos)
            values = [x[lead + p] for p in real]
            nans = [p for p, v in zip(real, values) if np.isnan(v)]
            if nans:
                picks[lead + o] = lead + nans[-1]
            else:
                top = max(values)
                picks[lead + o] = lead + real[values.index(top)]
    return picks, out


def _oracle(x, g, t, attrs):
    """(value, vjp of the k seeds g, jvp of the k tangents t) window by window."""
    win = [attrs["kernel_shape"], attrs["strides"], attrs["pads"], attrs["dilations"]]
    picks, out = _chosen(x, *win)
    k = g.shape[0]
    value = np.empty(x.shape[:2] + out, x.dtype)
    vjp = np.zeros((k,) + x.shape, x.dtype)
    jvp = np.empty((k,) + value.shape, x.dtype)
    for o, src in picks.items():
        value[o] = x[src]
        for j in range(k):
            vjp[(j,) + src] += g[(j,) + o]
            jvp[(j,) + o] = t[(j,) + src]
    return value, vjp, jvp


def _plan(x, attrs):
    graph = Graph([Input("x", x.dtype.name, list(x.shape))], [Node("y", "max_pool", ["x"], attrs)],
                  ["y"])
    return compile(graph)


def _small_ints(rng, shape, dtype, specials):
    x = rng.integers(-3, 4, shape).astype(dtype)
    if specials:
        flat = x.reshape(-1)
        for v in (np.nan, np.inf, -np.inf, -np.inf):
            flat[rng.integers(flat.size, size=max(1, flat.size // 40))] = v
    return x


# (kernel, strides, pads, dilations): windows that tile, leave gaps, are dilated, padded,
# 1-d to 3-d; and overlapping ones for the general path.
GEOMETRIES = [
    ([2, 2], [2, 2], [0, 0, 0, 0], [1, 1]),  # LeNet's
    ([2, 2], [3, 2], [0, 0, 0, 0], [1, 1]),  # gaps between windows
    ([3], [3], [1, 2], [1]),  # padded on both sides
    ([2, 3], [4, 3], [1, 0, 0, 2], [2, 1]),  # dilated, padded, not overlapping
    ([1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),  # one-element windows
    ([2, 1, 2], [2, 1, 3], [0, 0, 1, 1, 0, 0], [1, 1, 1]),  # 3-d
    ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1]),  # ResNet's stem pool: overlapping
    ([3], [1], [0, 2], [1]),  # overlapping, padded
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "k{}s{}p{}d{}".format(*g))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("specials", [False, True], ids=["finite", "nan-inf"])
def test_derivatives_match_the_window_by_window_oracle(geometry, dtype, specials):
    kernel, strides, pads, dilations = geometry
    attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads, "dilations": dilations}
    rng = np.random.default_rng([len(kernel), *strides, *pads, specials, dtype().itemsize])
    spatial = [int(dl * (kk - 1) + 1 + rng.integers(0, 7)) for kk, dl in zip(kernel, dilations)]
    x = _small_ints(rng, (2, 3, *spatial), dtype, specials)
    plan = _plan(x, attrs)
    y_shape = tuple(plan.shapes["y"])
    k = 3
    g = rng.standard_normal((k,) + y_shape).astype(dtype)
    t = rng.standard_normal((k,) + x.shape).astype(dtype)
    if specials:  # a non-finite seed lands only where its window's derivative goes
        g.reshape(-1)[:3] = [np.inf, np.nan, -np.inf]
        t.reshape(-1)[:3] = [np.nan, np.inf, -np.inf]
    value, want_vjp, want_jvp = _oracle(x, g, t, attrs)
    assert_array_equal(plan.evaluate({"x": x})["y"], value)
    got = plan.vjp({"x": x}, {"y": g}).cotangents["x"]
    if any(s < dl * (kk - 1) + 1 for s, kk, dl in zip(strides, kernel, dilations)):
        assert_allclose(got, want_vjp, rtol=1e-6)  # shared maxima: summed in another order
    else:
        assert_array_equal(got, want_vjp)
    assert_array_equal(plan.jvp({"x": x}, {"x": t}).tangents["y"], want_jvp)


def test_a_window_of_padding_and_minus_infinity_sends_its_derivative_to_a_real_element():
    x = np.array([[[-np.inf, 2.0, -np.inf, -np.inf]]])
    attrs = {"kernel_shape": [2], "strides": [2], "pads": [1, 1], "dilations": [1]}
    plan = _plan(x, attrs)
    y = plan.evaluate({"x": x})["y"]
    assert_array_equal(y, [[[-np.inf, 2.0, -np.inf]]])
    grad = plan.vjp({"x": x}, {"y": np.float64([[[1.0, 10.0, 100.0]]])}).cotangents["x"]
    assert_array_equal(grad, [[[1.0, 10.0, 0.0, 100.0]]])  # a real element, never padding


def test_ties_negative_zero_and_a_nan_window_beside_tiled_ones():
    x = np.array([[[[0.0, -0.0, 1.0, 1.0, np.nan, 5.0],
                    [-0.0, 0.0, 1.0, 1.0, 5.0, np.nan]]]])
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0],
             "dilations": [1, 1]}
    plan = _plan(x, attrs)
    grad = plan.vjp({"x": x}, {"y": np.float64([[[[1.0, 2.0, 3.0]]]])}).cotangents["x"]
    # 0.0 == -0.0: the first of the window; the NaN window's last NaN
    assert_array_equal(grad, [[[[1.0, 0.0, 2.0, 0.0, 0.0, 0.0],
                                [0.0, 0.0, 0.0, 0.0, 0.0, 3.0]]]])


@pytest.mark.parametrize("shape", [(32, 6, 28, 28), (16, 16, 10, 10), (4, 8, 9, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lenet_pooling_matches_pytorch_with_ties(shape, dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(prod(shape))
    x = _small_ints(rng, shape, dtype, specials=False)
    attrs = {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 0, 0],
             "dilations": [1, 1]}
    plan = _plan(x, attrs)
    g = rng.standard_normal((1,) + tuple(plan.shapes["y"])).astype(dtype)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.max_pool2d(xt, 2, 2)
    yt.backward(torch.tensor(g[0]))
    assert_array_equal(plan.evaluate({"x": x})["y"], yt.detach().numpy())
    assert_array_equal(plan.vjp({"x": x}, {"y": g}).cotangents["x"][0], xt.grad.numpy())


def test_distinct_values_match_central_differences():
    rng = np.random.default_rng(7)
    x = rng.permutation(4 * 5 * 6).reshape(1, 4, 5, 6).astype(np.float64) / 7
    attrs = {"kernel_shape": [2, 3], "strides": [2, 3], "pads": [1, 0, 0, 0],
             "dilations": [1, 1]}
    plan = _plan(x, attrs)
    g = rng.standard_normal(tuple(plan.shapes["y"]))
    eps = 1e-4
    numeric = np.empty_like(x)
    for i in np.ndindex(x.shape):
        hi, lo = x.copy(), x.copy()
        hi[i] += eps
        lo[i] -= eps
        up = plan.evaluate({"x": hi})["y"]
        down = plan.evaluate({"x": lo})["y"]
        numeric[i] = np.sum(g * (up - down)) / (2 * eps)
    assert_allclose(plan.vjp({"x": x}, {"y": g}).cotangents["x"], numeric, atol=1e-8)
