"""Shape helpers shared by the op table: broadcasting, axes, seeds.

Static shapes are tuples whose entries are ints or None (a dimension whose
size is only known at run time). Seeds (tangents and cotangents) carry one
leading axis of directions, so an array seeding a value of shape S has shape
(k,) + S.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .errors import RuleError

Shape = tuple  # of int | None


def fmt_shape(shape: Sequence) -> str:
    """(3, 4) / (?, 4) / () as a person reads it."""
    dims = ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def broadcast_shapes(*shapes: Shape) -> Shape:
    """NumPy broadcasting over static shapes; None broadcasts optimistically."""
    ndim = max(len(s) for s in shapes)
    out = []
    for axis in range(-ndim, 0):
        dim = 1
        for s in shapes:
            d = s[axis] if -axis <= len(s) else 1
            if d == 1 or d == dim:
                continue
            if dim == 1:
                dim = d
            elif d is None:
                continue
            elif dim is None:
                dim = d
            else:
                raise RuleError("shapes " + " and ".join(fmt_shape(x) for x in shapes)
                                + " do not broadcast")
        out.append(dim)
    return tuple(out)


def num_elements(shape: Sequence) -> int | None:
    n = 1
    for d in shape:
        if d is None:
            return None
        n *= d
    return n


# NumPy refuses a shape whose dimensions, zeros left out, multiply past what it can
# index ("array is too big"), even when a zero dimension makes the array empty.
MAX_SPAN = 1 << 59


def span(shape) -> int:
    """The product of the dimensions with zeros (and unknown ones) counted as 1."""
    n = 1
    for d in shape:
        if d:
            n *= d
    return n


# The largest rank of a value. NumPy arrays have at most 64 axes; a seed adds one
# axis of directions and a Jacobian block has the rank of its output plus its
# input's, so values stay at 32 or fewer for every derivative to fit.
MAX_RANK = 32


def check_shape(shape, field: str | None = None) -> None:
    """A shape NumPy can hold, with room for derivatives (MAX_SPAN, MAX_RANK)."""
    if len(shape) > MAX_RANK:
        raise RuleError(f"rank {len(shape)} is over the maximum of {MAX_RANK}", field)
    if span(shape) > MAX_SPAN:
        raise RuleError(f"shape {fmt_shape(shape)} is too large for an array "
                        f"(its non-zero dimensions multiply past 2^59)", field)


def normalize_axis(axis: int, ndim: int, field: str) -> int:
    if not -ndim <= axis < ndim:
        raise RuleError(f"axis {axis} is out of range for rank {ndim}", field)
    return axis % ndim


def normalize_axes(axes, ndim: int, field: str) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim))
    out = tuple(normalize_axis(a, ndim, field) for a in axes)
    if len(set(out)) != len(out):
        raise RuleError(f"repeated axis in {list(axes)}", field)
    return out


def lift(seed: np.ndarray, ndim: int) -> np.ndarray:
    """Insert unit axes after the direction axis so a seed broadcasts at rank `ndim`."""
    missing = ndim + 1 - seed.ndim
    if missing <= 0:
        return seed
    return seed.reshape(seed.shape[:1] + (1,) * missing + seed.shape[1:])


def unbroadcast(g: np.ndarray, shape: tuple) -> np.ndarray:
    """Sum a cotangent (k,) + broadcast shape back down to (k,) + `shape`."""
    if g.shape[1:] == shape:
        return g
    extra = g.ndim - 1 - len(shape)
    if extra > 0:
        g = g.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and g.shape[i + 1] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def fill_seed(seed: np.ndarray, shape: tuple) -> np.ndarray:
    """Broadcast a seed to the full (k,) + `shape` (a view, no copy)."""
    full = seed.shape[:1] + shape
    return seed if seed.shape == full else np.broadcast_to(lift(seed, len(shape)), full)
