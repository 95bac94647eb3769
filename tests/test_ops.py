"""Every op, from one table: JVP against finite differences, the VJP dot-product test,
forward == reverse Jacobians, values against NumPy, dtypes; plus the kink and tie
conventions (PyTorch's). Adding an op to the engine means adding a row here.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.engine import OPS, Graph, Input, Node, compile
from oracles import domains_for, dot, numeric_jacobian, numeric_jvp, random_inputs, reference

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


def float_inputs(r, inputs):
    return {n: inputs[n] for n in r.floats}


def numpy_op(r):
    """Row `r` as a function of a dict of arrays, for the finite differences."""
    return lambda xs: {"y": reference(r.op, [xs[n] for n in r.names], r.attrs)}


# --- (a) to (e): one test per property, each over the whole table ---------------------


@table()
def test_jvp_matches_finite_differences(r):
    plan, inputs, rng = setup(r)
    out_shape = numpy_op(r)(inputs)["y"].shape
    tangents = {n: rng.standard_normal((K,) + x.shape) for n, x in float_inputs(r, inputs).items()}

    got = plan.jvp(inputs, tangents).tangents["y"]

    assert got.shape == (K,) + out_shape
    for i in range(K):
        want = numeric_jvp(numpy_op(r), inputs, {n: t[i] for n, t in tangents.items()})["y"]
        assert_allclose(got[i], want, rtol=1e-5, atol=1e-7, err_msg=f"direction {i}")
    single = plan.jvp(inputs, {n: t[0] for n, t in tangents.items()}).tangents["y"]
    assert_allclose(single, got[0], rtol=1e-12, atol=1e-14, err_msg="unbatched seed")
    last = r.floats[-1]  # the other inputs get no tangent: held fixed
    partial = plan.jvp(inputs, {last: tangents[last]}).tangents["y"]
    for i in range(K):
        want = numeric_jvp(numpy_op(r), inputs, {last: tangents[last][i]})["y"]
        assert_allclose(partial[i], want, rtol=1e-5, atol=1e-7,
                        err_msg=f"only {last}, direction {i}")


@table()
def test_vjp_dot_product(r):
    plan, inputs, rng = setup(r)
    out_shape = numpy_op(r)(inputs)["y"].shape
    floats = float_inputs(r, inputs)
    tangents = {n: rng.standard_normal((K,) + x.shape) for n, x in floats.items()}
    cotangents = {"y": rng.standard_normal((K,) + out_shape)}

    before = {**{n: x.copy() for n, x in inputs.items()},
              **{f"t{n}": t.copy() for n, t in tangents.items()}, "c": cotangents["y"].copy()}
    jt = plan.jvp(inputs, tangents).tangents
    jtc = plan.vjp(inputs, cotangents).cotangents

    after = {**inputs, **{f"t{n}": t for n, t in tangents.items()}, "c": cotangents["y"]}
    for key, value in before.items():
        assert_array_equal(after[key], value, err_msg=f"{key} was modified")

    assert set(jtc) == set(floats)
    for n, x in floats.items():
        assert jtc[n].shape == (K,) + x.shape, n
    assert_allclose(dot(cotangents, jt, batched=True), dot(jtc, tangents, batched=True),
                    rtol=1e-10, atol=1e-12)
    single = plan.vjp(inputs, {"y": cotangents["y"][0]}).cotangents
    for n in floats:
        assert_allclose(single[n], jtc[n][0], rtol=1e-12, atol=1e-14, err_msg=f"unbatched {n}")
    last = r.floats[-1]
    only = plan.vjp(inputs, cotangents, wrt=[last]).cotangents
    assert set(only) == {last}
    assert_allclose(only[last], jtc[last], rtol=1e-12, atol=1e-14, err_msg=f"wrt=[{last}]")


@table()
def test_forward_and_reverse_jacobians_agree(r):
    plan, inputs, _ = setup(r)
    out_shape = numpy_op(r)(inputs)["y"].shape

    forward = plan.jacobian(inputs, mode="forward")
    reverse = plan.jacobian(inputs, mode="reverse")

    assert (forward.mode, reverse.mode) == ("forward", "reverse")
    assert set(forward.jacobian) == set(reverse.jacobian) == {("y", n) for n in r.floats}
    for n, x in float_inputs(r, inputs).items():
        assert forward.jacobian["y", n].shape == out_shape + x.shape, n
        assert_allclose(forward.jacobian["y", n], reverse.jacobian["y", n],
                        rtol=1e-10, atol=1e-12, err_msg=n)
    first = r.floats[0]
    for mode in ("forward", "reverse"):
        only = plan.jacobian(inputs, wrt=[first], of=["y"], mode=mode).jacobian
        assert set(only) == {("y", first)}
        assert_allclose(only["y", first], forward.jacobian["y", first], rtol=1e-10, atol=1e-12,
                        err_msg=f"{mode}, wrt=[{first}]")


@table(TABLE)
def test_evaluate_matches_numpy(r):
    plan, inputs, _ = setup(r)

    got = plan.evaluate(inputs)["y"]

    want = numpy_op(r)(inputs)["y"]
    assert got.dtype == (np.float64 if r.differentiable else np.bool_)
    assert got.shape == want.shape
    assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_table_covers_every_op():
    in_table = {r.op for r in TABLE}
    assert not set(OPS) - in_table, f"ops without a row in TABLE: {sorted(set(OPS) - in_table)}"
    assert not in_table - set(OPS), f"rows for ops the engine lacks: {sorted(in_table - set(OPS))}"


@pytest.mark.parametrize("op", sorted({r.op for r in TABLE}))
def test_op_table_arity_and_attrs_match_rows(op):
    opdef = OPS[op]
    attr_names = {getattr(a, "name", a) for a in opdef.attrs}
    for r in (r for r in TABLE if r.op == op):
        assert opdef.arity is None or opdef.arity == len(r.shapes), r.id
        assert set(r.attrs) <= attr_names, r.id
    assert (opdef.arity is None) == (op == "concat")


def strided_readonly(x):
    """The same values as a non-contiguous (for ndim >= 1), read-only array."""
    view = np.repeat(np.asarray(x)[..., None], 2, axis=-1)[..., 0]
    view.setflags(write=False)
    return view


@table()
def test_strided_readonly_arguments(r):
    plan, inputs, rng = setup(r)
    tangents = {n: rng.standard_normal((K,) + x.shape) for n, x in float_inputs(r, inputs).items()}
    cotangents = {"y": rng.standard_normal((K,) + plan.evaluate(inputs)["y"].shape)}
    views = {n: strided_readonly(x) for n, x in inputs.items()}
    t_views = {n: strided_readonly(t) for n, t in tangents.items()}
    c_views = {"y": strided_readonly(cotangents["y"])}

    pairs = [
        (plan.evaluate(views)["y"], plan.evaluate(inputs)["y"]),
        (plan.jvp(views, t_views).tangents["y"], plan.jvp(inputs, tangents).tangents["y"]),
        *zip(plan.vjp(views, c_views).cotangents.values(),
             plan.vjp(inputs, cotangents).cotangents.values()),
        *zip(plan.jacobian(views, mode="reverse").jacobian.values(),
             plan.jacobian(inputs, mode="reverse").jacobian.values()),
    ]
    for got, want in pairs:
        assert_allclose(got, want, rtol=1e-12, atol=1e-14)


@table()
def test_results_do_not_alias_later_calls(r):
    """Writing into a returned array (where it is writable) changes no later result."""
    plan, inputs, _ = setup(r)
    for mode in ("forward", "reverse"):
        first = plan.jacobian(inputs, mode=mode).jacobian
        want = {key: block.copy() for key, block in first.items()}
        for block in first.values():
            if block.flags.writeable:
                block[...] = 12345.0
        again = plan.jacobian(inputs, mode=mode).jacobian
        for key, block in again.items():
            assert_array_equal(block, want[key], err_msg=f"{mode} {key}")


# Graphs where one value feeds several consumers, through broadcasting, reductions and
# shape ops: reverse mode must sum the cotangents, forward mode carry every path.
FAN_OUT = [
    ("sum-and-sin", [("s", "sum", ["x"], {"axes": [0]}), ("q", "sin", ["x"], {}),
                     ("y", "add", ["q", "s"], {})]),
    ("broadcast-twice", [("b", "broadcast_to", ["v"], {"shape": [2, 3]}),
                         ("p", "mul", ["b", "b"], {}), ("y", "add", ["p", "v"], {})]),
    ("reshape-transpose-slice", [("t", "transpose", ["x"], {}),
                                 ("r", "reshape", ["t"], {"shape": [2, 3]}),
                                 ("c", "slice", ["x"], {"starts": [0, 1], "stops": [2, 3]}),
                                 ("m", "mul", ["r", "x"], {}),
                                 ("y", "concat", ["m", "c", "x"], {"axis": 1})]),
    ("mean-max-logsumexp", [("a", "mean", ["x"], {"axes": [1], "keepdims": True}),
                            ("b", "max", ["x"], {"axes": [-1], "keepdims": True}),
                            ("l", "logsumexp", ["x"], {"axis": 1, "keepdims": True}),
                            ("d", "sub", ["x", "a"], {}), ("e", "mul", ["d", "b"], {}),
                            ("y", "add", ["e", "l"], {})]),
    ("matmul-softmax", [("m", "matmul", ["x", "w"], {}), ("s", "softmax", ["m"], {"axis": 0}),
                        ("g", "log_softmax", ["m"], {}), ("y", "mul", ["s", "g"], {})]),
    ("same-input-twice", [("y", "matmul", ["w", "w"], {})]),
]
FAN_OUT_INPUTS = {"x": (2, 3), "v": (3,), "w": (3, 3)}


@pytest.mark.parametrize("nodes", [c[1] for c in FAN_OUT], ids=[c[0] for c in FAN_OUT])
def test_fan_out(nodes):
    used = sorted({a for _, _, args, _ in nodes for a in args if a in FAN_OUT_INPUTS})
    rng = np.random.default_rng(7)
    inputs = random_inputs(rng, [(n, FAN_OUT_INPUTS[n], "distinct") for n in used])
    graph = Graph([Input(n, "float64", FAN_OUT_INPUTS[n]) for n in used],
                  [Node(*spec) for spec in nodes], ["y"])

    def numpy_graph(xs):
        values = dict(xs)
        for name, op, args, attrs in nodes:
            values[name] = reference(op, [values[a] for a in args], attrs)
        return {"y": values["y"]}

    plan = compile(graph)
    forward = plan.jacobian(inputs, mode="forward").jacobian
    reverse = plan.jacobian(inputs, mode="reverse").jacobian
    numeric = numeric_jacobian(numpy_graph, inputs)
    for key, want in numeric.items():
        assert_allclose(forward[key], want, rtol=1e-5, atol=1e-7, err_msg=f"forward {key}")
        assert_allclose(reverse[key], want, rtol=1e-5, atol=1e-7, err_msg=f"reverse {key}")


# --- float32 in, float32 out ------------------------------------------------------------


@table([r for r in DIFFERENTIABLE if r.op != "cast"])  # cast fixes its dtype: test_cast_*
def test_float32_stays_float32(r):
    plan, inputs, rng = setup(r, "float32")
    value = plan.evaluate(inputs)["y"]
    tangents = {n: rng.standard_normal((2,) + x.shape).astype(np.float32)
                for n, x in float_inputs(r, inputs).items()}
    cotangents = {"y": rng.standard_normal((2,) + value.shape).astype(np.float32)}

    assert value.dtype == np.float32
    wide = {n: x.astype(np.float64) if n in r.floats else x for n, x in inputs.items()}
    want = reference(r.op, [wide[n] for n in r.names], r.attrs)
    assert_allclose(value, want, rtol=1e-4, atol=1e-5)
    assert plan.jvp(inputs, tangents).tangents["y"].dtype == np.float32
    for n, g in plan.vjp(inputs, cotangents).cotangents.items():
        assert g.dtype == np.float32, n
    plan64 = setup(r)[0]
    for mode in ("forward", "reverse"):
        want = plan64.jacobian(wide, mode=mode).jacobian
        for key, block in plan.jacobian(inputs, mode=mode).jacobian.items():
            assert block.dtype == np.float32, (mode, key)
            assert_allclose(block, want[key], rtol=1e-4, atol=1e-5, err_msg=f"{mode} {key}")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op", ["sigmoid", "softplus", "tanh", "logsumexp", "softmax",
                                "log_softmax"])
def test_extreme_inputs_give_finite_values_and_derivatives(op, dtype):
    x = np.array([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype)
    plan = compile(Graph([Input("a", dtype, (5,))], [Node("y", op, ["a"])], ["y"]))
    assert np.all(np.isfinite(plan.evaluate({"a": x})["y"]))
    for mode in ("forward", "reverse"):
        assert np.all(np.isfinite(plan.jacobian({"a": x}, mode=mode).jacobian["y", "a"])), mode


# --- derivatives at kinks and ties follow PyTorch ---------------------------------------


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


@pytest.mark.parametrize("op, slope", [("relu", [0.0, 0.0, 1.0]), ("abs", [-1.0, 0.0, 1.0])])
def test_derivative_at_kink_is_zero(op, slope):
    plan, inputs = one_op(op, [-1.0, 0.0, 2.0])
    for mode in ("forward", "reverse"):
        assert_array_equal(plan.jacobian(inputs, mode=mode).jacobian["y", "a"], np.diag(slope))
    check_gradients(plan, inputs, {"a": slope})


@pytest.mark.parametrize("op, a, b, da, db", [
    ("maximum", [1.0, 2.0, 3.0], [1.0, 0.0, 5.0], [0.5, 1.0, 0.0], [0.5, 0.0, 1.0]),
    ("minimum", [1.0, 2.0, 3.0], [1.0, 0.0, 5.0], [0.5, 0.0, 1.0], [0.5, 1.0, 0.0]),
    ("maximum", [1.0, 1.0, 0.0], 1.0, [0.5, 0.5, 0.0], 2.0),
    ("minimum", 2.0, [2.0, 3.0], 1.5, [0.5, 0.0]),
])
def test_elementwise_tie_splits_in_half(op, a, b, da, db):
    plan, inputs = one_op(op, a, b)
    check_gradients(plan, inputs, {"a": da, "b": db})


@pytest.mark.parametrize("x, attrs, grad", [
    ([3.0, 1.0, 3.0], {}, [0.5, 0.0, 0.5]),
    ([2.0, 2.0, 2.0], {}, [1 / 3, 1 / 3, 1 / 3]),
    ([[1.0, 1.0], [2.0, 0.0]], {"axes": [1]}, [[0.5, 0.5], [1.0, 0.0]]),
    ([[1.0, 1.0], [2.0, 0.0]], {"axes": [-1], "keepdims": True}, [[0.5, 0.5], [1.0, 0.0]]),
    ([[4.0, 1.0], [4.0, 4.0]], {}, [[1 / 3, 0.0], [1 / 3, 1 / 3]]),
])
def test_max_reduction_tie_shares_evenly(x, attrs, grad):
    plan, inputs = one_op("max", x, **attrs)
    check_gradients(plan, inputs, {"a": grad})
    # One direction through the tied elements: the mean of their tangents.
    t = np.arange(1.0, np.size(x) + 1).reshape(np.shape(x))
    want = reference("sum", [np.asarray(grad) * t], attrs)
    assert_allclose(plan.jvp(inputs, {"a": t}).tangents["y"], want, rtol=1e-15, atol=0)
