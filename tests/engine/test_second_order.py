"""Second order (Hessian-vector products and Hessians, forward-over-reverse).

Engine, per op from tests/support/op_table.py's table: HVPs against central differences of
the gradient in float64, symmetric Hessian blocks equal to HVPs along the identity,
batched vectors equal to single ones; prod with zeros; pow against PyTorch's double
backward where a <= 0; random graphs (tests/support/graphs.py's strategy) against
finite differences of gradients; limits and bad input. Over real gRPC: the client's
hvp and hessian by graph id and over the stream, scipy's trust-ncg on Rosenbrock
converging as with scipy's own derivatives, and bad input as INVALID_ARGUMENT naming
the field.
"""

from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from numpy.testing import assert_allclose

from gradserve.engine import (OPS, DifferentiationError, Graph, Input, InputError,
                              Node, ResourceLimitError, compile)
from gradserve.engine import second
from gradserve.engine.ops.table import UNSTATED, OpDef, no_cotangent, row
from support.graphs import SETTINGS, valid_graphs
from support.op_table import DIFFERENTIABLE, K, Row, table
from support.oracles import random_inputs

EPS = 1e-6


# --- engine: per op ----------------------------------------------------------------------


def test_every_op_with_a_derivative_states_its_curvature_in_its_row():
    assert [n for n, op in OPS.items() if op.curvature is UNSTATED] == []
    assert [n for n, op in OPS.items()
            if op.vjp is no_cotangent and (op.curvature, op.joint) != (None, None)] == []
    # the table refuses a row with a vjp and no word on its curvature
    with pytest.raises(TypeError, match="states no curvature"):
        row(OpDef("unstated", 1, lambda shapes, dtypes: shapes[0], lambda x: x,
                  lambda t, x, ans: t[0], lambda i, g, x, ans: g))
    assert "unstated" not in OPS


def scalar_setup(r: Row, dtype="float64"):
    """L = sum(y * y * c) with y = op(a, b, ...) and c a random constant shaped like y:
    the cotangent reaching the op is not all ones, and it has a tangent (so the op's vjp
    carries g and ġ together, besides its curvature term): plan, inputs, rng."""
    rng = np.random.default_rng(zlib.crc32(r.id.encode()))
    inputs = random_inputs(rng, list(zip(r.names, r.shapes, r.domains)), dtype)
    one = compile(Graph([Input(n, inputs[n].dtype.name, s) for n, s in zip(r.names, r.shapes)],
                        [Node("y", r.op, r.names, r.attrs)], ["y"]))
    y = one.evaluate(inputs)["y"]
    c = rng.uniform(0.5, 1.5, y.shape).astype(y.dtype)
    graph = Graph([Input(n, inputs[n].dtype.name, s) for n, s in zip(r.names, r.shapes)],
                  [Node("y", r.op, r.names, r.attrs), Node("yy", "mul", ["y", "y"]),
                   Node("p", "mul", ["yy", "weight"]), Node("L", "sum", ["p"])], ["L"],
                  {"weight": c})
    return compile(graph), inputs, rng


def gradient(plan, inputs, wrt):
    """The engine's first-order gradient (reverse mode, tested in test_ops.py)."""
    return plan.vjp(inputs, {"L": np.ones((), plan.dtypes["L"])}, wrt=wrt).cotangents


def numeric_hvp(plan, inputs, wrt, vectors, eps=EPS):
    """(grad(x + eps v) - grad(x - eps v)) / (2 eps), per wrt input."""
    plus = {n: x + eps * vectors[n] if n in vectors else x for n, x in inputs.items()}
    minus = {n: x - eps * vectors[n] if n in vectors else x for n, x in inputs.items()}
    gp, gm = gradient(plan, plus, wrt), gradient(plan, minus, wrt)
    return {n: (gp[n] - gm[n]) / (2 * eps) for n in wrt}


@pytest.mark.parametrize("stack", [False, True], ids=["separate", "stacked"])
@table()
def test_hvp_matches_finite_differences_of_the_gradient(r, stack, monkeypatch):
    # g and ġ go through the vjp stacked from second._STACK_FROM elements (larger than
    # these rows'), separately below: both ways for every op
    monkeypatch.setattr(second, "_STACK_FROM", 0 if stack else 1 << 62)
    plan, inputs, rng = scalar_setup(r)
    wrt = list(r.floats)
    vectors = {n: rng.standard_normal((K,) + inputs[n].shape) for n in wrt}

    got = plan.hvp(inputs, vectors, wrt=wrt)

    assert got.value.shape == () and got.value == plan.evaluate(inputs)["L"]
    want_grad = gradient(plan, inputs, wrt)
    for n in wrt:
        assert_allclose(got.gradient[n], want_grad[n], rtol=1e-12, atol=1e-14, err_msg=n)
        assert got.hvp[n].shape == (K,) + inputs[n].shape, n
    for i in range(K):
        want = numeric_hvp(plan, inputs, wrt, {n: v[i] for n, v in vectors.items()})
        for n in wrt:
            assert_allclose(got.hvp[n][i], want[n], rtol=1e-5, atol=1e-6,
                            err_msg=f"{n}, direction {i}")


@table()
def test_hessian_blocks_are_symmetric_and_equal_hvps(r):
    plan, inputs, rng = scalar_setup(r)
    wrt = list(r.floats)

    h = plan.hessian(inputs, wrt=wrt)

    sizes = {n: inputs[n].size for n in wrt}
    assert set(h.hessian) == {(a, b) for a in wrt for b in wrt}
    for (a, b), block in h.hessian.items():
        assert block.shape == inputs[a].shape + inputs[b].shape, (a, b)
        assert block.dtype == np.float64
        mirror = h.hessian[b, a].reshape(sizes[b], sizes[a]).T
        assert_allclose(block.reshape(sizes[a], sizes[b]), mirror, rtol=1e-9, atol=1e-10,
                        err_msg=f"H[{a},{b}] != H[{b},{a}]^T")
    assert "forward-over-reverse: one reverse sweep carrying" in h.decision.reason
    assert h.decision.n == sum(sizes.values())
    # column j of the Hessian is the HVP along the j-th unit vector
    for b in wrt:
        for j in range(min(sizes[b], 3)):
            unit = {n: np.zeros_like(inputs[n]) for n in wrt}
            unit[b].flat[j] = 1.0
            hv = plan.hvp(inputs, unit, wrt=wrt).hvp
            for a in wrt:
                column = h.hessian[a, b].reshape(sizes[a], sizes[b])[:, j]
                assert_allclose(hv[a].ravel(), column, rtol=1e-12, atol=1e-13,
                                err_msg=f"H[{a},{b}][:, {j}]")


@table()
def test_batched_vectors_equal_single_ones(r):
    plan, inputs, rng = scalar_setup(r)
    wrt = list(r.floats)
    vectors = {n: rng.standard_normal((K,) + inputs[n].shape) for n in wrt}

    batched = plan.hvp(inputs, vectors, wrt=wrt)

    for i in range(K):
        single = plan.hvp(inputs, {n: v[i] for n, v in vectors.items()}, wrt=wrt)
        for n in wrt:
            assert single.hvp[n].shape == inputs[n].shape
            assert_allclose(single.hvp[n], batched.hvp[n][i], rtol=1e-12, atol=1e-13,
                            err_msg=f"{n}, direction {i}")
            assert_allclose(single.gradient[n], batched.gradient[n], rtol=1e-12, atol=1e-13)


@table([r for r in DIFFERENTIABLE if r.op != "cast"])
def test_float32_stays_float32(r):
    plan32, inputs32, rng = scalar_setup(r, "float32")
    plan64, inputs64, _ = scalar_setup(r)
    wrt = list(r.floats)
    vectors = {n: rng.standard_normal(inputs32[n].shape) for n in wrt}

    got = plan32.hvp(inputs32, {n: v.astype(np.float32) for n, v in vectors.items()}, wrt=wrt)
    want = plan64.hvp(inputs64, vectors, wrt=wrt)

    for n in wrt:
        assert got.gradient[n].dtype == got.hvp[n].dtype == np.float32, n
        assert_allclose(got.hvp[n], want.hvp[n], rtol=2e-3, atol=2e-3, err_msg=n)
    for block in plan32.hessian(inputs32, wrt=wrt).hessian.values():
        assert block.dtype == np.float32


# --- prod with zeros, pow where a <= 0 ----------------------------------------------------


def one_op_loss(op, shapes, **attrs):
    names = "abcdefgh"[:len(shapes)]
    return compile(Graph([Input(n, "float64", s) for n, s in zip(names, shapes)],
                         [Node("y", op, list(names), attrs), Node("L", "sum", ["y"])], ["L"]))


@pytest.mark.parametrize("x", [
    [0.0, 2.0, -1.5, 0.5],  # one zero
    [0.0, 2.0, 0.0, 0.5],  # two zeros
    [0.0, 0.0, 0.0, 0.5],  # three zeros
    [[0.0, 1.5, 2.0], [0.0, 0.0, -1.0]],  # one zero in a slice, two in the other
])
def test_prod_with_zeros(x):
    x = np.array(x)
    plan = one_op_loss("prod", [x.shape], axes=[-1])
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4,) + x.shape)

    got = plan.hvp({"a": x}, {"a": vectors}).hvp["a"]

    # prod is a polynomial: central differences of its gradient are exact up to rounding
    for i in range(4):
        want = numeric_hvp(plan, {"a": x}, ["a"], {"a": vectors[i]}, eps=1e-5)["a"]
        assert_allclose(got[i], want, rtol=1e-7, atol=1e-7, err_msg=f"direction {i}")
    h = plan.hessian({"a": x}).hessian["a", "a"].reshape(x.size, x.size)
    assert_allclose(h, h.T, rtol=0, atol=0)


def test_pow_matches_pytorch_double_backward_where_the_base_is_zero_or_negative():
    """Equal to PyTorch's Hessian wherever PyTorch's is not NaN, except d2/da db at
    b == 0 and a > 0 (PyTorch 0, true value and ours 1/a: see curvature._pow_second);
    a negative base's NaN (log a) stays in its own element."""
    torch = pytest.importorskip("torch")
    a = np.array([0.0, 0.0, 0.0, 0.0, -1.5, -2.0, 1.5, 2.0, 0.0, 0.0, 0.5])
    b = np.array([0.0, 1.0, 2.0, 3.0, 2.0, 3.0, 0.0, 1.0, 0.5, -1.0, 2.5])
    plan = one_op_loss("pow", [a.shape, b.shape])
    with np.errstate(all="ignore"):
        h = plan.hessian({"a": a, "b": b}).hessian

    ta = torch.tensor(a, requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    hess = torch.autograd.functional.hessian(lambda x, y: (x ** y).sum(), (ta, tb))
    for (i, n), (j, m) in [((0, "a"), (0, "a")), ((0, "a"), (1, "b")), ((1, "b"), (0, "a")),
                           ((1, "b"), (1, "b"))]:
        want = hess[i][j].numpy().copy()
        if (n, m) == ("a", "b"):
            fix = (b == 0) & (a > 0)
            want[fix, fix] = 1 / a[fix]
        compared = ~np.isnan(want)
        assert_allclose(h[n, m][compared], want[compared], rtol=1e-12, atol=0,
                        err_msg=f"d2/d{n} d{m}")
    assert_allclose(np.diag(h["a", "a"])[4:6], [2.0, -12.0])  # (-1.5)^2, (-2)^3


# --- random graphs ---------------------------------------------------------------------------


@settings(SETTINGS, max_examples=60)
@given(valid_graphs())
def test_random_graph_hvps_match_finite_differences(case):
    graph, inputs = case
    # A scalar loss over every output: L = sum of sum(output)
    nodes, total = list(graph.nodes), None
    for i, o in enumerate(graph.outputs):
        nodes.append(Node(f"s{i}", "sum", [o]))
        if total is None:
            total = f"s{i}"
        else:
            nodes.append(Node(f"t{i}", "add", [total, f"s{i}"]))
            total = f"t{i}"
    nodes.append(Node("L", "mul", [total, "half"]))
    plan = compile(Graph(graph.inputs, nodes, ["L"], {"half": np.float64(0.5)}))
    wrt = list(inputs)
    rng = np.random.default_rng(len(nodes))
    vectors = {n: rng.standard_normal((2,) + np.shape(x)) for n, x in inputs.items()}

    got = plan.hvp(inputs, vectors)

    for i in range(2):
        want = numeric_hvp(plan, inputs, wrt, {n: v[i] for n, v in vectors.items()})
        for n in wrt:
            assert_allclose(got.hvp[n][i], want[n], rtol=1e-5, atol=1e-6,
                            err_msg=f"{n}, direction {i}")
    h = plan.hessian(inputs).hessian
    for (a, b), block in h.items():
        sa, sb = np.size(inputs[a]), np.size(inputs[b])
        assert_allclose(block.reshape(sa, sb), h[b, a].reshape(sb, sa).T, rtol=1e-9,
                        atol=1e-10)


# --- engine: requests, limits, bad input ------------------------------------------------------


def two_input_graph():
    """L = sum(tanh(W x)), a second output `v` (a vector) and an integer input."""
    return compile(Graph(
        [Input("W", "float64", (3, 4)), Input("x", "float64", (4,)), Input("i", "int64", ())],
        [Node("h", "matmul", ["W", "x"]), Node("t", "tanh", ["h"]), Node("L", "sum", ["t"]),
         Node("v", "mul", ["t", "t"])], ["L", "v"]))


def two_inputs(rng):
    return {"W": rng.standard_normal((3, 4)), "x": rng.standard_normal(4),
            "i": np.array(2, np.int64)}


def test_hvp_defaults_and_decision():
    plan = two_input_graph()
    rng = np.random.default_rng(0)
    inputs = two_inputs(rng)
    v = {"x": rng.standard_normal(4)}

    r = plan.hvp(inputs, v, of="L")  # wrt defaults to the vectors' names

    assert set(r.gradient) == set(r.hvp) == {"x"}
    assert set(r.outputs) == {"L", "v"}
    d = r.decision
    assert (d.mode, d.n, d.m) == ("forward", 4, 1)
    assert "forward-over-reverse: one reverse sweep carrying 1 tangent direction (" in d.reason
    assert "gradients" in d.reason
    assert d.cost_forward < d.cost_reverse
    h = plan.hessian(inputs, of=["L"], wrt=["x"])
    assert_allclose(h.hessian["x", "x"] @ v["x"], r.hvp["x"], rtol=1e-12, atol=1e-14)
    assert "carrying 4 tangent directions" in h.decision.reason


@pytest.mark.parametrize("kwargs, error, field", [
    ({}, DifferentiationError, "of"),  # two outputs: `of` must say which
    ({"of": "v"}, DifferentiationError, "of"),  # three elements
    ({"of": ["L", "v"]}, DifferentiationError, "of"),
    ({"of": "nope"}, DifferentiationError, "of"),
    ({"of": "L", "wrt": ["i"]}, DifferentiationError, "wrt"),  # integer wrt
    ({"of": "L", "wrt": ["h"]}, DifferentiationError, "wrt"),
])
def test_hessian_refuses_bad_requests(kwargs, error, field):
    plan = two_input_graph()
    inputs = two_inputs(np.random.default_rng(1))
    with pytest.raises(error) as info:
        plan.hessian(inputs, **kwargs)
    assert info.value.field == field
    with pytest.raises(error) as info:
        plan.hvp(inputs, {"x": np.ones(4)}, **{"wrt": ["x"], **kwargs})
    assert info.value.field == field


@pytest.mark.parametrize("vectors, wrt", [
    ({"x": np.ones(3)}, None),  # wrong shape
    ({"x": np.ones((2, 3))}, None),  # wrong shape, batched
    ({"x": np.ones(4, np.float32)}, None),  # wrong dtype
    ({"x": np.ones(4)}, ["x", "W"]),  # a wrt input without a vector
    ({"x": np.ones(4), "nope": np.ones(1)}, None),
    ({"x": np.ones(4), "W": np.ones((2, 3, 4))}, None),  # batched and unbatched mixed
    ({}, None),
])
def test_hvp_refuses_bad_vectors(vectors, wrt):
    plan = two_input_graph()
    with pytest.raises(InputError) as info:
        plan.hvp(two_inputs(np.random.default_rng(2)), vectors, of="L", wrt=wrt)
    assert info.value.field == "vectors"


def test_limits_are_checked_before_any_work():
    plan = two_input_graph()
    inputs = two_inputs(np.random.default_rng(3))
    with pytest.raises(ResourceLimitError) as info:
        plan.hessian(inputs, of="L", max_block_elements=100)  # W: 12 x 12 = 144
    assert info.value.field == "wrt"
    plan.hessian(inputs, of="L", max_block_elements=144)
    for limit in ("max_bytes", "max_flops", "max_reply_bytes"):
        with pytest.raises(ResourceLimitError):
            plan.hessian(inputs, of="L", **{limit: 100})
        with pytest.raises(ResourceLimitError):
            plan.hvp(inputs, {"x": np.ones((50, 4))}, of="L", **{limit: 100})
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise TimeoutError("stop")
    with pytest.raises(TimeoutError):
        plan.hvp(inputs, {"x": np.ones(4)}, of="L", check=check)


def test_hessian_mode():
    plan = two_input_graph()
    inputs = two_inputs(np.random.default_rng(4))
    a = plan.hessian(inputs, of="L", mode="forward-over-reverse").hessian
    b = plan.hessian(inputs, of="L").hessian
    for key in a:
        assert_allclose(a[key], b[key], rtol=0, atol=0)
    with pytest.raises(DifferentiationError) as info:
        plan.hessian(inputs, of="L", mode="reverse")
    assert info.value.field == "mode"


# --- over real gRPC ---------------------------------------------------------------------------


def rosenbrock(n):
    """f(x) = sum(100 (x[1:] - x[:-1]^2)^2 + (1 - x[:-1])^2), scipy's rosen."""
    from gradserve.client import GraphBuilder
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    head, tail = g.slice(x, [0], [n - 1]), g.slice(x, [1], [n])
    g.output("f", g.sum(100.0 * g.square(tail - g.square(head)) + g.square(1.0 - head)))
    return g


@pytest.mark.parametrize("n", [2, 10])
def test_trust_ncg_on_rosenbrock_converges_as_with_scipy_derivatives(client, n):
    from scipy.optimize import minimize, rosen, rosen_der, rosen_hess_prod
    graph = rosenbrock(n)
    graph_id = client.register(graph)
    calls = {"hvp": 0}

    def fun(x):
        return float(client.evaluate(graph_id, {"x": x})["f"])

    def jac(x):
        return np.array(client.grad(graph_id, {"x": x})["x"])

    def hessp(x, p):
        calls["hvp"] += 1
        return np.array(client.hvp(graph_id, {"x": x}, {"x": np.asarray(p, np.float64)})[1]["x"])

    x0 = np.array([-1.2, 1.0] * (n // 2))
    ours = minimize(fun, x0, method="trust-ncg", jac=jac, hessp=hessp)
    theirs = minimize(rosen, x0, method="trust-ncg", jac=rosen_der, hessp=rosen_hess_prod)

    assert ours.success and theirs.success
    assert ours.nit == theirs.nit
    assert (ours.nfev, ours.njev, ours.nhev) == (theirs.nfev, theirs.njev, theirs.nhev)
    assert_allclose(ours.x, theirs.x, rtol=1e-10, atol=1e-12)
    assert_allclose(ours.x, np.ones(n), atol=1e-5)
    assert calls["hvp"] > 0  # the products came from the service


def test_client_hvp_and_hessian_by_graph_id_and_over_the_stream(client):
    graph = rosenbrock(4)
    x = np.array([-1.2, 1.0, 0.5, 2.0])
    from scipy.optimize import rosen_der, rosen_hess
    want_h = rosen_hess(x)
    vectors = np.random.default_rng(5).standard_normal((3, 4))

    gradient, hvp = client.hvp(graph, {"x": x}, {"x": vectors}, of="f", wrt=["x"])
    blocks = client.hessian(client.register(graph), {"x": x})
    with client.stream(graph) as session:
        s_gradient, s_hvp = session.hvp({"x": x}, {"x": vectors[0]})
        s_blocks = session.hessian({"x": x}, of="f")
        first = session.differentiate({"x": x}).jacobian["f", "x"]  # first order still works

    assert_allclose(gradient["x"], rosen_der(x), rtol=1e-12)
    assert hvp["x"].shape == (3, 4)
    assert_allclose(hvp["x"], vectors @ want_h.T, rtol=1e-12, atol=1e-12)
    assert set(blocks) == {("x", "x")}
    assert_allclose(blocks["x", "x"], want_h, rtol=1e-12, atol=1e-12)
    assert_allclose(s_gradient["x"], rosen_der(x), rtol=1e-12)
    assert_allclose(s_hvp["x"], want_h @ vectors[0], rtol=1e-12, atol=1e-12)
    assert_allclose(s_blocks["x", "x"], want_h, rtol=1e-12, atol=1e-12)
    assert_allclose(first, rosen_der(x), rtol=1e-12)


def test_wire_reply_reports_the_decision(stub, client):
    from gradserve.v1 import gradient_service_pb2 as pb
    from gradserve.v1.codec import fill_tensors, from_tensor
    request = pb.DifferentiateRequest(graph_id=client.register(rosenbrock(3)))
    fill_tensors(request.inputs, {"x": np.array([0.5, 1.0, 1.5])})
    request.second_order.hessian = True

    reply = stub.Differentiate(request)

    assert reply.mode == pb.MODE_FORWARD
    assert (reply.planner.n, reply.planner.m) == (3, 1)
    assert reply.planner.reason.startswith(
        "forward-over-reverse: one reverse sweep carrying 3 tangent directions")
    assert set(reply.outputs) == {"f"} and set(reply.gradient) == {"x"}
    assert [(b.wrt_a, b.wrt_b) for b in reply.hessian] == [("x", "x")]
    assert from_tensor(reply.hessian[0].value, "h").shape == (3, 3)
    assert not reply.hvp and not reply.jacobian


def two_input_builder():
    from gradserve.client import GraphBuilder
    g = GraphBuilder()
    w, x, i = g.input("W", "float64", [3, 4]), g.input("x", "float64", [4]), \
        g.input("i", "int64", [])
    t = g.tanh(w @ x)
    g.output("L", g.sum(t))
    g.output("v", t * t)
    g.output("j", i * 2)
    return g


@pytest.mark.parametrize("call, field", [
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones(3)}, of="L"), "vectors"),  # shape
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones((2, 3))}, of="L"), "vectors"),
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones(4, np.float32)}, of="L"), "vectors"),  # dtype
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones(4)}, of="L", wrt=["x", "W"]), "vectors"),
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones(4)}, of="v"), "of"),  # not one element
    (lambda c, g, x: c.hvp(g, x, {"x": np.ones(4)}), "of"),  # three outputs: which?
    (lambda c, g, x: c.hessian(g, x, of="v"), "of"),
    (lambda c, g, x: c.hessian(g, x, of="L", wrt=["i"]), "wrt"),  # integer wrt
    (lambda c, g, x: c.hvp(g, x, {"i": np.ones((), np.int64)}, of="L"), "wrt"),
])
def test_bad_second_order_requests_are_invalid_argument_naming_the_field(client, call, field):
    inputs = {"W": np.ones((3, 4)), "x": np.ones(4), "i": np.array(1, np.int64)}
    graph = two_input_builder()
    for target in (graph, client.register(graph)):
        with pytest.raises(grpc.RpcError) as info:
            call(client, target, inputs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named_field(info.value).split(".")[-1] == field, info.value.details()
    with client.stream(graph) as session:
        with pytest.raises(grpc.RpcError) as info:
            call(_SessionAsClient(session), None, inputs)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert named_field(info.value).split(".")[-1] == field, info.value.details()


def named_field(err) -> str:
    """The BadRequest detail's field path of a refused call ("" if none)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status
    status = rpc_status.from_call(err)
    detail = error_details_pb2.BadRequest()
    if status is None or not status.details or not status.details[0].Unpack(detail):
        return ""
    return detail.field_violations[0].field if detail.field_violations else ""


class _SessionAsClient:
    """A session called like a client (the graph argument ignored)."""

    def __init__(self, session):
        self.session = session

    def hvp(self, graph, inputs, vectors, **kwargs):
        return self.session.hvp(inputs, vectors, **kwargs)

    def hessian(self, graph, inputs, **kwargs):
        return self.session.hessian(inputs, **kwargs)


@pytest.mark.parametrize("extra, field", [
    ({"trace": True}, "trace"),
    ({"mode": "MODE_REVERSE"}, "mode"),
    ({"both": True}, "vectors"),
])
def test_second_order_combined_with_other_requests_is_refused(stub, client, extra, field):
    from gradserve.v1 import gradient_service_pb2 as pb
    from gradserve.v1.codec import fill_tensors
    request = pb.DifferentiateRequest(graph_id=client.register(rosenbrock(3)))
    fill_tensors(request.inputs, {"x": np.array([0.5, 1.0, 1.5])})
    fill_tensors(request.second_order.vectors, {"x": np.ones(3)})
    if "trace" in extra:
        request.trace = True
    if "mode" in extra:
        request.mode = pb.MODE_REVERSE
    if "both" in extra:
        request.second_order.hessian = True
    with pytest.raises(grpc.RpcError) as info:
        stub.Differentiate(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named_field(info.value).split(".")[-1] == field, info.value.details()


def test_hessian_over_the_block_limit_is_resource_exhausted(start_server):
    from gradserve.client import Client
    from gradserve.server.limits import Limits
    server = start_server(Limits(max_tensor_elements=50))
    with Client(f"127.0.0.1:{server.port}") as c:
        with pytest.raises(grpc.RpcError) as info:
            c.hessian(rosenbrock(8), {"x": np.ones(8)})  # 64 elements
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "Hessian block" in info.value.details()
        assert c.hessian(rosenbrock(7), {"x": np.ones(7)})["x", "x"].shape == (7, 7)


def test_server_info_reports_the_second_order_ratio(client):
    from gradserve.engine import HVP_COST_RATIO
    assert client.server_info().planner_hvp_ratio == HVP_COST_RATIO
