"""Sliding windows over N-d NCHW tensors: the kernels of conv, max_pool and avg_pool.

Layout as ONNX and PyTorch: a tensor is (N, C, *spatial); a conv weight is
(O, C / groups, *kernel). A `Window` is the geometry: kernel, strides, pads
(begin values for each spatial axis, then end values, ONNX order) and dilations.

Convolution gathers every window of the padded input once into a contiguous
(C / groups * prod(kernel), windows) matrix (im2col, one copy of a strided
view) and multiplies the weights by it: one BLAS product per group, with the
seed directions folded into the batch (input directions) or into the weight
rows (weight directions). Its input cotangent scatters back with one strided
add per kernel offset (col2im). Pooling walks the kernel offsets, each a
strided view of the padded input; no Python loop runs over pixels.
"""

from __future__ import annotations

from math import prod
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .blocked import matmul


class Window(NamedTuple):
    kernel: tuple
    strides: tuple
    pads: tuple  # begin values per spatial axis, then end values
    dilations: tuple

    @property
    def begin(self):
        return self.pads[:len(self.kernel)]

    @property
    def end(self):
        return self.pads[len(self.kernel):]

    def extents(self):
        """The span of each dilated kernel axis."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilations))

    def padded(self, spatial):
        return tuple(s + b + e for s, b, e in zip(spatial, self.begin, self.end))

    def out(self, spatial):
        """Output spatial sizes (None where the input's is unknown). A kernel that does
        not fit gives a size below 1: shape rules check."""
        return tuple(None if s is None else (s + b + e - x) // st + 1
                     for s, b, e, x, st in zip(spatial, self.begin, self.end, self.extents(),
                                               self.strides))

    def overlapping(self):
        """Whether one input element can fall in two windows."""
        return any(s < e for s, e in zip(self.strides, self.extents()))


def pad(x, w: Window, value=0):
    """x with its last len(kernel) axes padded by `value`."""
    if not any(w.pads):
        return x
    lead = [(0, 0)] * (x.ndim - len(w.kernel))
    return np.pad(x, lead + list(zip(w.begin, w.end)), constant_values=value)


def unpad(xp, w: Window, spatial):
    """The inverse of `pad`: a view of the unpadded region."""
    if not any(w.pads):
        return xp
    index = tuple(slice(b, b + s) for b, s in zip(w.begin, spatial))
    return xp[(Ellipsis,) + index]


def _offsets(w: Window, out):
    """(kernel offset, index of the padded spatial axes it reads for every window)."""
    for offset in np.ndindex(*w.kernel):
        yield offset, tuple(
            slice(o * d, o * d + s * (p - 1) + 1, s) if p else slice(0, 0)
            for o, d, s, p in zip(offset, w.dilations, w.strides, out))


def _columns(xp, w: Window, out, batch_first=False):
    """The windows of padded xp (B, C, *Sp) as a read-only view (C, *kernel, B, *out),
    or (B, C, *kernel, *out) with batch_first. Copied group by group into matrices
    (C / groups * prod(kernel), B * prod(out)), or B of them: the innermost axes (the
    windows) run along memory, which copies faster than the other way round."""
    st = xp.strides
    d = len(w.kernel)
    kernel_strides = tuple(st[2 + i] * w.dilations[i] for i in range(d))
    window_strides = tuple(st[2 + i] * w.strides[i] for i in range(d))
    if batch_first:
        shape = xp.shape[:2] + w.kernel + out
        strides = st[:2] + kernel_strides + window_strides
    else:
        shape = xp.shape[1:2] + w.kernel + xp.shape[:1] + out
        strides = st[1:2] + kernel_strides + st[:1] + window_strides
    return as_strided(xp, shape, strides, writeable=False)


# --- convolution -----------------------------------------------------------------------

def conv(x, w, strides, pads, dilations, groups):
    """x (B, C, *S), w (k, O, C / groups, *kernel) -> (k, B, O, *out): k weight stacks
    applied to one gathered input (k = 1 for a plain convolution). One product per
    group, batched over B so that it lands in the output's layout."""
    k, n_out, cg = w.shape[:3]
    win = Window(w.shape[3:], strides, pads, dilations)
    b = x.shape[0]
    out = win.out(x.shape[2:])
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    view = _columns(pad(x, win), win, out, batch_first=True)
    res = None
    for gi in range(groups):
        cols = view[:, gi * cg:(gi + 1) * cg].reshape(b, cg * kp, p)
        r = matmul(w[:, gi * og:(gi + 1) * og].reshape(k * og, cg * kp), cols)  # (B, k Og, P)
        if groups == 1 and k == 1:
            return r.reshape((1, b, n_out) + out)
        if res is None:
            res = np.empty((k, b, n_out, p), r.dtype)
        res[:, :, gi * og:(gi + 1) * og] = r.reshape(b, k, og, p).transpose(1, 0, 2, 3)
    return res.reshape((k, b, n_out) + out)


def conv_input_grad(g, w, spatial, strides, pads, dilations, groups):
    """The transpose of conv in x: g (B, O, *out), w (O, C / groups, *kernel) -> (B, C, *S)."""
    d = len(spatial)
    reach = tuple(dl * (k - 1) for dl, k in zip(dilations, w.shape[2:]))
    if (groups == 1 and all(s == 1 for s in strides)
            and all(p <= r for p, r in zip(pads, reach + reach))
            and g.shape[1] * prod(spatial) <= w.shape[1] * prod(g.shape[2:])):
        # Stride 1: the transpose is itself a convolution, of g padded by what the
        # forward's padding left out, with the kernel flipped and its channel axes
        # swapped: one gather and one product instead of a scatter per kernel offset.
        # It gathers O channels over the input's positions where the scatter adds C
        # over the output's, so it is taken when that is no more (e.g. ResNet's 3x3
        # "same" convolutions: 1.7 -> 1.0 ms; LeNet's stay with the scatter).
        flipped = np.ascontiguousarray(
            np.flip(w, axis=tuple(range(2, 2 + d))).swapaxes(0, 1))
        back = tuple(r - p for r, p in zip(reach + reach, pads))
        return conv(g, flipped[None], strides, back, dilations, 1)[0]
    b, n_out = g.shape[:2]
    out = g.shape[2:]
    cg = w.shape[1]
    win = Window(w.shape[2:], strides, pads, dilations)
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    # The batch axis last while accumulating: each kernel offset then adds runs of
    # whole batches (contiguous) rather than runs of one window row.
    dxp = np.zeros((cg * groups,) + win.padded(spatial) + (b,), g.dtype)
    g3 = g.reshape(b, n_out, p)
    for gi in range(groups):
        gg = g3[:, gi * og:(gi + 1) * og].transpose(1, 2, 0).reshape(og, p * b)
        cols = matmul(w[gi * og:(gi + 1) * og].reshape(og, cg * kp).T, gg).reshape(
            (cg,) + win.kernel + out + (b,))
        target = dxp[gi * cg:(gi + 1) * cg]
        for offset, index in _offsets(win, out):
            dst = target[(slice(None),) + index]
            dst += cols[(slice(None),) + offset]
    return unpad(np.moveaxis(dxp, -1, 0), win, spatial)


def conv_weight_grad(g, x, kernel, strides, pads, dilations, groups):
    """The transpose of conv in w: g (k, N, O, *out), x (N, C, *S) -> (k, O, C / groups,
    *kernel)."""
    k, n, n_out = g.shape[:3]
    out = g.shape[3:]
    win = Window(tuple(kernel), strides, pads, dilations)
    cg = x.shape[1] // groups
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    view = _columns(pad(x, win), win, out)
    g4 = g.reshape(k, n, n_out, p)
    dw = np.empty((k, n_out, cg * kp), np.result_type(g, x))
    for gi in range(groups):
        cols = view[gi * cg:(gi + 1) * cg].reshape(cg * kp, n * p)
        gg = g4[:, :, gi * og:(gi + 1) * og].transpose(0, 2, 1, 3).reshape(k * og, n * p)
        # (cols @ gg.T).T: OpenBLAS is markedly faster this way round for these shapes
        dw[:, gi * og:(gi + 1) * og] = matmul(cols, gg.T).T.reshape(k, og, cg * kp)
    return dw.reshape((k, n_out, cg) + win.kernel)


def conv_scratch(x_shape, w_shape, strides, pads, dilations, groups) -> int:
    """Elements conv allocates beyond its output, per direction: the gathered windows
    of one group and the padded input (or its cotangent)."""
    n, c = x_shape[:2]
    win = Window(tuple(w_shape[2:]), strides, pads, dilations)
    out = win.out(x_shape[2:])
    return n * (prod(out) * (c // groups) * prod(win.kernel) + c * prod(win.padded(x_shape[2:])))


# --- pooling -----------------------------------------------------------------------------
# Pooling reads the last len(kernel) axes; any axes in front (N, C, and a direction
# axis for seeds) are carried along.

def max_pool(x, w: Window):
    xp = pad(x, w, -np.inf)
    out = w.out(x.shape[-len(w.kernel):])
    res = None
    for _, index in _offsets(w, out):
        v = xp[(Ellipsis,) + index]
        if res is None:
            res = v.copy()
        else:
            np.maximum(res, v, out=res)
    return res


def argmax_positions(x, ans, w: Window):
    """For each output element, the flat position, in x padded (all axes), of the first
    element of its window (row-major window order) that equals the maximum."""
    d = len(w.kernel)
    spatial = x.shape[-d:]
    sp = w.padded(spatial)
    out = ans.shape[-d:]
    xp = pad(x, w, -np.inf)
    plane = np.array([prod(sp[i + 1:]) for i in range(d)], np.intp)
    where = np.zeros(ans.shape, np.intp)
    offsets = [(int(np.dot(np.multiply(offset, w.dilations), plane)), index)
               for offset, index in _offsets(w, out)]
    # A window whose maximum is -inf matches its padding too: only real elements count.
    real = (pad(np.ones(spatial, bool), w, False)
            if any(w.pads) and np.isneginf(ans).any() else None)
    for at, index in reversed(offsets):  # so the first match is kept
        hit = xp[(Ellipsis,) + index] == ans
        if real is not None:
            hit &= real[index]
        np.copyto(where, at, where=hit)
    if np.isnan(ans).any():  # a NaN is the maximum: the last one in the window (PyTorch)
        for at, index in offsets:
            np.copyto(where, at, where=np.isnan(xp[(Ellipsis,) + index]))
    base = np.zeros(out, np.intp)
    for i in range(d):
        shape = [1] * d
        shape[i] = out[i]
        base = base + (np.arange(out[i], dtype=np.intp) * (w.strides[i] * plane[i])).reshape(shape)
    lead = np.arange(prod(x.shape[:-d]), dtype=np.intp).reshape(x.shape[:-d] + (1,) * d)
    return where + base + lead * prod(sp)


def max_pool_jvp(t, x, ans, w: Window):
    """t (k, *x.shape) -> (k, *ans.shape): the tangent of each window's first maximum."""
    k = t.shape[0]
    flat = argmax_positions(x, ans, w)
    tp = pad(t, w, 0)
    tp = tp.reshape(k, prod(tp.shape[1:]))  # not -1: it is undetermined when k * size is 0
    return tp[:, flat.ravel()].reshape((k,) + ans.shape)


def max_pool_vjp(g, x, ans, w: Window):
    """g (k, *ans.shape) -> (k, *x.shape): each window's cotangent to its first maximum."""
    k = g.shape[0]
    d = len(w.kernel)
    flat = argmax_positions(x, ans, w).ravel()
    size = prod(x.shape[:-d]) * prod(w.padded(x.shape[-d:]))
    gk = g.reshape(k, prod(g.shape[1:]))
    if w.overlapping():  # two windows may pick the same element: sum them
        ids = (np.arange(k, dtype=np.intp)[:, None] * size + flat).ravel()
        grad = np.bincount(ids, gk.ravel(), k * size).astype(g.dtype, copy=False)
    else:
        grad = np.zeros((k, size), g.dtype)
        grad[:, flat] = gk
    grad = grad.reshape((k,) + x.shape[:-d] + w.padded(x.shape[-d:]))
    return unpad(grad, w, x.shape[-d:])


def max_pool_scratch(x_shape, w: Window) -> int:
    """The padded input (or its cotangent) and each window's position of its maximum."""
    d = len(w.kernel)
    lead = prod(x_shape[:-d])
    return lead * (prod(w.padded(x_shape[-d:])) + 2 * prod(w.out(x_shape[-d:])))


def _divisor(spatial, w: Window, out, count_include_pad, dtype):
    """What each window's sum is divided by: the kernel size, or the number of
    non-padding elements in the window."""
    if count_include_pad or not any(w.pads):
        return dtype.type(prod(w.kernel))
    ones = pad(np.ones(spatial, dtype), w, 0)
    count = None
    for _, index in _offsets(w, out):
        count = ones[index].copy() if count is None else count + ones[index]
    return np.maximum(count, 1)


def avg_pool(x, w: Window, count_include_pad):
    d = len(w.kernel)
    spatial = x.shape[-d:]
    out = w.out(spatial)
    xp = pad(x, w, 0)
    res = None
    for _, index in _offsets(w, out):
        v = xp[(Ellipsis,) + index]
        res = v.copy() if res is None else np.add(res, v, out=res)
    res /= _divisor(spatial, w, out, count_include_pad, res.dtype)
    return res


def avg_pool_vjp(g, spatial, w: Window, count_include_pad):
    """g (..., *out) -> (..., *spatial): each window's share back to its elements."""
    d = len(w.kernel)
    out = g.shape[-d:]
    share = g / _divisor(spatial, w, out, count_include_pad, g.dtype)
    grad = np.zeros(g.shape[:-d] + w.padded(spatial), g.dtype)
    for _, index in _offsets(w, out):
        dst = grad[(Ellipsis,) + index]
        dst += share
    return unpad(grad, w, spatial)


def avg_pool_scratch(x_shape, w: Window) -> int:
    d = len(w.kernel)
    return prod(x_shape[:-d]) * prod(w.padded(x_shape[-d:]))
