"""The op table: one row per op (and per interesting shape or attribute), driving the
per-op property tests in tests/engine/ (first and second order)."""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.engine import Graph, Input, Node, compile
from support.oracles import domains_for, random_inputs


K = 3  # directions per batched seed


class Row(NamedTuple):
    op: str
    shapes: tuple  # one shape per operand
    attrs: dict
    domains: tuple  # one oracles domain per operand

    @property
    def names(self):
        return tuple("abcdefgh"[:len(self.shapes)])

    @property
    def floats(self):
        """The operands that are floating (the others are bool or integer indices)."""
        return tuple(n for n, d in zip(self.names, self.domains)
                     if d != "bool" and not d.startswith("index"))

    @property
    def differentiable(self):
        return self.op not in NO_DERIVATIVE

    @property
    def id(self):
        shapes = "x".join(str(s).replace(" ", "") for s in self.shapes)
        attrs = ",".join(f"{k}={v}".replace(" ", "") for k, v in self.attrs.items())
        return f"{self.op}-{shapes}" + (f"-{attrs}" if attrs else "")


def row(op, *shapes, domains=None, **attrs):
    return Row(op, shapes, attrs, domains or domains_for(op, len(shapes)))


BROADCAST = [((2, 3), (2, 3)), ((3, 1), (1, 4)), ((2, 3), (3,)), ((), (2, 2))]


UNARY = ["neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf"]


COMPARISONS = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]


NO_DERIVATIVE = set(COMPARISONS)  # bool results


TABLE = [
    *[row(op, a, b) for op in ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
      for a, b in BROADCAST],
    row("sub", (2, 2), ()),
    row("pow", (2, 3), ()),
    *[row(op, (2, 3)) for op in UNARY],
    *[row(op, ()) for op in ("sin", "exp", "log", "relu", "sigmoid")],
    *[r for op in ("sum", "mean", "max", "min", "prod") for r in (
        row(op, (2, 3)),
        row(op, ()),
        row(op, (2, 3), axes=[0]),
        row(op, (2, 3), axes=[1], keepdims=True),
        row(op, (2, 3), axes=[-1]),
        row(op, (2, 3), keepdims=True),
        row(op, (2, 3, 4), axes=[0, 2]),
        row(op, (2, 3, 4), axes=[-3, -1], keepdims=True),
    )],
    row("reshape", (2, 3), shape=[3, 2]),
    row("reshape", (2, 3), shape=[-1]),
    row("reshape", (2, 3, 4), shape=[4, -1]),
    row("reshape", (6,), shape=[2, 1, 3]),
    row("reshape", (), shape=[1, 1]),
    row("reshape", (1, 1), shape=[]),
    row("transpose", (2, 3)),
    row("transpose", (2, 3, 4)),
    row("transpose", (2, 3, 4), perm=[1, 0, 2]),
    row("transpose", (2, 3, 4), perm=[2, 0, 1]),
    row("broadcast_to", (3,), shape=[2, 3]),
    row("broadcast_to", (3, 1), shape=[3, 4]),
    row("broadcast_to", (), shape=[2, 2]),
    row("broadcast_to", (1, 3), shape=[2, 2, 3]),
    row("concat", (2, 1), (2, 3), (2, 2), axis=1),
    row("concat", (1, 3), (2, 3)),
    row("concat", (2, 2), (2, 1), axis=-1),
    row("concat", (2, 3)),
    row("slice", (5,), starts=[1], stops=[4]),
    row("slice", (4, 5), starts=[-3, 1], stops=[-1, 100]),
    row("slice", (4, 5), starts=[-2], stops=[5], axes=[1]),
    row("slice", (3, 4, 5), starts=[1, -10], stops=[3, -1], axes=[2, 0]),
    row("matmul", (2, 3), (3, 4)),
    row("matmul", (3,), (3, 4)),
    row("matmul", (2, 3), (3,)),
    row("matmul", (3,), (3,)),
    row("matmul", (2, 3, 4), (4, 2)),
    row("matmul", (2, 2, 3), (2, 3, 2)),
    row("matmul", (2, 1, 2, 3), (3, 3, 2)),
    *[r for op in ("softmax", "log_softmax") for r in (
        row(op, (2, 3)),
        row(op, (2, 3), axis=0),
        row(op, (2, 3, 4), axis=1),
        row(op, (4,), axis=-1),
        # many short rows along the last axis (softmax reduces them across the rows)
        row(op, (70, 5)),
        row(op, (3, 30, 4), axis=-1),
    )],
    row("logsumexp", (2, 3)),
    row("logsumexp", (2, 3), axis=0, keepdims=True),
    row("logsumexp", (2, 3, 4), axis=-2),
    row("logsumexp", (4,)),
    *[row(op, a, b) for op in COMPARISONS for a, b in BROADCAST],
    row("where", (2, 3), (2, 3), (2, 3)),
    row("where", (3,), (2, 3), ()),
    row("where", (2, 1), (3,), (2, 3)),
    row("clip", (2, 3), min=-0.5, max=0.7),
    row("clip", (2, 3), min=0.25),
    row("clip", (2, 3), max=-0.25),
    row("clip", (2, 3)),
    row("cumsum", (5,), axis=0),
    row("cumsum", (2, 3, 4), axis=1, reverse=True),
    row("cumsum", (2, 3), axis=-1, exclusive=True),
    row("cumsum", (2, 3), axis=0, reverse=True, exclusive=True),
    row("pad", (3,), pads=[1, 2]),
    row("pad", (2, 3), pads=[0, 1, 2, 0], value=1.5),
    row("pad", (), pads=[]),
    row("take", (5,), (3,), domains=("real", "index:5")),
    row("take", (4, 3), (2, 2), domains=("real", "index:4")),
    row("take", (2, 3, 4), (), axis=-1, domains=("real", "index:4")),
    row("take", (3, 4), (6,), axis=1, domains=("real", "index32:4")),  # repeats
    row("take", (3, 2), (0,), domains=("real", "index:3")),
    row("cast", (2, 3), dtype="float64"),
    # conv: x (N, C, *S), w (O, C / groups, *K); 1-D, 2-D and 3-D
    row("conv", (2, 3, 7), (4, 3, 3)),
    row("conv", (1, 2, 8), (3, 2, 2), strides=[2], pads=[1, 2], dilations=[2]),
    row("conv", (2, 2, 5, 5), (3, 2, 3, 3)),
    row("conv", (1, 2, 6, 5), (2, 2, 3, 2), strides=[2, 1], pads=[1, 0, 2, 1]),
    row("conv", (1, 4, 5, 5), (6, 2, 2, 3), groups=2, dilations=[2, 1], pads=[0, 1, 1, 0]),
    row("conv", (2, 4, 4, 4), (4, 1, 3, 3), groups=4, pads=[1, 1, 1, 1]),  # depthwise
    row("conv", (2, 3, 5, 6), (6, 1, 3, 2), groups=3, strides=[2, 1], pads=[1, 0, 1, 1]),
    row("conv", (1, 2, 9), (4, 1, 3), groups=2, dilations=[3], pads=[2, 1]),  # 2 per channel
    row("conv", (1, 2, 4, 3, 4), (2, 2, 2, 2, 3), strides=[1, 2, 1], pads=[1, 0, 0, 0, 1, 1]),
    *[r for op in ("max_pool", "avg_pool") for r in (
        row(op, (2, 3, 6), kernel_shape=[2], strides=[2]),
        row(op, (1, 2, 5), kernel_shape=[3], pads=[1, 1]),
        row(op, (2, 2, 5, 5), kernel_shape=[2, 2]),
        row(op, (1, 2, 6, 5), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1]),
        row(op, (1, 1, 7, 7), kernel_shape=[2, 3], dilations=[2, 1], strides=[1, 2]),
        row(op, (1, 1, 4, 3, 4), kernel_shape=[2, 2, 2], pads=[1, 0, 0, 0, 1, 1]),
    )],
    row("avg_pool", (1, 2, 5), kernel_shape=[3], pads=[1, 1], count_include_pad=True),
    row("avg_pool", (1, 1, 6, 5), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 2, 1, 1],
        count_include_pad=True),
]


DIFFERENTIABLE = [r for r in TABLE if r.differentiable]


def table(rows=DIFFERENTIABLE):
    return pytest.mark.parametrize("r", rows, ids=[r.id for r in rows])


def setup(r, dtype="float64"):
    """The one-node graph y = op(a, b, ...) of row `r`, compiled, with inputs drawn for it."""
    rng = np.random.default_rng(zlib.crc32(r.id.encode()))
    inputs = random_inputs(rng, list(zip(r.names, r.shapes, r.domains)), dtype)
    graph = Graph([Input(n, inputs[n].dtype.name, s) for n, s in zip(r.names, r.shapes)],
                  [Node("y", r.op, r.names, r.attrs)], ["y"])
    return compile(graph), inputs, rng


def one_op(op, *args, **attrs):
    """Compile y = op(a, b, ...) for float64 `args`; return the plan and the inputs."""
    args = [np.asarray(a, np.float64) for a in args]
    names = "abcdefgh"[:len(args)]
    graph = Graph([Input(n, "float64", a.shape) for n, a in zip(names, args)],
                  [Node("y", op, list(names), attrs)], ["y"])
    return compile(graph), dict(zip(names, args))


def check_gradients(plan, inputs, want):
    """The derivative of sum(y) wrt each input equals want[name], by vjp and both Jacobians;
    and the jvp along all-ones tangents equals the Jacobian's row sums."""
    value = plan.evaluate(inputs)["y"]
    grads = plan.vjp(inputs, {"y": np.ones_like(value)}).cotangents
    for n, g in want.items():
        assert_allclose(grads[n], g, rtol=0, atol=1e-15, err_msg=f"vjp wrt {n}")
    for mode in ("forward", "reverse"):
        jac = plan.jacobian(inputs, mode=mode).jacobian
        for n, g in want.items():
            summed = jac["y", n].sum(axis=tuple(range(value.ndim)))
            assert_allclose(summed, g, rtol=0, atol=1e-15, err_msg=f"{mode} Jacobian wrt {n}")
    jac = plan.jacobian(inputs, mode="forward").jacobian
    ones = {n: np.ones_like(x) for n, x in inputs.items()}
    rows = sum(jac["y", n].reshape(value.shape + (-1,)).sum(axis=-1) for n in inputs)
    assert_allclose(plan.jvp(inputs, ones).tangents["y"], rows, rtol=0, atol=1e-15, err_msg="jvp")
