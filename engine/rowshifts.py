"""2-d stride-1 convolution by row shifts: windows.py's conv and both its transposes
for one group, stride 1 and no dilation down the columns (LeNet's and ResNet's
stride-1 layers).

The padded input is gathered once per kernel column, laid (Hp, C, kw, B, Wo):
rows[i, c, j, b, o] is the padded x[b, c, i, o + j * dilation]. Output row r reads
padded rows r .. r + kh - 1, and those lie kh * C * kw equally spaced blocks of B * Wo
along memory: one strided view per output row, no copy, and one product of the weights
laid (O, kh, C, kw) with it, batched over the rows. The gather is kh times smaller than
im2col's, and no output is computed and dropped (the flat rows compute the padding's
columns too): LeNet's conv2 values 332 -> 260 us, conv1 207 -> 170, ResNet's 16-channel
3x3 "same" 332 -> 316 (bench/bench_conv.py's phases).

The input's transpose sums over the kernel's rows inside the products: padded row i of
the rows' cotangent (C kw, B Wp) takes kernel row kh - 1 - t with g's row i + t - (kh -
1), t over the rows of g that exist, one product per padded row over g laid (Ho + 2
(kh - 1), O, B, Wp), a view again. g's columns are laid Wp (the padded input's width)
apart, so that the kernel's columns add back as kw shifts of whole flat rows (the
products over the Wp - Wo extra columns are zeros, which land in the next image's
padding). Against the scatter (a product, then a strided add per kernel offset):
LeNet's conv2 516 -> 404 us. Where the transpose is itself a convolution
(windows.stride_one_transpose: fewer output channels than input ones) that stays
faster (ResNet's 3x3 "same": 311 against 416 us) and runs as row shifts in values.

The weight's transpose gathers the rows again and pairs output row r's view with g's
row r laid (B Wo, O): one product per output row, batched over a pass of rows and
summed. Against the flat rows' product per image (windows.py: an im2col copy kh times
larger, and the padding's columns computed): LeNet's conv2 454 -> 267 us, ResNet's
16-channel 3x3 442 -> 307, its stem 108 -> 102, LeNet's conv1 242 -> 177. g laid (B Wo,
O) rather than (O, B Wo) matters: the products run 1.5x faster that way round (for 16
outputs or more: COLUMNS_AT_LEAST).

Every loop runs once per kernel column, padded row or pass of output rows and calls
costs.iteration().
"""

from __future__ import annotations

import numpy as np

from .blocked import BLOCK_FLOPS, matmul
from .costs import iteration


def applies(win, groups) -> bool:
    """Whether windows.py's conv (and its input's transpose) run here: `win` a
    windows.Window."""
    return (len(win.kernel) == 2 and groups == 1 and win.strides == (1, 1)
            and win.dilations[0] == 1)


def _view(a, shape, strides):
    """A read-only view of a's buffer (np.ndarray: as_strided's own Python costs more)."""
    view = np.ndarray(shape, a.dtype, a, 0, strides)
    view.flags.writeable = False
    return view


def _rows(x, win, out):
    """x (B, C, H, W) -> (Hp, C, kw, B, Wo): the padded rows, a copy per kernel column.

    Where the output is as wide as the input ("same" padding), x is laid (H, C, B W) once
    and each kernel column is one shifted copy of those flat rows, the columns it pulls
    across an image's edge then zeroed: a copy per image row of W elements costs more in
    NumPy's loop than the elements (ResNet's 16x16 images: 88-94 -> 66-72 us a gather)."""
    b, c, h, wd = x.shape
    kw, dl = win.kernel[1], win.dilations[1]
    top, left = win.pads[0], win.pads[1]
    wo = out[1]
    hp = h + top + win.pads[2]
    rows = np.empty((hp, c, kw, b, wo), x.dtype)
    rows[:top] = 0
    rows[top + h:] = 0
    xs = x.transpose(2, 1, 0, 3)  # (H, C, B, W)
    flat = wo == wd
    if flat:
        xs = np.ascontiguousarray(xs)
        xf = xs.reshape(h, c, b * wd)
        inner = rows[top:top + h].reshape(h, c, kw, b * wo)
    for j in range(kw):
        iteration()
        # output column o reads input column o + j * dl - left, where that is inside x
        shift = j * dl - left
        lo, hi = max(0, -shift), min(wo, wd - shift)
        if lo >= hi:
            rows[top:top + h, :, j] = 0
        elif flat:
            n = b * wd - abs(shift)
            inner[:, :, j, max(0, -shift):max(0, -shift) + n] = xf[..., max(0, shift):
                                                                    max(0, shift) + n]
            if lo:
                rows[top:top + h, :, j, :, :lo] = 0
            if hi < wo:
                rows[top:top + h, :, j, :, hi:] = 0
        else:
            rows[top:top + h, :, j, :, :lo] = 0
            rows[top:top + h, :, j, :, hi:] = 0
            rows[top:top + h, :, j, :, lo:hi] = xs[..., lo + shift:hi + shift]
    return rows


def conv(x, w, win, out):
    """x (B, C, H, W), w (k, O, C, kh, kw) -> (k, B, O, Ho, Wo), as windows.conv."""
    k, n_out, c, kh, kw = w.shape
    b = x.shape[0]
    ho, wo = out
    rows = _rows(x, win, out)
    st = rows.strides
    view = _view(rows, (ho, kh * c * kw, b * wo), (st[0], st[2], st[4]))
    wt = np.ascontiguousarray(w.transpose(0, 1, 3, 2, 4)).reshape(k * n_out, kh * c * kw)
    r = matmul(wt, view)  # (Ho, k O, B Wo)
    del rows, view
    return np.ascontiguousarray(r.reshape(ho, k, n_out, b, wo).transpose(1, 3, 2, 0, 4))


def input_grad(g, w, spatial, win):
    """The transpose of conv in x: g (B, O, Ho, Wo), w (O, C, kh, kw) -> (B, C, H, W)."""
    n_out, c, kh, kw = w.shape
    b, _, ho, wo = g.shape
    dl = win.dilations[1]
    hp, wp = win.padded(spatial)
    gp = np.zeros((ho + 2 * (kh - 1), n_out, b, wp), g.dtype)
    gp[kh - 1:kh - 1 + ho, :, :, :wo] = g.transpose(2, 1, 0, 3)
    st = gp.strides
    view = _view(gp, (hp, kh * n_out, b * wp), (st[0], st[1], st[3]))
    wt = np.ascontiguousarray(np.flip(w, 2).transpose(1, 3, 2, 0)).reshape(c * kw, kh * n_out)
    rows = np.empty((hp, c * kw, b * wp), np.result_type(g, w))
    for i in range(hp):
        iteration()
        t0, t1 = max(0, kh - 1 - i) * n_out, min(kh, kh - 1 + ho - i) * n_out
        if 2 * c * kw * (t1 - t0) * b * wp <= BLOCK_FLOPS:
            np.matmul(wt[:, t0:t1], view[i, t0:t1], out=rows[i])
        else:  # blocked: a deadline stops it part-way
            rows[i] = matmul(wt[:, t0:t1], view[i, t0:t1])
    del gp, view
    rows = rows.reshape(hp, c, kw, b * wp)
    dxp = np.zeros((hp, c, b * wp + (kw - 1) * dl), rows.dtype)
    for j in range(kw):
        iteration()
        dxp[:, :, j * dl:j * dl + b * wp] += rows[:, :, j]
    del rows
    top, left = win.pads[0], win.pads[1]
    h, wd = spatial
    return np.ascontiguousarray(dxp[top:top + h, :, :b * wp].reshape(h, c, b, wp)[
        ..., left:left + wd].transpose(2, 1, 0, 3))


def weight_applies(x_shape, win, groups, itemsize) -> bool:
    """Whether windows.py's conv_weight_grad runs here: where conv does, each output
    row's product runs over at least WEIGHT_POSITIONS positions (B Wo), and an output
    plane (Ho Wo) is at most PLANE_BYTES."""
    if not applies(win, groups):
        return False
    ho, wo = win.out(x_shape[2:])
    return x_shape[0] * wo >= WEIGHT_POSITIONS and ho * wo * itemsize <= PLANE_BYTES


def weight_grad(g, x, win):
    """The transpose of conv in w: g (k, B, O, Ho, Wo), x (B, C, H, W) -> (k, O, C, kh,
    kw)."""
    k, b, n_out, ho, wo = g.shape
    c = x.shape[1]
    kh, kw = win.kernel
    rows = _rows(x, win, (ho, wo))
    st = rows.strides
    view = _view(rows, (ho, kh * c * kw, b * wo), (st[0], st[2], st[4]))
    if k * n_out >= COLUMNS_AT_LEAST:  # (Ho, B Wo, k O)
        gt = np.ascontiguousarray(g.transpose(3, 1, 4, 0, 2)).reshape(ho, b * wo, k * n_out)
    else:  # laid (Ho, k O, B Wo), read transposed: few columns copy slowly the other way
        gt = np.ascontiguousarray(g.transpose(3, 0, 2, 1, 4)).reshape(
            ho, k * n_out, b * wo).transpose(0, 2, 1)
    step = weight_pass(ho, kh * c * kw, b * wo, k * n_out)
    dw = None
    for r0 in range(0, ho, step):
        iteration()
        part = (matmul(view[r0], gt[r0]) if step == 1  # blocked: a deadline stops it
                else np.matmul(view[r0:r0 + step], gt[r0:r0 + step]).sum(axis=0))
        dw = part if dw is None else np.add(dw, part, out=dw)  # (kh C kw, k O)
    del rows, view, gt
    return np.ascontiguousarray(dw.reshape(kh, c, kw, k, n_out).transpose(3, 4, 1, 0, 2))


# A pass's products land in one array before they are summed: at most PASS_ELEMENTS
# (256 KiB of float32, cache-sized). Products over fewer than WEIGHT_POSITIONS positions
# cost more in per-product overhead than the smaller gather saves (16 and 24 positions:
# 2.4x and 1.8x the flat rows' time; 64: 0.76-0.82x). Past PLANE_BYTES a plane, laying g
# with its outputs last reads a new page per element (a 224x224 image with 64 outputs:
# 14 ms for g's copy, where the im2col path takes 9 ms in all): the gathered paths serve.
PASS_ELEMENTS = 1 << 16
WEIGHT_POSITIONS = 64
PLANE_BYTES = 4096
# g's rows laid (B Wo, k O) when that is at least a vector register of float32 columns
# (AVX-512: 16); LeNet's conv1 (6 outputs): 129 + 112 us that way, 35 + 81 us read
# transposed from (k O, B Wo)
COLUMNS_AT_LEAST = 16


def weight_pass(ho, rows, positions, n_out) -> int:
    """Output rows per pass of weight_grad: their products (rows x n_out each) within
    PASS_ELEMENTS and their work within BLOCK_FLOPS, at least one."""
    return max(1, min(ho, PASS_ELEMENTS // max(rows * n_out, 1),
                      BLOCK_FLOPS // max(2 * rows * positions * n_out, 1)))


# --- declared costs (windows.conv_cost adds them; tests/engine/test_costs.py measures) ---

def conv_cost(x_shape, rows_out, win, groups, isz):
    """(bytes, FLOPs, loop passes) of conv for `rows_out` output channels (times weight
    stacks), 0s where it does not apply: the gathered rows (a pass per kernel column)
    and x laid out for them, the weights laid out, the products' results (twice: a
    product split into blocks holds a block beside the whole)."""
    if not applies(win, groups):
        return 0, 0, 0
    b, c = x_shape[:2]
    kh, kw = win.kernel
    (hp, _), (ho, wo) = win.padded(x_shape[2:]), win.out(x_shape[2:])
    held = (_gather_elements(x_shape, win) + rows_out * kh * c * kw
            + 2 * rows_out * ho * b * wo)
    return held * isz, 2 * rows_out * kh * c * kw * ho * b * wo, kw


def _gather_elements(x_shape, win):
    """Elements _rows holds: the rows, and x laid (H, C, B W) where it shifts flat rows."""
    b, c, h, wd = x_shape
    (hp, _), (_, wo) = win.padded(x_shape[2:]), win.out(x_shape[2:])
    return hp * c * win.kernel[1] * b * wo + (b * c * h * wd if wo == wd else 0)


def input_grad_cost(g_shape, c, win, spatial, isz):
    """(bytes, FLOPs, loop passes) of input_grad: g laid out, the weights, the rows'
    cotangent, a row's product (twice, blocked), the padded input's cotangent; a pass per
    padded row and per kernel column."""
    b, n_out, ho, wo = g_shape
    kh, kw = win.kernel
    hp, wp = win.padded(spatial)
    held = ((ho + 2 * (kh - 1)) * n_out * b * wp + n_out * c * kh * kw
            + (hp + 2) * c * kw * b * wp + hp * c * (b * wp + (kw - 1) * win.dilations[1]))
    return held * isz, 2 * c * kw * kh * n_out * ho * b * wp, hp + kw


def weight_grad_cost(x_shape, n_out, win, groups, isz):
    """(bytes, loop passes) of weight_grad per seed direction, 0s where it does not apply
    (its FLOPs are the values' product's, plus a sum of the passes' parts): the gathered
    rows (and x laid out for them), g laid out, a pass's parts and their sum, the result
    and its transposed copy (a product split into blocks holds a block beside the whole)."""
    if not weight_applies(x_shape, win, groups, isz):
        return 0, 0
    b, c = x_shape[:2]
    kh, kw = win.kernel
    (hp, _), (ho, wo) = win.padded(x_shape[2:]), win.out(x_shape[2:])
    w_size = n_out * c * kh * kw
    step = weight_pass(ho, kh * c * kw, b * wo, n_out)
    held = _gather_elements(x_shape, win) + ho * b * wo * n_out + (2 * step + 3) * w_size
    return held * isz, kw + -(-ho // step)
