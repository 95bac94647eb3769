"""Depthwise convolution (one input and one output channel per group, stride 1) as a
sum of shifted elementwise products.

The padded input is laid out channel by channel, every image of the batch one after
the other in one flat row per channel: (C, B * prod(padded spatial) + tail). A kernel
offset is then one shift along that row, so each offset is one whole-array multiply
and add over (C, B * prod(padded)) - long contiguous runs - where the gathered
product (windows.conv's grouped path) ran one tiny product per channel. Outputs are
computed at every padded position where a window could start and the real ones
sliced out; the positions past the last real window read the zero tail. The two
transposes run the same way: the input's cotangent adds each shifted cotangent times
its weight, the weight's is one dot product per offset and channel.

Every loop here runs once per kernel offset and calls costs.iteration() (the kernel's
size is the request's).
"""

from __future__ import annotations

import itertools
from math import prod

import numpy as np

from .costs import iteration


def applies(x_shape, w_shape, strides, groups) -> bool:
    """Whether conv runs here: groups == channels, one output channel per group (O ==
    C, weight (C, 1, *kernel)), stride 1 on every axis."""
    return (groups > 1 and x_shape[1] == groups and w_shape[0] == groups
            and w_shape[1] == 1 and all(s == 1 for s in strides))


def _layout(spatial, kernel, pads, dilations):
    """The padded spatial sizes, each kernel offset's shift along a flat row, the tail
    the last shift reads past the rows."""
    d = len(spatial)
    padded = tuple(s + pads[i] + pads[d + i] for i, s in enumerate(spatial))
    plane = [prod(padded[i + 1:]) for i in range(d)]
    shifts = [sum(o * dl * pl for o, dl, pl in zip(offset, dilations, plane))
              for offset in itertools.product(*[range(k) for k in kernel])]
    return padded, shifts, max(shifts)


def _flat(x, padded, pads, tail):
    """x (B, C, *S) -> (C, B * prod(padded) + tail): zero-padded, channel rows."""
    b, c = x.shape[:2]
    d = len(padded)
    n = b * prod(padded)
    xp = np.zeros((c, n + tail), x.dtype)
    inner = tuple(slice(p, p + s) for p, s in zip(pads[:d], x.shape[2:]))
    xp[:, :n].reshape((c, b) + padded)[(slice(None), slice(None)) + inner] = np.moveaxis(x, 1, 0)
    return xp, n


def _spread(g, padded, n, tail):
    """g (..., B, C, *out) -> (..., C, B * prod(padded) + tail): each output at the padded
    position where its window starts, zeros elsewhere."""
    lead = g.shape[:-len(padded) - 2]
    b, c = g.shape[len(lead):len(lead) + 2]
    out = g.shape[len(lead) + 2:]
    gz = np.zeros(lead + (c, n + tail), g.dtype)
    at = (Ellipsis, slice(None), slice(None)) + tuple(slice(0, o) for o in out)
    gz[..., :n].reshape(lead + (c, b) + padded)[at] = np.swapaxes(g, len(lead), len(lead) + 1)
    return gz


def conv(x, w, pads, dilations, out):
    """x (B, C, *S), w (k, C, 1, *kernel) -> (k, B, C, *out) (see windows.conv)."""
    k, c = w.shape[:2]
    b = x.shape[0]
    kernel = w.shape[3:]
    padded, shifts, tail = _layout(x.shape[2:], kernel, pads, dilations)
    xp, n = _flat(x, padded, pads, tail)
    wk = w.reshape(k, c, len(shifts))
    acc = np.empty((k, c, n), np.result_type(x, w))
    tmp = np.empty_like(acc) if len(shifts) > 1 else None
    for j, shift in enumerate(shifts):
        iteration()
        if j == 0:
            np.multiply(xp[:, shift:shift + n], wk[:, :, j, None], out=acc)
        else:
            np.multiply(xp[:, shift:shift + n], wk[:, :, j, None], out=tmp)
            acc += tmp
    del xp, tmp
    grid = acc.reshape((k, c, b) + padded)[(Ellipsis,) + tuple(slice(0, o) for o in out)]
    return np.ascontiguousarray(np.swapaxes(grid, 1, 2))


def input_grad(g, w, spatial, pads, dilations):
    """The transpose of conv in x: g (B, C, *out), w (C, 1, *kernel) -> (B, C, *S)."""
    b, c = g.shape[:2]
    d = len(spatial)
    kernel = w.shape[2:]
    padded, shifts, tail = _layout(spatial, kernel, pads, dilations)
    n = b * prod(padded)
    gz = _spread(g, padded, n, 0)
    wk = w.reshape(c, len(shifts))
    dxp = np.zeros((c, n + tail), g.dtype)
    tmp = np.empty((c, n), g.dtype)
    for j, shift in enumerate(shifts):
        iteration()
        np.multiply(gz, wk[:, j, None], out=tmp)
        dxp[:, shift:shift + n] += tmp
    del gz, tmp
    inner = tuple(slice(p, p + s) for p, s in zip(pads[:d], spatial))
    grid = dxp[:, :n].reshape((c, b) + padded)[(slice(None), slice(None)) + inner]
    return np.ascontiguousarray(np.swapaxes(grid, 0, 1))


def weight_grad(g, x, kernel, pads, dilations):
    """The transpose of conv in w: g (k, B, C, *out), x (B, C, *S) -> (k, C, 1, *kernel)."""
    k, b, c = g.shape[:3]
    padded, shifts, tail = _layout(x.shape[2:], kernel, pads, dilations)
    xp, n = _flat(x, padded, pads, tail)
    gz = _spread(g, padded, n, 0)  # (k, C, n)
    dw = np.empty((k, c, len(shifts)), np.result_type(g, x))
    for j, shift in enumerate(shifts):
        iteration()
        dw[:, :, j] = np.vecdot(gz, xp[:, shift:shift + n])
    return dw.reshape((k, c, 1) + tuple(kernel))


def scratch_bytes(mode, b, c, spatial, kernel, pads, dilations, itemsize):
    """Bytes these kernels hold beyond their inputs and results, per direction: the
    padded rows, the accumulator and its temporary (values, and each term of forward
    mode), the spread cotangent, the padded input cotangent and a temporary (reverse)."""
    padded, _, tail = _layout(spatial, kernel, pads, dilations)
    rows = c * (b * prod(padded) + tail)
    if mode in ("values", "forward"):
        return (3 * rows) * itemsize
    # reverse: the input's transpose (spread g, the padded result, a temporary, the
    # unpadded copy) and the weight's (the padded input, spread g)
    return (6 * rows) * itemsize
