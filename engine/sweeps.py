"""The three sweeps over a Plan's prepared steps: values, forward mode, reverse mode.

Each is one flat loop (no recursion), so graph depth is bounded by memory only.
The loops special-case one and two inputs: for small tensors the interpreter's
own overhead is most of the cost, and building argument lists shows.

`check`, when given, is called before every CHUNK steps (so a long sweep can be
stopped between ops when its caller is gone) and stops the sweep by raising.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np


class Step(NamedTuple):
    node: str
    op: str
    eval: Callable
    jvp: Callable
    vjp: Callable
    ins: tuple  # input slots
    out: int  # output slot
    free: tuple = ()  # slots last used here (not outputs): freed after the step
    drop: tuple = ()  # of those, the ones no vjp reads: only their shape is kept


CHUNK = 64


def _chunks(steps, check):
    """The steps in chunks, calling `check` before each (no cost per step)."""
    if check is None:
        return (steps,)
    return _checked_chunks(steps, check)


def _checked_chunks(steps, check):
    for start in range(0, len(steps), CHUNK):
        check()
        yield steps[start:start + CHUNK]


class Stub(NamedTuple):
    """What the reverse sweep keeps of a value no vjp reads: its shape."""

    shape: tuple
    dtype: np.dtype
    ndim: int


def _args(vals, ins):
    n = len(ins)
    if n == 1:
        return (vals[ins[0]],)
    if n == 2:
        return (vals[ins[0]], vals[ins[1]])
    return tuple([vals[i] for i in ins])


def values_sweep(steps, vals, check=None):
    for chunk in _chunks(steps, check):
        for _, _, ev, _, _, ins, out, free, _ in chunk:
            vals[out] = ev(*_args(vals, ins))
            for s in free:
                vals[s] = None


def forward_sweep(steps, vals, tans, check=None):
    """Values and tangents in one sweep; a node with no tangent in is skipped."""
    for chunk in _chunks(steps, check):
        for _, _, ev, jvp, _, ins, out, free, _ in chunk:
            xs = _args(vals, ins)
            ans = vals[out] = ev(*xs)
            ts = _args(tans, ins)
            for t in ts:
                if t is not None:
                    tans[out] = jvp(ts, xs, ans)
                    break
            for s in free:
                vals[s] = tans[s] = None


def reverse_sweep(steps, vals, seeds, needs, check=None):
    """Values forward (keeping what the vjps read), then cotangents backward,
    summed where a value fans out. `needs[j]` lists the input positions of step
    j that lead back to a differentiated input. Returns the cotangent per slot."""
    for chunk in _chunks(steps, check):
        for _, _, ev, _, _, ins, out, _, drop in chunk:
            vals[out] = ev(*_args(vals, ins))
            for s in drop:
                v = vals[s]
                vals[s] = Stub(v.shape, v.dtype, v.ndim)
    cots = [None] * len(vals)
    for s, g in seeds.items():
        cots[s] = g
    for j in range(len(steps) - 1, -1, -1):
        if check is not None and j % CHUNK == 0:
            check()
        positions = needs[j]
        if not positions:
            continue
        _, _, _, _, vjp, ins, out, _, _ = steps[j]
        g = cots[out]
        if g is None:
            continue
        cots[out] = None
        xs = _args(vals, ins)
        ans = vals[out]
        for pos in positions:
            gi = vjp(pos, g, xs, ans)
            i = ins[pos]
            prev = cots[i]
            cots[i] = gi if prev is None else prev + gi
    return cots
