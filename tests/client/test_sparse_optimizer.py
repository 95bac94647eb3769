"""docs/sparse_optimal_control.py as written: a sparse NLP (n = 1,001) solved by scipy's
trust-constr with the constraint Jacobian and the Lagrangian's Hessian from a real
server, sparse, takes the same iterations to the same point as with derivatives written
by hand; and the service's derivatives equal the hand-written ones at the start."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from numpy.testing import assert_allclose

from gradserve.client import Client
from support import REPO

STEPS = 500


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "sparse_optimal_control", REPO / "docs" / "sparse_optimal_control.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_service_derivatives_equal_the_hand_written_ones(example, address):
    rng = np.random.default_rng(0)
    z, lam = rng.uniform(-1, 1, 2 * STEPS + 1), rng.uniform(-1, 1, STEPS + 1)
    with Client(address) as client:
        served = example.served(client, STEPS)
        by_hand = example.exact(STEPS)
        for name, a, b in zip(("f", "grad", "c"), served[:3], by_hand[:3]):
            assert_allclose(a(z), b(z), rtol=1e-12, atol=1e-12, err_msg=name)
        assert_allclose(served[3](z).toarray(), by_hand[3](z).toarray(), rtol=1e-12, atol=1e-12)
        assert_allclose(served[4](z, lam).toarray(), by_hand[4](z, lam).toarray(), rtol=1e-12,
                        atol=1e-12)
        assert_allclose(served[5](z).toarray(), by_hand[5](z).toarray(), rtol=1e-12,
                        atol=1e-12)
        # the pattern is what makes it cheap: 3 forward directions, not n = 1,001
        r = client.differentiate(example.graphs(STEPS)[1], {"z": z}, of=["c"],
                                 sparsity="sparse")
        assert r.planner.sparsity == "sparse"
        assert min(r.planner.colors_forward, r.planner.colors_reverse) <= 3


def test_trust_constr_takes_the_same_iterations(example, address):
    with Client(address) as client:
        by_service = example.solve(example.served(client, STEPS), STEPS)
    by_hand = example.solve(example.exact(STEPS), STEPS)
    assert by_hand.status in (1, 2) and by_service.status == by_hand.status
    assert by_service.nit == by_hand.nit
    assert_allclose(by_service.x, by_hand.x, rtol=0, atol=1e-8)
    assert by_service.constr_violation < 1e-8
