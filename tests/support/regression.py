"""A small regression model for the training tests: loss = mean((tanh(X W + b) - Y)^2),
its initial parameters and random data."""

from __future__ import annotations

import numpy as np

from gradserve.client import GraphBuilder


def model(features=4):
    g = GraphBuilder()
    x = g.input("X", "float32", [-1, features])
    w = g.input("W", "float32", [features, 3])
    b = g.input("b", "float32", [3])
    y = g.input("Y", "float32", [-1, 3])
    g.output("loss", g.mean(g.square(g.tanh(x @ w + b) - y)))
    return g


def initial():
    rng = np.random.default_rng(3)
    return {"W": rng.standard_normal((4, 3)).astype(np.float32),
            "b": np.zeros(3, np.float32)}


def data(n=50, seed=4):
    rng = np.random.default_rng(seed)
    return {"X": rng.standard_normal((n, 4)).astype(np.float32),
            "Y": rng.standard_normal((n, 3)).astype(np.float32)}
