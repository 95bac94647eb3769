"""ONNX import of models from elsewhere (issue 19, item 9): external data that points out of
the model's folder, import-time folding that asks for gigabytes from a few bytes, absurd
opsets, recursive local functions, memory exhausted; the library raises OnnxImportError and
`gradserve graph import` prints one line and exits 1, never a traceback. The import's own
peak memory is measured (VmHWM of the importing process).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys

import numpy as np
import pytest
from numpy.testing import assert_allclose

onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gradserve.client.onnx import OnnxImportError, from_onnx  # noqa: E402
from support.server_process import COMMAND, clean_env  # noqa: E402
from support.onnx_models import model, node  # noqa: E402

MIB = 2 ** 20


def cli_import(path, *extra, limit_bytes=None, tmp_path):
    """`gradserve graph import PATH`, optionally under an address-space limit (where
    grpc's core, which the command loads, logs its own complaints: silenced)."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    env = clean_env()
    if limit_bytes:
        env["GRPC_VERBOSITY"] = "NONE"
    return subprocess.run(COMMAND + ["graph", "import", str(path), "-o",
                                     str(tmp_path / "out.pb"), *extra],
                          capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL, preexec_fn=limit if limit_bytes else None)


# A line of grpc core's own log (absl format: E1207 15:09:20.249136    4531 file.cc:309] ...):
# under an address-space limit its poller may still log one (epoll_ctl failed, seen once
# beside a CPU hog) although GRPC_VERBOSITY is NONE. Not the command's output.
GRPC_CORE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def assert_one_line_error(done, *fragments):
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.strip().splitlines()
             if not GRPC_CORE_LOG.match(line)]
    assert len(lines) == 1 and lines[0].startswith("gradserve graph import: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- external data ------------------------------------------------------------------------------

def external_model(folder, location):
    """y = x + W with W stored externally at `location` (relative to `folder`)."""
    m = model([node("Add", ["x", "W"])], {"x": np.zeros(4)}, {"W": np.arange(4.0)})
    w = m.graph.initializer[0]
    w.ClearField("raw_data")
    w.ClearField("double_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "32")):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    onnx.save(m, path)
    return path


@pytest.fixture
def secret(tmp_path):
    """Data outside the model's folder, which no import may read."""
    path = tmp_path / "outside" / "secret.bin"
    path.parent.mkdir()
    path.write_bytes(np.full(4, 7.0).tobytes())
    return path


def test_external_data_inside_the_folder_is_read(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "sub").mkdir()
    (folder / "sub" / "w.bin").write_bytes(np.arange(4.0).tobytes())
    imported = from_onnx(external_model(folder, "sub/w.bin"))
    w = imported.graph.build().constants["W"]
    assert list(w.shape) == [4]


@pytest.mark.parametrize("how, message", [
    ("dotdot", "contains '..'"),
    ("absolute", "is an absolute path"),
    ("symlink", "leads out of the model's folder"),
    ("symlinked-folder", "leads out of the model's folder"),
])
def test_external_data_outside_the_folder_is_refused(tmp_path, secret, how, message):
    folder = tmp_path / "m"
    folder.mkdir()
    if how == "dotdot":
        location = "../outside/secret.bin"
    elif how == "absolute":
        location = str(secret)
    elif how == "symlink":
        os.symlink(secret, folder / "w.bin")
        location = "w.bin"
    else:
        os.symlink(secret.parent, folder / "data")
        location = "data/secret.bin"
    path = external_model(folder, location)
    with pytest.raises(OnnxImportError, match=message):
        from_onnx(path)
    if how == "symlink":  # the command prints the same error (one run keeps the test short)
        assert_one_line_error(cli_import(path, tmp_path=tmp_path), message, "initializer 'W'")
        assert not (tmp_path / "out.pb").exists()


# --- import-time folding: bounded before it allocates --------------------------------------------

def i64(*v):
    return np.asarray(v, np.int64)


# each asks for ~1 GiB (2^27 float64 or int64 values) from a few bytes
BIG = 2 ** 27
GREEDY = {
    "ConstantOfShape": ([node("ConstantOfShape", ["s"], ["c"],
                              value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [1.0])),
                         node("ReduceSum", ["c"], ["y"], keepdims=0)], {"s": i64(BIG)}),
    "Expand+Add": ([node("Expand", ["one", "s"], ["e"]), node("Add", ["e", "one"], ["a"]),
                    node("ReduceSum", ["a"], ["y"], keepdims=0)],
                   {"one": np.ones(1), "s": i64(2 ** 14, 2 ** 13)}),
    "Range": ([node("Range", ["start", "limit", "delta"], ["y"])],
              {"start": i64(0)[0], "limit": i64(BIG)[0], "delta": i64(1)[0]}),
    "Tile": ([node("Tile", ["one", "s"], ["y"])], {"one": np.ones(1), "s": i64(BIG)}),
    "Pad": ([node("Pad", ["one", "p"], ["y"])], {"one": np.ones(1), "p": i64(0, BIG)}),
}


def greedy_model(name):
    nodes, inits = GREEDY[name]
    m = model(nodes, {}, {n: np.asarray(a) for n, a in inits.items()})
    return m


def test_a_few_bytes_cannot_make_the_import_take_a_gigabyte(tmp_path):
    """Each model is a few hundred bytes; the import is refused before it allocates,
    naming the bound and how to raise it; the importing process's peak stays far below
    the 1 GiB the model asks for."""
    # VmHWM: the peak of this process's own memory (ru_maxrss would include the pytest
    # process's at fork time)
    script = ("import json, sys\n"
              "from gradserve.client.onnx import OnnxImportError, from_onnx\n"
              "errors = {}\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n"
              "        from_onnx(path)\n"
              "    except OnnxImportError as err:\n"
              "        errors[path] = str(err)\n"
              "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]\n"
              "print(json.dumps({'errors': errors, 'peak_kib': int(hwm[0].split()[1])}))\n")
    paths = []
    for name in GREEDY:
        path = tmp_path / f"{name}.onnx"
        onnx.save(greedy_model(name), path)
        assert path.stat().st_size < 400
        paths.append(str(path))
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True,
                          text=True, timeout=120, env=clean_env())
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert sorted(result["errors"]) == sorted(paths)
    for error in result["errors"].values():
        assert "over the import-time folding bound of 256.0 MiB" in error, error
        assert "max_fold_bytes=N" in error and "--max-fold-mib N" in error, error
    assert result["peak_kib"] * 1024 < 400 * MIB, result["peak_kib"]

    done = cli_import(paths[0], tmp_path=tmp_path)
    assert_one_line_error(done, "ConstantOfShape", "--max-fold-mib N")


def test_the_folding_bound_can_be_raised(client, tmp_path):
    m = model([node("ConstantOfShape", ["s"], ["c"],
                    value=helper.make_tensor("v", TensorProto.DOUBLE, [1], [0.5])),
               node("Add", ["x", "c"])], {"x": np.zeros((512, 1024))}, {"s": i64(512, 1024)})
    with pytest.raises(OnnxImportError, match="4.0 MiB at import time"):
        from_onnx(m, max_fold_bytes=1 * MIB)
    imported = from_onnx(m, max_fold_bytes=8 * MIB)
    x = np.random.default_rng(0).random((512, 1024))
    assert_allclose(client.evaluate(imported.graph, {"x": x})["y"], x + 0.5)
    path = tmp_path / "c.onnx"
    onnx.save(m, path)
    assert_one_line_error(cli_import(path, "--max-fold-mib", "1", tmp_path=tmp_path),
                          "over the import-time folding bound of 1.0 MiB")
    done = cli_import(path, "--max-fold-mib", "8", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr


def test_memory_exhausted_is_one_line_not_a_traceback(tmp_path):
    """With the bound raised past what the process may map, numpy's MemoryError becomes
    the same one-line error."""
    path = tmp_path / "big.onnx"
    m = greedy_model("ConstantOfShape")
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(i64(2 ** 33), "s"))  # 64 GiB
    onnx.save(m, path)
    done = cli_import(path, "--max-fold-mib", str(2 ** 20), limit_bytes=3 * 2 ** 30,
                      tmp_path=tmp_path)
    assert_one_line_error(done, "memory")


# --- opsets and local functions ------------------------------------------------------------------

@pytest.mark.parametrize("opset, message", [
    (2 ** 40, f"opset {2 ** 40}; the newest the installed onnx package knows is"),
    (onnx.defs.onnx_opset_version() + 1, "the newest the installed onnx package knows is"),
])
def test_absurd_opsets_are_refused(tmp_path, opset, message):
    m = model([node("Relu", ["x"])], {"x": np.zeros(3)}, opset=opset)
    with pytest.raises(OnnxImportError, match=message):
        from_onnx(m)
    if opset == 2 ** 40:
        path = tmp_path / "m.onnx"
        path.write_bytes(m.SerializeToString())
        assert_one_line_error(cli_import(path, tmp_path=tmp_path), message)


def test_recursive_local_functions_are_refused(tmp_path):
    f = helper.make_function("local", "f", ["a"], ["b"],
                             [helper.make_node("f", ["a"], ["b"], domain="local")],
                             [helper.make_opsetid("", 18)])
    m = model([helper.make_node("f", ["x"], ["y"], domain="local")], {"x": np.zeros(2)})
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.functions.append(f)
    with pytest.raises(OnnxImportError, match="local functions cannot be inlined.*recursive"):
        from_onnx(m)
    path = tmp_path / "rec.onnx"
    path.write_bytes(m.SerializeToString())
    assert_one_line_error(cli_import(path, tmp_path=tmp_path), "local functions")
