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
