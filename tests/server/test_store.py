"""The tensor store over real gRPC: chunked put and get, stored tensors named by every
tensor-taking request, lost handles (NOT_FOUND naming the field, then a transparent
re-put by the Client), malformed chunks (INVALID_ARGUMENT naming the field), the
bounds (GetServerInfo, eviction, the server's measured memory), and big models
through a lowered message limit."""

from __future__ import annotations

import mmap
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from gradserve.client import Client, GraphBuilder
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import graph_pb2
from gradserve.v1.chunks import OWN_PAGES_BYTES, Assembler, write_chunks

from support.process_stats import status_mib
from support.server_process import ServerProcess

MiB = 1 << 20


def model():
    """o = sum(sin(x) * w): do/dw = sin(x), do/dx = cos(x) * w."""
    g = GraphBuilder()
    x, w = g.input("x", "float32", [-1]), g.input("w", "float32", [-1])
    g.output("o", g.sum(g.sin(x) * w))
    return g


def field_of(err) -> str:
    detail = error_details_pb2.BadRequest()
    rpc_status.from_call(err).details[0].Unpack(detail)
    return detail.field_violations[0].field


def raw_put(channel, messages, timeout=10):
    """PutTensors with hand-built PutTensorsRequest messages (the generated code)."""
    put = channel.stream_unary("/gradserve.v1.GradientService/PutTensors",
                               request_serializer=pb.PutTensorsRequest.SerializeToString,
                               response_deserializer=pb.PutTensorsResponse.FromString)
    return put(iter(messages), timeout=timeout)


def chunk(name, offset=0, data=b"", dtype=None, shape=None):
    c = pb.TensorChunk(name=name, offset=offset, data=data)
    if dtype is not None:
        c.dtype = dtype
        c.shape.extend(shape)
    return pb.PutTensorsRequest(chunks=[c])


F32 = 1  # DATA_TYPE_FLOAT32


def test_put_and_get_in_chunks(client):
    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((300, 7)).astype(np.float32),
               "scalar": np.float64(2.5), "empty": np.zeros((0, 3), np.int32),
               "mask": rng.random(50) > 0.5, "big": np.arange(100_000, dtype=np.int64)}
    handle = client.put(tensors, chunk_bytes=1000)  # hundreds of chunks
    assert set(handle) == set(tensors) and handle.nbytes > sum(
        np.asarray(a).nbytes for a in tensors.values())
    back = client.get(handle)
    assert list(back) == list(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == np.asarray(a).dtype and back[name].shape == np.shape(a)
        np.testing.assert_array_equal(back[name], a)
    assert list(client.get(handle, ["mask"])) == ["mask"]
    assert client.delete(handle) and not client.delete(handle)


def test_chunks_written_by_the_generated_code(client, channel):
    """Several tensors in one message, a tensor over several messages: the wire format
    as any protobuf client writes it."""
    a, b = np.arange(6, dtype=np.float32), np.array([[1.5, -2.0]])
    one = pb.PutTensorsRequest(chunks=[
        pb.TensorChunk(name="a", dtype=1, shape=[6], data=a[:2].tobytes()),
        pb.TensorChunk(name="a", offset=8, data=a[2:5].tobytes())])
    two = pb.PutTensorsRequest(chunks=[
        pb.TensorChunk(name="a", offset=20, data=a[5:].tobytes()),
        pb.TensorChunk(name="b", dtype=2, shape=[1, 2], data=b.tobytes())])
    reply = raw_put(channel, [one, two])
    back = client.get(reply.handle)
    np.testing.assert_array_equal(back["a"], a)
    np.testing.assert_array_equal(back["b"], b)
    assert back["b"].dtype == np.float64
    client.delete(reply.handle)


def test_requests_take_stored_tensors(client):
    g = model()
    x = np.linspace(-2, 2, 500, dtype=np.float32)
    w = np.linspace(1, 3, 500, dtype=np.float32)
    handle = client.put({"x": x, "weights": w})
    r = client.differentiate(g, {"x": handle["x"], "w": handle["weights"]})
    np.testing.assert_allclose(r.jacobian["o", "w"], np.sin(x), rtol=1e-6)
    np.testing.assert_allclose(r.jacobian["o", "x"], np.cos(x) * w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(client.evaluate(g, {"x": handle["x"], "w": w})["o"]),
                               np.sum(np.sin(x) * w), rtol=1e-4)
    # seeds and second-order vectors from the store: d2o/dx2 = -sin(x) w (diagonal)
    v = np.ones_like(x)
    seeds = client.put({"t": v, "c": np.float32(2.0)})
    out, tan = client.jvp(g, {"x": x, "w": handle["weights"]}, {"x": seeds["t"],
                                                                "w": np.zeros_like(w)})
    np.testing.assert_allclose(tan["o"], np.sum(np.cos(x) * w), rtol=1e-4)
    _, cot = client.vjp(g, {"x": x, "w": w}, {"o": seeds["c"]}, wrt=["w"])
    np.testing.assert_allclose(cot["w"], 2 * np.sin(x), rtol=1e-6)
    _, hvp = client.hvp(g, {"x": handle["x"], "w": handle["weights"]}, {"x": seeds["t"]},
                        wrt=["x"])
    np.testing.assert_allclose(hvp["x"], -np.sin(x) * w, rtol=1e-5, atol=1e-6)
    with client.stream(g) as session:  # DifferentiateStream
        for scale in (1, 2):
            r = session.differentiate({"x": handle["x"], "w": np.float32(scale) * w},
                                      wrt=["x"])
            np.testing.assert_allclose(r.jacobian["o", "x"], scale * np.cos(x) * w,
                                       rtol=1e-5, atol=1e-6)



def test_grad_takes_stored_inputs(client):
    """Client.grad shapes each gradient like its input without reading the input, so a
    stored input (a handle's name, no array on the client) works as an array does."""
    g = model()
    x = np.linspace(-2, 2, 50, dtype=np.float32)
    w = np.linspace(1, 3, 50, dtype=np.float32)
    handle = client.put({"x": x, "w": w})
    grads = client.grad(g, {"x": handle["x"], "w": handle["w"]}, wrt=["w", "x"])
    assert grads["w"].shape == grads["x"].shape == (50,)
    np.testing.assert_allclose(grads["w"], np.sin(x), rtol=1e-6)
    np.testing.assert_allclose(grads["x"], np.cos(x) * w, rtol=1e-5, atol=1e-6)
    client.delete(handle)

def test_stored_results_come_back_in_chunks(client):
    g = model()
    x = np.linspace(-2, 2, 300_000, dtype=np.float32)
    w = np.ones_like(x)
    r = client.differentiate(g, {"x": x, "w": w}, store_results=True)
    assert not r.jacobian and r.results_handle is not None
    stored = client.get(r.results_handle)
    np.testing.assert_allclose(stored["jacobian/o/w"], np.sin(x), rtol=1e-6)
    np.testing.assert_allclose(stored["jacobian/o/x"], np.cos(x), rtol=1e-6, atol=1e-7)
    # a stored result is an input of the next request: sum(sin(sin x) * 1)
    r2 = client.evaluate(g, {"x": r.results_handle["jacobian/o/w"], "w": w})
    np.testing.assert_allclose(float(r2["o"]), np.sum(np.sin(np.sin(x))), rtol=1e-4)


def test_lost_handles_are_not_found_and_the_client_puts_again(start_server):
    a, b = start_server(), start_server()
    g, x = model(), np.linspace(0, 1, 100, dtype=np.float32)
    with Client(f"127.0.0.1:{a.port}") as ca, Client(f"127.0.0.1:{b.port}") as cb:
        handle = ca.put({"w": np.ones_like(x)})
        # another process never had it: NOT_FOUND naming the field
        request = pb.DifferentiateRequest(graph=graph_pb2.Graph.FromString(g.serialized()[0]))
        request.inputs["x"].CopyFrom(_tensor(x))
        request.stored_inputs["w"].handle = handle.id
        with grpc.insecure_channel(f"127.0.0.1:{b.port}") as channel:
            stub = _stub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.Differentiate(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert field_of(info.value) == "stored_inputs['w']"
            request.stored_inputs["w"].handle = "0" * 32
            with pytest.raises(grpc.RpcError) as info:
                stub.GetTensors(pb.GetTensorsRequest(handle="nope"), timeout=10).next()
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert field_of(info.value) == "handle"
        # evicted or deleted on its own server: the client puts it again by itself
        old = handle.id
        assert ca.delete(handle)
        r = ca.differentiate(g, {"x": x, "w": handle["w"]}, wrt=["w"])
        np.testing.assert_allclose(r.jacobian["o", "w"], np.sin(x), rtol=1e-6)
        assert handle.id != old
        assert float(cb.evaluate(g, {"x": x, "w": x})["o"]) > 0  # the other is fine


def test_async_and_stream_calls_put_lost_handles_again(start_server):
    """differentiate_async, evaluate_async and a DifferentiateSession take stored
    tensors and, like the blocking calls, put a lost handle again by themselves."""
    s = start_server()
    g, x = model(), np.linspace(0, 1, 64, dtype=np.float32)
    w = np.linspace(1, 2, 64, dtype=np.float32)
    with Client(f"127.0.0.1:{s.port}") as client, client.stream(g) as session:
        handle = client.put({"w": w})
        calls = {
            "differentiate_async": lambda: client.differentiate_async(
                g, {"x": x, **handle}, wrt=["w"]).result(timeout=30).jacobian["o", "w"],
            "evaluate_async": lambda: client.evaluate_async(
                g, {"x": x, **handle}).result(timeout=30)["o"],
            "session": lambda: session.differentiate(
                {"x": x, **handle}, wrt=["w"]).jacobian["o", "w"],
        }
        oracles = {"differentiate_async": np.sin(x), "evaluate_async": np.sum(np.sin(x) * w),
                   "session": np.sin(x)}
        for name, call in calls.items():
            np.testing.assert_allclose(call(), oracles[name], rtol=1e-5, err_msg=name)
            old = handle.id
            assert client.delete(handle)  # lost: the next call must put it again
            np.testing.assert_allclose(call(), oracles[name], rtol=1e-5, err_msg=name)
            assert handle.id != old, name


def test_async_calls_go_to_the_replica_holding_their_handles(start_server):
    """With two addresses (calls round-robin), calls naming a handle go to the server
    that holds it: none needs a put again (before, every other call went to the other
    server, and a put again could land where the retry did not)."""
    a, b = start_server(), start_server()
    g, x = model(), np.linspace(0, 1, 32, dtype=np.float32)
    with Client([f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]) as client:
        handle = client.put({"w": np.ones_like(x)})
        first = handle.id
        for _ in range(4):
            r = client.differentiate(g, {"x": x, **handle}, wrt=["w"])
            np.testing.assert_allclose(r.jacobian["o", "w"], np.sin(x), rtol=1e-6)
        futures = [client.differentiate_async(g, {"x": x, **handle}, wrt=["w"])
                   for _ in range(6)]
        for f in futures:
            np.testing.assert_allclose(f.result(timeout=30).jacobian["o", "w"], np.sin(x),
                                       rtol=1e-6)
        with client.stream(g) as session:
            for _ in range(3):
                r = session.differentiate({"x": x, **handle}, wrt=["w"])
                np.testing.assert_allclose(r.jacobian["o", "w"], np.sin(x), rtol=1e-6)
        assert handle.id == first


@pytest.mark.parametrize("address, peers", [
    ("127.0.0.1:5", []),                      # one server: the normal channels
    ("localhost:5", []),                      # one IPv4 address
    (["127.0.0.1:5", "127.0.0.1:6"], ["127.0.0.1:5", "127.0.0.1:6"]),
    (["localhost:5", "127.0.0.1:5"], []),     # the same server twice
    ("unix:/tmp/gradserve.sock", []),         # other schemes are taken as given
    ("ipv4:127.0.0.1:5,127.0.0.1:6", []),
])
def test_which_addresses_a_put_is_pinned_to(address, peers):
    from gradserve.client.client import _peers
    assert [p for p, _ in _peers(address)] == peers


def test_handles_expire(start_server):
    server = start_server(Limits(store_seconds=1))
    with Client(f"127.0.0.1:{server.port}") as c:
        handle = c.put({"w": np.ones(3, np.float32)})
        time.sleep(1.5)
        with pytest.raises(grpc.RpcError) as info:
            c.get(handle.id)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "expired" in info.value.details()


@pytest.mark.parametrize("messages,field,words", [
    ([chunk("w", 0, b"\0" * 8, F32, [4]), chunk("w", 12, b"\0" * 8)],
     "chunks[1].offset", "8 bytes so far"),
    ([chunk("w", 0, b"\0" * 8, F32, [4]), chunk("v", 0, b"", F32, [1])],
     "chunks[1].offset", "ended after 8 of its 16 bytes"),
    ([chunk("w", 0, b"\0" * 8, F32, [4]), chunk("v", 8, b"\0" * 8)],
     "chunks[1].name", "its chunks come first"),
    ([chunk("w", 0, b"\0" * 20, F32, [4])], "chunks[0].data", "runs past"),
    ([chunk("w", 0, b"\0" * 8, F32, [4])], "chunks[1].offset", "ended after 8"),
    ([chunk("w", 0, b"\0" * 4)], "chunks[0].dtype", "dtype"),
    ([chunk("w", 0, b"", F32, [-1])], "chunks[0].shape", "negative"),
    ([chunk("", 0, b"", F32, [0])], "chunks[0].name", "needs a name"),
    ([chunk("w", 0, b"", F32, [0]), chunk("w", 0, b"", F32, [0])],
     "chunks[1].name", "given twice"),
    ([chunk("w", 4, b"\0" * 4)], "chunks[0].offset", "continues no tensor"),
    ([], "chunks", "no tensors"),
    ([pb.PutTensorsRequest()], "chunks[0]", "without chunks"),
])
def test_malformed_chunks_are_refused_by_field(channel, messages, field, words):
    with pytest.raises(grpc.RpcError) as info:
        raw_put(channel, messages)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert field_of(info.value) == field, info.value.details()
    assert words in info.value.details()


def test_bounds_are_reported_and_enforced(start_server):
    limits = Limits(max_store_bytes=4 * MiB, max_store_bytes_per_client=3 * MiB,
                    max_store_handles=3)
    server = start_server(limits)
    with Client(f"127.0.0.1:{server.port}") as c:
        info = c.server_info().limits
        assert (info.max_store_bytes, info.max_store_bytes_per_client,
                info.max_store_handles, info.store_seconds) == (4 * MiB, 3 * MiB, 3, 600)
        with pytest.raises(grpc.RpcError) as err:
            c.put({"w": np.zeros(MiB, np.float32)})  # 4 MiB alone: over the client's 3
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_store_bytes_per_client" in err.value.details()
        assert field_of(err.value) == "chunks[0].shape"
        # least recently used first: a, b, then c evicts a (the client's 3 MiB)
        handles = [c.put({"w": np.full(MiB // 4, i, np.float32)}) for i in range(3)]
        with pytest.raises(grpc.RpcError) as err:
            c.get(handles[0].id)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert c.get(handles[2])["w"][0] == 2
        store = server.servicer.store
        assert store.nbytes <= 3 * MiB and len(store) <= 3
        for i in range(5):  # handle count
            c.put({"s": np.float32(i)})
        assert len(store) == 3


def test_server_memory_stays_within_the_store_bound():
    """Puts far beyond --max-store-bytes (320 MiB put, a 48 MiB bound): what the store
    keeps resident is at most its bound (the server's RSS falls by no more than that when
    the kept handles are deleted), and the server's RSS grows by at most the bound plus
    the transport's own retained buffers, not by what was put."""
    bound = 48
    with ServerProcess("--port", "0", "--max-store-bytes", bound * MiB,
                       "--max-store-bytes-per-client", bound * MiB) as server:
        address = server.wait_serving()
        pid = server.proc.pid
        block = np.ones(4 * MiB, np.float32)  # 16 MiB a put
        with Client(address) as c:
            # the transport's own memory, nothing kept: as many puts as below, so that
            # gRPC's threads and their malloc arenas are warmed much as they will be
            for _ in range(20):
                c.delete(c.put({"w": block}))
            transient = status_mib(pid)
            handles = [c.put({"w": block}) for _ in range(20)]
            kept = status_mib(pid)
            np.testing.assert_array_equal(c.get(handles[-1])["w"], block)
            with pytest.raises(grpc.RpcError) as err:  # the oldest were evicted
                c.get(handles[0].id)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            held = sum(c.delete(h) for h in handles)
            emptied = status_mib(pid)
        assert 1 <= held <= bound // 16  # (16 MiB and its accounting: two fit in 48)
        # the store's arrays live in mappings of their own, returned when deleted
        assert kept - emptied <= bound + 4, f"the store held {kept - emptied:.0f} MiB resident"
        # the rest is gRPC's buffers kept by the allocator's arenas (server/allocator.py):
        # up to ~35 MiB more than after the warm-up puts in runs on a loaded machine
        grown = kept - transient
        assert grown < bound + 48, f"server RSS grew by {grown:.0f} MiB beyond the transport's"


def test_big_model_through_a_lowered_message_limit(start_server):
    """The path of a 25.5M-parameter model with default settings, scaled down: 1 MiB
    messages, 3 MiB of parameters and a 3 MiB gradient."""
    server = start_server(Limits(max_message_bytes=MiB))
    g = model()
    rng = np.random.default_rng(1)
    x = rng.standard_normal(3 * MiB // 4).astype(np.float32)
    w = rng.standard_normal(3 * MiB // 4).astype(np.float32)
    with Client(f"127.0.0.1:{server.port}") as c:
        r = c.differentiate(g, {"x": x, "w": w}, wrt=["w"])  # by itself: chunks both ways
        np.testing.assert_allclose(r.jacobian["o", "w"], np.sin(x), rtol=1e-6)
        params = c.put({"w": w})  # or once, by the caller
        grads = c.grad(g, {"x": params["w"], "w": w}, wrt=["w"])
        np.testing.assert_allclose(grads["w"], np.sin(w), rtol=1e-6)
        assert len(server.servicer.store) == 1  # the client freed what it put itself
        # a message still over the limit: the error says which limit, its flag, and
        # the chunked alternative
        with pytest.raises(grpc.RpcError) as err:
            c.differentiate(g, {"x": x, "w": w}, wrt=["w"], store_results=False)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        for words in ("max_message_bytes", "--max-message-bytes", "Client.put",
                      "store_results"):
            assert words in err.value.details(), err.value.details()


def _tensor(a):
    from gradserve.v1.codec import to_tensor
    return to_tensor(a)


def _stub(channel):
    from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
    return pb_grpc.GradientServiceStub(channel)


def test_the_pytorch_bridge_takes_big_parameters_through_the_store(start_server):
    """remote_function's forward (Evaluate, keeping residuals) and backward (VJP) with
    a parameter three times the server's message limit: the inputs go by the store,
    the gradient equals PyTorch's own."""
    torch = pytest.importorskip("torch")
    from gradserve.client.torch import remote_function

    server = start_server(Limits(max_message_bytes=MiB))
    n = 3 * MiB // 4
    x = torch.linspace(-3, 3, n, dtype=torch.float32)
    w = torch.linspace(0.5, 1.5, n, dtype=torch.float32, requires_grad=True)
    with Client(f"127.0.0.1:{server.port}") as c:
        f = remote_function(c, model())
        out = f(x, w)
        out.backward()
        ours = w.grad.clone()
        w.grad = None
        (torch.sin(x) * w).sum().backward()
        torch.testing.assert_close(ours, w.grad, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(out.detach()), float((torch.sin(x) * w).sum().detach()),
                                   rtol=1e-4)
        assert len(server.servicer.store) == 0  # what the client put for the calls is freed


def test_large_assembled_arrays_are_on_private_pages_of_their_own():
    """A tensor from OWN_PAGES_BYTES up is assembled into an anonymous mapping of its own
    (an mmap of its own, returned to the system when freed) that is private and advised
    for huge pages: a shared one, mmap's default, takes no transparent huge pages (102 MB
    took 70 ms of page faults instead of 19). (The kernel may merge the mapping with a
    neighbour of the same flags into one region of /proc/self/smaps, so the region's size
    says nothing; its flags do.)"""
    a = np.random.default_rng(0).standard_normal(3 * OWN_PAGES_BYTES // 4).astype(np.float32)
    assembler = Assembler()
    for message in write_chunks({"a": a}, None, OWN_PAGES_BYTES // 2):
        assembler.add(message)
    b = assembler.finish()["a"]
    assert np.array_equal(a, b) and not b.flags.writeable
    base = b
    while not isinstance(base, mmap.mmap):
        assert base is not None, "the array is not on a mapping of its own"
        base = base.obj if isinstance(base, memoryview) else base.base
    assert len(base) == b.nbytes
    region = _smaps_region(b.ctypes.data)
    assert region[0].split()[1].endswith("p"), region[0]  # private
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        flags = next(line for line in region if line.startswith("VmFlags:"))
        assert " hg" in flags, flags  # MADV_HUGEPAGE


def _smaps_region(address: int) -> list[str]:
    """The lines of /proc/self/smaps for the region holding `address`."""
    region = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a region's first line
                if region is not None:
                    return region
                start, end = (int(x, 16) for x in head.split("-"))
                if start <= address < end:
                    region = [line]
            elif region is not None:
                region.append(line)
    if region is None:
        raise AssertionError("the array's pages are not mapped")
    return region


def test_a_get_of_many_chunks_cancelled_midway_leaves_the_server_serving(start_server):
    """GetTensors over 64 KiB makes each message in a worker while the one before is
    written: all of them arrive, in order; a client that stops reading after the first
    and cancels leaves the server answering, the handle intact."""
    server = start_server(Limits(store_chunk_bytes=64 << 10))
    big = np.random.default_rng(5).standard_normal(300_000).astype(np.float32)  # 1.2 MB
    with Client(f"127.0.0.1:{server.port}", timeout=30) as c:
        handle = c.put({"big": big, "small": np.arange(3.0)})
        back = c.get(handle)
        assert np.array_equal(back["big"], big) and np.array_equal(back["small"], np.arange(3.0))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            get = channel.unary_stream("/gradserve.v1.GradientService/GetTensors",
                                       request_serializer=pb.GetTensorsRequest.SerializeToString)
            replies = get(pb.GetTensorsRequest(handle=handle.id), timeout=30)
            first = next(replies)
            assert len(first) > 60 << 10
            replies.cancel()
        assert np.array_equal(c.get(handle, ["big"])["big"], big)
        assert c.differentiate(model(), {"x": np.float32([0.5]), "w": np.float32([2.0])}
                               ).jacobian["o", "w"] == pytest.approx(np.sin(0.5))
