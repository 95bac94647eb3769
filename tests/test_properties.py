"""Property tests (hypothesis) on random graphs.

1. Random valid graphs of elementwise, reduction, scan, padding and shape ops, and
   comparisons feeding where (float64): the forward and reverse Jacobians agree with
   each other, with central finite differences, and the values with NumPy. Each graph
   is built with its input values in hand, so an op whose operand is outside its safe
   domain (pole, kink, tie, overflow) first gets an adapter.
2. Random, mostly invalid graphs: `compile` succeeds or raises an EngineError subclass,
   never anything else; a graph that compiles also evaluates on inputs that fit it.
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from gradserve.engine import OPS, EngineError, Graph, Input, Node, compile
from oracles import numeric_jacobian, reference

UNARY = ["neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf"]
BINARY = ["add", "sub", "mul", "div", "pow", "maximum", "minimum", "select"]
SHAPE_OPS = ["sum", "mean", "prod", "reshape", "transpose", "cumsum", "pad", "clip"]
COMPARISONS = ["equal", "not_equal", "less", "less_equal", "greater", "greater_equal"]
SHAPES = [(), (3,), (2, 1), (1, 3), (2, 3)]
CAP = 10.0  # values above this go through tanh, so finite differences keep their accuracy

SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


# --- 1. random valid graphs -------------------------------------------------------------


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


def run_numpy(graph, inputs):
    """The graph's outputs, evaluated op by op with the NumPy references."""
    values = dict(inputs)
    for node in graph.nodes:
        values[node.name] = reference(node.op, [values[a] for a in node.inputs], node.attrs)
    return {o: values[o] for o in graph.outputs}


@SETTINGS
@given(valid_graphs())
def test_random_graph_jacobians(case):
    graph, inputs = case
    plan = compile(graph)

    values = plan.evaluate(inputs)
    forward = plan.jacobian(inputs, mode="forward").jacobian
    reverse = plan.jacobian(inputs, mode="reverse").jacobian

    want = run_numpy(graph, inputs)
    for name in graph.outputs:
        assert_allclose(values[name], want[name], rtol=1e-10, atol=1e-12, err_msg=name)
    numeric = numeric_jacobian(lambda xs: run_numpy(graph, xs), inputs)
    assert set(forward) == set(reverse) == set(numeric)
    for key, block in numeric.items():
        assert forward[key].shape == block.shape, key
        assert_allclose(forward[key], reverse[key], rtol=1e-10, atol=1e-12,
                        err_msg=f"{key} fwd/rev")
        assert_allclose(forward[key], block, rtol=1e-5, atol=1e-7, err_msg=f"{key} vs fd")


# --- 2. random, mostly invalid graphs ------------------------------------------------------

NAMES = ["x", "y", "c", "h0", "h1", "h2", "nope"]
BOGUS_OPS = ["frobnicate", "", "ADD", "sin ", "Matmul"]
ATTR_NAMES = ["axes", "keepdims", "shape", "perm", "axis", "starts", "stops", "bogus"]
ATTR_VALUES = [None, 0, 1, -1, 2, 3, 5, -5, 1.5, True, False, "x", [], [0], [1], [-1], [-2],
               [0, 1], [1, 0], [0, 0], [5], [2, 3], [3, 2], [6], [-1, 3], [3, -1], [-1, -1],
               [0, 6], [1, 2, 3], ["a"], [0.5], [None], {"a": 1}, (0,)]
DTYPES = ["float32", "float64", "int32", "int64", "float16", "complex64", "bogus"]


def _mostly(draw, good, bad):
    """Usually a draw from `good`, one time in sixteen from `bad`: most graphs get past
    their inputs and names and reach the op rules."""
    return draw(bad) if draw(st.integers(0, 15)) == 0 else draw(good)


@st.composite
def arbitrary_graphs(draw):
    dtype = draw(st.sampled_from(["float64", "float32", "int32"]))
    shape = st.lists(st.integers(1, 3), max_size=3)
    bad_shape = st.lists(st.sampled_from([0, -1, -5, 2]), min_size=1, max_size=3)
    names = ["x", "y"][:draw(st.integers(1, 2))] + _mostly(draw, st.just([]), st.just(["x"]))
    inputs = [Input(n, _mostly(draw, st.just(dtype), st.sampled_from(DTYPES)),
                    _mostly(draw, shape, bad_shape)) for n in names]
    constants = {}
    if draw(st.booleans()):
        c_dtype = _mostly(draw, st.just(dtype), st.sampled_from(DTYPES[:-1]))
        constants[_mostly(draw, st.just("c"), st.sampled_from(NAMES))] = np.ones(
            draw(st.lists(st.integers(0, 3), max_size=2)), dtype=c_dtype)
    defined = names + list(constants)
    nodes = []
    for j in range(draw(st.integers(1, 5))):
        op = _mostly(draw, st.sampled_from(sorted(OPS)), st.sampled_from(BOGUS_OPS))
        arity = OPS[op].arity if op in OPS and OPS[op].arity else 2
        arity = _mostly(draw, st.just(arity), st.integers(0, 3))
        refs = [_mostly(draw, st.sampled_from(defined or NAMES), st.sampled_from(NAMES))
                for _ in range(arity)]
        attr_names = [a.name for a in OPS[op].attrs] if op in OPS else []
        attrs = {}
        if attr_names and draw(st.booleans()):
            attrs = draw(st.dictionaries(st.sampled_from(attr_names), st.sampled_from(ATTR_VALUES),
                                         max_size=3))
        attrs = _mostly(draw, st.just(attrs), st.dictionaries(
            st.sampled_from(ATTR_NAMES), st.sampled_from(ATTR_VALUES), max_size=3))
        name = _mostly(draw, st.just(f"h{j}"), st.sampled_from(NAMES))
        nodes.append(Node(name, op, refs, attrs))
        defined.append(name)
    outputs = _mostly(draw, st.just(defined[-1:]), st.lists(st.sampled_from(NAMES), max_size=3))
    return Graph(inputs, nodes, outputs, constants)


def _fitting_inputs(graph):
    rng = np.random.default_rng(0)
    return {i.name: rng.uniform(-2, 2, i.shape).astype(i.dtype) for i in graph.inputs}


@settings(SETTINGS, max_examples=200)
@given(arbitrary_graphs())
def test_compile_raises_only_engine_errors(graph):
    try:
        plan = compile(graph)
    except EngineError:
        return
    if all(d >= 1 for i in graph.inputs for d in i.shape):
        with np.errstate(all="ignore"):
            try:
                plan.evaluate(_fitting_inputs(graph))
            except EngineError:
                pass
