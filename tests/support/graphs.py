"""Graphs the tests share: the worked example of DESIGN.md and hypothesis' random valid
graphs (elementwise, reduction, scan, padding and shape ops, comparisons feeding where)."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from gradserve.engine import Graph, Input, Node
from support.oracles import reference


UNARY = ["neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf"]


BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "select"]


SHAPE_OPS = ["sum", "mean", "prod", "reshape", "transpose", "cumsum", "pad", "clip"]


COMPARISONS = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]


SHAPES = [(), (3,), (2, 1), (1, 3), (2, 3)]


CAP = 10.0  # values above this go through tanh, so finite differences keep their accuracy


SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _needs(op, position):
    """The adapter an operand needs for `op` if it is outside the op's safe domain."""
    if op in ("log", "sqrt", "reciprocal", "log1p", "abs", "relu") \
            or (op, position) in (("pow", 0), ("div", 1)):
        return "positive"
    if op == "tan" or (op, position) == ("pow", 1):
        return "small"
    return None


def _safe(op, args):
    a = args[0]
    checks = {
        "log": lambda: np.all(a > 0.2), "sqrt": lambda: np.all(a > 0.2),
        "reciprocal": lambda: np.all(np.abs(a) > 0.2), "log1p": lambda: np.all(a > -0.8),
        "tan": lambda: np.all(np.abs(a) < 1.2),
        "abs": lambda: np.all(np.abs(a) > 1e-3), "relu": lambda: np.all(np.abs(a) > 1e-3),
        "div": lambda: np.all(np.abs(args[1]) > 0.2),
        "pow": lambda: np.all(a > 0.2) and np.all(np.abs(args[1]) < 3),
    }
    return bool(checks.get(op, lambda: True)())


class Builder:
    """Nodes plus their NumPy values at the drawn inputs."""

    def __init__(self, inputs):
        self.values = dict(inputs)
        self.nodes = []
        self.pool = list(inputs)  # names whose |value| <= CAP: usable as operands

    def add(self, op, args, attrs=None):
        name = f"h{len(self.nodes)}"
        self.nodes.append(Node(name, op, args, attrs))
        self.values[name] = reference(op, [self.values[a] for a in args], attrs)
        if np.max(np.abs(self.values[name]), initial=0.0) > CAP:
            return self.add("tanh", [name])
        self.pool.append(name)
        return name

    def adapt(self, name, need):
        if need == "positive":  # exp(tanh(v)) lies in [0.37, 2.72]
            return self.add("exp", [self.add("tanh", [name])])
        return self.add("tanh", [name])  # "small": |tanh(v)| < 1

    def apply(self, op, args, attrs=None):
        """Add op(args), first adapting operands that are out of its safe domain."""
        if op in ("maximum", "minimum", "select") and \
                np.min(np.abs(self.values[args[0]] - self.values[args[1]]), initial=1.0) < 1e-3:
            op, attrs = "add", None  # a near-tie: finite differences would straddle the kink
        if op == "select":  # where(a <cmp> b, a, b): a comparison feeding where
            cond = f"h{len(self.nodes)}"
            self.nodes.append(Node(cond, (attrs or {})["compare"], args))
            self.values[cond] = reference(self.nodes[-1].op, [self.values[a] for a in args])
            return self.add("where", [cond] + list(args))
        if not _safe(op, [self.values[a] for a in args]):
            args = [self.adapt(a, _needs(op, i)) if _needs(op, i) else a
                    for i, a in enumerate(args)]
        return self.add(op, args, attrs)


def _reshapes(shape):
    """Shapes of rank 0..3 with as many elements as `shape`, some with a -1."""
    size = int(np.prod(shape, dtype=int))
    out = []
    for rank in range(4):
        for dims in itertools.product(range(1, size + 1), repeat=rank):
            if int(np.prod(dims, dtype=int)) == size:
                out.append(list(dims))
                out.extend(list(dims[:i]) + [-1] + list(dims[i + 1:]) for i in range(rank))
    return out


@st.composite
def valid_graphs(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
    inputs = {f"x{i}": rng.uniform(-2.0, 2.0, s) for i, s in enumerate(shapes)}
    b = Builder(inputs)
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(UNARY + BINARY + SHAPE_OPS))
        a = draw(st.sampled_from(b.pool))
        shape = np.shape(b.values[a])
        if op in UNARY:
            b.apply(op, [a])
        elif op in BINARY:
            partners = [n for n in b.pool if _broadcasts(shape, np.shape(b.values[n]))]
            attrs = {"compare": draw(st.sampled_from(COMPARISONS))} if op == "select" else None
            b.apply(op, [a, draw(st.sampled_from(partners))], attrs)
        elif op == "cumsum" and shape:
            b.apply(op, [a], {"axis": draw(st.integers(-len(shape), len(shape) - 1)),
                              "reverse": draw(st.booleans()), "exclusive": draw(st.booleans())})
        elif op == "pad":
            pads = draw(st.lists(st.integers(0, 2), min_size=2 * len(shape),
                                 max_size=2 * len(shape)))
            b.apply(op, [a], {"pads": pads, "value": draw(st.floats(-1, 1))})
        elif op == "clip":
            low = draw(st.none() | st.floats(-1.5, 0.5))
            b.apply(op, [a], {"min": low, "max": draw(st.none() | st.floats(0.75, 1.5))})
        elif op in ("sum", "mean", "prod", "cumsum"):
            op = "sum" if op == "cumsum" else op  # cumsum of a scalar: no axis
            attrs = {}
            if shape and draw(st.booleans()):
                axes = draw(st.lists(st.integers(0, len(shape) - 1), unique=True,
                                     max_size=len(shape)))
                attrs["axes"] = [ax - len(shape) if draw(st.booleans()) else ax for ax in axes]
            if draw(st.booleans()):
                attrs["keepdims"] = draw(st.booleans())
            b.apply(op, [a], attrs)
        elif op == "reshape":
            b.apply(op, [a], {"shape": draw(st.sampled_from(_reshapes(shape)))})
        else:
            perm = draw(st.none() | st.permutations(range(len(shape))))
            b.apply(op, [a], {} if perm is None else {"perm": list(perm)})
    usable = [n.name for n in b.nodes if n.name in b.pool]  # never empty: one op at least
    outputs = sorted({usable[-1], *draw(st.lists(st.sampled_from(usable), max_size=2))})
    graph = Graph([Input(n, "float64", np.shape(v)) for n, v in inputs.items()], b.nodes, outputs)
    return graph, inputs


def _broadcasts(s, t):
    try:
        np.broadcast_shapes(s, t)
        return True
    except ValueError:
        return False


PUBLISHED_DODX, PUBLISHED_DODY = -6.2832, -8.7423e-08


def seed_nodes(y="y"):
    """o = (x + y) * sin(x)."""
    return [Node("s", "add", ["x", y]), Node("sx", "sin", ["x"]), Node("o", "mul", ["s", "sx"])]


def seed_graph(dtype, shape):
    return Graph([Input("x", dtype, shape), Input("y", dtype, shape)], seed_nodes(), ["o"])


def seed_inputs(dtype, shape):
    pi = np.full(shape, np.pi, dtype=dtype)
    return {"x": pi, "y": pi.copy()}


def closed_form(dtype):
    """(o, do/dx, do/dy) at x = y = pi, by NumPy in `dtype`."""
    x = y = np.array(np.pi, dtype=dtype)
    return (x + y) * np.sin(x), np.sin(x) + (x + y) * np.cos(x), np.sin(x)
