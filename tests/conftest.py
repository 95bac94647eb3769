"""Fixtures for the integration tests: real gradserve servers on 127.0.0.1, the real
client and the raw generated stub. No mocks: every call crosses real gRPC.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from gradserve.client import Client, GraphBuilder
from gradserve.server.app import create_server
from gradserve.v1 import gradient_service_pb2_grpc as pb_grpc


@pytest.fixture(scope="session")
def server():
    """One server with the default limits, shared by every test that needs no limits of its own."""
    with create_server("127.0.0.1:0") as s:
        yield s


@pytest.fixture(scope="session")
def address(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture(scope="session")
def channel(address):
    with grpc.insecure_channel(address) as ch:
        yield ch


@pytest.fixture(scope="session")
def stub(channel) -> pb_grpc.GradientServiceStub:
    """The generated stub, for tests of the wire API itself."""
    return pb_grpc.GradientServiceStub(channel)


@pytest.fixture(scope="session")
def client(address):
    with Client(address, timeout=30.0) as c:
        yield c


@pytest.fixture
def start_server():
    """start_server(limits=None, address="127.0.0.1:0") -> a started Server of its own,
    stopped when the test ends."""
    servers = []

    def start(limits=None, address="127.0.0.1:0"):
        s = create_server(address, limits).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop(grace=0)


@pytest.fixture(scope="session")
def seed_builder():
    """seed_builder(dtype="float32", shape=(1,)) -> GraphBuilder of o = (x + y) * sin(x)."""
    def build(dtype="float32", shape=(1,)):
        g = GraphBuilder()
        x, y = g.input("x", dtype, shape), g.input("y", dtype, shape)
        g.output("o", (x + y) * g.sin(x))
        return g
    return build


@pytest.fixture(scope="session")
def seed_inputs():
    """seed_inputs(dtype="float32", shape=(1,)) -> {"x": pi, "y": pi} in that dtype."""
    def inputs(dtype="float32", shape=(1,)):
        pi = np.full(shape, np.pi, dtype=dtype)
        return {"x": pi, "y": pi.copy()}
    return inputs
