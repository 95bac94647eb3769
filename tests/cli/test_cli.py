"""The `gradserve` command, run as a subprocess: demo, serve (port 0 and GRADSERVE_PORT),
health, --help, and a clean exit on SIGTERM.
"""

from __future__ import annotations

import re
import subprocess
import time
from importlib.metadata import entry_points
from pathlib import Path

import grpc
import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from support.server_process import COMMAND, ServerProcess, clean_env, free_port

PUBLISHED_DODX, PUBLISHED_DODY = -6.2832, -8.7423e-08


def run(*args, env=None, timeout=60):
    return subprocess.run(COMMAND + list(args), capture_output=True, text=True, timeout=timeout,
                          env=env or clean_env(), stdin=subprocess.DEVNULL)


def figure(name, text):
    """The number printed after `name =` in the demo's output."""
    match = re.search(re.escape(name) + r"\s*=\s*(\S+)", text)
    assert match, f"no '{name} =' in:\n{text}"
    return float(match.group(1))


def check_demo_output(out):
    pi = np.float32(np.pi)
    assert "-6.2832" in out and "-8.7423e-08" in out
    dodx, dody = figure("do/dx", out), figure("do/dy", out)
    assert abs(dodx - PUBLISHED_DODX) < 1e-4
    assert abs(dody - PUBLISHED_DODY) < 1e-11
    assert abs(dodx - float(np.sin(pi) + (pi + pi) * np.cos(pi))) < 1e-4
    first, second = out.split("\n2.", 1)
    assert re.search(r"mode\s*=\s*forward", second), "the 1-input, 1000-output example " \
                                                      "must be computed in forward mode"
    assert "(1000, 1)" in second
    # d wave / dt = k cos(k t) exp(-0.1 k) at t = 0.5, first values as printed (4 decimals)
    printed = re.search(r"first values ([-\d., ]+)", second).group(1)
    values = [float(v) for v in printed.split(",")]
    k = np.linspace(0.0, 10.0, 1000)[:len(values)]
    np.testing.assert_allclose(values, k * np.cos(k * 0.5) * np.exp(-0.1 * k), atol=6e-5)


def test_demo_with_an_in_process_server():
    result = run("demo")
    assert result.returncode == 0, result.stderr
    check_demo_output(result.stdout)


def test_serve_on_port_0_then_health_demo_and_sigterm():
    with ServerProcess("--port", "0", "--grace", "2") as server:
        host, port = server.address()
        assert host == "127.0.0.1" and port > 0
        address = f"{host}:{port}"

        for service in ("", "gradserve.v1.GradientService"):
            health = run("health", "--server", address, "--service", service)
            assert health.returncode == 0, health.stderr
            assert "SERVING" in health.stdout
        demo = run("demo", "--server", address)
        assert demo.returncode == 0, demo.stderr
        assert address in demo.stdout
        check_demo_output(demo.stdout)
        with Client(address, timeout=10) as client:
            assert client.server_info().version

        started = time.monotonic()
        assert server.terminate(timeout=15) == 0
        assert time.monotonic() - started < 5
        assert "shutting down" in "".join(server.stderr)

    after = run("health", "--server", address, "--timeout", "1")
    assert after.returncode != 0
    assert "UNAVAILABLE" in after.stderr or "DEADLINE_EXCEEDED" in after.stderr


def test_gradserve_port_and_limit_variables_are_honoured():
    port = free_port()
    env = clean_env(GRADSERVE_PORT=port, GRADSERVE_MAX_NODES=77)
    with ServerProcess(env=env) as server:
        assert server.address()[1] == port
        health = run("health", env=env)  # health's default server follows GRADSERVE_PORT too
        assert health.returncode == 0, health.stderr
        with Client(f"127.0.0.1:{port}", timeout=10) as client:
            assert client.server_info().limits.max_nodes == 77
        assert server.terminate(timeout=15) == 0


def test_a_flag_wins_over_its_variable():
    taken = free_port()
    with ServerProcess("--port", "0", "--max-nodes", "5",
               env=clean_env(GRADSERVE_PORT=taken, GRADSERVE_MAX_NODES=77)) as server:
        host, port = server.address()
        assert port != taken
        with Client(f"{host}:{port}", timeout=10) as client:
            assert client.server_info().limits.max_nodes == 5
        assert server.terminate(timeout=15) == 0


def test_the_console_script_is_gradserve_cli():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "gradserve"]
    assert script.value == "gradserve.cli:main"


@pytest.mark.parametrize("command", ["", "serve", "demo", "health"])
def test_help(command):
    result = run(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: gradserve" in result.stdout
    if command == "serve":
        for variable in ("GRADSERVE_PORT", "GRADSERVE_MAX_NODES", "GRADSERVE_MAX_TENSOR_ELEMENTS"):
            assert variable in result.stdout
        assert "--port" in result.stdout and "--host" in result.stdout
    if command == "":
        for sub in ("serve", "demo", "health"):
            assert sub in result.stdout


def test_serve_exits_on_sigterm_after_garbage_on_the_stream():
    """grpcio keeps a stream call whose message failed to parse in its state for good, so the
    event grpc.Server.stop(grace) returns is never set: the server must not wait on it
    forever (30 such streams hung `gradserve serve` in 5 of 5 runs when it did)."""
    with ServerProcess("--port", "0", "--grace", "0.5") as server:
        host, port = server.address()
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stream = channel.stream_stream("/gradserve.v1.GradientService/DifferentiateStream")
            for _ in range(30):
                with pytest.raises(grpc.RpcError):
                    list(stream(iter([b"\xff\xff\xff\xff not a request"]), timeout=10))
        try:
            code = server.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 15 s after SIGTERM with --grace 0.5")
        assert code == 0


# --- ONNX: graph import, graph show ------------------------------------------------------------

def test_graph_import_writes_a_graph_and_describes_it(tmp_path, client):
    onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
    from gradserve.client import load_graph
    from support.onnx_models import digits_cnn_model

    model = tmp_path / "cnn.onnx"
    onnx.save(digits_cnn_model(), model)
    done = run("graph", "import", str(model), "-o", str(tmp_path / "cnn.pb"))
    assert done.returncode == 0, done.stderr
    assert "inputs     image float32 [-1, 1, 8, 8]" in done.stdout
    assert "outputs    logits" in done.stdout
    assert "ops        7 nodes: add 2, conv 1, relu 1, max_pool 1, reshape 1, matmul 1" in done.stdout
    assert "parameters 4 constants, 1,370 values" in done.stdout
    graph = load_graph(tmp_path / "cnn.pb")
    x = np.random.default_rng(0).random((3, 1, 8, 8), np.float32)
    assert client.evaluate(graph, {"image": x})["logits"].shape == (3, 10)

    done = run("graph", "import", str(model), "-o", str(tmp_path / "cnn.json"),
               "--parameters", "inputs")
    assert done.returncode == 0, done.stderr
    assert "parameters 4 graph inputs, 1,370 values (saved in" in done.stdout
    graph = load_graph(tmp_path / "cnn.json")
    assert [i.name for i in graph.inputs] == ["image", "conv.weight", "conv.bias", "fc.weight",
                                              "fc.bias"]
    with np.load(tmp_path / "cnn.params.npz") as params:
        out = client.evaluate(graph, {"image": x, **params})["logits"]
    assert out.shape == (3, 10)

    shown = run("graph", "show", str(model))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("digraph") and "max_pool" in shown.stdout


def test_graph_import_errors_name_the_node(tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
    from onnx import helper
    from support.onnx_models import model as onnx_model

    bad = onnx_model([helper.make_node("Det", ["x"], ["y"], name="det")],
                     {"x": np.zeros((2, 2))})
    onnx.save(bad, tmp_path / "det.onnx")
    done = run("graph", "import", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "g.pb"))
    assert done.returncode == 1  # a model it cannot import; 2 is for a wrong command line
    assert "ONNX node 'det' (Det): opset 18 Det is not supported" in done.stderr
    assert "Traceback" not in done.stderr
    done = run("graph", "import", str(tmp_path / "det.onnx"), "-o", str(tmp_path / "g.txt"))
    assert done.returncode == 2 and "use a name ending in .pb" in done.stderr


def test_serve_refuses_an_unusable_token_file(tmp_path):
    """A token no client could send in gRPC metadata: a one-line error naming the file's
    problem and exit status 1, not a traceback and not a server nobody can call."""
    token = tmp_path / "token"
    token.write_text("pässwort\n", encoding="utf-8")
    done = run("serve", "--port", "0", "--auth-token-file", str(token), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("gradserve serve: "), done.stderr
    assert "Traceback" not in done.stderr


def test_blas_threads_flag():
    """--blas-threads limits BLAS's threads in the server process (threadpoolctl); a
    negative count, or a pressure outside 0-100, is refused with a one-line message."""
    for flag, value, message in (
            ("--blas-threads", "-1", "--blas-threads and --blas-threads-alone must be >= 0"),
            ("--blas-threads-alone", "-2", "--blas-threads-alone must be >= 0"),
            ("--blas-alone-max-pressure", "101", "must be within 0-100")):
        done = run("serve", "--port", "0", flag, value, timeout=60)
        assert done.returncode == 1 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    with ServerProcess("--port", "0", "--blas-threads", "1") as server:
        with Client(server.wait_serving()) as client:
            a = np.arange(400.0).reshape(20, 20)
            g = GraphBuilder()
            x = g.input("a", "float64", [20, 20])
            g.output("p", x @ x)
            np.testing.assert_allclose(client.evaluate(g, {"a": a})["p"], a @ a)
        assert server.terminate(timeout=30) == 0


def test_kernels_flag_and_variable():
    """--kernels picks the engine's conv kernel provider (logged at start); numpy's needs
    nothing; a depthwise conv answers the same either way; with numpy, the default, a
    process never loads numba, not even for a depthwise conv; an unknown provider in
    GRADSERVE_KERNELS is a one-line error."""
    g = GraphBuilder()
    x = g.input("x", "float64", [2, 3, 5, 5])
    w = g.input("w", "float64", [3, 1, 3, 3])
    g.output("y", g.conv(x, w, pads=[1, 1, 1, 1], groups=3))
    g_plain = GraphBuilder()
    g_plain.output("s", g_plain.sum(g_plain.input("x", "float64", [2, 3, 5, 5])))
    rng = np.random.default_rng(0)
    inputs = {"x": rng.standard_normal((2, 3, 5, 5)), "w": rng.standard_normal((3, 1, 3, 3))}
    answers = {}
    choices = ["numpy"]
    try:
        import numba  # noqa: F401
        choices.append("numba")
    except ImportError:
        pass
    for provider in choices:
        with ServerProcess("--port", "0", "--kernels", provider) as server:
            with Client(server.wait_serving()) as client:
                answers[provider] = client.evaluate(g, inputs)["y"]
            server.wait_for(re.compile(f"conv kernels: {provider}"), timeout=120)
            assert server.terminate(timeout=30) == 0
    for got in answers.values():
        np.testing.assert_allclose(got, answers["numpy"], rtol=1e-12, atol=1e-12)
    # numpy (the default): no numba in the process, whatever it computes (loading it is
    # memory and CPU that no request's declared cost includes)
    with ServerProcess("--port", "0") as server:
        with Client(server.wait_serving()) as client:
            client.evaluate(g_plain, {"x": inputs["x"]})
            np.testing.assert_allclose(client.evaluate(g, inputs)["y"], answers["numpy"],
                                       rtol=1e-12, atol=1e-12)
            maps = Path(f"/proc/{server.proc.pid}/maps").read_text()
            assert "llvmlite" not in maps and "numba" not in maps
        assert server.terminate(timeout=30) == 0
    done = run("serve", "--port", "0", env=clean_env(GRADSERVE_KERNELS="fortran"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith("gradserve serve: --kernels:"), done.stderr
    assert "expected one of auto, numpy, numba" in done.stderr
