"""conv's shape-specific kernels (engine/depthwise.py, windows.py's flat-row gather,
engine/rowshifts.py) against independent oracles:
PyTorch's convolution and its autograd (values, both transposes), the loop-by-window
reference of tests/support/oracles.py, finite differences on a small case, and the
gathered kernels' float32 error against float64.

Each case asserts that it reaches the kernel it is meant to test, so a change in
the dispatch cannot make these tests pass on the general path instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import Graph, Input, Node, compile, depthwise, rowshifts, windows
from support.oracles import numeric_jacobian, reference

torch = pytest.importorskip("torch")

# name -> (x shape, w shape, strides, pads (begin values, then end values), dilations)
DEPTHWISE = {
    "3x3 same": ((2, 6, 9, 7), (6, 1, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1]),
    "asymmetric pads, dilated": ((3, 4, 11, 8), (4, 1, 3, 2), [1, 1], [2, 0, 1, 3], [2, 3]),
    "5x5 no pads": ((2, 3, 12, 10), (3, 1, 5, 5), [1, 1], [0, 0, 0, 0], [1, 1]),
    "1-d": ((3, 5, 17), (5, 1, 4), [1], [2, 1], [2]),
    "3-d": ((2, 3, 5, 6, 4), (3, 1, 2, 3, 2), [1, 1, 1], [1, 0, 1, 0, 1, 1], [1, 1, 2]),
    "3x3 stride 2": ((2, 6, 9, 8), (6, 1, 3, 3), [2, 2], [1, 1, 1, 1], [1, 1]),
    "stride 3 and 2, dilated, odd pads": ((2, 4, 13, 11), (4, 1, 3, 2), [3, 2],
                                          [2, 0, 1, 3], [2, 3]),
    "stride above the kernel": ((2, 3, 14, 9), (3, 1, 2, 2), [5, 4], [0, 1, 2, 0], [1, 1]),
    "1-d stride 4, dilation 2": ((3, 5, 23), (5, 1, 4), [4], [2, 1], [2]),
    "3-d strided": ((2, 3, 7, 6, 5), (3, 1, 3, 2, 2), [2, 1, 3], [1, 0, 1, 0, 1, 1],
                    [1, 1, 2]),
}


def _attrs(w_shape, strides, pads, dilations):
    return {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
            "groups": w_shape[0]}


def _plan(x, w, attrs):
    return compile(Graph([Input("x", x.dtype.name, list(x.shape)),
                          Input("w", w.dtype.name, list(w.shape))],
                         [Node("y", "conv", ["x", "w"], attrs)], ["y"], {}))


def _torch_conv(x, w, attrs):
    """PyTorch's convolution of leaf tensors x and w (asymmetric pads applied first)."""
    d = x.ndim - 2
    pads = attrs["pads"]
    spec = []
    for i in reversed(range(d)):  # F.pad: the last axis first
        spec += [pads[i], pads[d + i]]
    conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d,
            3: torch.nn.functional.conv3d}[d]
    return conv(torch.nn.functional.pad(x, spec), w, stride=attrs["strides"],
                dilation=attrs["dilations"], groups=attrs["groups"])


def _torch_grads(x, w, g, attrs):
    tx = torch.from_numpy(x).requires_grad_()
    tw = torch.from_numpy(w).requires_grad_()
    y = _torch_conv(tx, tw, attrs)
    y.backward(torch.from_numpy(g))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()


@pytest.mark.parametrize("case", sorted(DEPTHWISE))
def test_depthwise_matches_pytorch_in_values_and_both_transposes(case):
    xs, ws, strides, pads, dilations = DEPTHWISE[case]
    attrs = _attrs(ws, strides, pads, dilations)
    assert depthwise.applies(xs, ws, attrs["strides"], attrs["groups"])
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    plan = _plan(x, w, attrs)
    y = plan.evaluate({"x": x, "w": w})["y"]
    k = 3
    g = rng.standard_normal((k,) + y.shape)
    back = plan.vjp({"x": x, "w": w}, {"y": g}).cotangents
    for i in range(k):
        want_y, want_x, want_w = _torch_grads(x, w, g[i], attrs)
        assert_allclose(y, want_y, rtol=1e-12, atol=1e-12)
        assert_allclose(back["x"][i], want_x, rtol=1e-12, atol=1e-12)
        assert_allclose(back["w"][i], want_w, rtol=1e-12, atol=1e-12)
    assert_allclose(y, reference("conv", [x, w], attrs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(DEPTHWISE))
def test_depthwise_forward_mode_is_the_sum_of_two_convolutions(case):
    """conv is bilinear: its JVP is conv(tx, w) + conv(x, tw), each checked by the
    reference; and the JVP and VJP agree (<g, J t> = <J^T g, t>)."""
    xs, ws, strides, pads, dilations = DEPTHWISE[case]
    attrs = _attrs(ws, strides, pads, dilations)
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    plan = _plan(x, w, attrs)
    tx, tw = rng.standard_normal((4,) + xs), rng.standard_normal((4,) + ws)
    got = plan.jvp({"x": x, "w": w}, {"x": tx, "w": tw}).tangents["y"]
    for i in range(4):
        assert_allclose(got[i], reference("conv", [tx[i], w], attrs)
                        + reference("conv", [x, tw[i]], attrs), rtol=1e-11, atol=1e-11)
    g = rng.standard_normal(got.shape)
    back = plan.vjp({"x": x, "w": w}, {"y": g}).cotangents

    def dot(a, b):
        return (a * b).reshape(len(a), -1).sum(axis=1)
    assert_allclose(dot(g, got), dot(back["x"], tx) + dot(back["w"], tw), rtol=1e-10)


def _jacobian_matches_finite_differences(inputs, attrs):
    """conv's Jacobian in both modes against central differences of its values."""
    plan = _plan(inputs["x"], inputs["w"], attrs)
    want = numeric_jacobian(lambda v: plan.evaluate(v), inputs)
    for mode in ("forward", "reverse"):
        got = plan.jacobian(inputs, mode=mode).jacobian
        for key in want:
            assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-8, err_msg=f"{mode} {key}")


def test_depthwise_jacobian_matches_finite_differences():
    xs, ws, strides, pads, dilations = (1, 3, 7, 6), (3, 1, 2, 3), [2, 3], [1, 0, 0, 2], [2, 1]
    attrs = _attrs(ws, strides, pads, dilations)
    rng = np.random.default_rng(9)
    inputs = {"x": rng.standard_normal(xs), "w": rng.standard_normal(ws)}
    _jacobian_matches_finite_differences(inputs, attrs)


def _float32_within_pytorchs_error(x, w, g, attrs):
    """conv's float32 values and both transposes are within 4x PyTorch's own float32
    error of float64's (relative to the largest entry)."""
    exact = _torch_grads(x, w, g, attrs)
    single = _torch_grads(x.astype(np.float32), w.astype(np.float32),
                          g.astype(np.float32), attrs)
    plan = _plan(x.astype(np.float32), w.astype(np.float32), attrs)
    inputs = {"x": x.astype(np.float32), "w": w.astype(np.float32)}
    y = plan.evaluate(inputs)["y"]
    back = plan.vjp(inputs, {"y": g.astype(np.float32)}).cotangents
    for got, ours, torch_single in zip(exact, (y, back["x"], back["w"]), single):
        assert ours.dtype == np.float32
        scale = np.abs(got).max()
        ours_err = np.abs(ours - got).max() / scale
        torch_err = np.abs(torch_single - got).max() / scale
        assert ours_err <= max(4 * torch_err, 1e-6), (ours_err, torch_err)


def test_depthwise_float32_is_as_accurate_as_pytorchs_against_float64():
    xs, ws = (8, 32, 16, 16), (32, 1, 3, 3)
    attrs = _attrs(ws, [1, 1], [1, 1, 1, 1], [1, 1])
    rng = np.random.default_rng(10)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    g = rng.standard_normal((8, 32, 16, 16))
    _float32_within_pytorchs_error(x, w, g, attrs)


def test_depthwise_is_not_taken_where_it_does_not_apply():
    """A channel multiplier, input channels shared by a group or a single group: the
    general path (and its own tests) serve them."""
    assert not depthwise.applies((1, 4, 8, 8), (8, 1, 3, 3), (1, 1), 4)
    assert not depthwise.applies((1, 4, 8, 8), (2, 2, 3, 3), (1, 1), 2)
    assert not depthwise.applies((1, 1, 8, 8), (1, 1, 3, 3), (1, 1), 1)


# windows.py's flat-row gather (stride 1, one group, short windows):
# name -> (x shape, w shape, pads, dilations)
FLAT_ROWS = {
    "lenet conv2": ((3, 6, 14, 14), (16, 6, 5, 5), [0, 0, 0, 0], [1, 1]),
    "3x3 same on 8x8": ((2, 5, 8, 8), (7, 5, 3, 3), [1, 1, 1, 1], [1, 1]),
    # fewer outputs than inputs: the input's transpose is itself a flat-row convolution
    "3x3 same on 8x8, 7 -> 5 channels": ((2, 7, 8, 8), (5, 7, 3, 3), [1, 1, 1, 1], [1, 1]),
    "asymmetric pads, dilated": ((2, 3, 13, 9), (4, 3, 3, 2), [2, 0, 1, 3], [2, 3]),
    "3-d": ((2, 3, 6, 9, 10), (4, 3, 2, 2, 3), [1, 0, 0, 0, 0, 1], [1, 1, 1]),
    # ResNet's 3x3 "same" layers (P9's small ResNet: 16x16 windows a row)
    "3x3 same on 16x16": ((2, 4, 16, 16), (5, 4, 3, 3), [1, 1, 1, 1], [1, 1]),
    "1-row windows, 32 a row": ((2, 3, 4, 32), (2, 3, 1, 3), [0, 1, 0, 1], [1, 1]),
    # the weight's transpose then runs an image per pass (windows.flat_weight_pass)
    "many channels in and out": ((3, 128, 4, 4), (512, 128, 3, 3), [1, 1, 1, 1], [1, 1]),
}


def _check_values_and_both_transposes(xs, ws, attrs, seed):
    """conv's values and both transposes (a VJP of two cotangents) against PyTorch's and
    the loop-by-window reference, and its JVP of three tangents against the reference."""
    rng = np.random.default_rng(seed)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    plan = _plan(x, w, attrs)
    y = plan.evaluate({"x": x, "w": w})["y"]
    g = rng.standard_normal((2,) + y.shape)
    back = plan.vjp({"x": x, "w": w}, {"y": g}).cotangents
    for i in range(2):
        want_y, want_x, want_w = _torch_grads(x, w, g[i], attrs)
        assert_allclose(y, want_y, rtol=1e-11, atol=1e-11)
        assert_allclose(back["x"][i], want_x, rtol=1e-11, atol=1e-11)
        assert_allclose(back["w"][i], want_w, rtol=1e-11, atol=1e-11)
    assert_allclose(y, reference("conv", [x, w], attrs), rtol=1e-11, atol=1e-11)
    tx, tw = rng.standard_normal((3,) + xs), rng.standard_normal((3,) + ws)
    got = plan.jvp({"x": x, "w": w}, {"x": tx, "w": tw}).tangents["y"]
    for i in range(3):
        assert_allclose(got[i], reference("conv", [tx[i], w], attrs)
                        + reference("conv", [x, tw[i]], attrs), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(FLAT_ROWS))
def test_flat_row_gather_matches_pytorch_in_values_and_both_transposes(case):
    xs, ws, pads, dilations = FLAT_ROWS[case]
    d = len(xs) - 2
    attrs = {"strides": [1] * d, "pads": pads, "dilations": dilations, "groups": 1}
    assert windows.flat_rows(xs, windows.Window(ws[2:], (1,) * d, tuple(pads),
                                                tuple(dilations)), 1, ws[0])
    if case == "many channels in and out":
        assert windows.flat_weight_pass(xs[0], ws[1] * 9, ws[0], 4 * 6) == 1
    _check_values_and_both_transposes(xs, ws, attrs, seed=11)


# engine/rowshifts.py (2-d, stride 1, one group, no dilation down the columns): the
# values, and the input's transpose (as its own kernel, or as a row-shift convolution
# where windows.stride_one_transpose takes it). The 2-d FLAT_ROWS cases above reach them
# too in values; their weight's transpose is the flat rows' (too few positions a row for
# rowshifts.weight_applies: WEIGHT_ROW_SHIFTS below reach it).
# name -> (x shape, w shape, pads, dilations)
ROW_SHIFTS = {
    "lenet conv2": ((3, 6, 14, 14), (16, 6, 5, 5), [0, 0, 0, 0], [1, 1]),
    "lenet conv1, padded": ((2, 1, 12, 12), (6, 1, 5, 5), [2, 2, 2, 2], [1, 1]),
    "asymmetric pads, dilated columns": ((2, 3, 9, 13), (5, 3, 3, 2), [2, 0, 1, 3], [1, 3]),
    "pads past the kernel": ((2, 3, 5, 5), (4, 3, 2, 2), [3, 1, 2, 4], [1, 1]),
    "one row, a wide kernel": ((2, 2, 1, 20), (3, 2, 1, 7), [0, 3, 0, 2], [1, 1]),
    "a tall kernel, one column": ((2, 2, 11, 4), (4, 2, 6, 1), [1, 0, 3, 0], [1, 1]),
    "fewer outputs: the transpose a row-shift convolution": ((2, 7, 8, 8), (5, 7, 3, 3),
                                                             [1, 1, 1, 1], [1, 1]),
    # as wide out as in (rowshifts._rows shifts flat rows), two kernel columns wholly in
    # the padding
    "same width, columns past the image": ((3, 2, 3, 2), (3, 2, 2, 5), [1, 2, 0, 2],
                                           [1, 1]),
}


@pytest.mark.parametrize("case", sorted(ROW_SHIFTS))
def test_row_shifts_match_pytorch_in_values_and_both_transposes(case):
    xs, ws, pads, dilations = ROW_SHIFTS[case]
    attrs = {"strides": [1, 1], "pads": pads, "dilations": dilations, "groups": 1}
    assert rowshifts.applies(windows.Window(ws[2:], (1, 1), tuple(pads), tuple(dilations)), 1)
    _check_values_and_both_transposes(xs, ws, attrs, seed=13)


# rowshifts.weight_grad (the weight's transpose by row shifts: B Wo positions a row or
# more, small planes), with two cotangents: g laid with its outputs last, or first for
# fewer than rowshifts.COLUMNS_AT_LEAST; all output rows in one pass, several passes, or
# a (blocked) product per pass. name -> (x shape, w shape, pads, dilations, rows a pass)
WEIGHT_ROW_SHIFTS = {
    "lenet conv2, 8 images": ((8, 6, 14, 14), (16, 6, 5, 5), [0, 0, 0, 0], [1, 1], 10),
    "lenet conv1 padded, few outputs": ((6, 1, 12, 12), (6, 1, 5, 5), [2, 2, 2, 2], [1, 1],
                                        12),
    "asymmetric pads, dilated columns": ((8, 3, 9, 13), (5, 3, 3, 2), [2, 0, 1, 3], [1, 3],
                                         10),
    "passes of output rows": ((8, 32, 8, 8), (16, 32, 3, 3), [1, 1, 1, 1], [1, 1], 7),
    "a product per pass": ((8, 64, 8, 8), (64, 64, 3, 3), [1, 1, 1, 1], [1, 1], 1),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_ROW_SHIFTS))
def test_weight_row_shifts_match_pytorch(case):
    xs, ws, pads, dilations, step = WEIGHT_ROW_SHIFTS[case]
    attrs = {"strides": [1, 1], "pads": pads, "dilations": dilations, "groups": 1}
    win = windows.Window(ws[2:], (1, 1), tuple(pads), tuple(dilations))
    assert rowshifts.weight_applies(xs, win, 1, 8)
    ho, wo = win.out(xs[2:])
    assert rowshifts.weight_pass(ho, ws[1] * ws[2] * ws[3], xs[0] * wo, 2 * ws[0]) == step
    _check_values_and_both_transposes(xs, ws, attrs, seed=15)


def test_row_shifts_jacobian_matches_finite_differences():
    attrs = {"strides": [1, 1], "pads": [1, 2, 0, 1], "dilations": [1, 2], "groups": 1}
    rng = np.random.default_rng(14)
    inputs = {"x": rng.standard_normal((2, 2, 4, 5)), "w": rng.standard_normal((3, 2, 2, 2))}
    _jacobian_matches_finite_differences(inputs, attrs)
    # eight images: the weight's transpose by row shifts too (one cotangent per output)
    inputs = {"x": rng.standard_normal((8, 2, 4, 9)), "w": rng.standard_normal((3, 2, 2, 2))}
    assert rowshifts.weight_applies((8, 2, 4, 9), windows.Window((2, 2), (1, 1), (1, 2, 0, 1),
                                                                 (1, 2)), 1, 8)
    _jacobian_matches_finite_differences(inputs, attrs)


@pytest.mark.parametrize("xs, ws, pads", [
    ((16, 16, 16, 16), (16, 16, 3, 3), [1, 1, 1, 1]),  # P9's ResNet block
    ((32, 6, 14, 14), (16, 6, 5, 5), [0, 0, 0, 0]),  # LeNet's conv2
])
def test_flat_rows_float32_is_as_accurate_as_pytorchs_against_float64(xs, ws, pads):
    """float32 in, float32 out, no float64 on the way: the values and both transposes
    (row shifts in all three) as close
    to float64's as PyTorch's own float32 convolution."""
    attrs = {"strides": [1, 1], "pads": pads, "dilations": [1, 1], "groups": 1}
    assert windows.flat_rows(xs, windows.Window(ws[2:], (1, 1), tuple(pads), (1, 1)), 1,
                             ws[0])
    assert rowshifts.weight_applies(xs, windows.Window(ws[2:], (1, 1), tuple(pads), (1, 1)),
                                    1, 4)
    rng = np.random.default_rng(12)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    out = tuple(s + pads[i] + pads[2 + i] - k + 1
                for i, (s, k) in enumerate(zip(xs[2:], ws[2:])))
    g = rng.standard_normal((xs[0], ws[0]) + out)
    _float32_within_pytorchs_error(x, w, g, attrs)
