"""Client.differentiate's small requests (a Jacobian of a few small arrays for a graph
the server knows by id: written from pieces kept per graph, input and form, read back
without the tensor codec) over real gRPC on 127.0.0.1: the bytes are the generated
code's for the same request, the answers equal central finite differences and the
general path's, and whatever does not fit (lists, stored tensors, big-endian arrays,
large inputs, a graph the client has not registered) takes the general path with the
same answer."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder, store
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.codec import fill_tensors
from gradserve.v1.modes import WIRE_MODES
from support.models import dense_model


def mixed_graph():
    g = GraphBuilder()
    x, s, w = g.input("x", "float64", [3]), g.input("s", "float64", []), g.input("w", "float64", [2, 3])
    k = g.input("k", "int32", [2])
    g.output("aa", g.sin(x) * s)
    g.output("a", g.sum((w @ x) ** 2))
    g.output("k2", k * k)
    return g


def mixed_inputs(rng) -> dict:
    return {"x": rng.standard_normal(3), "s": np.array(rng.standard_normal()),
            "w": rng.standard_normal((2, 3)), "k": rng.integers(-5, 5, 2).astype(np.int32)}


def big_endian(inputs: dict) -> dict:
    return {k: v.astype(v.dtype.newbyteorder(">")) for k, v in inputs.items()}


def generated(graph_id, inputs, request_id, wrt=None, of=None, mode="auto") -> bytes:
    request = pb.DifferentiateRequest(graph_id=graph_id, wrt=wrt or (), of=of or (),
                                      mode=WIRE_MODES[mode], request_id=request_id)
    fill_tensors(request.inputs, inputs)
    return request.SerializeToString(deterministic=True)


def test_small_request_bytes_are_the_generated_codes():
    """Names that are prefixes of each other (the map's order), a scalar, an empty
    array, ints and bools, a 2-D transposed (not contiguous) array, every mode and
    wrt/of; each request twice (the second from kept pieces)."""
    rng = np.random.default_rng(1)
    cases = [
        ({"x": np.float32([np.pi]), "y": np.float32([np.pi])}, {}),
        ({"b": np.array(2.5), "a": np.zeros(0, np.float32), "aa": np.int64([1, -2]),
          "": np.bool_([True, False, True])}, {"mode": "forward"}),
        ({"w": rng.standard_normal((3, 2)).T, "é": np.float32(rng.standard_normal((2, 2)))},
         {"wrt": ["w"], "of": ["o", "p"], "mode": "reverse"}),
        ({}, {"mode": "auto"}),
    ]
    with Client("127.0.0.1:1") as client:  # never called: bytes only
        for inputs, options in cases:
            for graph_id in ("g" * 64, "short"):
                for _ in range(2):
                    data, request_id, key, _ = client._small_request(
                        graph_id, inputs, options.get("wrt"), options.get("of"),
                        options.get("mode", "auto"))
                    assert key is None
                    assert data == generated(graph_id, inputs, request_id, **options)


def test_what_does_not_fit_is_left_to_the_general_path():
    with Client("127.0.0.1:1") as client:
        for inputs in ({"x": [1.0, 2.0]}, {"x": np.float64(1.0)},
                       {"x": np.float32([1.0]).astype(">f4")},
                       {"x": np.zeros(4096, np.float32)}, {"x": np.complex64([1j])}):
            assert client._small_request("g" * 64, inputs, None, None, "auto") is None
        graph = GraphBuilder()
        graph.output("o", graph.input("x", "float32", [1]) * 2.0)
        # not registered by this client yet: the general path registers it
        assert client._small_request(graph, {"x": np.float32([1])}, None, None, "auto") is None
        assert client._small_request("g" * 64, {}, "x", None, "auto") is None  # wrt a str


def central_differences(client, graph, inputs, of, wrt, h=1e-6) -> np.ndarray:
    x = inputs[wrt]
    flat = np.array(x, dtype=np.float64).reshape(-1)
    columns = []
    for i in range(flat.size):
        values = []
        for step in (h, -h):
            moved = flat.copy()
            moved[i] += step
            values.append(client.evaluate(graph, {**inputs, wrt: moved.reshape(np.shape(x))})[of])
        columns.append((values[0] - values[1]) / (2 * h))
    out = np.asarray(client.evaluate(graph, inputs)[of])
    return np.stack(columns, axis=-1).reshape(out.shape + np.shape(x))


def test_small_requests_answer_as_finite_differences_and_the_general_path(address):
    rng = np.random.default_rng(2)
    graph = mixed_graph()
    with Client(address) as client:
        client.register(graph)
        for mode in ("auto", "forward", "reverse"):
            for _ in range(3):
                inputs = mixed_inputs(rng)
                small = client.differentiate(graph, inputs, mode=mode)
                form = (small.graph_id, (), (), mode)
                assert form in client._small_frames  # the small path
                assert form in client._small_layouts  # replies after the first: read by it
                # the same request by the general path: big-endian arrays, which it
                # converts (the small path leaves them alone)
                general = client.differentiate(graph, big_endian(inputs), mode=mode)
                assert small.mode == general.mode and small.planner == general.planner
                assert small.graph_id == general.graph_id
                assert int(small.request_id) + 1 == int(general.request_id)
                for name in ("outputs", "jacobian"):
                    got, want = getattr(small, name), getattr(general, name)
                    assert set(got) == set(want), name
                    for key in want:
                        np.testing.assert_array_equal(got[key], want[key])
                        assert not got[key].flags.writeable
                for of, wrt in small.jacobian:
                    np.testing.assert_allclose(
                        small.jacobian[of, wrt],
                        central_differences(client, graph, inputs, of, wrt),
                        rtol=1e-6, atol=1e-7)


def test_inputs_the_small_path_leaves_alone_give_the_same_answer(address, seed_builder):
    x = np.float32([0.3, 1.7])
    with Client(address) as client:
        pair = seed_builder("float32", (2,))
        client.register(pair)
        want = client.differentiate(pair, {"x": x, "y": x + 1})
        for inputs in ({"x": x.astype(">f4"), "y": (x + 1).astype(">f4")},
                       {**client.put({"x": x}), "y": x + 1}):
            got = client.differentiate(pair, inputs)
            for key in want.jacobian:
                np.testing.assert_array_equal(got.jacobian[key], want.jacobian[key])
            np.testing.assert_array_equal(got.outputs["o"], want.outputs["o"])


@pytest.mark.parametrize("channels", [1, 3])
def test_small_futures_equal_blocking_calls(address, channels):
    rng = np.random.default_rng(3)
    graph = mixed_graph()
    with Client(address, channels=channels) as client:
        client.register(graph)
        inputs = [mixed_inputs(rng) for _ in range(24)]
        futures = [client.differentiate_async(graph, i) for i in inputs]
        for i, future in zip(inputs, futures):
            got, want = future.result(timeout=30), client.differentiate(graph, i)
            assert got.planner == want.planner
            for key in want.jacobian:
                np.testing.assert_array_equal(got.jacobian[key], want.jacobian[key])


# --- JVPs and VJPs with stored tensors (an ONNX import's call) ---------------------------

def dense_parameters(rng) -> dict:
    return {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4),
            "V": rng.standard_normal((4, 2))}


def dense_vjp(p, x, g) -> dict:
    """The VJP of dense_model by hand (the chain rule through tanh and two products)."""
    h = np.tanh(x @ p["W"] + p["b"])
    dz = (g @ p["V"].T) * (1 - h * h)
    return {"x": dz @ p["W"].T, "W": x.T @ dz, "b": dz.sum(0), "V": h.T @ g}


def seeded_generated(graph_id, inputs, seeds, field, stored, request_id) -> bytes:
    request = pb.DifferentiateRequest(graph_id=graph_id, request_id=request_id,
                                      mode=WIRE_MODES["auto"])
    fill_tensors(request.inputs, inputs)
    fill_tensors(getattr(request, field), seeds)
    for key, ref in stored.items():
        request.stored_inputs[key].handle = ref.handle.id
        request.stored_inputs[key].name = "" if ref.name == key else ref.name
    return request.SerializeToString(deterministic=True)


def test_seeded_request_bytes_are_the_generated_codes():
    """A VJP and a JVP with stored inputs (a handle's tensors under their own names and
    another's), each twice (the second from kept pieces)."""
    rng = np.random.default_rng(4)
    with Client("127.0.0.1:1") as client:  # never called: bytes only
        handle = store.TensorHandle("h" * 32, {"W": ("float64", (3, 4)),
                                               "V2": ("float64", (4, 2))})
        stored = {"W": handle["W"], "V": handle["V2"]}
        for field, seeds in (("cotangents", {"y": rng.standard_normal((5, 2))}),
                             ("tangents", {"b": rng.standard_normal(4)})):
            inputs = {"x": rng.standard_normal((5, 3)), "b": rng.standard_normal(4)}
            for _ in range(2):
                data, request_id, form, _ = client._seeded_request(
                    "g" * 64, {**stored, **inputs}, None, None, "auto", field, seeds)
                assert data == seeded_generated("g" * 64, inputs, seeds, field, stored,
                                                request_id)


def test_seeded_requests_with_stored_parameters_answer_as_the_chain_rule(address):
    """VJPs and a JVP with the parameters stored: the small path's bytes, replies read by
    the form's layout after the first, answers those of the chain rule by hand; a handle
    the server lost is put again and the call answered the same."""
    rng = np.random.default_rng(5)
    graph = dense_model("float64")
    parameters = dense_parameters(rng)
    with Client(address) as client:
        client.register(graph)
        handle = client.put(parameters)
        for _ in range(3):
            x, g = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
            outputs, got = client.vjp(graph, {**handle, "x": x}, {"y": g})
            form = next(f for f in client._small_frames if f[4:5] == ("cotangents",))
            assert form in client._small_layouts
            want = dense_vjp(parameters, x, g)
            assert set(got) == set(want)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-12, atol=1e-12)
            h = np.tanh(x @ parameters["W"] + parameters["b"])
            np.testing.assert_allclose(outputs["y"], h @ parameters["V"], rtol=1e-12)
        # a JVP along W: dy = ((1 - h^2) * (x @ tW)) @ V
        t = rng.standard_normal((3, 4))
        for _ in range(2):
            _, tangents = client.jvp(graph, {**handle, "x": x}, {"W": t})
            np.testing.assert_allclose(tangents["y"], ((1 - h * h) * (x @ t)) @ parameters["V"],
                                       rtol=1e-12, atol=1e-12)
        old = handle.id
        with Client(address) as other:  # the server loses it (as after an eviction)
            assert other.delete(old)
        _, got = client.vjp(graph, {**handle, "x": x}, {"y": g})
        assert handle.id != old  # put again by the general path
        for name, want in dense_vjp(parameters, x, g).items():
            np.testing.assert_allclose(got[name], want, rtol=1e-12, atol=1e-12)
