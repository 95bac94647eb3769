"""Matrix products that stop part-way when their caller's deadline passes."""

from __future__ import annotations

from math import prod

import numpy as np

from .sweeps import checkpoint

# A product larger than this runs in blocks of rows, with the sweep's cancellation
# check between them: about 2 GFLOP, tens of milliseconds on these machines.
BLOCK_FLOPS = 1 << 31


def matmul(a, b):
    """np.matmul, split into blocks of a's rows with a checkpoint() between them
    when the product is large, so that a deadline stops it part-way."""
    if a.ndim < 2:
        return np.matmul(a, b)
    m = a.shape[-2]
    work = 2 * max(a.size * (b.shape[-1] if b.ndim > 1 else 1), b.size * m)
    if work <= BLOCK_FLOPS or m < 2:
        return np.matmul(a, b)
    rows = max(1, m * BLOCK_FLOPS // work)
    first = np.matmul(a[..., :rows, :], b)
    if b.ndim > 1:
        out = np.empty(first.shape[:-2] + (m, first.shape[-1]), first.dtype)
        out[..., :rows, :] = first
    else:
        out = np.empty(first.shape[:-1] + (m,), first.dtype)
        out[..., :rows] = first
    for start in range(rows, m, rows):
        checkpoint()
        stop = min(start + rows, m)
        if b.ndim > 1:
            np.matmul(a[..., start:stop, :], b, out=out[..., start:stop, :])
        else:
            np.matmul(a[..., start:stop, :], b, out=out[..., start:stop])
    return out


def unblocked(a_shape: tuple, b_shape: tuple) -> bool:
    """Whether matmul(a, b) at these shapes is one np.matmul (no blocks): its own test."""
    if len(a_shape) < 2:
        return True
    m = a_shape[-2]
    work = 2 * max(prod(a_shape) * (b_shape[-1] if len(b_shape) > 1 else 1),
                   prod(b_shape) * m)
    return work <= BLOCK_FLOPS or m < 2
