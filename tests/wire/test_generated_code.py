"""The committed gradserve.v1 modules match the .proto files and work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from support import REPO

ROOT = REPO
PACKAGE = Path("gradserve") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
STALE = "generated code is stale: run python scripts/generate_proto.py"


def generated_files(root: Path) -> dict[str, bytes]:
    """Name -> content of every generated module under root/gradserve/v1."""
    folder = root / PACKAGE
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)}


def test_generated_code_is_up_to_date(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate_proto.py"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, f"generate_proto.py failed:\n{result.stderr}"
    assert "warning" not in result.stderr.lower(), f"protoc warned:\n{result.stderr}"

    fresh = generated_files(tmp_path)
    committed = generated_files(ROOT / "proto")
    assert fresh, "generate_proto.py produced no files"
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    assert not missing, f"{STALE} (missing: {missing})"
    assert not extra, f"{STALE} (no .proto generates: {extra})"
    differing = sorted(name for name in fresh if fresh[name] != committed[name])
    assert not differing, f"{STALE} (differs: {differing})"


def test_modules_import_as_gradserve_v1():
    from gradserve.v1 import (gradient_service_pb2, gradient_service_pb2_grpc,
                              graph_pb2, tensor_pb2)

    assert tensor_pb2.DESCRIPTOR.package == "gradserve.v1"
    assert graph_pb2.Graph.DESCRIPTOR.full_name == "gradserve.v1.Graph"
    service = gradient_service_pb2.DESCRIPTOR.services_by_name["GradientService"]
    streaming = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert streaming == {
        "RegisterGraph": (False, False),
        "Evaluate": (False, False),
        "Differentiate": (False, False),
        "DifferentiateStream": (True, True),
        "GetServerInfo": (False, False),
        "TrainSteps": (False, False),
        "PutTensors": (True, False),
        "GetTensors": (False, True),
        "DeleteTensors": (False, False),
    }
    assert hasattr(gradient_service_pb2_grpc, "GradientServiceStub")
    assert hasattr(gradient_service_pb2_grpc, "add_GradientServiceServicer_to_server")


def test_tensor_round_trips_through_the_wire_format():
    from gradserve.v1 import tensor_pb2

    values = np.arange(6, dtype="<f4").reshape(2, 3) - 2.5
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=values.shape,
                               data=values.tobytes(order="C"))

    decoded = tensor_pb2.Tensor.FromString(tensor.SerializeToString())

    assert decoded == tensor
    assert decoded.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert list(decoded.shape) == [2, 3]
    array = np.frombuffer(decoded.data, dtype="<f4").reshape(tuple(decoded.shape))
    np.testing.assert_array_equal(array, values)
