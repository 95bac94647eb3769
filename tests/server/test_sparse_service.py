"""Sparse Jacobians and Hessians over real gRPC: DifferentiateRequest.sparsity, sparse
blocks (JacobianBlock.sparse / HessianBlock.sparse) read by the Client as scipy.sparse
matrices (a SparseMatrix without scipy), the planner's sparsity figures in the reply and
the pattern bound in GetServerInfo; reply bounds count the sparse size.

Oracles: the same request with sparsity="dense" (the identity's columns as seeds), and the
closed form of the banded test function."""

from __future__ import annotations

import sys

import grpc
import numpy as np
import pytest
from numpy.testing import assert_allclose
from scipy import sparse as scipy_sparse

from gradserve.client import Client, GraphBuilder
from gradserve.client.sparse import SparseMatrix
from gradserve.engine import MAX_PATTERN_ENTRIES
from gradserve.server.app import create_server
from gradserve.server.limits import Limits
from gradserve.v1 import gradient_service_pb2 as pb
from support.requests import INVALID, check_good_request, check_status, tensors

N = 400


def banded(n=N):
    """f_i = x_i (2 + 5 x_i^2) + 1 - x_{i-1} (1 + x_{i-1}) - x_{i+1} (1 + x_{i+1}); and a
    scalar loss = sum(f^2)."""
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    xp = g.pad(x, pads=[1, 1])
    f = x * (2.0 + 5.0 * g.square(x)) + 1.0
    for s in (0, 2):
        y = g.slice(xp, starts=[s], stops=[s + n], axes=[0])
        f = f - y * (1.0 + y)
    g.output("f", f)
    g.output("loss", g.sum(g.square(f)))
    return g


def closed_form_jacobian(x):
    j = np.diag(2 + 15 * x ** 2)
    j -= np.diag(1 + 2 * x[:-1], -1)  # d f_i / d x_{i-1}
    j -= np.diag(1 + 2 * x[1:], 1)  # d f_i / d x_{i+1}
    return j


X = {"x": np.random.default_rng(0).uniform(-1, 1, N)}


def test_sparse_jacobian_is_a_scipy_matrix_equal_to_the_dense_one(client):
    g = banded()
    r = client.differentiate(g, X, of=["f"], sparsity="sparse")
    block = r.jacobian["f", "x"]
    assert isinstance(block, scipy_sparse.csr_matrix) and block.shape == (N, N)
    assert block.nnz == 3 * N - 2
    assert_allclose(block.toarray(), closed_form_jacobian(X["x"]), rtol=1e-12, atol=1e-12)
    dense = client.differentiate(g, X, of=["f"], sparsity="dense")
    assert_allclose(block.toarray(), dense.jacobian["f", "x"], rtol=1e-12, atol=1e-12)
    p = r.planner
    assert (p.sparsity, p.nnz, p.colors_forward, p.colors_reverse) == ("sparse", 3 * N - 2,
                                                                        3, 3)
    assert p.mode == "forward" and "3 column colors" in p.reason
    assert dense.planner.sparsity == "dense" and dense.planner.nnz == -1


def test_the_default_compresses_but_keeps_dense_blocks(client):
    r = client.differentiate(banded(), X, of=["f"])
    assert isinstance(r.jacobian["f", "x"], np.ndarray)
    assert r.planner.sparsity == "sparse"
    assert_allclose(r.jacobian["f", "x"], closed_form_jacobian(X["x"]), rtol=1e-12,
                    atol=1e-12)


def test_auto_returns_sparse_blocks_when_smaller(client):
    r = client.differentiate(banded(), X, of=["f"], sparsity="auto")
    assert isinstance(r.jacobian["f", "x"], scipy_sparse.csr_matrix)
    small = client.differentiate(banded(3), {"x": np.ones(3)}, of=["f"], sparsity="auto")
    assert isinstance(small.jacobian["f", "x"], np.ndarray)  # dense is smaller at n = 3


def test_sparse_hessian_over_grpc(client):
    g = banded()
    h = client.hessian(g, X, of="loss", sparsity="sparse")["x", "x"]
    dense = client.hessian(g, X, of="loss", sparsity="dense")["x", "x"]
    assert isinstance(h, scipy_sparse.csr_matrix)
    assert_allclose(h.toarray(), dense, rtol=1e-9, atol=1e-9)
    assert h.nnz <= 5 * N  # f_i^2 couples x_{i-1}, x_i, x_{i+1}: bandwidth 2


def test_without_scipy_blocks_are_plain_sparse_matrices(client, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)  # `import scipy` raises ImportError
    block = client.jacobian(banded(), X, of=["f"], sparsity="sparse")["f", "x"]
    assert isinstance(block, SparseMatrix)
    assert block.shape == (N, N) and block.rows.dtype == block.cols.dtype == np.int64
    assert_allclose(block.toarray(), closed_form_jacobian(X["x"]), rtol=1e-12, atol=1e-12)


def test_unknown_sparsity_is_invalid_argument(stub):
    g = GraphBuilder()
    x = g.input("x", "float64", [3])
    g.output("o", g.sin(x))
    request = pb.DifferentiateRequest(graph=g.build(), inputs=tensors({"x": np.ones(3)}),
                                      sparsity=7)
    with pytest.raises(grpc.RpcError) as info:
        stub.Differentiate(request, timeout=30)
    check_status(info.value, INVALID, ("sparsity",), "sparsity")
    check_good_request(stub)


def test_the_client_refuses_an_unknown_sparsity(client):
    with pytest.raises(ValueError, match="sparsity"):
        client.jacobian(banded(), X, sparsity="sometimes")


def test_server_info_reports_the_pattern_bound(client):
    info = client.server_info()
    assert info.max_pattern_entries == MAX_PATTERN_ENTRIES > 0


def test_reply_bounds_count_the_sparse_size():
    """A 3000 x 3000 float64 Jacobian is 72 MB dense, over a 16 MiB message limit; its
    ~9,000 nonzeros are ~0.2 MB sparse: refused dense (RESOURCE_EXHAUSTED before any
    work), answered sparse."""
    n = 3000
    with create_server("127.0.0.1:0", Limits(max_message_bytes=16 << 20)) as server, \
            Client(f"127.0.0.1:{server.port}") as client:
        x = {"x": np.random.default_rng(1).uniform(-1, 1, n)}
        with pytest.raises(grpc.RpcError) as info:
            client.jacobian(banded(n), x, of=["f"], sparsity="dense")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        block = client.jacobian(banded(n), x, of=["f"], sparsity="sparse")["f", "x"]
        assert block.nnz == 3 * n - 2
