"""What the PyTorch and JAX bridge tests share: a Client that counts its calls (the real
one, over real gRPC), the property tests' random graphs as GraphBuilders, and
finite differences through the service's values.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from gradserve.client import Client, GraphBuilder
from support.oracles import numeric_jvp



class CountingClient(Client):
    """The real Client, counting the calls the bridges make: "evaluate",
    "evaluate_for_vjp" (an Evaluate keeping residuals), "jvp", "vjp" (each one round
    trip), "register"; and "vjp_from_residuals", the VJPs that sent a residuals handle
    (the server then runs the reverse sweep only)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = Counter()

    def _counted(name):
        def method(self, *args, **kwargs):
            self.calls[name] += 1
            return getattr(super(CountingClient, self), name)(*args, **kwargs)
        method.__name__ = name
        return method

    register = _counted("register")
    evaluate = _counted("evaluate")
    evaluate_for_vjp = _counted("evaluate_for_vjp")
    jvp = _counted("jvp")
    del _counted

    def vjp(self, *args, residuals="", **kwargs):
        self.calls["vjp"] += 1
        if residuals:
            self.calls["vjp_from_residuals"] += 1
        return super().vjp(*args, residuals=residuals, **kwargs)


def builder_from_engine(graph) -> GraphBuilder:
    """The engine Graph a property-test strategy draws, rebuilt with the client's builder."""
    g = GraphBuilder()
    values = {i.name: g.input(i.name, i.dtype, i.shape) for i in graph.inputs}
    for name, array in graph.constants.items():
        values[name] = g.constant(array, name=name)
    for node in graph.nodes:
        attrs = {k: v for k, v in (node.attrs or {}).items() if v is not None}
        values[node.name] = g.node(node.op, [values[a] for a in node.inputs], attrs,
                                   name=node.name)
    for name in graph.outputs:
        g.output(values[name])
    return g


def finite_difference_jvp(client, graph, inputs, tangents, eps=1e-6) -> dict:
    """Central differences of the service's values: output name -> tangent (float64)."""
    return numeric_jvp(lambda xs: client.evaluate(graph, xs), inputs, tangents, eps)


def random_tangents(inputs, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(np.shape(v)).astype(np.asarray(v).dtype)
            for k, v in inputs.items()}
