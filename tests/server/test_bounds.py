"""Every resource a request can consume is bounded before it is consumed: per-plan
caches, reply sizes, ranks NumPy cannot hold, floating-point work and the time one
op may run past a deadline (issue 11, items 2, 3, 5 and 6).

Memory is measured, not only the status code: the server runs in its own process
and its resident set (VmRSS, VmHWM) is read from /proc; the engine's own estimates
are checked against what NumPy really allocates (tracemalloc sees NumPy's arrays).
Work is measured by the server process's CPU time.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.client import Client, GraphBuilder
from gradserve.server.limits import Limits
from gradserve.engine import MAX_RANK, Graph, Input, Node, ResourceLimitError, compile
from gradserve.engine.compiled import PLAN_CACHE_BYTES
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1 import graph_pb2, tensor_pb2
from gradserve.v1.codec import to_tensor
from support.process_stats import cpu_seconds, reset_peak_rss, status_mib
from support.server_process import ServerProcess

MiB = 1 << 20
F32, F64 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT64
EXHAUSTED, INVALID = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


def node(name, op, *inputs, **attrs):
    n = graph_pb2.Node(name=name, op=op, inputs=list(inputs))
    for key, value in attrs.items():
        a = n.attrs[key]
        if isinstance(value, list):
            a.ints.values.extend(value)
        elif isinstance(value, bool):
            a.b = value
        else:
            a.i = value
    return n


def graph(inputs, nodes, outputs=None):
    return graph_pb2.Graph(inputs=[graph_pb2.Input(name=n, dtype=d, shape=s)
                                   for n, d, s in inputs],
                           nodes=nodes, outputs=outputs or [nodes[-1].name])


def refused(call, code, *says, field=None):
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    assert err.code() == code, (err.code(), err.details())
    for text in says:
        assert text in err.details(), err.details()
    assert len(err.details()) < 2000
    return err


@pytest.fixture(scope="module")
def proc():
    with ServerProcess("--port", "0") as server:
        host, port = server.address()
        with grpc.insecure_channel(f"{host}:{port}", options=[
                ("grpc.max_receive_message_length", 256 * MiB)]) as channel:
            server.stub = pb_grpc.GradientServiceStub(channel)
            server.target = f"{host}:{port}"
            yield server


def good_call(stub):
    """The seed example answers right: the server is still well after a refusal."""
    g = graph([("x", F32, [1]), ("y", F32, [1])],
              [node("s", "add", "x", "y"), node("sx", "sin", "x"), node("o", "mul", "s", "sx")])
    pi = np.float32([np.pi])
    reply = stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs={"x": to_tensor(pi), "y": to_tensor(pi)}), timeout=10)
    dodx = [b for b in reply.jacobian if b.wrt == "x"][0].value
    assert abs(np.frombuffer(dodx.data, np.float32)[0] - -6.2832) < 1e-4


# --- item 2: per-plan caches ---------------------------------------------------------------

def test_wrt_orders_and_subsets_do_not_grow_the_server(proc):
    """VJPs on one 8,000-node graph with 8 inputs, asking for 200 orders of 6 of the
    inputs and 100 subsets: one cached activity list per set of names, at most 16
    sets. Was: 640 MiB for 600 permutations on 20,000 nodes, never freed (about 130
    MiB for these requests)."""
    names = [f"x{i}" for i in range(8)]
    nodes = [node("s0", "add", "x0", "x1")]
    for i in range(1, 8_000):
        nodes.append(node(f"s{i}", "sin" if i % 2 else "add", f"s{i - 1}",
                          *(() if i % 2 else (names[i % 8],))))
    g = graph([(n, F64, [1]) for n in names], nodes)
    inputs = {n: to_tensor(np.float64([0.1 * i])) for i, n in enumerate(names)}
    one = {nodes[-1].name: to_tensor(np.float64([1.0]))}
    graph_id = proc.stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=60).graph_id
    ask = lambda wrt: proc.stub.Differentiate(pb.DifferentiateRequest(  # noqa: E731
        graph_id=graph_id, inputs=inputs, cotangents=one, wrt=list(wrt)), timeout=60)
    ask(names)
    before = status_mib(proc.proc.pid)
    orders = itertools.islice(itertools.permutations(names, 6), 200)
    subsets = (s for r in range(1, 9) for s in itertools.combinations(names, r))
    for wrt in itertools.chain(orders, itertools.islice(subsets, 100)):
        assert len(ask(wrt).cotangents) == len(wrt)
    growth = status_mib(proc.proc.pid) - before
    assert growth < 40, f"server RSS grew by {growth:.0f} MiB over 300 wrt orders and sets"
    refused(lambda: ask(["x0", "x0"]), INVALID, "more than once")
    good_call(proc.stub)


def test_cached_identity_seeds_are_bounded_per_plan(proc):
    """20 one-node graphs x 64 input sizes (Jacobians of sin(x), n = m = 10..640): the
    identity seeds a plan keeps are at most PLAN_CACHE_BYTES (1 MiB) in all. Was:
    1,077 MiB for 20 x 64 requests of ~3 KB (about 250 MiB for these)."""
    before = None
    for k in range(20):
        g = graph([(f"x{k}", F64, [-1])], [node(f"y{k}", "sin", f"x{k}")])
        graph_id = proc.stub.RegisterGraph(pb.RegisterGraphRequest(graph=g), timeout=30).graph_id
        for size in range(10, 650, 10):
            reply = proc.stub.Differentiate(pb.DifferentiateRequest(
                graph_id=graph_id, inputs={f"x{k}": to_tensor(np.zeros(size))}), timeout=30)
            assert tuple(reply.jacobian[0].value.shape) == (size, size)
        if before is None:
            before = status_mib(proc.proc.pid)
    growth = status_mib(proc.proc.pid) - before
    assert growth < 100, f"server RSS grew by {growth:.0f} MiB caching identity seeds"


# --- item 3: replies bounded before they are computed -----------------------------------------

@pytest.mark.parametrize("dtype,log2", [(F32, 27), (F64, 28)])
def test_tiny_request_with_a_huge_reply_is_refused_before_any_work(proc, dtype, log2):
    """A ~80-byte Evaluate of broadcast_to(x, [2^27 or 2^28]): its reply (512 MiB or
    2 GiB) is over the message limit, so RESOURCE_EXHAUSTED before anything is
    allocated. Was: 1.6 GiB peak then "Sent message larger than max", or INTERNAL."""
    g = graph([("x", dtype, [1])], [node("b", "broadcast_to", "x", shape=[1 << log2])])
    x = np.ones(1, np.float32 if dtype == F32 else np.float64)
    request = pb.EvaluateRequest(graph=g, inputs={"x": to_tensor(x)})
    assert request.ByteSize() < 100
    reset_peak_rss(proc.proc.pid)
    before = status_mib(proc.proc.pid, "VmHWM")
    # Refused by whichever bound sees it first: the reply's size or the values' memory.
    refused(lambda: proc.stub.Evaluate(request, timeout=30), EXHAUSTED, "over the limit")
    growth = status_mib(proc.proc.pid, "VmHWM") - before
    assert growth < 50, f"peak RSS grew by {growth:.0f} MiB refusing a huge reply"
    good_call(proc.stub)


def test_jacobian_under_the_element_limit_but_over_the_message_limit(proc):
    """softmax with n = m = 3000 in float64: a 9,000,000-element block (72 MB) is under
    max_tensor_elements but over the 64 MiB message: refused before the sweep."""
    g = graph([("x", F64, [3000])], [node("p", "softmax", "x", axis=0)])
    request = pb.DifferentiateRequest(graph=g, inputs={"x": to_tensor(np.zeros(3000))})
    started = cpu_seconds(proc.proc.pid)
    refused(lambda: proc.stub.Differentiate(request, timeout=30), EXHAUSTED,
            "Jacobian blocks", "max_reply_bytes")
    assert cpu_seconds(proc.proc.pid) - started < 0.5  # no sweep of 3000 directions ran
    good_call(proc.stub)


# --- item 5: ranks NumPy cannot hold ----------------------------------------------------------

RANK = MAX_RANK  # the documented maximum


@pytest.mark.parametrize("case", ["input-rank-65", "input-rank-33", "reshape-rank-100",
                                  "broadcast-rank-40", "tensor-rank-65"])
def test_ranks_over_the_maximum_are_invalid_argument(proc, case):
    if case == "input-rank-65":
        g = graph([("x", F32, [1] * 65)], [node("y", "sin", "x")])
        inputs = {}
    elif case == "input-rank-33":
        g = graph([("x", F32, [1] * (RANK + 1))], [node("y", "sin", "x")])
        inputs = {}
    elif case == "reshape-rank-100":
        g = graph([("x", F32, [1])], [node("y", "reshape", "x", shape=[1] * 100)])
        inputs = {"x": to_tensor(np.ones(1, np.float32))}
    elif case == "broadcast-rank-40":
        g = graph([("x", F32, [1])], [node("y", "broadcast_to", "x", shape=[1] * 40)])
        inputs = {"x": to_tensor(np.ones(1, np.float32))}
    else:
        g = graph([("x", F32, [-1])], [node("y", "sin", "x")])
        inputs = {"x": tensor_pb2.Tensor(dtype=F32, shape=[1] * 65, data=b"\0\0\0\0")}
    err = refused(lambda: proc.stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs=inputs), timeout=10), INVALID)
    assert "rank" in err.details()
    good_call(proc.stub)


def test_derivatives_at_the_maximum_rank(proc):
    """Rank 32 values: a full Jacobian (block rank 64), a JVP and a VJP (seeds of rank
    33) all work; was INTERNAL at rank 33 and above for Jacobians, 64 for JVP/VJP."""
    shape = [1] * (RANK - 1) + [2]
    g = graph([("x", F64, shape)], [node("y", "sin", "x")])
    x = np.full(shape, 0.5)
    reply = proc.stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs={"x": to_tensor(x)}), timeout=10)
    block = np.frombuffer(reply.jacobian[0].value.data).reshape(
        tuple(reply.jacobian[0].value.shape))
    assert block.ndim == 2 * RANK
    assert_allclose(block.reshape(2, 2), np.diag(np.cos([0.5, 0.5])))
    jvp = proc.stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs={"x": to_tensor(x)}, tangents={"x": to_tensor(np.ones(shape))}),
        timeout=10)
    assert_allclose(np.frombuffer(jvp.tangents["y"].data), np.cos([0.5, 0.5]))
    vjp = proc.stub.Differentiate(pb.DifferentiateRequest(
        graph=g, inputs={"x": to_tensor(x)}, cotangents={"y": to_tensor(np.ones(shape))}),
        timeout=10)
    assert_allclose(np.frombuffer(vjp.cotangents["x"].data), np.cos([0.5, 0.5]))


@pytest.mark.parametrize("how", ["auto", "reverse", "forward", "jvp", "vjp", "trace"])
def test_zero_size_matmul_derivatives_over_grpc(client, how):
    """[4,0,2] @ [2,5] and [3,0] @ [0]: every derivative is an empty or zero array of
    the right shape (was INTERNAL)."""
    g = GraphBuilder()
    a, b = g.input("a", "float64", [4, 0, 2]), g.input("b", "float64", [2, 5])
    g.output("c", g.sum(a @ b))
    inputs = {"a": np.zeros((4, 0, 2)), "b": np.ones((2, 5))}
    if how in ("auto", "reverse", "forward"):
        r = client.differentiate(g, inputs, mode=how)
        assert r.jacobian["c", "a"].shape == (4, 0, 2)
        assert_allclose(r.jacobian["c", "b"], np.zeros((2, 5)))
    elif how == "jvp":
        r = client.differentiate(g, inputs, tangents={"a": np.zeros((4, 0, 2)),
                                                      "b": np.ones((2, 5))})
        assert_allclose(r.tangents["c"], 0.0)
    elif how == "vjp":
        r = client.differentiate(g, inputs, cotangents={"c": np.float64(1.0)})
        assert r.cotangents["a"].shape == (4, 0, 2)
        assert_allclose(r.cotangents["b"], np.zeros((2, 5)))
    else:
        r = client.differentiate(g, inputs, trace=True)
        assert {n.name for n in r.trace} >= {"a", "b", "c"}
    h = GraphBuilder()
    p, q = h.input("p", "float64", [3, 0]), h.input("q", "float64", [0])
    h.output("r", p @ q)
    r = client.differentiate(h, {"p": np.zeros((3, 0)), "q": np.zeros(0)}, mode="forward")
    assert r.jacobian["r", "p"].shape == (3, 3, 0)
    assert_allclose(r.outputs["r"], np.zeros(3))


# --- item 6: work, not only memory -------------------------------------------------------------

def test_memory_estimate_bounds_what_numpy_allocates():
    """The estimate made before a request runs (values, seeds, the largest op's scratch,
    the reply) is an upper bound of NumPy's peak allocation on the heaviest op shapes."""
    cases = [
        ("matmul", [Input("a", "float64", [300, 400]), Input("b", "float64", [400, 500])],
         [Node("c", "matmul", ["a", "b"], {}), Node("s", "sum", ["c"], {})]),
        ("conv", [Input("x", "float32", [8, 3, 32, 32]), Input("w", "float32", [16, 3, 5, 5])],
         [Node("c", "conv", ["x", "w"], {"pads": [2, 2, 2, 2]}), Node("s", "sum", ["c"], {})]),
        ("max_pool", [Input("x", "float32", [8, 16, 32, 32])],
         [Node("p", "max_pool", ["x"], {"kernel_shape": [3, 3], "strides": [1, 1]}),
          Node("s", "sum", ["p"], {})]),
        ("softmax", [Input("x", "float64", [64, 1000])],
         [Node("p", "log_softmax", ["x"], {"axis": 1}), Node("s", "sum", ["p"], {})]),
    ]
    rng = np.random.default_rng(0)
    for name, ins, nodes in cases:
        plan = compile(Graph(ins, nodes, ["s"], {}))
        inputs = {i.name: rng.standard_normal(i.shape).astype(i.dtype) for i in ins}
        tangents = {n: np.ones_like(v) for n, v in inputs.items()}
        runs = {"evaluate": plan.evaluate,
                "reverse": lambda x, **kw: plan.jacobian(x, mode="reverse", **kw),
                "forward": lambda x, **kw: plan.jacobian(x, mode="forward", **kw)
                if sum(v.size for v in x.values()) < 5000 else plan.jvp(x, tangents, **kw),
                "jvp": lambda x, **kw: plan.jvp(x, tangents, **kw)}
        for mode, run in runs.items():
            run(inputs)  # warm: caches filled outside the measurement
            tracemalloc.start()
            try:
                run(inputs)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            # An upper bound: any limit below what NumPy really took refuses the request.
            with pytest.raises(ResourceLimitError):
                run(inputs, max_bytes=peak - 1)


def test_flops_are_estimated_before_any_work():
    """sum(broadcast_to(x, [16000, 16000]) @ same): a 178-byte request that would take
    ~8 TFLOP is refused at once by the work bound (was: both cores busy for 31 s)."""
    g = Graph([Input("x", "float32", [1])],
              [Node("b", "broadcast_to", ["x"], {"shape": [16000, 16000]}),
               Node("m", "matmul", ["b", "b"], {}), Node("s", "sum", ["m"], {})], ["s"], {})
    plan = compile(g)
    assert plan.estimate_flops(plan.shapes) >= 2 * 16000 ** 3
    started = time.process_time()
    with pytest.raises(ResourceLimitError) as info:
        plan.evaluate({"x": np.ones(1, np.float32)}, max_flops=10 ** 12)
    assert "floating-point operations" in str(info.value)
    assert time.process_time() - started < 0.5


def test_a_large_matmul_stops_within_a_second_of_its_deadline():
    """One 3000 x 3000 x 3000 float64 product (54 GFLOP, several seconds here) runs in
    blocks with the check between them: a check that starts failing after 0.2 s stops
    it within a second (measured as this process's CPU time, both BLAS threads)."""
    a = np.random.default_rng(0).standard_normal((3000, 3000))
    g = Graph([Input("a", "float64", [3000, 3000])],
              [Node("m", "matmul", ["a", "a"], {}), Node("s", "sum", ["m"], {})], ["s"], {})
    plan = compile(g)

    class Ended(Exception):
        pass

    deadline = time.monotonic() + 0.2

    def check():
        if time.monotonic() > deadline:
            raise Ended

    cpu = time.process_time()
    with pytest.raises(Ended):
        plan.evaluate({"a": a}, check=check)
    # CPU time, not wall time: on a busy machine the product gets less of a core per
    # wall second, and the wall clock says nothing about the work done past the check.
    assert time.process_time() - cpu < 2.5  # at most 2 cores x (0.2 s + 1 s)


def test_flops_bound_over_grpc(proc):
    """A small request within the memory bound whose 20 products of 3000 x 3000
    matrices need 1.08 TFLOP: RESOURCE_EXHAUSTED naming the work bound, with no work
    done (server CPU), and GetServerInfo reports the bound."""
    nodes = [node("b", "broadcast_to", "x", shape=[3000, 3000]), node("m0", "matmul", "b", "b")]
    for i in range(1, 20):
        nodes.append(node(f"m{i}", "matmul", f"m{i - 1}", "b"))
    g = graph([("x", F32, [1])], nodes + [node("s", "sum", "m19")])
    request = pb.EvaluateRequest(graph=g, inputs={"x": to_tensor(np.ones(1, np.float32))})
    assert request.ByteSize() < 1000
    started = cpu_seconds(proc.proc.pid)
    refused(lambda: proc.stub.Evaluate(request, timeout=30), EXHAUSTED,
            "floating-point operations", "max_request_flops")
    assert cpu_seconds(proc.proc.pid) - started < 0.5
    info = proc.stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10)
    assert info.limits.max_request_flops == 10 ** 12
    good_call(proc.stub)


def test_deadline_stops_a_large_matmul_in_the_server(proc):
    """A 2500 x 2500 x 2500 float64 product (31 GFLOP, under the work bound; seconds of
    BLAS here) with a 0.3 s deadline: the server stops within a second of the deadline,
    measured by its CPU time, and answers the next call."""
    g = graph([("a", F64, [2500, 2500])], [node("m", "matmul", "a", "a"), node("s", "sum", "m")])
    a = np.random.default_rng(0).standard_normal((2500, 2500))
    request = pb.EvaluateRequest(graph=g, inputs={"a": to_tensor(a)})
    started = cpu_seconds(proc.proc.pid)
    refused(lambda: proc.stub.Evaluate(request, timeout=0.3), grpc.StatusCode.DEADLINE_EXCEEDED)
    time.sleep(1.5)
    busy = cpu_seconds(proc.proc.pid) - started
    assert busy < 2 * 1.3 + 0.5, f"the server spent {busy:.1f} s of CPU on a 0.3 s call"
    good_call(proc.stub)


# --- item 8: smaller ones --------------------------------------------------------------------

def test_an_integer_only_graph_has_nothing_to_differentiate(stub):
    """Was: OK with an empty Jacobian; the docs say INVALID_ARGUMENT."""
    g = graph([("k", tensor_pb2.DATA_TYPE_INT32, [3])], [node("s", "sum", "k")])
    request = pb.DifferentiateRequest(graph=g, inputs={"k": to_tensor(np.int32([1, 2, 3]))})
    err = refused(lambda: stub.Differentiate(request, timeout=10), INVALID, "no floating inputs")
    good_call(stub)
    # values still work, and an int32 sum stays int32 (dtypes are kept, as documented)
    reply = stub.Evaluate(pb.EvaluateRequest(graph=g, inputs=request.inputs), timeout=10)
    assert reply.outputs["s"].dtype == tensor_pb2.DATA_TYPE_INT32
    assert np.frombuffer(reply.outputs["s"].data, np.int32)[0] == 6
    assert err.code() == INVALID


@pytest.mark.parametrize("field", ["wrt", "of"])
def test_names_listed_twice_are_invalid_argument(stub, field):
    """Was: wrt=["x","x"] accepted and counted twice by the planner."""
    g = graph([("x", F64, [2])], [node("y", "sin", "x")])
    names = {"wrt": ["x", "x"]} if field == "wrt" else {"of": ["y", "y"]}
    request = pb.DifferentiateRequest(graph=g, inputs={"x": to_tensor(np.zeros(2))}, **names)
    refused(lambda: stub.Differentiate(request, timeout=10), INVALID, "more than once")


def test_a_plans_own_caches_count_in_the_graph_cache(start_server):
    """Jacobians of sin(x) at 30 input sizes grow one plan's caches (its shape
    specializations, setups and identity seeds); the graph cache counts that growth
    and evicts the least recently used graph to stay within max_cache_bytes."""
    server = start_server(Limits(max_cache_bytes=256 << 10))
    cache = server.servicer.registry.cache
    with Client(f"127.0.0.1:{server.port}") as client:
        other = GraphBuilder()
        other.output("z", other.cos(other.input("z0", "float64", [3])))
        client.evaluate(other, {"z0": np.zeros(3)})
        g = GraphBuilder()
        g.output("y", g.sin(g.input("x", "float64", [-1])))
        client.evaluate(g, {"x": np.zeros(1)})
        before = cache.nbytes
        assert len(cache) == 2
        for size in range(10, 310, 10):  # dense: a diagonal Jacobian would be compressed
            client.jacobian(g, {"x": np.zeros(size)}, sparsity="dense")
        client.evaluate(g, {"x": np.zeros(1)})  # the growth is counted on the next use
        assert cache.nbytes > before + 200_000
        assert len(cache) == 1  # the other graph was evicted to make room
        # the plan in use is never evicted: it may pass the limit by its own bounded caches
        assert cache.nbytes <= (256 << 10) + PLAN_CACHE_BYTES + 100_000


def test_sigterm_stops_a_large_product_after_the_grace_period():
    """A 3000 x 3000 x 3000 float64 product (54 GFLOP: seconds of BLAS) in flight when
    the server gets SIGTERM with --grace 1: the call is cut at the grace period and the
    blocked product stops at its next check, so the process exits in a few seconds
    (was: 26.7 s for a single product, which ran to its end)."""
    import threading
    g = graph([("a", F64, [3000, 3000])], [node("m", "matmul", "a", "a"), node("s", "sum", "m")])
    a = np.random.default_rng(0).standard_normal((3000, 3000))
    request = pb.EvaluateRequest(graph=g, inputs={"a": to_tensor(a)})
    with ServerProcess("--port", "0", "--grace", "1") as server:
        host, port = server.address()
        outcome = {}
        with grpc.insecure_channel(f"{host}:{port}", options=[
                ("grpc.max_send_message_length", 256 * MiB)]) as channel:
            stub = pb_grpc.GradientServiceStub(channel)

            def call():
                try:
                    stub.Evaluate(request, timeout=120)
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    outcome["code"] = err.code()

            caller = threading.Thread(target=call)
            caller.start()
            time.sleep(1.0)  # the product is running
            started = time.monotonic()
            code = server.terminate(timeout=60)
            exited = time.monotonic() - started
            caller.join(30)
    assert code == 0
    assert exited < 1 + 5, f"exited {exited:.1f} s after SIGTERM with --grace 1"
    assert outcome.get("code") != grpc.StatusCode.OK  # cut, not finished
