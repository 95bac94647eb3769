"""Sliding windows over N-d NCHW tensors: the kernels of conv, max_pool and avg_pool.

Layout as ONNX and PyTorch: a tensor is (N, C, *spatial); a conv weight is
(O, C / groups, *kernel). A `Window` is the geometry: kernel, strides, pads
(begin values for each spatial axis, then end values, ONNX order) and dilations.

Convolution gathers every window of the padded input once into a contiguous
(C / groups * prod(kernel), windows) matrix (im2col, one copy of a strided
view) and multiplies the weights by it: one BLAS product, or for a grouped
convolution one batched product per chunk of groups, with the seed directions
folded into the batch (input directions) or into the weight rows (weight
directions). Its input cotangent scatters back with one strided add per kernel
offset (col2im). A stride-1 convolution with short rows gathers whole flat rows of
the padded input instead (a kernel offset is a shift along the row; the outputs of the
padding's columns are computed and dropped: FlatRows below); a 2-d one with no dilation
down the columns runs by row shifts instead, in values and both transposes
(engine/rowshifts.py). A depthwise convolution (a channel per group) runs as shifted
elementwise products (engine/depthwise.py), in values and both transposes, or as
numba's compiled loops when that provider is active (engine/kernels.py).
Pooling walks the kernel offsets, each a strided view of the padded input; no Python
loop runs over pixels or single groups, and every loop whose trip count the request
sets calls costs.iteration() between passes (the deadline check). Each kernel's
declared cost (`*_cost`, bottom) is what its op row hands to engine/costs.py.
"""

from __future__ import annotations

import itertools
from math import prod
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import depthwise, kernels, rowshifts
from .blocked import BLOCK_FLOPS, matmul
from .costs import OpCost, iteration


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
    """x with its last len(kernel) axes padded by `value` (a filled array and one copy:
    np.pad's own Python took 45-70 us a call, several times a conv's copy here)."""
    if not any(w.pads):
        return x
    d = len(w.kernel)
    xp = np.full(x.shape[:-d] + w.padded(x.shape[-d:]), value, x.dtype)
    xp[(Ellipsis,) + tuple(slice(b, b + s) for b, s in zip(w.begin, x.shape[-d:]))] = x
    return xp


def unpad(xp, w: Window, spatial):
    """The inverse of `pad`: a view of the unpadded region."""
    if not any(w.pads):
        return xp
    index = tuple(slice(b, b + s) for b, s in zip(w.begin, spatial))
    return xp[(Ellipsis,) + index]


def _offsets(w: Window, out, reverse=False):
    """(kernel offset, index of the padded spatial axes it reads for every window), in
    row-major order of the offsets (or its reverse), generated one at a time."""
    axes = [range(k - 1, -1, -1) if reverse else range(k) for k in w.kernel]
    for offset in itertools.product(*axes):
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
# A grouped convolution runs as batched products over as many groups at once as fit
# GROUP_PASS_ELEMENTS gathered elements and BLOCK_FLOPS of work, at least one: a pass per
# chunk of groups (costs.iteration() checks the deadline between passes), never one
# Python pass per group of a request with millions of tiny groups.

GROUP_PASS_ELEMENTS = 1 << 20


def group_passes(groups, per_group_elements, per_group_flops) -> int:
    """Groups handled by one pass of a grouped convolution's loop."""
    return max(1, min(groups, GROUP_PASS_ELEMENTS // max(per_group_elements, 1),
                      BLOCK_FLOPS // max(per_group_flops, 1)))


def conv(x, w, strides, pads, dilations, groups):
    """x (B, C, *S), w (k, O, C / groups, *kernel) -> (k, B, O, *out): k weight stacks
    applied to one gathered input (k = 1 for a plain convolution). One product per
    chunk of groups, batched over B so that it lands in the output's layout."""
    k, n_out, cg = w.shape[:3]
    win = Window(w.shape[3:], strides, pads, dilations)
    b = x.shape[0]
    out = win.out(x.shape[2:])
    if depthwise.applies(x.shape, w.shape[1:], strides, groups):
        return kernels.depthwise().conv(x, w, strides, pads, dilations, out)
    if rowshifts.applies(win, groups):
        return rowshifts.conv(x, w, win, out)
    found = flat_rows(x.shape, win, groups, k * n_out)
    if found:
        return _flat_rows_conv(x, w, win, out, found)
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    view = _columns(pad(x, win), win, out, batch_first=True)  # (B, C, *kernel, *out)
    if groups == 1:
        r = matmul(w.reshape(k * n_out, cg * kp), view.reshape(b, cg * kp, p))  # (B, k O, P)
        if k == 1:
            return r.reshape((1, b, n_out) + out)
        return np.ascontiguousarray(r.reshape(b, k, n_out, p).transpose(1, 0, 2, 3)).reshape(
            (k, b, n_out) + out)
    res = np.empty((k, b, n_out, p), np.result_type(x, w))
    wg = w.reshape(k, groups, og, cg * kp).transpose(1, 0, 2, 3).reshape(groups, k * og,
                                                                          cg * kp)
    step = group_passes(groups, b * cg * kp * p, 2 * b * cg * kp * p * k * og)
    for g0 in range(0, groups, step):
        iteration()
        g1 = min(groups, g0 + step)
        n = g1 - g0
        cols = view[:, g0 * cg:g1 * cg].reshape(b, n, cg * kp, p)
        r = (matmul(wg[g0], cols[:, 0])[:, None] if n == 1
             else np.matmul(wg[g0:g1], cols))  # (B, n, k Og, P)
        res[:, :, g0 * og:g1 * og].reshape(k, b, n, og, p)[...] = (
            r.reshape(b, n, k, og, p).transpose(2, 0, 1, 3, 4))
    return res.reshape((k, b, n_out) + out)


# A stride-1 convolution whose windows are short (LeNet's 5x5 over 10 outputs a row)
# spends most of its gather in the copy's short inner loops. Laid out as one flat row
# per image and channel, each kernel offset is a shift along the row: the gather then
# copies whole rows, at the price of computing the outputs of every padded column (the
# ones past the last window are dropped). Taken where the windows' last axis is below
# FLAT_ROWS_BELOW and that adds at most half again (measured: LeNet's conv2 0.72x,
# 8x8 windows of 128 channels 0.83-0.94x), or, for rows up to FLAT_ROWS_UP_TO, where
# the products' extra work is small beside the gather's saving: the dropped positions
# times the product's rows at most FLAT_ROWS_EXTRA times the kept positions (ResNet's
# 16x16 "same" 3x3 with 16 channels: 0.6-0.75x; with 64, or 32 on 28x28, the products
# dominate and the extra positions cost more than the gather saves). The weight's
# transpose gathers the same rows, channel-major, and zeroes the cotangent's dropped
# columns (_flat_rows_weight_grad).

FLAT_ROWS_BELOW = 16
FLAT_ROWS_UP_TO = 32
FLAT_ROWS_EXTRA = 2


class FlatRows(NamedTuple):
    padded: tuple  # the padded input's spatial sizes
    n: int  # its elements per image and channel (a flat row)
    tail: int  # zeros past the row that the last windows read
    computed: int  # outputs computed per row: out[0] * prod(padded[1:])
    shifts: tuple  # elements along the row per kernel step, per spatial axis


def flat_rows(x_shape, win: Window, groups, rows_out):
    """The flat-row layout (FlatRows) when conv gathers by flat rows for a product of
    `rows_out` rows (output channels, times weight stacks), else None."""
    kernel = win.kernel
    d = len(kernel)
    if d < 2 or groups != 1 or win.strides.count(1) != d:
        return None
    pads = win.pads
    padded = tuple(s + pads[i] + pads[d + i] for i, s in enumerate(x_shape[2:]))
    out = tuple(p - dl * (k - 1) for p, k, dl in zip(padded, kernel, win.dilations))
    kept, laid = prod(out[1:]), prod(padded[1:])
    if 2 * laid > 3 * kept or out[-1] > FLAT_ROWS_UP_TO:
        return None
    if out[-1] >= FLAT_ROWS_BELOW and (laid - kept) * rows_out > FLAT_ROWS_EXTRA * kept:
        return None
    n = padded[0] * laid
    computed = out[0] * laid
    shifts = tuple(dl * prod(padded[i + 1:]) for i, dl in enumerate(win.dilations))
    reach = sum(sh * (k - 1) for sh, k in zip(shifts, kernel))
    return FlatRows(padded, n, max(0, computed + reach - n), computed, shifts)


def _strided(a, shape, strides):
    """A read-only view of a (np.ndarray over a's buffer: as_strided's own Python took
    about as long as a small convolution's copy)."""
    view = np.ndarray(shape, a.dtype, a, 0, strides)
    view.flags.writeable = False
    return view


def _flat_row_input(x, win: Window, flat: FlatRows, channels_first):
    """x (B, C, *S) padded into flat rows (B, C, n + tail), or (C, B, n + tail)."""
    b, c = x.shape[:2]
    xp = np.zeros((c, b, flat.n + flat.tail) if channels_first else (b, c, flat.n + flat.tail),
                  x.dtype)
    inner = (slice(None), slice(None)) + tuple(
        slice(p, p + s) for p, s in zip(win.pads, x.shape[2:]))
    xp[:, :, :flat.n].reshape(xp.shape[:2] + flat.padded)[inner] = (
        x.swapaxes(0, 1) if channels_first else x)
    return xp


def _flat_rows_conv(x, w, win: Window, out, flat: FlatRows):
    k, n_out, cg = w.shape[:3]
    b, kp, computed = x.shape[0], prod(win.kernel), flat.computed
    xp = _flat_row_input(x, win, flat, False)
    st = xp.strides
    view = _strided(xp, (b, cg) + win.kernel + (computed,),
                    st[:2] + tuple(sh * st[2] for sh in flat.shifts) + st[2:])
    r = matmul(w.reshape(k * n_out, cg * kp), view.reshape(b, cg * kp, computed))
    del xp, view  # r: (B, k O, computed)
    grid = r.reshape((b, k, n_out, out[0]) + flat.padded[1:])[
        (Ellipsis,) + tuple(slice(0, o) for o in out[1:])]
    return np.ascontiguousarray(grid.swapaxes(0, 1))


def _flat_rows_weight_grad(g, x, win: Window, flat: FlatRows):
    """conv_weight_grad by flat rows where row shifts do not apply: g (k, N, O, *out), x
    (N, C, *S) -> (k, O, C, *kernel). Each image's windows gathered as the forward does, g
    laid out alike (zero in the columns the forward drops), a product per image batched
    over a pass of images and summed (against one product over every image, channel-major,
    0.45-0.95x on 2-d layers); costs.iteration() between passes."""
    k, b, n_out = g.shape[:3]
    c, computed, kp = x.shape[1], flat.computed, prod(win.kernel)
    out = g.shape[3:]
    xp = _flat_row_input(x, win, flat, False)
    st = xp.strides
    cols = _strided(xp, (b, c) + win.kernel + (computed,),
                    st[:2] + tuple(sh * st[2] for sh in flat.shifts) + st[2:]).reshape(
        b, c * kp, computed)
    del xp
    gp = np.zeros((b, k, n_out, out[0]) + flat.padded[1:], g.dtype)
    gp[(Ellipsis,) + tuple(slice(0, o) for o in out[1:])] = g.swapaxes(0, 1)
    gt = gp.reshape(b, k * n_out, computed).transpose(0, 2, 1)
    step = flat_weight_pass(b, c * kp, n_out, computed)
    dw = None
    for i in range(0, b, step):
        iteration()
        part = (matmul(cols[i], gt[i]) if step == 1  # blocked: a deadline stops it part-way
                else np.matmul(cols[i:i + step], gt[i:i + step]).sum(axis=0))  # (C kp, k O)
        dw = part if dw is None else np.add(dw, part, out=dw)
    return np.ascontiguousarray(dw.T).reshape((k, n_out, c) + win.kernel)


def flat_weight_pass(images, rows, n_out, computed) -> int:
    """Images per pass of _flat_rows_weight_grad, per seed direction: their products
    (images x rows x n_out) within GROUP_PASS_ELEMENTS and their work within BLOCK_FLOPS,
    at least one."""
    return max(1, min(images, GROUP_PASS_ELEMENTS // max(rows * n_out, 1),
                      BLOCK_FLOPS // max(2 * rows * n_out * computed, 1)))


def _flat_rows_cost(x_shape, rows_out, win: Window, isz):
    """(bytes, FLOPs) of _flat_rows_conv beyond the gathered kernel's declaration: the
    padded rows, the gathered windows and the products over the computed positions."""
    found = flat_rows(x_shape, win, 1, rows_out)
    if not found:
        return 0, 0
    _, n, tail, computed, _ = found
    b, c = x_shape[:2]
    kp = prod(win.kernel)
    held = b * c * (n + tail) + b * c * kp * computed + b * rows_out * computed
    return held * isz, 2 * b * rows_out * computed * c * kp


def conv_input_grad(g, w, spatial, strides, pads, dilations, groups):
    """The transpose of conv in x: g (B, O, *out), w (O, C / groups, *kernel) -> (B, C, *S)."""
    d = len(spatial)
    if depthwise.applies((g.shape[0], w.shape[0]) + tuple(spatial), w.shape, strides, groups):
        return kernels.depthwise().input_grad(g, w, spatial, strides, pads, dilations)
    reach = tuple(dl * (k - 1) for dl, k in zip(dilations, w.shape[2:]))
    if stride_one_transpose(g.shape, w.shape, spatial, strides, pads, dilations, groups):
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
    win = Window(w.shape[2:], strides, pads, dilations)
    if rowshifts.applies(win, groups):
        return rowshifts.input_grad(g, w, spatial, win)
    b, n_out = g.shape[:2]
    out = g.shape[2:]
    cg = w.shape[1]
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    # The batch axis last while accumulating: each kernel offset then adds runs of
    # whole batches (contiguous) rather than runs of one window row.
    dxp = np.zeros((cg * groups,) + win.padded(spatial) + (b,), g.dtype)
    g3 = g.reshape(b, n_out, p)
    wt = w.reshape(groups, og, cg * kp)
    step = group_passes(groups, cg * kp * p * b, 2 * og * cg * kp * p * b)
    for g0 in range(0, groups, step):
        iteration()
        g1 = min(groups, g0 + step)
        n = g1 - g0
        gg = g3[:, g0 * og:g1 * og].reshape(b, n, og, p).transpose(1, 2, 3, 0).reshape(
            n, og, p * b)
        cols = (matmul(wt[g0].T, gg[0]) if n == 1
                else np.matmul(wt[g0:g1].transpose(0, 2, 1), gg)).reshape(
            (n * cg,) + win.kernel + out + (b,))
        target = dxp[g0 * cg:g1 * cg]
        for offset, index in _offsets(win, out):
            iteration()
            dst = target[(slice(None),) + index]
            dst += cols[(slice(None),) + offset]
    # back in the input's layout: a view with the batch innermost slowed the ops that
    # read it next (LeNet's pool: its vjp 1.2x slower) by more than this copy costs
    return np.ascontiguousarray(unpad(dxp.transpose((d + 1,) + tuple(range(d + 1))), win,
                                      spatial))


def stride_one_transpose(g_shape, w_shape, spatial, strides, pads, dilations, groups):
    """Whether conv_input_grad runs as one convolution rather than a scatter."""
    reach = tuple(dl * (k - 1) for dl, k in zip(dilations, w_shape[2:]))
    return (groups == 1 and all(s == 1 for s in strides)
            and all(p <= r for p, r in zip(pads, reach + reach))
            and g_shape[1] * prod(spatial) <= w_shape[1] * prod(g_shape[2:]))


def conv_weight_grad(g, x, kernel, strides, pads, dilations, groups):
    """The transpose of conv in w: g (k, N, O, *out), x (N, C, *S) -> (k, O, C / groups,
    *kernel)."""
    k, n, n_out = g.shape[:3]
    if depthwise.applies(x.shape, (n_out, x.shape[1] // groups) + tuple(kernel), strides,
                         groups):
        return kernels.depthwise().weight_grad(g, x, kernel, strides, pads, dilations)
    win = Window(tuple(kernel), strides, pads, dilations)
    if rowshifts.weight_applies(x.shape, win, groups, x.dtype.itemsize):
        return rowshifts.weight_grad(g, x, win)
    found = flat_rows(x.shape, win, groups, k * n_out)
    if found:
        return _flat_rows_weight_grad(g, x, win, found)
    out, cg = g.shape[3:], x.shape[1] // groups
    p, kp, og = prod(out), prod(win.kernel), n_out // groups
    view = _columns(pad(x, win), win, out)  # (C, *kernel, N, *out)
    g4 = g.reshape(k, n, n_out, p)
    dw = np.empty((k, n_out, cg * kp), np.result_type(g, x))
    step = group_passes(groups, cg * kp * n * p, 2 * cg * kp * n * p * k * og)
    for g0 in range(0, groups, step):
        iteration()
        g1 = min(groups, g0 + step)
        m = g1 - g0
        cols = view[g0 * cg:g1 * cg].reshape(m, cg * kp, n * p)
        gg = g4[:, :, g0 * og:g1 * og].reshape(k, n, m, og, p).transpose(2, 0, 3, 1, 4).reshape(
            m, k * og, n * p)
        # (cols @ gg.T).T: OpenBLAS is markedly faster this way round for these shapes
        r = (matmul(cols[0], gg[0].T)[None] if m == 1
             else np.matmul(cols, gg.transpose(0, 2, 1)))  # (m, C/g kp, k Og)
        dw[:, g0 * og:g1 * og].reshape(k, m, og, cg * kp)[...] = (
            r.reshape(m, cg * kp, k, og).transpose(2, 0, 3, 1))
    return dw.reshape((k, n_out, cg) + win.kernel)


# --- pooling -----------------------------------------------------------------------------
# Pooling reads the last len(kernel) axes; any axes in front (N, C, and a direction
# axis for seeds) are carried along. Each loop makes one pass per kernel offset, each
# pass one NumPy operation over every window (costs.iteration() between passes).

def max_pool(x, w: Window):
    xp = pad(x, w, -np.inf)
    out = w.out(x.shape[-len(w.kernel):])
    res = None
    for _, index in _offsets(w, out):
        iteration()
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
    plane = [prod(sp[i + 1:]) for i in range(d)]
    steps = [dl * pl for dl, pl in zip(w.dilations, plane)]
    where = np.zeros(ans.shape, np.intp)
    # A window whose maximum is -inf matches its padding too: only real elements count.
    real = (pad(np.ones(spatial, bool), w, False)
            if any(w.pads) and np.isneginf(ans).any() else None)
    # Last offset first, so that the first match is the one kept; the offsets are
    # generated pass by pass (a list of a million kernel offsets took 400 MiB).
    for offset, index in _offsets(w, out, reverse=True):
        iteration()
        hit = xp[(Ellipsis,) + index] == ans
        if real is not None:
            hit &= real[index]
        np.copyto(where, sum(o * s for o, s in zip(offset, steps)), where=hit)
    if np.isnan(ans).any():  # a NaN is the maximum: the last one in the window (PyTorch)
        for offset, index in _offsets(w, out):
            iteration()
            np.copyto(where, sum(o * s for o, s in zip(offset, steps)),
                      where=np.isnan(xp[(Ellipsis,) + index]))
    del xp, real
    for i in range(d):
        shape = [1] * d
        shape[i] = out[i]
        where += (np.arange(out[i], dtype=np.intp) * (w.strides[i] * plane[i])).reshape(shape)
    lead = np.arange(prod(x.shape[:-d]), dtype=np.intp).reshape(x.shape[:-d] + (1,) * d)
    where += lead * prod(sp)
    return where


def _tiled(ans, w: Window):
    """Whether the fast path below gives each window's derivative element: windows that
    do not overlap, no NaN maximum (the last NaN rule is the general path's), and no
    window of padding and -inf only (its maximum must go to a real element)."""
    return (not w.overlapping() and not np.isnan(ans).any()
            and not (any(w.pads) and np.isneginf(ans).any()))


def _first_maxima(xp, ans, w: Window, out, bits):
    """For windows that do not overlap (see _tiled), per kernel offset in row-major order:
    (index into the padded axes, a mask of `bits` all ones where the element at that
    offset is its window's first maximum, else zero). Equality, not argmax over a window
    axis: a pass per offset runs over every window at once. The mask is reused."""
    eq = np.empty(ans.shape, bool)
    hit = np.empty(ans.shape, bool)
    taken = np.zeros(ans.shape, bool)
    mask = np.empty(ans.shape, bits)
    ones = bits.type(np.iinfo(bits).max)
    for _, index in _offsets(w, out):
        iteration()
        np.equal(xp[(Ellipsis,) + index], ans, out=eq)
        np.greater(eq, taken, out=hit)  # equal, and no earlier offset took the window
        taken |= eq
        np.multiply(hit, ones, out=mask)
        yield index, mask


def _bits(dtype):
    return np.dtype(f"u{dtype.itemsize}")


def max_pool_jvp(t, x, ans, w: Window):
    """t (k, *x.shape) -> (k, *ans.shape): the tangent of each window's first maximum."""
    k = t.shape[0]
    if _tiled(ans, w):  # each offset's tangents, masked bitwise (exact), or-ed together
        bits = _bits(t.dtype)
        d = len(w.kernel)
        res = np.zeros((k,) + ans.shape, t.dtype)
        rb, part = res.view(bits), np.empty(res.shape, bits)
        tp = pad(t, w, 0)
        for index, mask in _first_maxima(pad(x, w, -np.inf), ans, w, ans.shape[-d:], bits):
            np.bitwise_and(tp[(Ellipsis,) + index].view(bits), mask, out=part)
            rb |= part
        return res
    flat = argmax_positions(x, ans, w)
    tp = pad(t, w, 0)
    tp = tp.reshape(k, prod(tp.shape[1:]))  # not -1: it is undetermined when k * size is 0
    return tp[:, flat.ravel()].reshape((k,) + ans.shape)


def max_pool_vjp(g, x, ans, w: Window):
    """g (k, *ans.shape) -> (k, *x.shape): each window's cotangent to its first maximum."""
    k = g.shape[0]
    d = len(w.kernel)
    if _tiled(ans, w):  # a one-hot placement: each offset's elements are its own
        bits = _bits(g.dtype)
        grad = np.zeros((k,) + x.shape[:-d] + w.padded(x.shape[-d:]), g.dtype)
        gb = g.view(bits)
        for index, mask in _first_maxima(pad(x, w, -np.inf), ans, w, ans.shape[-d:], bits):
            np.bitwise_and(gb, mask, out=grad[(Ellipsis,) + index].view(bits))
        return unpad(grad, w, x.shape[-d:])
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


def _divisor(spatial, w: Window, out, count_include_pad, dtype):
    """What each window's sum is divided by: the kernel size, or the number of
    non-padding elements in the window."""
    if count_include_pad or not any(w.pads):
        return dtype.type(prod(w.kernel))
    ones = pad(np.ones(spatial, dtype), w, 0)
    count = None
    for _, index in _offsets(w, out):
        iteration()
        if count is None:
            count = ones[index].copy()
        else:
            count += ones[index]
    return np.maximum(count, 1, out=count)


def avg_pool(x, w: Window, count_include_pad):
    d = len(w.kernel)
    spatial = x.shape[-d:]
    out = w.out(spatial)
    xp = pad(x, w, 0)
    res = None
    for _, index in _offsets(w, out):
        iteration()
        v = xp[(Ellipsis,) + index]
        res = v.copy() if res is None else np.add(res, v, out=res)
    del xp
    res /= _divisor(spatial, w, out, count_include_pad, res.dtype)
    return res


def avg_pool_vjp(g, spatial, w: Window, count_include_pad):
    """g (..., *out) -> (..., *spatial): each window's share back to its elements."""
    d = len(w.kernel)
    out = g.shape[-d:]
    share = g / _divisor(spatial, w, out, count_include_pad, g.dtype)
    grad = np.zeros(g.shape[:-d] + w.padded(spatial), g.dtype)
    for _, index in _offsets(w, out):
        iteration()
        dst = grad[(Ellipsis,) + index]
        dst += share
    return unpad(grad, w, spatial)


# --- declared costs (engine/costs.py; tests/engine/test_costs.py measures them) -----------------
# Bytes beyond the op's inputs and output, FLOPs and loop passes, per seed direction
# (the whole eval for "values"). A term computed once per call (the maxima's positions,
# the padded input) is declared per direction: k directions are then charged k times.

_INTP = np.dtype(np.intp).itemsize


def _padded_bytes(lead, spatial, w: Window, itemsize):
    return lead * prod(w.padded(spatial)) * itemsize if any(w.pads) else 0


def conv_cost(mode, shapes, out, dtype, strides, pads, dilations, groups):
    """conv's cost (ops/conv.py's row): the padded input, the gathered windows of one
    pass of groups, the products' results before they land in place, the regrouped
    weights; for derivatives the same of the transposed convolutions."""
    (b, c, *spatial), (n_out, cg, *kernel) = shapes[0], shapes[1]
    spatial, kernel = tuple(spatial), tuple(kernel)
    isz = dtype.itemsize
    win = Window(kernel, strides, pads, dilations)
    p, kp, og = prod(out[2:]), prod(kernel), n_out // groups
    out_size, x_size, w_size = prod(out), b * c * prod(spatial), n_out * cg * kp
    flops = 2 * out_size * cg * kp

    def gathered(batch, channels_per_group, positions, rows):
        step = group_passes(groups, batch * channels_per_group * kp * positions,
                            2 * batch * channels_per_group * kp * positions * rows)
        passes = 0 if groups == 1 else -(-groups // step)
        return step * batch * channels_per_group * kp * positions, passes

    if depthwise.applies((b, c) + spatial, (n_out, cg) + kernel, strides, groups):
        return _depthwise_cost(mode, b, c, spatial, kernel, strides, pads, dilations, isz,
                               flops, out_size, x_size, w_size)
    cols, passes = gathered(b, cg, p, og)
    flat_bytes, flat_flops = _flat_rows_cost((b, c) + spatial, n_out, win, isz)
    rows_bytes, rows_flops, rows_passes = rowshifts.conv_cost((b, c) + spatial, n_out, win,
                                                              groups, isz)
    flops = max(flops, flat_flops, rows_flops)
    forward = (_padded_bytes(b * c, spatial, win, isz) + (cols + w_size) * isz + out_size * isz
               + max(flat_bytes, rows_bytes))
    if mode == "values":
        return OpCost(forward, flops, passes + rows_passes)
    if mode == "forward":  # a term per input, each a convolution, and their sum
        return OpCost(2 * forward + 2 * out_size * isz, 2 * flops, 2 * (passes + rows_passes))
    # reverse: the weight's transpose gathers the input again and regroups g; the
    # input's is a scatter (per group pass, per kernel offset) or a convolution of g
    weight = (_padded_bytes(b * c, spatial, win, isz) + (cols + out_size + 2 * w_size) * isz)
    found = flat_rows((b, c) + spatial, win, groups, n_out)
    weight_passes = max(passes, 1)
    if rowshifts.weight_applies((b, c) + spatial, win, groups, isz):
        weight, weight_passes = rowshifts.weight_grad_cost((b, c) + spatial, n_out, win,
                                                           groups, isz)
    elif found:  # _flat_rows_weight_grad (k seeds may take the gathered path)
        _, n, tail, computed, _ = found
        step = flat_weight_pass(b, c * kp, n_out, computed)
        weight = max(weight, (c * b * (n + tail) + (c * kp + n_out) * b * computed
                              + 2 * step * w_size + 3 * w_size) * isz)
        weight_passes = max(weight_passes, -(-b // step))
    g_shape = (b, n_out) + tuple(out[2:])
    if stride_one_transpose(g_shape, (n_out, cg) + kernel, spatial, strides, pads, dilations,
                            groups):
        reach = tuple(dl * (k - 1) for dl, k in zip(dilations, kernel))
        back = Window(kernel, (1,) * len(kernel), tuple(r - q for r, q in zip(reach + reach, pads)),
                      dilations)
        into_bytes, into_flops = _flat_rows_cost(g_shape, c, back, isz)
        rows_bytes, rows_flops, into_passes = rowshifts.conv_cost(g_shape, c, back, 1, isz)
        into = (_padded_bytes(b * n_out, out[2:], back, isz)
                + (b * n_out * kp * prod(spatial) + w_size) * isz
                + max(into_bytes, rows_bytes))
        flops = max(flops, into_flops, rows_flops)
    elif rowshifts.applies(win, groups):
        into, into_flops, into_passes = rowshifts.input_grad_cost(g_shape, c, win, spatial, isz)
        flops = max(flops, into_flops)
    else:
        into_cols, group_pass = gathered(b, cg, p, og)
        into = (b * c * prod(win.padded(spatial)) + out_size + into_cols + x_size) * isz
        into_passes = max(group_pass, 1) * (1 + kp)
    # the weight's transpose loops over passes of groups at least once (one group too)
    reverse = OpCost(weight + into + (x_size + w_size) * isz, 4 * flops,
                     weight_passes + into_passes)
    if mode == "reverse":
        return reverse
    # second: the curvature term runs one transposed convolution per direction and input
    # (a pass each) beside the vjps of the stacked seed, and holds the term's result
    return OpCost(2 * reverse.scratch + (x_size + w_size) * isz, 2 * reverse.flops,
                  2 * reverse.loops + 2)


def _depthwise_cost(mode, b, c, spatial, kernel, strides, pads, dilations, isz, flops,
                    out_size, x_size, w_size):
    """conv's cost on the active provider's depthwise kernels (engine/kernels.py: they
    say what they hold and how many passes they make): the values, each forward term and their sum, both
    transposes."""
    held, passes = kernels.depthwise().cost(mode, b, c, spatial, kernel, strides, pads,
                                           dilations)
    scratch = held * isz
    if mode == "values":
        return OpCost(scratch + out_size * isz, flops, passes)
    if mode == "forward":  # a term per input and their sum
        return OpCost(2 * scratch + 2 * out_size * isz, 2 * flops, 2 * passes)
    reverse = OpCost(scratch + (x_size + w_size) * isz, 4 * flops, passes)
    if mode == "reverse":
        return reverse
    return OpCost(2 * reverse.scratch + (x_size + w_size) * isz, 2 * reverse.flops,
                  2 * reverse.loops + 1)


def max_pool_cost(mode, shapes, out, dtype, window):
    """max_pool's cost: the padded input; for derivatives the maxima's positions (a
    pass per kernel offset, two where a maximum is NaN) and the padded seed. Windows
    that do not overlap take the masked path (_first_maxima: six array operations per
    element and offset, three bytes and a mask per window), which this also bounds."""
    x = shapes[0]
    d = len(window.kernel)
    lead, spatial = prod(x[:-d]), tuple(x[-d:])
    isz, kp, out_size = dtype.itemsize, prod(window.kernel), prod(out)
    padded = lead * prod(window.padded(spatial))
    xp = _padded_bytes(lead, spatial, window, isz)
    flops = out_size * kp
    if mode == "values":
        return OpCost(xp + out_size * isz, flops, kp)
    positions = (xp + 3 * out_size * _INTP + 2 * out_size
                 + prod(window.padded(spatial)) + lead * _INTP)
    if mode == "forward":
        seed = padded * isz + out_size * isz
    else:  # reverse and second (its curvature is zero: the vjp of the stacked seed)
        seed = (out_size * _INTP + padded * (8 + isz) if window.overlapping()
                else padded * isz)
    passes = 3 if window.overlapping() else 6
    return OpCost(positions + seed, passes * flops + out_size, 2 * kp)


def avg_pool_cost(mode, shapes, out, dtype, window, count_include_pad):
    """avg_pool's cost: the padded input (or the padded cotangent), the window counts
    when padding is not counted, a pass per kernel offset for each."""
    x = shapes[0]
    d = len(window.kernel)
    lead, spatial = prod(x[:-d]), tuple(x[-d:])
    isz, kp, out_size = dtype.itemsize, prod(window.kernel), prod(out)
    counts = 0 if count_include_pad or not any(window.pads) else kp
    divisor = (prod(window.padded(spatial)) + 2 * prod(out[-d:])) * isz if counts else 0
    flops = out_size * (kp + 1)
    if mode in ("values", "forward"):
        return OpCost(_padded_bytes(lead, spatial, window, isz) + out_size * isz + divisor,
                      flops, kp + counts)
    return OpCost(lead * prod(window.padded(spatial)) * isz + out_size * isz + divisor,
                  flops, kp + counts)
