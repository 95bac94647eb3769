"""Imported models keep their parameters in the server's tensor store: a model too big
for a graph message imports with its parameters as inputs by default (parameters="auto"),
the import's calls put them once and send only the data, and the gradient with respect to
every parameter equals PyTorch's. The path of a 25.5M-parameter model under default
settings, scaled down: a real `gradserve serve` process with a 1 MiB message limit and
models of 2-3 MiB of parameters. What a call sends is counted on the wire, by a TCP proxy
between the Client and the server."""

from __future__ import annotations

import io
import pickle
import warnings

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose

torch = pytest.importorskip("torch", reason="the oracle is PyTorch (the test extra)")
pytest.importorskip("onnx", reason="ONNX import needs the onnx package (the test extra)")
nn = torch.nn

from gradserve.client import Client  # noqa: E402
from gradserve.client.onnx import from_onnx  # noqa: E402
from gradserve.client.torch import from_module  # noqa: E402
from support.byte_counter import ByteCounter  # noqa: E402
from support.onnx_models import model, node  # noqa: E402
from support.server_process import ServerProcess  # noqa: E402

MiB = 1 << 20
LIMIT = MiB  # the server's --max-message-bytes
CALLS = 4


@pytest.fixture(scope="module")
def proxied():
    """(the server's address, a byte-counting proxy in front of it)."""
    with ServerProcess("--port", "0", "--max-message-bytes", LIMIT) as server:
        address = server.wait_serving(timeout=60)
        with ByteCounter(address) as proxy:
            yield address, proxy


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 512), nn.Tanh(),
                         nn.Linear(512, 10)).eval()


def exported(module, example) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), f, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          do_constant_folding=False)
    return f.getvalue()


def torch_vjp(module, example, w):
    module.zero_grad()
    y = module(example)
    (y * w).sum().backward()
    return y.detach().numpy(), {n: p.grad.numpy().copy() for n, p in module.named_parameters()}


def assert_gradients_equal(got, want):
    assert sorted(got) == sorted(want)
    for name, g in want.items():
        scale = float(np.max(np.abs(g))) or 1.0
        assert_allclose(got[name], g, rtol=1e-4, atol=1e-5 * scale, err_msg=name)


def sent_per_call(proxy, call) -> float:
    before = proxy.sent
    for _ in range(CALLS):
        call()
    return (proxy.sent - before) / CALLS


def test_a_model_over_the_message_limit_keeps_its_parameters_on_the_server(proxied):
    address, proxy = proxied
    module = mlp()
    example = torch.randn(8, 64)
    data = exported(module, example)
    w = torch.linspace(-1, 1, 80).reshape(8, 10)
    want_y, want = torch_vjp(module, example, w)
    param_bytes = sum(p.numel() * 4 for p in module.parameters())
    assert param_bytes > 2 * LIMIT

    with Client(proxy.address, timeout=60) as client:
        # as constants, the graph alone is over the server's limit: refused
        with pytest.raises(grpc.RpcError) as err:
            client.register(from_onnx(data, parameters="constants").graph)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_bytes" in err.value.details()

        # the default asks the server's limit and makes them inputs
        imported = from_onnx(data, client=client)
        assert imported.parameter_mode == "inputs"
        assert sorted(imported.parameters) == sorted(want)
        x, cot = example.numpy(), {"y": w.numpy()}
        y, grads = imported.vjp(client, {"x": x}, cot)  # puts the parameters, once
        assert_allclose(y["y"], want_y, rtol=1e-5, atol=1e-6)
        assert_gradients_equal(grads, want)

        stored = sent_per_call(proxy, lambda: imported.vjp(client, {"x": x}, cot))
        assert stored < x.nbytes + 16 * 1024, stored  # x, the cotangent and the framing
        # the same calls sending the parameters (the Client puts them in the store for
        # each call, by itself): the parameters cross the wire every time
        resent = sent_per_call(proxy, lambda: client.vjp(
            imported.graph, {"x": x, **imported.parameters}, cot, wrt=list(want)))
        assert resent > param_bytes > 100 * stored

        # the other calls name the same stored tensors
        assert_allclose(imported.evaluate(client, x)["y"], want_y, rtol=1e-5, atol=1e-6)
        assert_gradients_equal(imported.differentiate(client, {"x": x}, cotangents=cot)
                               .cotangents, want)

        # a handle the server lost is put again by the Client, transparently
        handle = imported.stored_parameters(client)
        assert client.delete(handle)
        before = proxy.sent
        assert_gradients_equal(imported.vjp(client, {"x": x}, cot)[1], want)
        assert proxy.sent - before > param_bytes
        assert imported.stored_parameters(client) is handle  # the same handle, a new id
        imported.release(client)
        with pytest.raises(grpc.RpcError) as err:
            client.get(handle)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_parameters_between_the_limit_and_a_chunk_are_put_in_chunks_under_the_limit(proxied):
    """1.5 MiB of parameters against a 1 MiB limit: more than half the limit, so inputs;
    a message of the Client's 1 MiB chunk (and its header) is over the limit, so the
    chunks must shrink to the server's limit."""
    _, proxy = proxied
    torch.manual_seed(2)
    module = nn.Sequential(nn.Linear(64, 4096), nn.Tanh(), nn.Linear(4096, 32)).eval()
    example = torch.randn(2, 64)
    w = torch.linspace(-1, 1, 64).reshape(2, 32)
    want_y, want = torch_vjp(module, example, w)
    assert LIMIT < sum(p.numel() * 4 for p in module.parameters()) < 2 * LIMIT
    with Client(proxy.address, timeout=60) as client:
        imported = from_onnx(exported(module, example), client=client)
        assert imported.parameter_mode == "inputs"
        y, grads = imported.vjp(client, {"x": example.numpy()}, {"y": w.numpy()})
    assert_allclose(y["y"], want_y, rtol=1e-5, atol=1e-6)
    assert_gradients_equal(grads, want)


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 640)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_from_module_stores_parameters_and_buffers_once(proxied):
    """The PyTorch bridge's import: trainable parameters and batch norm's buffers put
    once; by default the gradient is taken with respect to the trainable ones only."""
    _, proxy = proxied
    torch.manual_seed(1)
    module = ConvBN()
    with torch.no_grad():
        module.bn.running_mean.uniform_(-0.5, 0.5)
        module.bn.running_var.uniform_(0.5, 2.0)
    module.eval()
    example = torch.randn(4, 3, 8, 8)
    w = torch.linspace(-1, 1, 4 * 640).reshape(4, 640)
    want_y, want = torch_vjp(module, example, w)
    param_bytes = sum(p.numel() * 4 for p in module.parameters())
    assert param_bytes > 2 * LIMIT

    imported = from_module(module, example)
    assert "bn.running_mean" in imported.parameters and imported.buffers
    with Client(proxy.address, timeout=60) as client:
        x, cot = example.numpy(), {"y": w.numpy()}
        y, grads = imported.vjp(client, {"x": x}, cot)
        assert_allclose(y["y"], want_y, rtol=1e-5, atol=1e-5)
        assert_gradients_equal(grads, want)  # trainable only, every one
        stored = sent_per_call(proxy, lambda: imported.vjp(client, {"x": x}, cot))
        assert stored < x.nbytes + cot["y"].nbytes + 16 * 1024, stored


def test_auto_keeps_small_initializers_as_constants_and_moves_large_ones():
    """Without a client, "auto" takes gradserve serve's default limit (64 MiB): up to
    half of it the initializers are constants, beyond it inputs."""
    x = np.zeros((2, 3), np.float32)
    small = from_onnx(model([node("MatMul", ["x", "W"])], {"x": x},
                            {"W": np.ones((3, 4), np.float32)}))
    assert small.parameter_mode == "constants" and small.parameters == {}
    assert [i.name for i in small.graph.build().inputs] == ["x"]
    big_w = np.ones((3, (32 * MiB) // 12 + 1), np.float32)  # just over 32 MiB
    big = from_onnx(model([node("MatMul", ["x", "W"])], {"x": x}, {"W": big_w}))
    assert big.parameter_mode == "inputs" and list(big.parameters) == ["W"]
    assert from_onnx(model([node("MatMul", ["x", "W"])], {"x": x}, {"W": big_w}),
                     parameters="constants").parameter_mode == "constants"


def test_many_small_stored_parameters_are_not_a_big_request(start_server, caplog):
    """64 stored parameters of 16 KiB (1 MiB in all) under an 8 MiB limit: the request is
    small, and its gradients come in the reply (no GetTensors), each one equal to the
    cotangent (y = x + W0 + ... + W63)."""
    from gradserve.server.limits import Limits

    server = start_server(Limits(max_message_bytes=8 * MiB))
    x = np.zeros((4, 1024), np.float32)
    names = [f"W{i}" for i in range(64)]
    nodes, last = [], "x"
    for i, name in enumerate(names):
        out = "y" if i == len(names) - 1 else f"s{i}"
        nodes.append(node("Add", [last, name], [out]))
        last = out
    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal((4, 1024)).astype(np.float32) for n in names}
    imported = from_onnx(model(nodes, {"x": x}, inits), parameters="inputs")
    w = rng.standard_normal((4, 1024)).astype(np.float32)
    with Client(f"127.0.0.1:{server.port}") as client, \
            caplog.at_level("INFO", logger="gradserve.requests"):
        y, grads = imported.vjp(client, {"x": x}, {"y": w})
        assert_allclose(y["y"], sum(inits.values()), rtol=1e-5, atol=1e-5)
        assert sorted(grads) == sorted(names)
        for name in names:
            assert_allclose(grads[name], w, err_msg=name)
        methods = [r.getMessage() for r in caplog.records if r.name == "gradserve.requests"]
        assert sum('"PutTensors"' in m for m in methods) == 1, methods
        assert not any('"GetTensors"' in m for m in methods), methods
        # a pickled copy leaves the handle behind (it belongs to this object's clients)
        copy = pickle.loads(pickle.dumps(imported))
        assert "_handles" not in copy.__dict__
        assert_allclose(copy.vjp(client, {"x": x}, {"y": w})[1]["W7"], w)
        methods = [r.getMessage() for r in caplog.records if r.name == "gradserve.requests"]
        assert sum('"PutTensors"' in m for m in methods) == 2, methods
