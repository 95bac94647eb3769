"""Reference models: a small dense model with a dynamic batch (the shape of an ONNX
import's call), the hand-written NumPy model the client's model graphs are checked
against, and ONNX models built with onnx.helper (the op cases, the digits CNN)."""

from __future__ import annotations

import numpy as np

from gradserve.client import GraphBuilder
from gradserve.client.models import ModelSpec


def dense_model(dtype: str = "float32", batch_dims=(-1,)) -> GraphBuilder:
    """y = tanh(x @ W + b) @ V, x (batch..., 3), a batch dynamic by default: what an ONNX
    import sends, with W, b and V as inputs (stored on the server by the tests)."""
    g = GraphBuilder()
    x = g.input("x", dtype, list(batch_dims) + [3])
    w, b, v = (g.input("W", dtype, [3, 4]), g.input("b", dtype, [4]),
               g.input("V", dtype, [4, 2]))
    g.output("y", g.tanh(x @ w + b) @ v)
    return g


DENSE_PARAMETERS = {"W": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
                    "b": np.float32([0.1, -0.2, 0.3, 0.0]),
                    "V": np.linspace(0.5, -0.5, 8, dtype=np.float32).reshape(4, 2)}


ACTIVATION_AND_DERIVATIVE = {  # f(z), and f'(z) written in terms of a = f(z) and z
    "relu": (lambda z: np.maximum(z, 0), lambda a, z: (z > 0).astype(z.dtype)),
    "tanh": (np.tanh, lambda a, z: 1 - a * a),
    "sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda a, z: a * (1 - a)),
}


def reference_loss_and_grads(spec: ModelSpec, params: dict, X, Y):
    """(loss, logits, grads) of softmax cross-entropy + l2/2 * sum(W^2), by hand."""
    f, df = ACTIVATION_AND_DERIVATIVE[spec.activation]
    layers = len(spec.widths) - 1
    h, saved = X, []  # saved: (layer input, pre-activation, activation) per hidden layer
    for layer in range(1, layers + 1):
        z = h @ params[f"W{layer}"] + params[f"b{layer}"]
        if layer < layers:
            a = f(z)
            saved.append((h, z, a))
            h = a
        else:
            saved.append((h, z, None))
    logits = z
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(X)
    loss = -np.sum(Y * log_p) / n
    loss += 0.5 * spec.l2 * sum(np.sum(params[f"W{k}"] ** 2) for k in range(1, layers + 1))

    grads = {}
    dz = (np.exp(log_p) - Y) / n
    for layer in range(layers, 0, -1):
        h_in, z, _ = saved[layer - 1]
        W = params[f"W{layer}"]
        grads[f"W{layer}"] = h_in.T @ dz + spec.l2 * W
        grads[f"b{layer}"] = dz.sum(axis=0)
        if layer > 1:
            _, z_prev, a_prev = saved[layer - 2]
            dz = (dz @ W.T) * df(a_prev, z_prev)
    return loss, logits, grads
