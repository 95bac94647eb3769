"""The server's malloc thresholds (server.allocator): `gradserve serve` raises glibc's
mmap and trim thresholds so that a 16 MiB request reuses memory freed by the last
one instead of faulting in fresh pages; `--no-malloc-tuning` keeps glibc's defaults.
Measured on the real server process: its minor page faults (/proc/PID/stat) per
16 MiB gradient call, never time."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest

from gradserve.client import GraphBuilder
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc
from gradserve.v1.codec import fill_tensors, from_tensor

from support.server_process import ServerProcess

ELEMENTS = 1 << 22  # float32: 16 MiB in, 16 MiB out
CALLS = 4
PAGES = 16 * (1 << 20) // os.sysconf("SC_PAGE_SIZE")  # pages of one 16 MiB buffer


def minor_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10: minflt


def faults_per_call(*flags) -> float:
    """The server's minor page faults per 16 MiB gradient call, after one warm-up call."""
    g = GraphBuilder()
    x = g.input("x", "float32", [ELEMENTS])
    g.output("loss", g.sum(x * x))
    a = np.linspace(-1, 1, ELEMENTS, dtype=np.float32)
    request = pb.DifferentiateRequest()
    fill_tensors(request.inputs, {"x": a})
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    with ServerProcess("--port", "0", *flags) as server, \
            grpc.insecure_channel(server.wait_serving(), options=options) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        request.graph_id = stub.RegisterGraph(pb.RegisterGraphRequest(graph=g.build()),
                                              timeout=60).graph_id
        reply = stub.Differentiate(request, timeout=60)
        np.testing.assert_array_equal(from_tensor(reply.jacobian[0].value), 2 * a)
        before = minor_faults(server.proc.pid)
        for _ in range(CALLS):
            stub.Differentiate(request, timeout=60)
        return (minor_faults(server.proc.pid) - before) / CALLS


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads /proc")
def test_large_calls_reuse_freed_memory_unless_malloc_tuning_is_off():
    tuned, default = faults_per_call(), faults_per_call("--no-malloc-tuning")
    # glibc's defaults: every 16 MiB buffer (request, arrays, reply) is fresh pages
    assert default > 2 * PAGES, (tuned, default)
    # the thresholds: buffers come back from the heap, faulted in once
    assert tuned < default / 4, (tuned, default)
