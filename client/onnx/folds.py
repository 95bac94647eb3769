"""Import-time folds: the engine's ops computed with numpy on values known at import time.

Each must give what the engine's own op gives (tests/client/test_onnx_folds.py checks each one
against gradserve.engine): a folded constant and the same op run by the server agree.
"""

from __future__ import annotations

import math

import numpy as np

from .values import Dim

UNARY_FOLDS = {
    "neg": np.negative, "exp": np.exp, "log": np.log, "sqrt": np.sqrt, "tanh": np.tanh,
    "abs": np.abs, "sin": np.sin, "cos": np.cos, "tan": np.tan, "reciprocal": np.reciprocal,
    "square": np.square, "relu": lambda x: np.maximum(x, 0),
    "sigmoid": lambda x: np.exp(-np.logaddexp(0, -x)), "softplus": lambda x: np.logaddexp(0, x),
    "log1p": np.log1p,
    "erf": lambda x: np.vectorize(math.erf, otypes=[x.dtype])(x).astype(x.dtype),
}


def _int_div(a, b):
    """ONNX Div on integers truncates; on shapes (object arrays) it is exact."""
    if a.dtype == object or b.dtype == object:
        return np.frompyfunc(_shape_div, 2, 1)(a, b)
    return _trunc_div(a, b)


def _shape_div(p, q):
    if isinstance(p, Dim) or isinstance(q, Dim):
        return p / q
    return int(_trunc_div(np.int64(p), np.int64(q)))


def _trunc_div(a, b):
    q = np.floor_divide(np.abs(a), np.abs(b))
    return (np.sign(a) * np.sign(b) * q).astype(np.result_type(a, b))


BINARY_FOLDS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "pow": np.power,
    "maximum": np.maximum, "minimum": np.minimum,
    "div": lambda a, b: np.divide(a, b) if a.dtype.kind == "f" else _int_div(a, b),
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less,
    "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal,
}
COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")


REDUCE_FOLDS = {"sum": np.sum, "mean": np.mean, "max": np.max, "min": np.min, "prod": np.prod}


def softmax(x, axis):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def log_softmax(x, axis):
    z = x - np.max(x, axis=axis, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


SOFTMAX_FOLDS = {"softmax": softmax, "log_softmax": log_softmax}
