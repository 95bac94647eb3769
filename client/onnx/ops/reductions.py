"""Reductions, softmax and cumulative sums."""

from __future__ import annotations

from ..registry import _out, converts
from .shapes import _axes


@converts("CumSum")
def _cumsum(imp, node, x, attrs):
    axis = int(imp.static(x[1], "axis").item())
    return imp.e.cumsum(x[0], axis, attrs.get("reverse", 0), attrs.get("exclusive", 0),
                        name=_out(node))


REDUCE_OPS = {"ReduceSum": "sum", "ReduceMean": "mean", "ReduceMax": "max", "ReduceMin": "min",
              "ReduceProd": "prod"}


@converts(*REDUCE_OPS, "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSumExp",
          "ReduceLogSum")
def _reduce(imp, node, x, attrs):
    axes = _axes(imp, node, x, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x[0]
        axes = None
    e, op, name = imp.e, node.op_type, _out(node)
    if op in REDUCE_OPS:
        return e.reduce(REDUCE_OPS[op], x[0], axes, keep, name=name)
    if op == "ReduceSumSquare":
        return e.reduce("sum", e.unary("square", x[0]), axes, keep, name=name)
    if op == "ReduceL1":
        return e.reduce("sum", e.unary("abs", x[0]), axes, keep, name=name)
    if op == "ReduceL2":
        return e.unary("sqrt", e.reduce("sum", e.unary("square", x[0]), axes, keep), name=name)
    if op == "ReduceLogSum":
        return e.unary("log", e.reduce("sum", x[0], axes, keep), name=name)
    # ReduceLogSumExp: max-shifted, as logsumexp (the engine's takes one axis)
    m = e.reduce("max", x[0], axes, True)
    s = e.reduce("sum", e.unary("exp", e.sub(x[0], m)), axes, keep)
    shift = m if keep else e.reduce("max", m, axes, False)
    return e.add(e.unary("log", s), shift, name=name)


@converts("Softmax", "LogSoftmax")
def _softmax(imp, node, x, attrs):
    op = "softmax" if node.op_type == "Softmax" else "log_softmax"
    return imp.e.softmax(op, x[0], attrs.get("axis", -1), name=_out(node))
