"""Direct kernels: a row's eval or vjp at fixed shapes, written as the NumPy calls the
row itself makes at those shapes, for a sweep generated once per set of shapes and run
many times (a training call's, engine/losses.py and engine/sweeps.py's
compiled_reverse). At a dense layer's sizes a row's own wrapper (blocked.matmul's size
test, matmul's rank dispatch, unbroadcast's axis search, a lambda) costs a third to a
half of its NumPy call; here those decisions are taken once, from the shapes.

A kernel is source text over numbered operands: `{0}`, `{1}` the step's inputs, `{g}`
the cotangent of its output, `{ans}` its output, and the names in ENV (NumPy's own
functions). Only integers and fixed text enter it. Each is the row's own arithmetic
(the same calls in the same order: the same bits), which tests/engine/test_sgd.py
checks against the row for every form below; an op or a form not listed runs its row.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .blocked import unblocked

_add_reduce, _max_reduce = np.add.reduce, np.maximum.reduce


def _log_softmax_eval(x, axis):
    """ops/nn.py's _log_softmax: the same reductions (what ndarray.max and .sum call),
    without the methods' Python wrappers."""
    z = x - _max_reduce(x, axis, None, None, True)
    return z - np.log(_add_reduce(np.exp(z), axis, None, None, True))


# (add.reduce: what ndarray.sum calls, without its Python wrapper)
ENV = {"matmul": np.matmul, "add": np.add, "maximum": np.maximum, "exp": np.exp,
       "add_reduce": _add_reduce, "log_softmax_": _log_softmax_eval}


class Kernels(NamedTuple):
    eval: str | None  # the output from the inputs, or None: the row's eval
    vjps: dict  # input position -> its cotangent from g (one direction); absent: the row's


def kernels(op: str, attrs: dict, shapes: list, out: tuple) -> Kernels | None:
    """The direct kernels of one step of op `op` (attributes `attrs`) whose inputs have
    `shapes` and whose output has shape `out`, for one seed direction; None: none."""
    make = _FORMS.get(op)
    return None if make is None else make(attrs, shapes, out)


def _matmul(attrs, shapes, out):
    a, b = shapes
    if len(a) != 2 or len(b) != 2:
        return None
    g = (1,) + out
    return Kernels("matmul({0}, {1})" if unblocked(a, b) else None,
                   {pos: src for pos, src, ok in (
                       (0, "matmul({g}, {1}.T)", unblocked(g, b[::-1])),
                       (1, "matmul({0}.T, {g})", unblocked(a[::-1], g))) if ok})


def _unbroadcast(shape, out) -> str:
    """shapes.unbroadcast(g, shape) for g of shape (1,) + out."""
    if out == shape:
        return "{g}"
    src, extra = "{g}", len(out) - len(shape)
    if extra > 0:
        src = f"add_reduce({src}, {tuple(range(1, 1 + extra))})"
    kept = out[extra:]
    axes = tuple(i + 1 for i, d in enumerate(shape) if d == 1 and kept[i] != 1)
    if axes:
        src = f"add_reduce({src}, {axes}, None, None, True)"
    return src


def _add(attrs, shapes, out):
    return Kernels("add({0}, {1})", {pos: _unbroadcast(shape, out)
                                     for pos, shape in enumerate(shapes)})


def _relu(attrs, shapes, out):
    return Kernels("maximum({0}, 0)", {0: "{g} * ({ans} > 0)"})


def _log_softmax(attrs, shapes, out):
    axis = int(attrs["axis"])
    return Kernels(f"log_softmax_({{0}}, {axis})",
                   {0: f"{{g}} - exp({{ans}}) * add_reduce({{g}}, {axis + 1}, None, None, "
                       "True)"})


_FORMS = {"matmul": _matmul, "add": _add, "relu": _relu, "log_softmax": _log_softmax}
