"""Every op, from one table: JVP against finite differences, the VJP dot-product test,
forward == reverse Jacobians, values against NumPy, dtypes; plus the kink and tie
conventions (PyTorch's). Adding an op to the engine means adding a row to
support/op_table.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.engine import OPS, Graph, Input, Node, compile
from support.op_table import (DIFFERENTIABLE, K, TABLE, check_gradients, one_op, setup,
                              table)
from support.oracles import dot, numeric_jacobian, numeric_jvp, random_inputs, reference


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
