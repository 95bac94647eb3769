"""`gradserve umbridge`: a real `gradserve umbridge` process on a loopback port, called
through the umbridge package's own HTTP client (umbridge.HTTPModel).

Oracles: the model's formula in NumPy for Evaluate; central differences for Gradient,
ApplyJacobian and ApplyHessian (of Gradient); the dot-product test between Gradient
and ApplyJacobian; PyTorch's Hessian-vector product for ApplyHessian. Errors: the
protocol's (UM-Bridge 1.0: HTTP 400, {"error": {"type", "message"}}).
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

umbridge = pytest.importorskip("umbridge", reason="pip install 'gradserve[umbridge]'")
requests = pytest.importorskip("requests")
torch = pytest.importorskip("torch")

from gradserve import cli  # noqa: E402
from gradserve.client import GraphBuilder  # noqa: E402
from support.server_process import COMMAND, clean_env  # noqa: E402
from support import REPO

# The page whose two Python blocks test_docs_example_emcee_and_laplace runs as written.
PAGE = REPO / "docs" / "umbridge.md"
URL = re.compile(r"model '([^']*)' at (http://\S+),")
INPUTS = [("x", (3,)), ("w", (2, 3))]
OUTPUTS = [("y", (2,)), ("s", ())]


class UmbridgeProcess:
    """`gradserve umbridge ARGS` in a subprocess; a thread collects its stderr lines."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(COMMAND + ["umbridge", *map(str, args)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env=clean_env())
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def url(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            match = URL.search(self.output())
            if match:
                return match.group(2)
            time.sleep(0.05)
        raise AssertionError(f"no URL from gradserve umbridge (exit code {self.proc.poll()}):"
                             f"\n{self.output()}")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Log lines are written after the response: wait for one to appear."""
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.output()}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def build_model() -> GraphBuilder:
    g = GraphBuilder()
    x = g.input("x", "float64", [3])
    w = g.input("w", "float64", [2, 3])
    g.output("y", g.tanh(g.matmul(w, x)))
    g.output("s", g.sum(x * x * g.sin(x)) + g.sum(w * w * x))
    return g


def torch_model(x, w):
    """The same model in PyTorch."""
    return torch.tanh(w @ x), (x * x * torch.sin(x)).sum() + (w * w * x).sum()


def numpy_model(parameters) -> list[np.ndarray]:
    x, w = (np.asarray(p).reshape(shape) for p, (_, shape) in zip(parameters, INPUTS))
    return [np.tanh(w @ x).ravel(), np.atleast_1d(np.sum(x * x * np.sin(x)) + np.sum(w * w * x))]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    path = build_model().save(tmp_path_factory.mktemp("umbridge") / "model.json")
    process = UmbridgeProcess(path, "--port", "0", "--name", "forward")
    try:
        yield process, process.url()
    finally:
        assert process.stop() == 0, process.output()


@pytest.fixture(scope="module")
def model(served):
    return umbridge.HTTPModel(served[1], "forward")


@pytest.fixture
def point():
    rng = np.random.default_rng(7)
    return [rng.normal(size=int(np.prod(shape))).tolist() for _, shape in INPUTS]


def sizes(items):
    return [int(np.prod(shape)) for _, shape in items]


def central(f, x, h=1e-5):
    """Central differences of f: R^n -> R^m at x, as an (m, n) matrix."""
    x = np.asarray(x, float)
    columns = []
    for j in range(x.size):
        e = np.zeros_like(x)
        e[j] = h
        columns.append((np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * h))
    return np.stack(columns, axis=-1)


def with_input(parameters, index, value):
    changed = [list(p) for p in parameters]
    changed[index] = np.asarray(value).tolist()
    return changed


# --- the calls, against independent oracles -----------------------------------------------

def test_info_sizes_and_support(served, model):
    assert umbridge.supported_models(served[1]) == ["forward"]
    assert model.get_input_sizes() == sizes(INPUTS) == [3, 6]
    assert model.get_output_sizes() == sizes(OUTPUTS) == [2, 1]
    assert model.supports_evaluate() and model.supports_gradient()
    assert model.supports_apply_jacobian() and model.supports_apply_hessian()
    info = requests.get(served[1] + "/Info", timeout=10).json()
    assert info == {"protocolVersion": 1.0, "models": ["forward"]}


def test_evaluate_is_the_formula(model, point):
    output = model(point)
    assert [len(o) for o in output] == [2, 1]
    for got, want in zip(output, numpy_model(point)):
        np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("out_wrt, in_wrt", list(itertools.product(range(2), range(2))))
def test_apply_jacobian_against_central_differences(model, point, out_wrt, in_wrt):
    vec = np.random.default_rng(out_wrt * 2 + in_wrt).normal(size=sizes(INPUTS)[in_wrt])
    got = model.apply_jacobian(out_wrt, in_wrt, point, vec.tolist())
    jacobian = central(lambda v: numpy_model(with_input(point, in_wrt, v))[out_wrt],
                       point[in_wrt])
    np.testing.assert_allclose(got, jacobian @ vec, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("out_wrt, in_wrt", list(itertools.product(range(2), range(2))))
def test_gradient_against_central_differences_and_the_jacobian(model, point, out_wrt,
                                                                in_wrt):
    rng = np.random.default_rng(10 + out_wrt * 2 + in_wrt)
    sens = rng.normal(size=sizes(OUTPUTS)[out_wrt])
    got = np.array(model.gradient(out_wrt, in_wrt, point, sens.tolist()))
    objective = lambda v: sens @ numpy_model(with_input(point, in_wrt, v))[out_wrt]  # noqa: E731
    np.testing.assert_allclose(got, central(objective, point[in_wrt]), rtol=1e-6, atol=1e-8)
    # the other mode: <sens, J v> = <J^T sens, v>
    v = rng.normal(size=sizes(INPUTS)[in_wrt])
    jv = np.array(model.apply_jacobian(out_wrt, in_wrt, point, v.tolist()))
    assert sens @ jv == pytest.approx(got @ v, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("out_wrt, in_wrt1, in_wrt2",
                         list(itertools.product(range(2), range(2), range(2))))
def test_apply_hessian_against_torch_hvp_and_the_gradient(model, point, out_wrt, in_wrt1,
                                                          in_wrt2):
    rng = np.random.default_rng(20 + 4 * out_wrt + 2 * in_wrt1 + in_wrt2)
    sens = rng.normal(size=sizes(OUTPUTS)[out_wrt])
    vec = rng.normal(size=sizes(INPUTS)[in_wrt2])
    got = np.array(model.apply_hessian(out_wrt, in_wrt1, in_wrt2, point, sens.tolist(),
                                       vec.tolist()))
    assert got.shape == (sizes(INPUTS)[in_wrt1],)

    # PyTorch: the HVP of L = sens . F_out over (x, w) with the vector (0, vec) placed at
    # inWrt2 (or vec alone when both indices agree); its inWrt1 part is H12 vec.
    def objective(x, w):
        return (torch.as_tensor(sens) * torch_model(x, w)[out_wrt].reshape(-1)).sum()

    inputs = tuple(torch.tensor(p, dtype=torch.float64).reshape(shape)
                   for p, (_, shape) in zip(point, INPUTS))
    vectors = [torch.zeros_like(t) for t in inputs]
    vectors[in_wrt2] = torch.as_tensor(vec).reshape(INPUTS[in_wrt2][1])
    _, hvp = torch.autograd.functional.hvp(objective, inputs, tuple(vectors))
    np.testing.assert_allclose(got, hvp[in_wrt1].reshape(-1).numpy(), rtol=1e-10, atol=1e-12)

    # central differences of the service's own Gradient along vec
    def gradient(t):
        moved = with_input(point, in_wrt2, np.asarray(point[in_wrt2]) + t * vec)
        return np.array(model.gradient(out_wrt, in_wrt1, moved, sens.tolist()))
    h = 1e-5
    np.testing.assert_allclose(got, (gradient(h) - gradient(-h)) / (2 * h), rtol=1e-6,
                               atol=1e-7)


def test_the_planners_decision_is_logged(served, model, point):
    process, _ = served
    model.gradient(0, 1, point, [1.0, 1.0])
    process.wait_for("Gradient outWrt=0 (y) inWrt=1 (w): reverse: ")
    model.apply_jacobian(1, 0, point, [1.0, 0.0, 0.0])
    process.wait_for("ApplyJacobian outWrt=1 (s) inWrt=0 (x): forward: ")
    model.apply_hessian(1, 0, 0, point, [1.0], [1.0, 0.0, 0.0])
    process.wait_for("ApplyHessian outWrt=1 (s) inWrt1=0 (x) inWrt2=0 (x): forward: "
                     "forward-over-reverse")


# --- errors, as the protocol says ----------------------------------------------------------

def body(point, **changes):
    request = {"name": "forward", "input": point, "config": {}, "outWrt": 0, "inWrt": 0,
               "inWrt1": 0, "inWrt2": 1, "sens": [1.0, 2.0], "vec": [1.0, 0.0, 0.0]}
    request.update(changes)
    return request


HESSIAN_VEC = [0.5] * 6  # sized like input 1 (inWrt2 = 1 in body())

ERRORS = [
    # endpoint, changes to body(), message (the umbridge package's own where it has one)
    ("Evaluate", {"input": "INPUT[:1]"},
     "Number of input parameters does not match model number of model inputs!"),
    ("Evaluate", {"input": "INPUT_SHORT"},
     "Input parameter 1 has invalid length! Expected 6 but got 5."),
    ("Evaluate", {"input": "INPUT_TEXT"}, "Input parameter 0 entry 1 is not a number"),
    ("Evaluate", {"input": [1.0, 2.0]}, "'input' must be a list of lists"),
    ("Gradient", {"outWrt": 2},
     "Invalid outWrt index! Expected between 0 and number of outputs minus one, but got 2"),
    ("Gradient", {"inWrt": -1},
     "Invalid inWrt index! Expected between 0 and number of inputs minus one, but got -1"),
    ("Gradient", {"inWrt": "0"}, "'inWrt' must be an integer index"),
    ("Gradient", {"inWrt": 1.0}, "'inWrt' must be an integer index"),
    ("Gradient", {"sens": [1.0]},
     "Sensitivity vector sens has invalid length! Expected 2 but got 1."),
    ("ApplyJacobian", {"vec": [1.0, 2.0]},
     "Vector vec has invalid length! Expected 3 but got 2."),
    ("ApplyJacobian", {"outWrt": 5}, "Invalid outWrt index!"),
    ("ApplyHessian", {"vec": HESSIAN_VEC, "inWrt1": 2}, "Invalid inWrt1 index!"),
    ("ApplyHessian", {"vec": HESSIAN_VEC, "inWrt2": 3}, "Invalid inWrt2 index!"),
    ("ApplyHessian", {"vec": HESSIAN_VEC, "sens": [1.0, 2.0, 3.0]},
     "Sensitivity vector sens has invalid length! Expected 2 but got 3."),
    ("ApplyHessian", {"vec": [1.0, 0.0, 0.0]},
     "Vector vec has invalid length! Expected 6 but got 3."),
    ("ApplyHessian", {"vec": HESSIAN_VEC, "name": None}, "no model name"),
]


@pytest.mark.parametrize("endpoint, changes, message", ERRORS)
def test_invalid_input_is_http_400_with_the_protocols_error(served, point, endpoint, changes,
                                                            message):
    special = {"INPUT[:1]": point[:1], "INPUT_SHORT": [point[0], point[1][:5]],
               "INPUT_TEXT": [[0.0, "a", 1.0], point[1]]}
    changes = {k: special.get(v, v) if isinstance(v, str) else v for k, v in changes.items()}
    reply = requests.post(f"{served[1]}/{endpoint}", json=body(point, **changes), timeout=30)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "InvalidInput" and message in error["message"]


def test_the_umbridge_client_raises_the_servers_error(model, point):
    with pytest.raises(Exception, match="InvalidInput: Input parameter 1 has invalid length"):
        model([point[0], point[1][:4]])
    with pytest.raises(Exception, match="InvalidInput: Vector vec has invalid length"):
        model.apply_hessian(0, 0, 1, point, [1.0, 1.0], [1.0, 2.0, 3.0])


def test_unknown_model_and_malformed_bodies(served, point):
    url = served[1]
    reply = requests.post(f"{url}/Evaluate", json=body(point, name="other"), timeout=30)
    assert reply.status_code == 400
    assert reply.json()["error"] == {
        "type": "ModelNotFound",
        "message": "Model other not found! The following are available: ['forward']."}
    for endpoint in ("InputSizes", "ModelInfo", "Gradient"):
        reply = requests.post(f"{url}/{endpoint}", json={"name": "other"}, timeout=30)
        assert (reply.status_code, reply.json()["error"]["type"]) == (400, "ModelNotFound")
    for data in (b"{not json", b"[1, 2]", b'{"name": "forward", "input": [[NaN]]}'):
        reply = requests.post(f"{url}/Evaluate", data=data, timeout=30)
        assert (reply.status_code, reply.json()["error"]["type"]) == (400, "InvalidInput")


def test_shared_memory_is_an_unsupported_feature(served, point):
    reply = requests.post(f"{served[1]}/EvaluateShMem", json=body(point), timeout=30)
    assert reply.status_code == 400
    assert reply.json()["error"]["type"] == "UnsupportedFeature"
    # The umbridge client tries shared memory when asked to, then falls back to HTTP.
    fallback = umbridge.HTTPModel(served[1], "forward", use_shmem=True)
    assert not fallback.supports_shmem()
    np.testing.assert_allclose(fallback(point)[0], numpy_model(point)[0], rtol=1e-12)


def test_an_oversized_body_is_invalid_input(served):
    reply = requests.post(f"{served[1]}/Evaluate",
                          data=b'{"name": "forward", "input": [[' + b"0," * 600_000 + b"0]]}",
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "InvalidInput" and "limit of" in error["message"]


def test_the_service_keeps_serving_after_errors(model, point):
    with pytest.raises(Exception):
        model([point[0]])
    np.testing.assert_allclose(model(point)[1], numpy_model(point)[1], rtol=1e-12)


# --- an ONNX model on a running server (--server), and the command's refusals ------------

def onnx_model(path: Path) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]],
                                              np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["h"], name="/fc/MatMul"),
         helper.make_node("Tanh", ["h"], ["y"], name="/act/Tanh")],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


def test_an_onnx_model_on_a_running_server(tmp_path, address):
    path = onnx_model(tmp_path / "tiny.onnx")
    process = UmbridgeProcess(path, "--port", "0", "--server", address, "--shape", "x=2,3",
                              "--name", "tiny")
    try:
        url = process.url()
        tiny = umbridge.HTTPModel(url, "tiny")
        assert tiny.get_input_sizes() == [6] and tiny.get_output_sizes() == [4]
        x = np.array([0.1, -0.2, 0.3, 0.4, 0.0, -0.5])
        weight = np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 1.0]])
        forward = lambda v: np.tanh(v.reshape(2, 3) @ weight).ravel()  # noqa: E731
        np.testing.assert_allclose(tiny([x.tolist()])[0], forward(x), rtol=1e-6)
        sens = np.array([1.0, -1.0, 0.5, 2.0])
        gradient = np.array(tiny.gradient(0, 0, [x.tolist()], sens.tolist()))
        np.testing.assert_allclose(gradient, central(lambda v: sens @ forward(v), x),
                                   rtol=1e-5, atol=1e-6)  # float32 model, float64 oracle
        process.wait_for("Gradient outWrt=0 (y) inWrt=0 (x): reverse")
        assert "computed by " + address in process.output()
    finally:
        assert process.stop() == 0, process.output()


@pytest.mark.parametrize("extra, message", [
    ([], "input 'x' has a dynamic dimension (shape [-1, 3])"),
    (["--shape", "x=2,4"], "does not fit the input's declared shape [-1, 3]"),
    (["--shape", "z=1"], "--shape z: not an input of the graph"),
    (["--shape", "x=two"], "expected INPUT=D0,D1,..."),
])
def test_sizes_must_be_fixed(tmp_path, address, capsys, extra, message):
    path = onnx_model(tmp_path / "tiny.onnx")
    assert cli.main(["umbridge", str(path), "--server", address, *extra]) == 2
    assert message in capsys.readouterr().err


def test_integer_inputs_are_refused(tmp_path, address, capsys):
    g = GraphBuilder()
    v, i = g.input("v", "float64", [4]), g.input("i", "int64", [2])
    g.output("picked", g.take(v, i, axis=0))
    path = g.save(tmp_path / "take.json")
    assert cli.main(["umbridge", str(path), "--server", address]) == 2
    assert "input 'i' is not floating" in capsys.readouterr().err


# --- docs/umbridge.md's example, executed as written ---------------------------------------

def page_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), re.S)


def test_docs_example_emcee_and_laplace(tmp_path, monkeypatch):
    pytest.importorskip("emcee")
    pytest.importorskip("scipy")
    build, use = page_blocks()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(build, "docs/umbridge.md (build)", "exec"), namespace)
    process = UmbridgeProcess(tmp_path / "posterior.json", "--port", "0", "--name",
                              "posterior")
    try:
        url = process.url()
        assert "http://localhost:4242" in use
        exec(compile(use.replace("http://localhost:4242", url), "docs/umbridge.md (use)",
                     "exec"), namespace)
    finally:
        assert process.stop() == 0, process.output()
    # The exact posterior: Gaussian with precision I + A^T A / sigma^2.
    a, y, sigma = namespace["A"], namespace["y"], namespace["sigma"]
    precision = np.eye(2) + a.T @ a / sigma**2
    mean = np.linalg.solve(precision, a.T @ y / sigma**2)
    np.testing.assert_allclose(namespace["map_estimate"], mean, atol=1e-5)
    np.testing.assert_allclose(namespace["precision"], precision, rtol=1e-10)
    np.testing.assert_allclose(namespace["samples"].mean(axis=0), mean,
                               atol=0.2 * np.sqrt(np.diag(np.linalg.inv(precision))).max()
                               + 0.02)


# --- when gradserve refuses or fails ------------------------------------------------------

def test_a_request_over_the_servers_limits_is_invalid_input(tmp_path, start_server):
    """The evaluation fits the server's work bound and the gradient does not: the
    server's RESOURCE_EXHAUSTED reaches the UM-Bridge client as InvalidInput, naming the
    bound."""
    from gradserve.server.limits import Limits

    server = start_server(Limits(max_request_flops=100))
    path = build_model().save(tmp_path / "model.json")
    process = UmbridgeProcess(path, "--port", "0", "--server", f"127.0.0.1:{server.port}")
    try:
        limited = umbridge.HTTPModel(process.url(), "forward")
        point = [[0.1, 0.2, 0.3], [0.0] * 6]
        np.testing.assert_allclose(limited(point)[0], numpy_model(point)[0], rtol=1e-12)
        reply = requests.post(f"{process.url()}/Gradient", json=body(point), timeout=30)
        assert reply.status_code == 400
        error = reply.json()["error"]
        assert error["type"] == "InvalidInput"
        assert "RESOURCE_EXHAUSTED" in error["message"] and "max_request_flops" in error["message"]
    finally:
        assert process.stop() == 0, process.output()


def test_gradserve_gone_is_an_http_500_the_client_can_read(tmp_path, start_server):
    server = start_server()
    path = build_model().save(tmp_path / "model.json")
    process = UmbridgeProcess(path, "--port", "0", "--server", f"127.0.0.1:{server.port}",
                              "--timeout", "2")
    try:
        url = process.url()
        point = [[0.1, 0.2, 0.3], [0.0] * 6]
        server.stop(grace=0)
        reply = requests.post(f"{url}/Evaluate", json=body(point), timeout=60)
        assert reply.status_code == 500
        error = reply.json()["error"]
        assert error["type"] == "ModelError" and error["message"].startswith("gradserve: ")
        with pytest.raises(Exception, match="Model returned error of type ModelError"):
            umbridge.HTTPModel(url, "forward")(point)
        # the UM-Bridge server itself is still there
        assert requests.get(f"{url}/Info", timeout=10).json()["models"] == ["forward"]
    finally:
        assert process.stop() == 0, process.output()
