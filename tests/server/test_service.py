"""GradientService over real gRPC on 127.0.0.1: the worked example by every route (raw
stub inline and by id, Client, stream), JVP/VJP, the planner's choice, the graph
cache, GetServerInfo, health and reflection.

Oracles: the published figures (-6.2832, -8.7423e-08), closed forms computed by NumPy
in the same dtype, central finite differences (tests/oracles.py), the dot-product test
and the other mode; never numbers copied from the server's output.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import re

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase)
from google.protobuf import descriptor_pool
from numpy.testing import assert_allclose, assert_array_equal

from gradserve import engine
from gradserve.client import Client, GraphBuilder
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import tensor_pb2
from gradserve.v1.codec import from_tensor, to_tensor
from support.oracles import dot, numeric_jacobian, numeric_jvp

PUBLISHED_DODX, PUBLISHED_DODY = -6.2832, -8.7423e-08
SERVICE = "gradserve.v1.GradientService"
PI32 = np.float32([np.pi])


# --- oracles and helpers ----------------------------------------------------------------


def seed_closed_form(x, y):
    """(o, do/dx, do/dy) of o = (x + y) sin(x), by NumPy in the arguments' dtype."""
    return (x + y) * np.sin(x), np.sin(x) + (x + y) * np.cos(x), np.sin(x)


def check_seed32(o, dodx, dody):
    """The worked example in float32 at x = y = pi: published figures and closed form."""
    want_o, want_dodx, want_dody = seed_closed_form(PI32, PI32)
    for a in (o, dodx, dody):
        assert a.dtype == np.float32 and a.size == 1
    assert abs(dodx.item() - PUBLISHED_DODX) < 1e-4
    assert abs(dody.item() - PUBLISHED_DODY) < 1e-11
    assert_allclose(dodx.item(), want_dodx.item(), rtol=1e-6)
    assert_allclose(dody.item(), want_dody.item(), rtol=1e-6)
    assert_allclose(o.item(), want_o.item(), rtol=1e-6)


def check_seed32_at(x, o, dodx, dody):
    """The worked example at x (float32 [1]), y = pi, against the closed form."""
    want_o, want_dodx, want_dody = seed_closed_form(x, PI32)
    for got, want in ((o, want_o), (dodx, want_dodx), (dody, want_dody)):
        assert got.dtype == np.float32
        assert_allclose(got.reshape(-1), want, rtol=1e-5, atol=1e-6)


def tensors(arrays):
    return {name: to_tensor(a) for name, a in arrays.items()}


def blocks(reply):
    """Jacobian blocks of a DifferentiateResponse, in wire order."""
    return {(b.of, b.wrt): from_tensor(b.value) for b in reply.jacobian}


def mlp_builder():
    """h = tanh(x @ w) and s = sum(h, axes=[1]): matmul + tanh + sum, two outputs."""
    g = GraphBuilder()
    x, w = g.input("x", "float64", [3, 4]), g.input("w", "float64", [4, 2])
    h = g.output("h", g.tanh(x @ w))
    g.output("s", g.sum(h, axes=[1]))
    return g


def mlp_numpy(v):
    h = np.tanh(v["x"] @ v["w"])
    return {"h": h, "s": h.sum(axis=1)}


def mlp_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.uniform(-1, 1, (3, 4)), "w": rng.uniform(-1, 1, (4, 2))}


def wide_builder(n=1000):
    """n inputs -> one scalar: loss = sum(sin(x))."""
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    g.output("loss", g.sum(g.sin(x)))
    return g


W_TALL = np.stack([np.linspace(-1.0, 1.0, 1000), np.cos(np.linspace(0.0, 3.0, 1000))], axis=1)


def tall_builder():
    """2 inputs -> 1000 outputs: y = tanh(W @ x)."""
    g = GraphBuilder()
    x = g.input("x", "float64", [2])
    g.output("y", g.tanh(g.constant(W_TALL) @ x))
    return g


def tall_jacobian(x):
    return (1 - np.tanh(W_TALL @ x) ** 2)[:, None] * W_TALL


# --- the worked example by every route --------------------------------------------------


def test_seed_inline_by_raw_stub(stub, seed_builder, seed_inputs):
    request = pb.DifferentiateRequest(graph=seed_builder().build(),
                                      inputs=tensors(seed_inputs()))
    reply = stub.Differentiate(request, timeout=10)

    assert [(b.of, b.wrt) for b in reply.jacobian] == [("o", "x"), ("o", "y")]
    jac = blocks(reply)
    assert jac["o", "x"].shape == jac["o", "y"].shape == (1, 1)  # of.shape + wrt.shape
    check_seed32(from_tensor(reply.outputs["o"]), jac["o", "x"], jac["o", "y"])
    assert reply.mode in (pb.MODE_FORWARD, pb.MODE_REVERSE)
    assert reply.planner.mode == reply.mode
    assert (reply.planner.n, reply.planner.m) == (2, 1)
    assert re.fullmatch("[0-9a-f]{64}", reply.graph_id)
    assert reply.request_id == ""
    assert not reply.tangents and not reply.cotangents


def test_seed_by_graph_id(stub, seed_builder, seed_inputs):
    graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=seed_builder().build()),
                                  timeout=10).graph_id
    reply = stub.Differentiate(pb.DifferentiateRequest(graph_id=graph_id,
                                                       inputs=tensors(seed_inputs()),
                                                       request_id="by-id"), timeout=10)
    jac = blocks(reply)
    check_seed32(from_tensor(reply.outputs["o"]), jac["o", "x"], jac["o", "y"])
    assert reply.graph_id == graph_id
    assert reply.request_id == "by-id"


@pytest.mark.parametrize("method", ["differentiate", "jacobian", "grad", "jvp", "vjp"])
def test_seed_through_client(client, seed_builder, seed_inputs, method):
    g, inputs = seed_builder(), seed_inputs()
    o = client.evaluate(g, inputs)["o"]
    if method == "differentiate":
        r = client.differentiate(g, inputs)
        assert r.outputs["o"].dtype == np.float32
        assert r.mode == r.planner.mode and r.planner.reason
        dodx, dody = r.jacobian["o", "x"], r.jacobian["o", "y"]
    elif method == "jacobian":
        jac = client.jacobian(g, inputs)
        assert jac["o", "x"].shape == (1, 1)
        dodx, dody = jac["o", "x"], jac["o", "y"]
    elif method == "grad":
        grads = client.grad(g, inputs)
        assert grads["x"].shape == grads["y"].shape == (1,)
        dodx, dody = grads["x"], grads["y"]
    elif method == "jvp":
        one, zero = np.float32([1.0]), np.float32([0.0])
        _, tx = client.jvp(g, inputs, {"x": one, "y": zero})
        _, ty = client.jvp(g, inputs, {"x": zero, "y": one})
        dodx, dody = tx["o"], ty["o"]
    else:
        _, cot = client.vjp(g, inputs, {"o": np.float32([1.0])})
        dodx, dody = cot["x"], cot["y"]
    check_seed32(o, dodx, dody)


def test_seed_over_a_client_stream_session(client, seed_builder):
    xs = [PI32, PI32 + np.float32(0.5), np.float32([-1.25]), PI32]
    with client.stream(seed_builder()) as session:
        ids = []
        for x in xs:
            r = session.differentiate({"x": x, "y": PI32})
            check_seed32_at(x, r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"])
            ids.append(r.request_id)
        r = session.differentiate({"x": PI32, "y": PI32}, cotangents={"o": np.float32([1.0])})
        check_seed32(r.outputs["o"], r.cotangents["x"], r.cotangents["y"])
        ids.append(r.request_id)
    assert len(set(ids)) == len(ids) and all(ids)


def test_raw_stream_answers_every_request_in_order(stub, seed_builder):
    graph = seed_builder().build()
    graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graph), timeout=10).graph_id
    xs = [PI32 + np.float32(0.25 * i) for i in range(6)]
    requests = []
    for i, x in enumerate(xs):
        request = pb.DifferentiateRequest(inputs=tensors({"x": x, "y": PI32}),
                                          request_id=f"step-{i}")
        if i % 2:
            request.graph.CopyFrom(graph)  # each request is independent: inline or by id
        else:
            request.graph_id = graph_id
        requests.append(request)
    for name, seed in (("jvp-x", [1.0, 0.0]), ("jvp-y", [0.0, 1.0])):
        requests.append(pb.DifferentiateRequest(
            graph_id=graph_id, inputs=tensors({"x": PI32, "y": PI32}), request_id=name,
            tangents=tensors({"x": np.float32(seed[:1]), "y": np.float32(seed[1:])})))

    replies = list(stub.DifferentiateStream(iter(requests), timeout=30))

    assert [r.request_id for r in replies] == [q.request_id for q in requests]
    for x, reply in zip(xs, replies):
        jac = blocks(reply)
        check_seed32_at(x, from_tensor(reply.outputs["o"]), jac["o", "x"], jac["o", "y"])
        assert reply.graph_id == graph_id
    jvp_x, jvp_y = replies[-2:]
    for reply in (jvp_x, jvp_y):
        assert not reply.jacobian and reply.mode == pb.MODE_FORWARD
    check_seed32(from_tensor(jvp_x.outputs["o"]), from_tensor(jvp_x.tangents["o"]),
                 from_tensor(jvp_y.tangents["o"]))


def test_seed_float64_stays_float64(client, seed_builder, seed_inputs):
    r = client.differentiate(seed_builder("float64"), seed_inputs("float64"))
    x = np.float64([np.pi])
    want_o, want_dodx, want_dody = seed_closed_form(x, x)
    for a in (r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"]):
        assert a.dtype == np.float64
    assert_allclose(r.jacobian["o", "x"].reshape(1), want_dodx, rtol=1e-15)
    assert_allclose(r.jacobian["o", "x"].item(), -2 * np.pi, rtol=1e-14)
    assert_allclose(r.jacobian["o", "y"].reshape(1), want_dody, rtol=1e-12)
    assert abs(r.jacobian["o", "y"].item() - 1.2246e-16) < 1e-20
    assert_allclose(r.outputs["o"], want_o, rtol=1e-12)


# --- JVP and VJP -------------------------------------------------------------------------


@pytest.mark.parametrize("k", [None, 3], ids=["single", "batched-k3"])
def test_jvp_against_finite_differences(client, k):
    inputs = mlp_inputs()
    rng = np.random.default_rng(7)
    lead = () if k is None else (k,)
    tangents = {name: rng.standard_normal(lead + v.shape) for name, v in inputs.items()}

    outputs, out_tangents = client.jvp(mlp_builder(), inputs, tangents)

    want = mlp_numpy(inputs)
    for name in ("h", "s"):
        assert_allclose(outputs[name], want[name], rtol=1e-12)
        assert out_tangents[name].shape == lead + want[name].shape
        assert out_tangents[name].dtype == np.float64
    for j in range(k or 1):
        seed = {n: (t if k is None else t[j]) for n, t in tangents.items()}
        fd = numeric_jvp(mlp_numpy, inputs, seed)
        for name in ("h", "s"):
            got = out_tangents[name] if k is None else out_tangents[name][j]
            assert_allclose(got, fd[name], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("k", [None, 3], ids=["single", "batched-k3"])
def test_vjp_dot_product_and_finite_differences(client, k):
    g, inputs = mlp_builder(), mlp_inputs(1)
    rng = np.random.default_rng(11)
    lead = () if k is None else (k,)
    shapes = {n: v.shape for n, v in mlp_numpy(inputs).items()}
    cotangents = {n: rng.standard_normal(lead + s) for n, s in shapes.items()}
    tangents = {n: rng.standard_normal(lead + v.shape) for n, v in inputs.items()}

    _, jt = client.jvp(g, inputs, tangents)
    _, ctj = client.vjp(g, inputs, cotangents)

    for name, v in inputs.items():
        assert ctj[name].shape == lead + v.shape and ctj[name].dtype == np.float64
    # <c, J t> = <J^T c, t>, per direction
    assert_allclose(dot(cotangents, jt, batched=k is not None),
                    dot(ctj, tangents, batched=k is not None), rtol=1e-10)
    # c J against the finite-difference Jacobian
    jac = numeric_jacobian(mlp_numpy, inputs)
    for j in range(k or 1):
        c = {n: (v if k is None else v[j]) for n, v in cotangents.items()}
        for w in inputs:
            want = sum(np.tensordot(c[o], jac[o, w], axes=c[o].ndim) for o in shapes)
            got = ctj[w] if k is None else ctj[w][j]
            assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_vjp_with_wrt_subset(client):
    inputs = mlp_inputs(2)
    c = {"s": np.ones(3)}
    _, ctj = client.vjp(mlp_builder(), inputs, c, wrt=["w"])
    assert set(ctj) == {"w"}
    jac = numeric_jacobian(mlp_numpy, inputs, wrt=["w"])
    assert_allclose(ctj["w"], np.tensordot(c["s"], jac["s", "w"], axes=1), rtol=1e-6, atol=1e-8)


# --- the planner's choice ----------------------------------------------------------------


def test_reverse_mode_for_many_inputs_one_output(stub, client):
    ratio = client.server_info().planner_ratio
    x = np.linspace(-3.0, 3.0, 1000)
    reply = stub.Differentiate(pb.DifferentiateRequest(graph=wide_builder().build(),
                                                       inputs=tensors({"x": x})), timeout=10)
    p = reply.planner
    assert reply.mode == p.mode == pb.MODE_REVERSE
    assert (p.n, p.m) == (1000, 1)
    assert p.cost_forward == 1000 and p.cost_reverse == ratio * 1
    assert not p.n <= ratio * p.m  # the documented rule agrees
    assert p.reason
    gradient = blocks(reply)["loss", "x"]
    assert gradient.shape == (1000,)  # scalar output: the gradient, shaped like x
    assert_allclose(gradient, np.cos(x), rtol=1e-14, atol=1e-15)


def test_forward_mode_for_few_inputs_many_outputs(client):
    ratio = client.server_info().planner_ratio
    x = np.array([0.3, -0.7])
    r = client.differentiate(tall_builder(), {"x": x})
    p = r.planner
    assert r.mode == p.mode == "forward"
    assert (p.n, p.m) == (2, 1000)
    assert p.cost_forward == 2 and p.cost_reverse == ratio * 1000
    assert p.n <= ratio * p.m
    assert p.reason
    assert r.jacobian["y", "x"].shape == (1000, 2)
    assert_allclose(r.jacobian["y", "x"], tall_jacobian(x), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("forced", [pb.MODE_FORWARD, pb.MODE_REVERSE], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", ["wide", "tall", "mlp"])
def test_forced_mode_gives_the_auto_jacobian(stub, case, forced):
    graph, inputs = {
        "wide": lambda: (wide_builder(50), {"x": np.linspace(-1.0, 2.0, 50)}),
        "tall": lambda: (tall_builder(), {"x": np.array([0.3, -0.7])}),
        "mlp": lambda: (mlp_builder(), mlp_inputs(3)),
    }[case]()
    request = pb.DifferentiateRequest(graph=graph.build(), inputs=tensors(inputs))
    auto = stub.Differentiate(request, timeout=10)
    request.mode = forced
    reply = stub.Differentiate(request, timeout=10)

    assert reply.mode == reply.planner.mode == forced
    assert (reply.planner.n, reply.planner.m) == (auto.planner.n, auto.planner.m)
    assert reply.planner.reason
    got, want = blocks(reply), blocks(auto)
    assert list(got) == list(want)
    for key in want:
        assert got[key].shape == want[key].shape and got[key].dtype == want[key].dtype
        assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-15)
    if case == "mlp":  # and both agree with finite differences
        fd = numeric_jacobian(mlp_numpy, inputs)
        for key in want:
            assert_allclose(got[key], fd[key], rtol=1e-6, atol=1e-8)


# --- Evaluate and the graph cache --------------------------------------------------------


def test_evaluate_inline_and_by_id(stub, client):
    g, inputs = mlp_builder(), mlp_inputs(4)
    want = mlp_numpy(inputs)
    graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=g.build()), timeout=10).graph_id
    inline = stub.Evaluate(pb.EvaluateRequest(graph=g.build(), inputs=tensors(inputs)), timeout=10)
    by_id = stub.Evaluate(pb.EvaluateRequest(graph_id=graph_id, inputs=tensors(inputs)),
                          timeout=10)
    assert inline.graph_id == by_id.graph_id == graph_id
    for reply in (inline, by_id):
        assert set(reply.outputs) == {"h", "s"}
        for name in want:
            assert_allclose(from_tensor(reply.outputs[name]), want[name], rtol=1e-12)
    out = client.evaluate(g, inputs)
    for name in want:
        assert out[name].dtype == np.float64
        assert_allclose(out[name], want[name], rtol=1e-12)


def test_register_graph_is_idempotent_and_the_same_on_every_server(stub, start_server,
                                                                   seed_builder):
    request = pb.RegisterGraphRequest(graph=seed_builder().build())
    first = stub.RegisterGraph(request, timeout=10).graph_id
    second = stub.RegisterGraph(request, timeout=10).graph_id
    assert first == second
    assert re.fullmatch("[0-9a-f]{64}", first)
    # a graph built anew gives the same id; another graph another id
    assert stub.RegisterGraph(pb.RegisterGraphRequest(graph=seed_builder().build()),
                              timeout=10).graph_id == first
    assert stub.RegisterGraph(pb.RegisterGraphRequest(graph=seed_builder("float64").build()),
                              timeout=10).graph_id != first
    other = start_server()
    with grpc.insecure_channel(f"127.0.0.1:{other.port}") as ch:
        assert pb_grpc.GradientServiceStub(ch).RegisterGraph(request, timeout=10).graph_id == first


def test_unknown_graph_id_is_not_found(stub, seed_inputs):
    unknown = "0" * 64
    for call, request in (
            (stub.Differentiate, pb.DifferentiateRequest(graph_id=unknown,
                                                         inputs=tensors(seed_inputs()))),
            (stub.Evaluate, pb.EvaluateRequest(graph_id=unknown, inputs=tensors(seed_inputs())))):
        with pytest.raises(grpc.RpcError) as info:
            call(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert unknown in info.value.details()


def test_client_registers_again_after_a_server_restart(start_server, seed_builder, seed_inputs):
    a = start_server()
    address = f"127.0.0.1:{a.port}"
    g, inputs = seed_builder(), seed_inputs()
    with Client(address, timeout=10) as client:
        r = client.differentiate(g, inputs)
        check_seed32(r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"])
        graph_id = r.graph_id
        a.stop(grace=0)

        b = start_server(address=address)  # the same port, a fresh server
        assert b.port == a.port
        with grpc.insecure_channel(address) as ch:  # b does not know the graph
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.GradientServiceStub(ch).Evaluate(
                    pb.EvaluateRequest(graph_id=graph_id, inputs=tensors(inputs)), timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

        r = client.differentiate(g, inputs)  # NOT_FOUND -> register -> retry, transparently
        check_seed32(r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"])
        assert r.graph_id == graph_id
        check_seed32(client.evaluate(g, inputs)["o"], *client.grad(g, inputs).values())


def distinct_graphs(count):
    """`count` different small graphs: o = x * c_i."""
    graphs = []
    for i in range(count):
        g = GraphBuilder()
        g.output("o", g.input("x", "float64", [2]) * float(i + 2))
        graphs.append(g.build())
    return graphs


def test_cache_evicts_the_least_recently_used_graph(start_server):
    s = start_server(Limits(max_cached_graphs=2))
    x = np.array([1.5, -2.0])
    with grpc.insecure_channel(f"127.0.0.1:{s.port}") as ch:
        stub = pb_grpc.GradientServiceStub(ch)
        graphs = distinct_graphs(3)
        ids = [stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=10).graph_id
               for g in graphs]
        assert len(set(ids)) == 3

        def evaluate(i):
            reply = stub.Evaluate(pb.EvaluateRequest(graph_id=ids[i], inputs=tensors({"x": x})),
                                  timeout=10)
            assert_array_equal(from_tensor(reply.outputs["o"]), x * (i + 2))

        with pytest.raises(grpc.RpcError) as info:
            evaluate(0)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        evaluate(1)
        evaluate(2)
        again = stub.RegisterGraph(pb.RegisterGraphRequest(graph=graphs[0]), timeout=10).graph_id
        assert again == ids[0]
        evaluate(0)


def test_stream_session_registers_again_after_eviction(start_server, seed_builder, seed_inputs):
    s = start_server(Limits(max_cached_graphs=1))
    with Client(f"127.0.0.1:{s.port}", timeout=10) as client:
        with client.stream(seed_builder()) as session:
            r = session.differentiate(seed_inputs())
            check_seed32(r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"])
            client.register(seed_builder("float64"))  # evicts the session's graph
            r = session.differentiate(seed_inputs())
            check_seed32(r.outputs["o"], r.jacobian["o", "x"], r.jacobian["o", "y"])


# --- GetServerInfo, health, reflection ---------------------------------------------------


def test_server_info_lists_every_engine_op(client):
    info = client.server_info()
    assert info.version == importlib.metadata.version("gradserve")
    ops = {op.name: op for op in info.ops}
    assert set(ops) == set(engine.OPS)
    allowed_types = {"int", "float", "bool", "string", "ints", "floats"}
    for name, op in engine.OPS.items():
        got = ops[name]
        if op.arity is None:  # one or more operands
            assert (got.min_inputs, got.max_inputs) == (1, -1)
        else:
            assert got.min_inputs == got.max_inputs == op.arity
        assert [a.name for a in got.attrs] == [s.name for s in op.attrs]
        for attr, spec in zip(got.attrs, op.attrs):
            assert attr.type == spec.type and attr.type in allowed_types
            assert attr.required == (spec.default is engine.ops.REQUIRED)
            assert (attr.default == "") == attr.required
    # spot checks against DESIGN.md's table
    assert (ops["matmul"].min_inputs, ops["matmul"].max_inputs) == (2, 2)
    assert (ops["concat"].min_inputs, ops["concat"].max_inputs) == (1, -1)
    assert {a.name: (a.type, a.required) for a in ops["slice"].attrs} == {
        "starts": ("ints", True), "stops": ("ints", True), "axes": ("ints", False)}
    assert {a.name: a.type for a in ops["sum"].attrs} == {"axes": "ints", "keepdims": "bool"}
    assert set(info.dtypes) == {tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT64,
                                tensor_pb2.DATA_TYPE_INT32, tensor_pb2.DATA_TYPE_INT64,
                                tensor_pb2.DATA_TYPE_BOOL}
    assert info.planner_ratio > 0


def test_server_info_reports_the_servers_limits(start_server):
    limits = Limits(max_message_bytes=8 << 20, max_nodes=1234, max_tensor_elements=5678,
                    max_intermediate_bytes=9 << 20, max_cached_graphs=7, max_cache_bytes=99_999,
                    max_concurrent_rpcs=9)
    s = start_server(limits)
    with Client(f"127.0.0.1:{s.port}", timeout=10) as client:
        got = client.server_info().limits
    wire_fields = set(pb.Limits.DESCRIPTOR.fields_by_name)
    assert wire_fields == {f.name for f in dataclasses.fields(Limits)}
    assert {f: getattr(got, f) for f in wire_fields} == dataclasses.asdict(limits)


@pytest.mark.parametrize("service", ["", SERVICE])
def test_health_is_serving(channel, service):
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_of_an_unknown_service_is_not_found(channel):
    with pytest.raises(grpc.RpcError) as info:
        health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes_the_service(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = db.get_services()
    assert SERVICE in services
    assert "grpc.health.v1.Health" in services
    service = descriptor_pool.DescriptorPool(db).FindServiceByName(SERVICE)
    assert {m.name for m in service.methods} == {
        "RegisterGraph", "Evaluate", "Differentiate", "DifferentiateStream", "GetServerInfo",
        "TrainSteps", "PutTensors", "GetTensors", "DeleteTensors"}
    stream = service.methods_by_name["DifferentiateStream"]
    assert stream.input_type.full_name == "gradserve.v1.DifferentiateRequest"


# --- shapes, views and IEEE values --------------------------------------------------------


def test_any_size_dimension_accepts_several_sizes(client):
    g = GraphBuilder()
    x = g.input("x", "float64", [-1, 3])
    g.output("s", g.sum(g.tanh(x), axes=[1]))
    rng = np.random.default_rng(5)
    ids = set()
    for rows in (1, 4, 7):
        x = rng.uniform(-2, 2, (rows, 3))
        r = client.differentiate(g, {"x": x})
        want = np.zeros((rows, rows, 3))
        want[np.arange(rows), np.arange(rows)] = 1 - np.tanh(x) ** 2
        assert r.outputs["s"].shape == (rows,)
        assert_allclose(r.outputs["s"], np.tanh(x).sum(axis=1), rtol=1e-12)
        assert r.jacobian["s", "x"].shape == (rows, rows, 3)
        assert_allclose(r.jacobian["s", "x"], want, rtol=1e-12, atol=1e-15)
        ids.add(r.graph_id)
    assert len(ids) == 1


def test_client_results_are_read_only_views(client, seed_builder, seed_inputs):
    """Documented behaviour: arrays in results are read-only views of the received bytes;
    np.array(a) makes a writable copy."""
    g, inputs = seed_builder(), seed_inputs()
    r = client.differentiate(g, inputs)
    arrays = [r.outputs["o"], r.jacobian["o", "x"], client.evaluate(g, inputs)["o"],
              client.grad(g, inputs)["x"], client.vjp(g, inputs, {"o": PI32})[1]["y"]]
    for a in arrays:
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[...] = 0
    copy = np.array(r.jacobian["o", "x"])
    copy[...] = 1.0
    assert copy.flags.writeable and r.jacobian["o", "x"].item() != 1.0


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # NumPy's, raised inside the server
def test_nan_and_inf_inputs_give_ieee_results(client):
    g = GraphBuilder()
    x, y = g.input("x", "float64", [6]), g.input("y", "float64", [6])
    g.output("o", x * y + g.log(x))
    x = np.array([np.nan, np.inf, -np.inf, -1.0, 0.0, 2.0])
    y = np.array([1.0, 1.0, 1.0, 1.0, 1.0, np.nan])
    with np.errstate(all="ignore"):
        want_o = x * y + np.log(x)
        want_dodx = y + 1 / x  # the diagonal of d o / d x

    assert_array_equal(client.evaluate(g, {"x": x, "y": y})["o"], want_o)
    r = client.differentiate(g, {"x": x, "y": y}, wrt=["x"])
    assert_array_equal(r.outputs["o"], want_o)
    assert_array_equal(np.diagonal(r.jacobian["o", "x"]), want_dodx)
    _, cot = client.vjp(g, {"x": x, "y": y}, {"o": np.ones(6)}, wrt=["x"])
    assert_array_equal(cot["x"], want_dodx)
