"""Seeing the computation: traces over real gRPC, their DOT pictures, `gradserve graph show`.

The seed example's pictures must carry the article's numbers: in reverse mode
the adjoint into x from the multiplication (through add) is sin(x) and from
the sine node (x + y) cos(x), summing to -6.2832; in forward mode from x the
tangent after add is 1 and the partial of sin is cos(x) = -1.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from gradserve import cli
from gradserve.client import Client, GraphBuilder, load_graph
from gradserve.client.render import format_array, trace_dot
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import graph_pb2
from gradserve.v1.codec import to_tensor
from support.server_process import COMMAND

EDGE = re.compile(r'^\s*"([^"]+)" -> "([^"]+)"(?: \[(.*)\])?;$', re.M)
NODE = re.compile(r'^\s*"([^"]+)" \[(.*label=<(.*)>)\];$', re.M)


def edges(dot: str) -> dict:
    """(tail, head) -> the edge's attribute text."""
    return {(a, b): attrs or "" for a, b, attrs in EDGE.findall(dot)}


def nodes(dot: str) -> dict:
    """name -> the node's label."""
    return {name: label for name, _, label in NODE.findall(dot)}


@pytest.fixture(scope="module")
def seed(seed_builder, seed_inputs):
    return seed_builder(), seed_inputs()


# --- the seed example's pictures ---------------------------------------------------------

def test_seed_reverse_picture_carries_the_articles_numbers(client, seed):
    g, inputs = seed
    r = client.differentiate(g, inputs, trace=True)  # a scalar output: adjoint 1 from o
    assert r.trace_mode == "reverse"
    dot = r.to_dot()
    e, n = edges(dot), nodes(dot)
    assert set(e) == {("x", "add_1"), ("y", "add_1"), ("x", "sin_2"), ("add_1", "o"),
                      ("sin_2", "o")}
    # mul splits: sin(x) back to the sum, x + y = 2 pi back to sin(x)
    assert "adj=-8.742e-08<" in e["add_1", "o"] and "adj=6.283<" in e["sin_2", "o"]
    # into x: sin(x) through add, (x + y) cos(x) = -6.283 through sin
    assert "adj=-8.742e-08<" in e["x", "add_1"] and "adj=-8.742e-08<" in e["y", "add_1"]
    assert "adj=-6.283<" in e["x", "sin_2"]
    # ... summing to -6.2832 at x; the output's own adjoint is 1
    assert "adj=-6.283<" in n["x"] and "adj=-8.742e-08<" in n["y"] and "adj=1<" in n["o"]
    assert "-6.283" in dot
    # values in the nodes, drawn against the data flow
    assert ">3.142<" in n["x"] and ">6.283<" in n["add_1"] and ">-8.742e-08<" in n["sin_2"]
    assert all("dir=back" in attrs for attrs in e.values())
    assert "peripheries=2" in dot.split('"o" [', 1)[1].split("\n", 1)[0]
    # the numbers are the server's, as decoded
    x = next(t for t in r.trace if t.name == "x")
    assert abs(x.adjoint[0] - -6.2832) < 1e-4 and x.adjoint.dtype == np.float32


def test_seed_forward_picture_from_x(client, seed):
    g, inputs = seed
    r = client.differentiate(g, inputs, tangents={"x": np.float32([1]), "y": np.float32([0])},
                             trace=True)
    assert r.trace_mode == "forward"
    dot = r.to_dot()
    e, n = edges(dot), nodes(dot)
    assert "tan=1<" in n["add_1"]  # the tangent after add is 1
    assert "∂=-1<" in e["x", "sin_2"] and "tan=-1<" in e["x", "sin_2"]  # cos(pi)
    assert "∂=1<" in e["x", "add_1"] and "tan=1<" in e["x", "add_1"]
    assert "∂=6.283<" in e["sin_2", "o"] and "tan=-6.283<" in e["sin_2", "o"]
    assert "tan=-6.283<" in n["o"]
    assert "dir=back" not in dot
    with pytest.raises(ValueError, match="no adjoints"):
        r.to_dot("reverse")


def test_forward_trace_from_one_input_only(client, seed):
    g, inputs = seed
    r = client.differentiate(g, inputs, tangents={"x": np.float32([1])}, wrt=["x"],
                             trace=True)
    trace = {t.name: t for t in r.trace}
    assert trace["y"].tangent is None and trace["add_1"].tangent[0] == 1
    y_edge = trace["add_1"].edges[1]
    assert y_edge.input == "y" and y_edge.tangent is None and y_edge.partial[0] == 1


def test_values_only_picture(client, seed):
    g, inputs = seed
    dot = client.differentiate(g, inputs, trace=True).to_dot("values")
    assert "adj=" not in dot and "tan=" not in dot
    assert nodes(dot)["add_1"].endswith("<br/>6.283")


# --- what values look like -----------------------------------------------------------------

def test_small_tensors_in_full_and_large_ones_summarized(client):
    g = GraphBuilder()
    small, big = g.input("small", "float64", [2, 3]), g.input("big", "float64", [100])
    g.output("loss", g.sum(g.tanh(big)) + g.sum(small * small))
    inputs = {"small": np.arange(6.0).reshape(2, 3) / 3, "big": np.arange(100.0) / 10}
    r = client.differentiate(g, inputs, trace=True)
    n = nodes(r.to_dot())
    assert "[[0, 0.3333, 0.6667], [1, 1.333, 1.667]]" in n["small"]
    assert "(100,) min 0 mean 4.95 max 9.9" in n["big"]
    assert "0.1," not in n["big"]  # no element list
    big_adj = re.search(r"adj=([^<]*)<", n["big"]).group(1)
    assert big_adj.startswith("(100,) min ") and " mean " in big_adj
    assert "(2, 3) float64" in n["small"]


@pytest.mark.parametrize("value, text", [
    (np.float32(np.pi), "3.142"), (np.array([-6.2831855], np.float32), "-6.283"),
    (np.array([1.0, 2.5, -3.0]), "[1, 2.5, -3]"), (np.array([[1, 2], [3, 4]]), "[[1, 2], [3, 4]]"),
    (np.zeros((0, 3)), "empty (0, 3)"), (np.arange(7), "(7,) min 0 mean 3 max 6"),
])
def test_format_array(value, text):
    assert format_array(value) == text


def test_builder_structure_picture():
    g = GraphBuilder()
    x = g.input("x", "float32", [-1, 3])
    k = g.constant(np.float32([1, 2, 3]), name="k")
    g.output("o", g.sum(x * k, axes=[1]))
    dot = g.to_dot()
    n = nodes(dot)
    assert "input (?, 3) float32" in n["x"] and "[1, 2, 3]" in n["k"]
    assert "shape=box" in dot.split('"x" [', 1)[1].split("\n", 1)[0]
    assert "<b>sum</b>" in n["o"] and "axes=[1]" in n["o"]
    assert set(edges(dot)) == {("x", "mul_1"), ("k", "mul_1"), ("mul_1", "o")}
    assert dot.startswith("digraph gradserve {") and dot.rstrip().endswith("}")


def test_names_are_quoted_and_escaped():
    g = GraphBuilder()
    x = g.input('x"<1>', "float64", [1])
    g.output(g.sin(x, name="a\\b"))
    dot = g.to_dot()
    assert '"x\\"<1>"' in dot and "x&quot;&lt;1&gt;" in dot and '"a\\\\b"' in dot


# --- the wire: off by default, bounded, refusals --------------------------------------------

def test_trace_is_off_by_default(client, stub, seed):
    g, inputs = seed
    r = client.differentiate(g, inputs)
    assert r.trace is None and r.trace_mode == ""
    with pytest.raises(ValueError, match="no trace"):
        r.to_dot()
    request = pb.DifferentiateRequest(graph=g.build())
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(to_tensor(value))
    assert not stub.Differentiate(request, timeout=10).HasField("trace")
    request.trace = True
    reply = stub.Differentiate(request, timeout=10)
    assert reply.HasField("trace") and reply.trace.mode == pb.MODE_REVERSE
    assert [n.op for n in reply.trace.nodes] == ["input", "input", "add", "sin", "mul"]
    assert not reply.trace.nodes[0].HasField("tangent")


def test_trace_over_the_size_bound_is_resource_exhausted(start_server, seed):
    g, inputs = seed
    s = start_server(Limits(max_trace_elements=10))
    with Client(f"127.0.0.1:{s.port}", timeout=10) as c:
        assert c.server_info().limits.max_trace_elements == 10
        assert c.differentiate(g, inputs).jacobian  # no trace: no bound
        with pytest.raises(grpc.RpcError) as info:
            c.differentiate(g, inputs, trace=True)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_trace_elements" in info.value.details()


def test_trace_needs_a_starting_point(client, seed):
    g, inputs = seed
    with pytest.raises(grpc.RpcError) as info:
        client.differentiate(g, inputs, mode="forward", trace=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "needs tangents" in info.value.details()
    vector = GraphBuilder()
    v = vector.input("v", "float64", [3])
    vector.output("w", vector.sin(v))
    with pytest.raises(grpc.RpcError) as info:
        client.differentiate(vector, {"v": np.ones(3)}, trace=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "one element" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        client.differentiate(vector, {"v": np.ones(3)}, tangents={"v": np.ones((2, 3))},
                             trace=True)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    r = client.differentiate(vector, {"v": np.ones(3)}, cotangents={"w": np.ones(3)},
                             trace=True)
    assert np.allclose(r.cotangents["v"], np.cos(1.0))
    assert np.allclose(next(t for t in r.trace if t.name == "v").adjoint, np.cos(1.0))


def test_trace_over_a_stream(client, seed):
    g, inputs = seed
    with client.stream(g) as session:
        plain = session.differentiate(inputs)
        traced = session.differentiate(inputs, trace=True)
    assert plain.trace is None and traced.trace_mode == "reverse"
    assert "-6.283" in traced.to_dot()


def test_engine_traces_draw_too(seed):
    from gradserve.engine import compile, trace
    from gradserve.server.convert import graph_from_proto

    g, inputs = seed
    plan = compile(graph_from_proto(g.build()))
    t = trace(plan, inputs, "reverse", cotangents={"o": np.float32([1])})
    assert "adj=-6.283<" in nodes(trace_dot(t.nodes, "reverse"))["x"]


# --- gradserve graph show ------------------------------------------------------------------

SEED_PY = '''
from gradserve.client import GraphBuilder

def build():
    g = GraphBuilder()
    x, y = g.input("x", "float32", [1]), g.input("y", "float32", [1])
    g.output("o", (x + y) * g.sin(x))
    return g
'''


def show(*args) -> int:
    return cli.main(["graph", "show", *map(str, args)])


def test_save_and_load_json_and_binary(tmp_path, seed):
    g, _ = seed
    for name in ("g.json", "g.pb"):
        path = g.save(tmp_path / name)
        assert load_graph(path) == g.build()
    assert json_format.Parse((tmp_path / "g.json").read_text(), graph_pb2.Graph()) == g.build()


def test_cli_reverse_on_a_saved_json_graph(tmp_path, address, seed, capsys):
    g, _ = seed
    path = g.save(tmp_path / "seed.json")
    out = tmp_path / "seed.dot"
    assert show(path, "--inputs", "x=pi,y=pi", "--mode", "reverse", "--server", address,
                "-o", out) == 0
    dot = out.read_text(encoding="utf-8")
    assert "adj=-6.283<" in nodes(dot)["x"]
    assert "adj=-8.742e-08<" in edges(dot)["x", "add_1"]


def test_cli_forward_on_a_python_file_to_stdout(tmp_path, address, capsys):
    path = tmp_path / "seed.py"
    path.write_text(SEED_PY)
    assert show(path, "--inputs", "x=3.14159", "--inputs", "y=3.14159", "--mode", "forward",
                "--wrt", "x", "--server", address) == 0
    dot = capsys.readouterr().out
    assert "tan=1<" in nodes(dot)["add_1"] and "∂=-1<" in edges(dot)["x", "sin_2"]


def test_cli_structure_needs_no_server(tmp_path, seed, capsys):
    g, _ = seed
    path = g.save(tmp_path / "seed.pb")
    assert show(path) == 0
    assert set(edges(capsys.readouterr().out)) == {
        ("x", "add_1"), ("y", "add_1"), ("x", "sin_2"), ("add_1", "o"), ("sin_2", "o")}


def test_cli_inputs_file_and_vectors(tmp_path, address, capsys):
    g = GraphBuilder()
    w, b = g.input("w", "float64", [2, 2]), g.input("b", "float64", [2])
    g.output("l", g.sum(g.matmul(w, b)))
    path = g.save(tmp_path / "g.json")
    np.savez(tmp_path / "in.npz", w=np.eye(2, dtype=np.float32))
    assert show(path, "--inputs-file", tmp_path / "in.npz", "--inputs", "b=[1,2]",
                "--server", address) == 0
    n = nodes(capsys.readouterr().out)
    assert "[[1, 0], [0, 1]]" in n["w"] and "adj=[1, 1]" in n["b"]


@pytest.mark.parametrize("args, message", [
    (["--inputs", "x=pi"], "no value for input y"),
    (["--inputs", "x=pi,z=1,y=1"], "expected NAME=VALUE"),
    (["--inputs", "x=abc,y=1"], "not a number"),
    (["--mode", "reverse"], "need input values"),
    (["--inputs", "x=1,y=1", "--mode", "forward"], "needs --wrt"),
    (["-o", "out.jpg"], "use a name ending in"),
    (["--inputs", "x=1,y=1", "--mode", "forward", "--wrt", "o"], "not a floating input"),
])
def test_cli_usage_errors(tmp_path, seed, capsys, args, message):
    g, _ = seed
    path = g.save(tmp_path / "seed.json")
    assert show(path, *args) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_graph_files(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "empty.py").write_text("x = 1\n")
    assert show(tmp_path / "bad.json") == 2
    assert "is not a JSON gradserve Graph" in capsys.readouterr().err
    assert show(tmp_path / "empty.py") == 2
    assert "must define `graph`" in capsys.readouterr().err
    assert show(tmp_path / "missing.json") == 2


def test_cli_of_must_name_a_floating_output(tmp_path, address, seed, capsys):
    g, _ = seed
    path = g.save(tmp_path / "seed.json")
    assert show(path, "--inputs", "x=1,y=1", "--of", "x", "--server", address) == 2
    assert "not a floating output" in capsys.readouterr().err


def test_cli_server_errors_are_reported(tmp_path, address, capsys):
    g = GraphBuilder()
    v = g.input("v", "float64", [2])
    g.output("w", g.log(v))
    path = g.save(tmp_path / "g.json")
    assert show(path, "--inputs", "v=[1,2,3]", "--server", address) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


def test_cli_without_graphviz_still_writes_dot(tmp_path, seed):
    """PATH without `dot`: the DOT file is written and the message says to install Graphviz."""
    g, _ = seed
    path = g.save(tmp_path / "seed.json")
    done = subprocess.run(COMMAND + ["graph", "show", str(path), "-o", str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=60, env={"PATH": ""})
    assert done.returncode == 1
    assert "install Graphviz" in done.stderr and (tmp_path / "s.dot").exists()
    assert not (tmp_path / "s.png").exists()


def test_cli_png_with_an_in_process_server(tmp_path):
    """The whole command as users run it: a subprocess starting its own server."""
    path = tmp_path / "seed.py"
    path.write_text(SEED_PY)
    png = tmp_path / "seed.png"
    done = subprocess.run(COMMAND + ["graph", "show", str(path), "--inputs", "x=pi,y=pi",
                                     "-o", str(png)], capture_output=True, text=True, timeout=60)
    assert "adj=-6.283<" in (tmp_path / "seed.dot").read_text(encoding="utf-8")
    if shutil.which("dot") is None:
        assert done.returncode == 1 and "install Graphviz" in done.stderr
        if os.environ.get("GRADSERVE_REQUIRE_GRAPHVIZ") == "1":  # CI installs it
            pytest.fail("Graphviz's `dot` is not installed and GRADSERVE_REQUIRE_GRAPHVIZ=1")
        pytest.skip("Graphviz's `dot` is not installed: the PNG part is not checked")
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- pictures of real models: resnet18 grouped by module -----------------------------------

SCREEN = (1920, 1080)  # a picture that fits on a screen needs no scrolling at 100%
CLUSTER = re.compile(r'subgraph "cluster_([^"]+)" \{\n\s*label="([^"]+)"')


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def clusters(dot: str) -> set:
    found = CLUSTER.findall(dot)
    assert all(name == label for name, label in found)
    return {name for name, _ in found}


def resnet18():
    """torchvision's resnet18, compactly: BasicBlocks in layer1..layer4 (torchvision's
    module names), random weights, eval mode."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + identity)

    class ResNet18(nn.Module):
        def __init__(self, classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1, self.relu = nn.BatchNorm2d(64), nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            cin = 64
            for i, cout in enumerate([64, 128, 256, 512]):
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, cout, stride),
                                                              BasicBlock(cout, cout, 1)))
                cin = cout
            self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(512, classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    torch.manual_seed(0)
    return ResNet18().eval(), torch.randn(1, 3, 32, 32)


@pytest.fixture(scope="module", params=["torchscript", "dynamo"])
def resnet18_onnx(request, tmp_path_factory):
    """resnet18 as PyTorch's two exporters write it: module paths in the node names
    (/layer1/layer1.0/conv1/Conv) or in the nodes' metadata (dynamo, node_conv2d_1)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    model, x = resnet18()
    path = tmp_path_factory.mktemp("resnet18") / f"resnet18_{request.param}.onnx"
    if request.param == "dynamo":
        pytest.importorskip("onnxscript")
        torch.onnx.export(model, (x,), str(path), dynamo=True, optimize=False)
    else:
        # without constant folding: no batch norm folded into a conv
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the exporter's own notice
            torch.onnx.export(model, (x,), str(path), dynamo=False, do_constant_folding=False)
    return request.param, path


def render(tmp_path, *args) -> tuple[str, tuple[int, int]]:
    if shutil.which("dot") is None:
        if os.environ.get("GRADSERVE_REQUIRE_GRAPHVIZ") == "1":
            pytest.fail("Graphviz's `dot` is not installed and GRADSERVE_REQUIRE_GRAPHVIZ=1")
        pytest.skip("Graphviz's `dot` is not installed")
    png = tmp_path / "picture.png"
    assert show(*args, "-o", png) == 0
    return (tmp_path / "picture.dot").read_text(encoding="utf-8"), png_size(png)


def test_resnet18_fits_a_screen_in_clusters_by_module(resnet18_onnx, tmp_path):
    exporter, path = resnet18_onnx
    dot, (width, height) = render(tmp_path, path)
    assert width <= SCREEN[0] and height <= SCREEN[1], (width, height)
    assert "rankdir=TB" in dot and not re.search(r"[ ,\[]size=", dot)  # never scaled down
    assert 'fontsize=10' in dot
    assert clusters(dot) == {"layer1", "layer2", "layer3", "layer4"}
    n = nodes(dot)
    # each residual block is one box, a repeated block says what it repeats
    for block in ("layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer4.1"):
        assert f"<b>{block}</b>" in n[block]
    assert "as layer1.0 · 7 ops" in n["layer1.1"] and "as layer2.0 · 9 ops" in n["layer3.0"]
    assert "9 ops" in n["layer2.0"]  # conv, bn, relu, conv, bn, add, relu + downsample's 2
    conv1 = next(label for label in n.values() if label.startswith("<b>conv1</b>"))
    # 64 x 3 x 7 x 7: no batch norm folded in (dynamo's export adds a bias of 64 zeros)
    assert f"Conv · {9408 + (64 if exporter == 'dynamo' else 0):,} params" in conv1
    assert len(n) <= 20
    edge_pairs = set(edges(dot))
    assert ("layer1.0", "layer1.1") in edge_pairs and ("layer3.1", "layer4.0") in edge_pairs


def test_resnet18_depth_opens_blocks_named_by_onnx_nodes(resnet18_onnx, tmp_path):
    exporter, path = resnet18_onnx
    dot, (width, height) = render(tmp_path, path, "--depth", "2")
    assert width <= SCREEN[0]
    # the first block of each kind opens; its repeats stay one box each
    assert clusters(dot) == {"layer1", "layer1.0", "layer2", "layer2.0", "layer3", "layer4"}
    n = nodes(dot)
    conv = "/layer1/layer1.0/conv1/Conv" if exporter == "torchscript" else "node_conv2d_1"
    params = 64 * 64 * 9 + (64 if exporter == "dynamo" else 0)
    assert n[conv].startswith("<b>conv1</b>") and f"Conv · {params:,} params" in n[conv]
    assert f'tooltip="{conv}"' in dot  # the ONNX node's name, also when hovering in SVG
    bn = next(name for name, label in n.items() if label.startswith("<b>bn1</b>")
              and "256 params" in label)  # layer2.0.bn1: the whole BatchNormalization
    assert "BatchNormalization" in n[bn]
    assert "downsample</b><br/>" in n["layer2.0.downsample"]  # a level deeper: one box
    adds = [name for name, label in n.items() if label == "<b>Add</b>"]
    assert len(adds) == 2  # the residual sums of layer1.0 and layer2.0


def test_resnet18_focus_on_one_block(resnet18_onnx, tmp_path):
    exporter, path = resnet18_onnx
    dot, (width, height) = render(tmp_path, path, "--focus", "layer3.0")
    assert width <= SCREEN[0] and height <= SCREEN[1]
    assert clusters(dot) == {"layer3", "layer3.0", "layer3.0.downsample"}
    n = nodes(dot)
    assert "outside the focus" in n["layer2.1"] and "outside the focus" in n["layer3.1"]
    titles = sorted(re.match(r"<b>([^<]*)</b>", label).group(1) for label in n.values())
    assert titles == sorted(["layer2.1", "layer3.1", "conv1", "bn1", "relu", "conv2", "bn2",
                             "Add", "downsample.0", "downsample.1",
                             "relu_1" if exporter == "torchscript" else "relu"])
    assert "focus: layer3.0" in dot


def test_focus_and_depth_refusals(resnet18_onnx, tmp_path, capsys):
    _, path = resnet18_onnx
    assert show(path, "--focus", "layer9") == 2
    err = capsys.readouterr().err
    assert "--focus layer9: no module or ONNX node of that name" in err and "layer2.0" in err
    assert show(path, "--depth", "-1") == 2
    assert "use 0 or more" in capsys.readouterr().err


def test_a_saved_graph_is_grouped_by_its_node_names(tmp_path, capsys):
    """A .pb saved from a TorchScript export keeps the module paths in its node names;
    `out/op` intermediates of one ONNX node stay one box."""
    g = GraphBuilder()
    x = g.input("x", "float64", [2, 4])
    h = x
    for i in range(3):
        w = g.constant(np.full((4, 4), 0.1 * (i + 1)), name=f"enc.{i}.lin.weight")
        h = g.matmul(h, w, name=f"/enc/enc.{i}/lin/MatMul_output_0")
        h = g.node("mul", [h, h], name=f"/enc/enc.{i}/act/Act_output_0/square")
        h = g.tanh(h, name=f"/enc/enc.{i}/act/Act_output_0")
    g.output(g.sum(h, name="/head/ReduceSum_output_0"))
    path = g.save(tmp_path / "enc.pb")
    assert show(path, "--depth", "2") == 0
    dot = capsys.readouterr().out
    assert clusters(dot) == {"enc", "enc.0"}  # enc.1, enc.2 repeat enc.0 op for op
    n = nodes(dot)
    assert n["/enc/enc.0/lin/MatMul_output_0"].startswith("<b>lin</b>")
    assert "matmul · 16 params" in n["/enc/enc.0/lin/MatMul_output_0"]
    assert n["/enc/enc.0/act/Act_output_0"].startswith("<b>act</b>")  # square + tanh
    assert "as enc.0 · 2 ops · 16 params" in n["enc.2"]
    assert ("/enc/enc.0/act/Act_output_0", "enc.1") in edges(dot)
    assert "peripheries=2" in dot.split('"/head/ReduceSum_output_0" [', 1)[1].split("\n")[0]
    assert show(path, "--depth", "0") == 0
    assert set(nodes(capsys.readouterr().out)) == {"x", "enc", "/head/ReduceSum_output_0"}


def test_depth_and_focus_are_for_structure(tmp_path, seed, capsys):
    g, _ = seed
    path = g.save(tmp_path / "seed.json")
    assert show(path, "--inputs", "x=1,y=1", "--depth", "1") == 2
    assert "draw a model's structure" in capsys.readouterr().err
