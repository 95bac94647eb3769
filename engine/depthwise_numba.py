"""Depthwise convolution (one input and one output channel per group) as compiled direct
loops: numba's kernels behind engine/kernels.py, the same functions and results as
engine/depthwise.py (which stays the default when numba is absent or turned off).

The layout is engine/depthwise.py's, one (image, channel) plane at a time: every
spatial rank runs as 3-d (leading axes of size 1); the plane is copied into its padded
polyphase rows (a stride s splits an axis into s phases; each phase's positions are
contiguous), so that each kernel offset is one contiguous multiply-add of the whole
output grid from one phase at one shift (the grid positions past the real outputs are
computed and dropped, a run is whole AVX-512 vectors), and the real outputs are read
out. The transposes run the same runs the other way: the input's cotangent adds each
weighted cotangent run into the phase rows and reads the input's elements back; the
weight's is a dot product per offset. The plane's rows and grid stay in the L1/L2 cache,
where numpy's whole-array passes (engine/depthwise.py) stream the whole tensor once per
offset.

The compiled loops never run a whole request: Python calls them for a chunk of (image,
channel) pairs of at most about CHUNK_FLOPS of work (a few ms) and calls
costs.iteration() before each (the deadline and cancellation check), so a huge request
stops within one chunk. They allocate nothing of a request's size: the operands'
contiguous copies, the result and one plane's scratch are numpy arrays made here and
declared in `cost`.

numba compiles the kernels for a dtype on their first call: 7 to 15 s for all of them
and both float dtypes on this (busy, 2-core) machine, 0.4 to 2.5 s to load them back
from numba's on-disk cache (`cache=True`: NUMBA_CACHE_DIR, else __pycache__ beside this
file, else the user's cache folder). Where no cache folder can be written they compile
in memory, in every process. kernels.warm_up() does this; `gradserve serve` runs it in a
background thread from start and logs how long it took.

This module imports numba at its top: only engine/kernels.py imports it, and only when
numba imports.
"""

from __future__ import annotations

import itertools
import warnings
from math import prod
from typing import NamedTuple

import numba
import numpy as np

from .costs import iteration

# Work (FLOPs) of one call of a compiled loop: a few ms here, the deadline's grain.
CHUNK_FLOPS = 1 << 25
VECTOR = 16  # elements per tap's run are a multiple of this (AVX-512 float32)
_FASTMATH = {"reassoc", "nsz", "contract"}  # sums may be reordered (vectorized)


def _compile(fn):
    """njit with the on-disk cache; without it where numba finds no folder it may write
    (a read-only install, a container without a home)."""
    try:
        return numba.njit(cache=True, fastmath=_FASTMATH, nogil=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return numba.njit(cache=False, fastmath=_FASTMATH, nogil=True)(fn)


def _fill(xi, buf, st, pd, grid, plane, runs):
    """The polyphase rows of one padded (image, channel) plane xi (D, H, W): element
    (z, y, u) at padded position (z + pd0, ...) goes to phase (pz % s0, py % s1, pu % s2),
    grid position (pz // s0, py // s1, pu // s2). Every plane fills the same places:
    the rest of buf (the padding) is zeroed once per call, by the caller. Phases and
    grid positions are stepped along, not divided (a division per row cost more than the
    row's copy); runs[phase] = (first u, its grid position, count) along the last axis.
    xi may be read-only (a request's buffer): this function only reads it."""
    s0, s1, s2 = st[0], st[1], st[2]
    z_phase, z_q = pd[0] % s0, pd[0] // s0
    for z in range(xi.shape[0]):
        y_phase, y_q = pd[1] % s1, pd[1] // s1
        for y in range(xi.shape[1]):
            base = (z_phase * s1 + y_phase) * s2 * plane + (z_q * grid[1] + y_q) * grid[2]
            row = xi[z, y]
            for ph in range(s2):  # a run per phase: every s2-th element, contiguous in buf
                first, q, count = runs[ph, 0], runs[ph, 1], runs[ph, 2]
                run = buf[base + ph * plane + q:base + ph * plane + q + count]
                if s2 == 1:
                    for j in range(count):
                        run[j] = row[j]
                else:
                    for j in range(count):
                        run[j] = row[first + j * s2]
            y_phase += 1
            if y_phase == s1:
                y_phase, y_q = 0, y_q + 1
        z_phase += 1
        if z_phase == s0:
            z_phase, z_q = 0, z_q + 1


def _drain(buf, xi, st, pd, grid, plane, runs):
    """The inverse of _fill: xi (D, H, W) read back from its phases' rows."""
    s0, s1, s2 = st[0], st[1], st[2]
    z_phase, z_q = pd[0] % s0, pd[0] // s0
    for z in range(xi.shape[0]):
        y_phase, y_q = pd[1] % s1, pd[1] // s1
        for y in range(xi.shape[1]):
            base = (z_phase * s1 + y_phase) * s2 * plane + (z_q * grid[1] + y_q) * grid[2]
            row = xi[z, y]
            for ph in range(s2):
                first, q, count = runs[ph, 0], runs[ph, 1], runs[ph, 2]
                run = buf[base + ph * plane + q:base + ph * plane + q + count]
                if s2 == 1:
                    for j in range(count):
                        row[j] = run[j]
                else:
                    for j in range(count):
                        row[first + j * s2] = run[j]
            y_phase += 1
            if y_phase == s1:
                y_phase, y_q = 0, y_q + 1
        z_phase += 1
        if z_phase == s0:
            z_phase, z_q = 0, z_q + 1


def _conv_pairs(x, w, out, lo, hi, st, pd, grid, runs, starts, n, buf, acc):
    """x (B, C, D, H, W), w (C, taps) -> out (B, C, OD, OH, OW), for the pairs
    b * C + c in [lo, hi): each tap one contiguous multiply-add of n grid positions
    from its phase's rows (buf) at starts[tap] into acc; the real outputs read out."""
    c_n = x.shape[1]
    plane = grid[0] * grid[1] * grid[2]
    buf[:] = 0
    for i in range(lo, hi):
        b, c = i // c_n, i % c_n
        _fill_jit(x[b, c], buf, st, pd, grid, plane, runs)
        for t in range(starts.shape[0]):
            wv = w[c, t]
            src = buf[starts[t]:starts[t] + n]  # a view: indices from range() only vectorize
            if t == 0:
                for q in range(n):
                    acc[q] = wv * src[q]
            else:
                for q in range(n):
                    acc[q] += wv * src[q]
        oi = out[b, c]
        for od in range(oi.shape[0]):
            for oh in range(oi.shape[1]):
                base = (od * grid[1] + oh) * grid[2]
                row = oi[od, oh]
                src = acc[base:base + oi.shape[2]]
                for ow in range(oi.shape[2]):
                    row[ow] = src[ow]


def _input_grad_pairs(g, w, dx, lo, hi, st, pd, grid, runs, starts, n, buf, acc):
    """The transpose of _conv_pairs in x: g (B, C, OD, OH, OW), w (C, taps) -> dx (B, C,
    D, H, W): g spread on the grid (acc, zero elsewhere), each tap added into its phase's
    rows, the input's elements read back."""
    c_n = dx.shape[1]
    plane = grid[0] * grid[1] * grid[2]
    acc[:] = 0  # every plane of g lands in the same places
    for i in range(lo, hi):
        b, c = i // c_n, i % c_n
        gi = g[b, c]
        for od in range(gi.shape[0]):
            for oh in range(gi.shape[1]):
                base = (od * grid[1] + oh) * grid[2]
                row = gi[od, oh]
                dst = acc[base:base + gi.shape[2]]
                for ow in range(gi.shape[2]):
                    dst[ow] = row[ow]
        buf[:] = 0
        for t in range(starts.shape[0]):
            wv = w[c, t]
            dst = buf[starts[t]:starts[t] + n]
            for q in range(n):
                dst[q] += wv * acc[q]
        _drain_jit(buf, dx[b, c], st, pd, grid, plane, runs)


def _weight_grad_pairs(g, x, dw, lo, hi, st, pd, grid, runs, starts, n, buf, acc):
    """The transpose of _conv_pairs in w: g (B, C, OD, OH, OW), x (B, C, D, H, W) ->
    added into dw (C, taps): per tap a dot product of the spread g with its phase's rows."""
    c_n = x.shape[1]
    # sums in the operands' dtype, as numpy's BLAS dot products (a float64 sum of float32
    # products took 30% longer)
    zero = np.zeros(1, dw.dtype)[0]
    plane = grid[0] * grid[1] * grid[2]
    buf[:] = 0
    acc[:] = 0
    for i in range(lo, hi):
        b, c = i // c_n, i % c_n
        _fill_jit(x[b, c], buf, st, pd, grid, plane, runs)
        gi = g[b, c]
        for od in range(gi.shape[0]):
            for oh in range(gi.shape[1]):
                base = (od * grid[1] + oh) * grid[2]
                row = gi[od, oh]
                dst = acc[base:base + gi.shape[2]]
                for ow in range(gi.shape[2]):
                    dst[ow] = row[ow]
        for t in range(starts.shape[0]):
            src = buf[starts[t]:starts[t] + n]
            total = zero
            for q in range(n):
                total += acc[q] * src[q]
            dw[c, t] += total


_fill_jit = _compile(_fill)
_drain_jit = _compile(_drain)
_conv_pairs_jit = _compile(_conv_pairs)
_input_grad_pairs_jit = _compile(_input_grad_pairs)
_weight_grad_pairs_jit = _compile(_weight_grad_pairs)


# --- the Python side: shapes to 3-d, chunks, deadline checks ------------------------------

def _three(t, fill=1):
    """A spatial tuple as 3 values, leading `fill`s."""
    return (fill,) * (3 - len(t)) + tuple(t)


class Layout(NamedTuple):
    strides: tuple  # 3 values
    begin: tuple  # begin pads, 3 values
    grid: tuple  # positions per axis of each phase: ceil(padded / stride)
    runs: np.ndarray  # per phase of the last axis: (first input index, its grid index, count)
    starts: np.ndarray  # per kernel offset (row-major): where its run starts in the rows
    n: int  # grid positions computed: up to the last real output, rounded up to VECTOR
    rows: int  # elements of one plane's phase rows (all phases, and the tail)
    grid_size: int  # elements of the grid (the accumulator): at least n


def layout(spatial, kernel, strides, pads, dilations) -> Layout:
    d = len(spatial)
    st, dl = _three(strides), _three(dilations)
    begin = _three(pads[:d], 0)
    padded = _three([s + pads[i] + pads[d + i] for i, s in enumerate(spatial)])
    grid = tuple(-(-p // s) for p, s in zip(padded, st))
    out = [(p - q * (k - 1) - 1) // s + 1 for p, k, s, q in zip(padded, _three(kernel), st, dl)]
    plane = prod(grid)
    steps = (grid[1] * grid[2], grid[2], 1)
    starts = []
    for offset in itertools.product(*[range(k) for k in _three(kernel)]):
        at = [o * q for o, q in zip(offset, dl)]
        phase = ((at[0] % st[0]) * st[1] + at[1] % st[1]) * st[2] + at[2] % st[2]
        starts.append(phase * plane + sum((a // s) * m for a, s, m in zip(at, st, steps)))
    n = 0 if min(out) < 1 else ((out[0] - 1) * grid[1] + out[1] - 1) * grid[2] + out[2]
    n = -(-n // VECTOR) * VECTOR  # whole vectors: no scalar remainder per tap (the extra
    # positions are not outputs; the transposes hold zeros there)
    width, s2 = _three(spatial)[2], st[2]
    runs = np.array([((ph - begin[2]) % s2, ((ph - begin[2]) % s2 + begin[2]) // s2,
                      max(0, -(-(width - (ph - begin[2]) % s2) // s2))) for ph in range(s2)],
                    np.int64).reshape(s2, 3)
    return Layout(st, begin, grid, runs, np.array(starts, np.int64), n,
                  max(prod(st) * plane, max(starts) + n), max(plane, n))


def _as5(a, lead):
    """a (*lead, *spatial) contiguous with 3 spatial axes."""
    a = np.ascontiguousarray(a)
    return a.reshape(a.shape[:lead] + _three(a.shape[lead:]))


def chunk(pair_flops) -> int:
    """(image, channel) pairs per call of a compiled loop."""
    return max(1, CHUNK_FLOPS // max(pair_flops, 1))


def _chunks(pairs, step):
    for lo in range(0, pairs, step):
        iteration()
        yield lo, min(pairs, lo + step)


def _scratch(lay: Layout, dtype):
    return np.empty(lay.rows, dtype), np.empty(lay.grid_size, dtype)


def _pair_flops(lay: Layout):
    return 2 * lay.n * len(lay.starts)


def conv(x, w, strides, pads, dilations, out):
    """x (B, C, *S), w (k, C, 1, *kernel) -> (k, B, C, *out) (see depthwise.conv)."""
    k, c = w.shape[:2]
    b = x.shape[0]
    dtype = np.result_type(x, w)
    lay = layout(x.shape[2:], w.shape[3:], strides, pads, dilations)
    res = np.empty((k, b, c) + tuple(out), dtype)
    if lay.n == 0 or b * c == 0:
        return res
    x5 = _as5(x.astype(dtype, copy=False), 2)
    w3 = np.ascontiguousarray(w.astype(dtype, copy=False)).reshape(k, c, len(lay.starts))
    r6 = res.reshape((k, b, c) + _three(out))
    buf, acc = _scratch(lay, dtype)
    step = chunk(_pair_flops(lay))
    for j in range(k):
        for lo, hi in _chunks(b * c, step):
            _conv_pairs_jit(x5, w3[j], r6[j], lo, hi, lay.strides, lay.begin, lay.grid,
                            lay.runs, lay.starts, lay.n, buf, acc)
    return res


def input_grad(g, w, spatial, strides, pads, dilations):
    """The transpose of conv in x: g (B, C, *out), w (C, 1, *kernel) -> (B, C, *S)."""
    b, c = g.shape[:2]
    dtype = np.result_type(g, w)
    lay = layout(spatial, w.shape[2:], strides, pads, dilations)
    if lay.n == 0 or b * c == 0 or 0 in spatial:
        return np.zeros((b, c) + tuple(spatial), dtype)
    dx = np.empty((b, c) + tuple(spatial), dtype)
    g5 = _as5(g.astype(dtype, copy=False), 2)
    w2 = np.ascontiguousarray(w.astype(dtype, copy=False)).reshape(c, len(lay.starts))
    d5 = dx.reshape((b, c) + _three(spatial))
    buf, acc = _scratch(lay, dtype)
    for lo, hi in _chunks(b * c, chunk(_pair_flops(lay))):
        _input_grad_pairs_jit(g5, w2, d5, lo, hi, lay.strides, lay.begin, lay.grid,
                              lay.runs, lay.starts, lay.n, buf, acc)
    return dx


def weight_grad(g, x, kernel, strides, pads, dilations):
    """The transpose of conv in w: g (k, B, C, *out), x (B, C, *S) -> (k, C, 1, *kernel)."""
    k, b, c = g.shape[:3]
    dtype = np.result_type(g, x)
    lay = layout(x.shape[2:], kernel, strides, pads, dilations)
    dw = np.zeros((k, c, 1) + tuple(kernel), dtype)
    if lay.n == 0 or b * c == 0:
        return dw
    g6 = _as5(g.astype(dtype, copy=False), 3)
    x5 = _as5(x.astype(dtype, copy=False), 2)
    d3 = dw.reshape(k, c, len(lay.starts))
    buf, acc = _scratch(lay, dtype)
    step = chunk(_pair_flops(lay))
    for j in range(k):
        for lo, hi in _chunks(b * c, step):
            _weight_grad_pairs_jit(g6[j], x5, d3[j], lo, hi, lay.strides, lay.begin,
                                   lay.grid, lay.runs, lay.starts, lay.n, buf, acc)
    return dw


def cost(mode, b, c, spatial, kernel, strides, pads, dilations):
    """(elements held beyond the inputs and the result, loop passes) of these kernels,
    per direction (as depthwise.cost): contiguous copies of the operands (x and the
    weight; for reverse the cotangent twice too), one plane's phase rows and grid (the
    scratch of a call), and a pass per chunk of (image, channel) pairs; reverse runs both
    transposes."""
    lay = layout(spatial, kernel, strides, pads, dilations)
    pairs = b * c
    passes = -(-pairs // chunk(_pair_flops(lay))) if lay.n else 0
    # and the taps' starts and the runs (int64: two elements of float32 each)
    scratch = lay.rows + lay.grid_size + 2 * len(lay.starts) + 6 * lay.strides[2]
    x_size, w_size = pairs * prod(spatial), c * prod(kernel)
    out = pairs * prod(lay.grid)  # at least the output's elements
    if mode in ("values", "forward"):
        return x_size + w_size + scratch, passes
    return x_size + 2 * out + 2 * w_size + 2 * scratch, 2 * passes


def warm_up():
    """Compile (or load from the cache) every kernel for float32 and float64."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in (np.float32, np.float64):
            x = np.ones((1, 2, 3, 3), dtype)
            w = np.ones((1, 2, 1, 2, 2), dtype)
            geometry = ((1, 1), (0, 0, 0, 0), (1, 1))
            y = conv(x, w, *geometry, (2, 2))
            input_grad(y[0], w[0], (3, 3), *geometry)
            weight_grad(y, x, (2, 2), *geometry)
