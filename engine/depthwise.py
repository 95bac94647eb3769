"""Depthwise convolution (one input and one output channel per group) as a sum of
shifted elementwise products.

The padded input is laid out channel by channel, every image of the batch one after
the other in one flat row per channel: (C, B * prod(padded spatial) + tail). A kernel
offset is then one shift along that row, so each offset is one whole-array multiply
and add over (C, B * prod(padded)) - long contiguous runs - where the gathered
product (windows.conv's grouped path) ran one tiny product per channel. Outputs are
computed at every position where a window could start and the real ones sliced out;
the positions past the last real window read the zero tail.

A stride s splits each axis into s phases (positions p, p + s, p + 2s, ...), each
phase its own set of rows (polyphase): a kernel offset o reads phase (o * dilation)
mod s shifted by (o * dilation) // s, so a strided convolution is the same passes
over its output's size. Only the phases some kernel offset reads are built.

The two transposes run the same way: the input's cotangent adds each shifted
cotangent times its weight into its phase, the weight's is one dot product per
offset and channel. Every loop here runs once per kernel offset or per phase (at most
one per offset) and calls costs.iteration() (the kernel's size is the request's).
"""

from __future__ import annotations

import itertools
from math import prod
from typing import NamedTuple

import numpy as np

from .costs import iteration


def applies(x_shape, w_shape, strides, groups) -> bool:
    """Whether conv runs here: groups == channels and one output channel per group (O ==
    C, weight (C, 1, *kernel))."""
    return groups > 1 and x_shape[1] == groups and w_shape[0] == groups and w_shape[1] == 1


class Layout(NamedTuple):
    grid: tuple  # positions per axis of each phase (ceil(padded / stride))
    phases: list  # the phase (one start per axis) of each set of rows, in build order
    taps: list  # per kernel offset (row-major): (index into phases, shift along a row)
    tail: int  # how far the last shift reads past a row


def layout(spatial, kernel, strides, pads, dilations) -> Layout:
    d = len(spatial)
    padded = [s + pads[i] + pads[d + i] for i, s in enumerate(spatial)]
    grid = tuple(-(-p // s) for p, s in zip(padded, strides))
    plane = [prod(grid[i + 1:]) for i in range(d)]
    index: dict = {}
    taps = []
    for offset in itertools.product(*[range(k) for k in kernel]):
        at = [o * dl for o, dl in zip(offset, dilations)]
        phase = tuple(a % s for a, s in zip(at, strides))
        shift = sum((a // s) * pl for a, s, pl in zip(at, strides, plane))
        taps.append((index.setdefault(phase, len(index)), shift))
    return Layout(grid, list(index), taps, max(shift for _, shift in taps))


def _phase_slices(phase, spatial, strides, pads):
    """For one phase: the slice of its grid that holds input elements, and the slice of
    the input (per axis) those elements are."""
    grid_part, x_part = [], []
    for p, size, s, begin in zip(phase, spatial, strides, pads):
        first = max(0, -(-(begin - p) // s))  # first grid index whose position is in x
        last = (size - 1 + begin - p) // s  # last one
        count = max(0, last - first + 1)
        start = first * s + p - begin
        grid_part.append(slice(first, first + count))
        x_part.append(slice(start, start + (count - 1) * s + 1 if count else start, s))
    return tuple(grid_part), tuple(x_part)


def _rows(x, lay: Layout, strides, pads):
    """x (B, C, *S) -> (phases, C, B * prod(grid) + tail): zero-padded channel rows, one
    set per phase."""
    b, c = x.shape[:2]
    n = b * prod(lay.grid)
    rows = np.zeros((len(lay.phases), c, n + lay.tail), x.dtype)
    xc = np.swapaxes(x, 0, 1)
    for j, phase in enumerate(lay.phases):
        iteration()
        grid_part, x_part = _phase_slices(phase, x.shape[2:], strides, pads)
        rows[j, :, :n].reshape((c, b) + lay.grid)[(slice(None), slice(None)) + grid_part] = (
            xc[(slice(None), slice(None)) + x_part])
    return rows, n


def _spread(g, grid, n):
    """g (..., B, C, *out) -> (..., C, B * prod(grid)): each output at the grid position
    where its window starts, zeros elsewhere."""
    d = len(grid)
    lead = g.shape[:-d - 2]
    b, c = g.shape[len(lead):len(lead) + 2]
    gz = np.zeros(lead + (c, n), g.dtype)
    at = (Ellipsis, slice(None), slice(None)) + tuple(slice(0, o) for o in g.shape[-d:])
    gz.reshape(lead + (c, b) + grid)[at] = np.swapaxes(g, len(lead), len(lead) + 1)
    return gz


def conv(x, w, strides, pads, dilations, out):
    """x (B, C, *S), w (k, C, 1, *kernel) -> (k, B, C, *out) (see windows.conv)."""
    k, c = w.shape[:2]
    b = x.shape[0]
    lay = layout(x.shape[2:], w.shape[3:], strides, pads, dilations)
    rows, n = _rows(x, lay, strides, pads)
    wk = w.reshape(k, c, len(lay.taps))
    acc = np.empty((k, c, n), np.result_type(x, w))
    tmp = np.empty_like(acc) if len(lay.taps) > 1 else None
    for i, (j, shift) in enumerate(lay.taps):
        iteration()
        if i == 0:
            np.multiply(rows[j, :, shift:shift + n], wk[:, :, i, None], out=acc)
        else:
            np.multiply(rows[j, :, shift:shift + n], wk[:, :, i, None], out=tmp)
            acc += tmp
    del rows, tmp
    grid = acc.reshape((k, c, b) + lay.grid)[(Ellipsis,) + tuple(slice(0, o) for o in out)]
    return np.ascontiguousarray(np.swapaxes(grid, 1, 2))


def input_grad(g, w, spatial, strides, pads, dilations):
    """The transpose of conv in x: g (B, C, *out), w (C, 1, *kernel) -> (B, C, *S)."""
    b, c = g.shape[:2]
    lay = layout(spatial, w.shape[2:], strides, pads, dilations)
    n = b * prod(lay.grid)
    gz = _spread(g, lay.grid, n)
    wk = w.reshape(c, len(lay.taps))
    rows = np.zeros((len(lay.phases), c, n + lay.tail), g.dtype)
    tmp = np.empty((c, n), g.dtype)
    for i, (j, shift) in enumerate(lay.taps):
        iteration()
        np.multiply(gz, wk[:, i, None], out=tmp)
        rows[j, :, shift:shift + n] += tmp
    del gz, tmp
    dx = np.zeros((b, c) + tuple(spatial), g.dtype)  # elements no offset reads stay 0
    dxc = np.swapaxes(dx, 0, 1)
    for j, phase in enumerate(lay.phases):
        iteration()
        grid_part, x_part = _phase_slices(phase, spatial, strides, pads)
        dxc[(slice(None), slice(None)) + x_part] = rows[j, :, :n].reshape(
            (c, b) + lay.grid)[(slice(None), slice(None)) + grid_part]
    return dx


def weight_grad(g, x, kernel, strides, pads, dilations):
    """The transpose of conv in w: g (k, B, C, *out), x (B, C, *S) -> (k, C, 1, *kernel)."""
    k, b, c = g.shape[:3]
    lay = layout(x.shape[2:], kernel, strides, pads, dilations)
    rows, n = _rows(x, lay, strides, pads)
    gz = _spread(g, lay.grid, n)  # (k, C, n)
    dw = np.empty((k, c, len(lay.taps)), np.result_type(g, x))
    for i, (j, shift) in enumerate(lay.taps):
        iteration()
        # a dot product per direction and channel (np.vecdot needs NumPy 2; this is as fast)
        dw[:, :, i] = np.matmul(gz[:, :, None, :], rows[j, :, shift:shift + n, None])[..., 0, 0]
    return dw.reshape((k, c, 1) + tuple(kernel))


def cost(mode, b, c, spatial, kernel, strides, pads, dilations):
    """(elements held beyond the inputs and the result, loop passes) of these kernels,
    per direction: the phases' rows, the accumulator and its temporary (values, and
    each term of forward mode); for reverse the input's transpose (spread cotangent,
    the phases' rows, a temporary) and the weight's (the phases' rows, spread
    cotangent)."""
    lay = layout(spatial, kernel, strides, pads, dilations)
    n = b * prod(lay.grid)
    rows = len(lay.phases) * c * (n + lay.tail)
    passes = len(lay.taps) + len(lay.phases)
    if mode in ("values", "forward"):
        return rows + 2 * c * n, passes
    return 2 * rows + 3 * c * n, 2 * passes
