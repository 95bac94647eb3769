"""Model graphs (gradserve.client.models) against a hand-written numpy model.

The numpy forward and backward pass below is the oracle: the service's loss,
logits and gradients of every model variant must match it. test_training.py
reuses it for its loss-curve check.
"""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve.client.models import LOGITS, LOSS, ModelSpec, one_hot
from support.models import reference_loss_and_grads

# --- the numpy reference -----------------------------------------------------------------


# --- fixtures ----------------------------------------------------------------------------

SPECS = {
    "logreg": ModelSpec.logistic_regression(12, 4),
    "mlp-relu": ModelSpec.mlp(12, 4, (16, 8)),
    "mlp-tanh-l2": ModelSpec.mlp(12, 4, (10,), activation="tanh", l2=0.01),
    "mlp-sigmoid-l2": ModelSpec.mlp(12, 4, (9, 7, 5), activation="sigmoid", l2=0.1),
    "logreg-l2": ModelSpec.logistic_regression(12, 3, l2=0.5),
}


def batch(spec: ModelSpec, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, spec.num_features)).astype(np.float32)
    return X, one_hot(rng.integers(0, spec.num_classes, n), spec.num_classes)


def as_float64(arrays: dict) -> dict:
    return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}


# --- the graphs through the service ------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_loss_logits_and_gradients_match_numpy_reference(client, name):
    spec = SPECS[name]
    graph = spec.build_graph()
    params = spec.init_params(np.random.default_rng(1))
    X, Y = batch(spec, 33)
    result = client.differentiate(graph, {**params, "X": X, "Y": Y}, wrt=spec.param_names,
                                  of=[LOSS])

    loss, logits, grads = reference_loss_and_grads(spec, as_float64(params),
                                                   X.astype(np.float64), Y.astype(np.float64))
    assert result.outputs[LOSS].dtype == np.float32
    assert_allclose(result.outputs[LOSS], loss, rtol=2e-5)
    assert_allclose(result.outputs[LOGITS], logits, rtol=2e-5, atol=2e-6)
    for p in spec.param_names:
        block = result.jacobian[LOSS, p]
        assert block.shape == params[p].shape and block.dtype == np.float32, p
        assert_allclose(block, grads[p], rtol=2e-4, atol=2e-6, err_msg=p)
    # A scalar loss of thousands of parameters: the planner picks reverse mode.
    assert result.mode == "reverse"
    assert (result.planner.n, result.planner.m) == (sum(a.size for a in params.values()), 1)


def test_batch_dimension_is_free(client):
    """One registered graph serves minibatches of any size, down to one sample."""
    spec = SPECS["mlp-relu"]
    graph = spec.build_graph()
    params = spec.init_params(np.random.default_rng(2))
    for n in (1, 5, 64):
        X, Y = batch(spec, n, seed=n)
        loss = client.evaluate(graph, {**params, "X": X, "Y": Y})[LOSS]
        assert loss.shape == ()
        assert_allclose(loss, reference_loss_and_grads(spec, params, X, Y)[0], rtol=1e-5)


# --- specs and initialization ------------------------------------------------------------

def test_param_shapes_follow_the_widths():
    spec = ModelSpec.mlp(64, 10, (32, 16))
    assert spec.widths == (64, 32, 16, 10)
    assert spec.param_shapes == {"W1": (64, 32), "b1": (32,), "W2": (32, 16), "b2": (16,),
                                 "W3": (16, 10), "b3": (10,)}
    assert ModelSpec.logistic_regression(64, 10).param_shapes == {"W1": (64, 10), "b1": (10,)}


def test_init_is_seeded_float32_glorot_uniform():
    spec = ModelSpec.mlp(64, 10, (32,))
    a = spec.init_params(np.random.default_rng(7))
    b = spec.init_params(np.random.default_rng(7))
    c = spec.init_params(np.random.default_rng(8))
    for name in spec.param_names:
        assert a[name].dtype == np.float32 and a[name].shape == spec.param_shapes[name]
        assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["W1"], c["W1"])
    assert_array_equal(a["b1"], 0)
    limit = np.sqrt(6 / (64 + 32))
    assert np.abs(a["W1"]).max() <= limit and np.abs(a["W1"]).max() > 0.9 * limit


@pytest.mark.parametrize("make, message", [
    (lambda: ModelSpec.mlp(4, 3, ()), "at least one hidden layer"),
    (lambda: ModelSpec.mlp(4, 3, (8,), activation="swish"), "unknown activation 'swish'"),
    (lambda: ModelSpec.mlp(4, 3, (0,)), "widths must be >= 1"),
    (lambda: ModelSpec.logistic_regression(4, 1), ">= 2 classes"),
    (lambda: ModelSpec.logistic_regression(4, 3, l2=-1), "l2 must be >= 0"),
])
def test_bad_specs_say_what_to_change(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_one_hot():
    assert_array_equal(one_hot(np.array([2, 0, 1]), 3),
                       np.float32([[0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    assert one_hot(np.array([1]), 2).dtype == np.float32
