"""Sparsity (engine/sparsity.py, engine/sparse.py): patterns found from the graph never
miss a nonzero of the dense Jacobian or Hessian (every op row, random graphs), colorings
are valid, compressed sweeps give the dense results back, and the planner keeps the dense
path, unchanged, when sparsity does not pay.

The oracle is the engine's dense Jacobian or Hessian (sparsity="dense": the identity's
columns as seeds, checked against finite differences in tests/engine/test_ops.py), and
for the exactness of the patterns its nonzeros.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from numpy.testing import assert_allclose

from gradserve.engine import OPS, Graph, Input, Node, compile
from gradserve.engine.errors import EngineError
from gradserve.engine import sparse, sparsity as sp
from support.graphs import SETTINGS, valid_graphs
from support.op_table import TABLE, setup

RTOL, ATOL = 1e-12, 1e-12


def float_names(plan, names):
    return tuple(n for n in names if plan.dtypes[n] in ("float32", "float64"))


def dense_jacobian(plan, inputs, wrt, of):
    """The Jacobian of `of` (rows) by `wrt` (columns) as one matrix, by the dense path."""
    blocks = plan.jacobian(inputs, wrt=list(wrt), of=list(of), sparsity="dense").jacobian
    sizes = {name: int(np.prod(np.shape(plan.evaluate(inputs)[name]) if name in of
                               else np.shape(inputs[name]))) for name in wrt + of}
    return np.block([[np.reshape(blocks[o, w], (sizes[o], sizes[w])) for w in wrt]
                     for o in of])


def stacked(blocks, rows, cols):
    return np.block([[blocks[r, c].todense().reshape(blocks[r, c].shape) for c in cols]
                     for r in rows])


def check_pattern(plan, inputs, wrt, of):
    """The pattern covers every nonzero of the dense Jacobian; both colorings are valid;
    compressed forward and reverse sweeps give the dense Jacobian back."""
    shapes = plan.bind(inputs).shapes
    analysis = sparse.jacobian_analysis(plan, shapes, wrt, of)
    assert analysis.pattern is not None
    dense = dense_jacobian(plan, inputs, wrt, of)
    missed = (dense != 0) & ~analysis.pattern.dense()
    assert not missed.any(), f"pattern misses {np.argwhere(missed)[:5].tolist()}"
    if analysis.columns is None:  # over half full, or too costly to color: dense it is
        r = plan.jacobian(inputs, wrt=list(wrt), of=list(of), sparsity="sparse")
        assert r.decision.sparsity == "dense" and "too dense to color" in r.decision.reason
        return
    assert sp.check_coloring(analysis.pattern, analysis.columns)
    assert sp.check_coloring(analysis.pattern.transpose(), analysis.rows)
    for mode in ("forward", "reverse"):
        r = plan.jacobian(inputs, wrt=list(wrt), of=list(of), mode=mode, sparsity="sparse")
        assert r.decision.sparsity == "sparse" and r.decision.mode == mode
        assert_allclose(stacked(r.jacobian, of, wrt), dense, rtol=1e-10, atol=1e-12,
                        err_msg=mode)


def with_loss(graph, outputs):
    """The graph plus loss = sum of sum(o) over `outputs`, a scalar output."""
    nodes = list(graph.nodes)
    terms = []
    for k, o in enumerate(outputs):
        nodes.append(Node(f"loss_sum{k}", "sum", [o]))
        terms.append(f"loss_sum{k}")
    total = terms[0]
    for k, t in enumerate(terms[1:]):
        nodes.append(Node(f"loss_add{k}", "add", [total, t]))
        total = f"loss_add{k}"
    return Graph(graph.inputs, nodes, [total], graph.constants), total


def check_hessian(plan, inputs, wrt, of):
    shapes = plan.bind(inputs).shapes
    analysis = sparse.hessian_analysis(plan, shapes, wrt, of)
    assert analysis.pattern is not None
    dense = plan.hessian(inputs, of=of, wrt=list(wrt), sparsity="dense").hessian
    dense = np.block([[dense[a, b].reshape(inputs[a].size, inputs[b].size) for b in wrt]
                      for a in wrt])
    missed = (dense != 0) & ~analysis.pattern.dense()
    assert not missed.any(), f"Hessian pattern misses {np.argwhere(missed)[:5].tolist()}"
    if analysis.columns is None:  # over half full, or too costly to color: dense it is
        r = plan.hessian(inputs, of=of, wrt=list(wrt), sparsity="sparse")
        assert r.decision.sparsity == "dense" and "too dense to color" in r.decision.reason
        return
    check_star_coloring(analysis.pattern, analysis.columns)
    r = plan.hessian(inputs, of=of, wrt=list(wrt), sparsity="sparse")
    assert r.decision.sparsity == "sparse"
    assert_allclose(stacked(r.hessian, wrt, wrt), dense, rtol=1e-9, atol=1e-10)


def check_star_coloring(pattern, colors):
    """Any symmetric matrix with this pattern is recovered from its products with the
    coloring's seeds: random values, B = H S, star_recover gives them back."""
    rng = np.random.default_rng(7)
    h = np.where(pattern.dense(), rng.uniform(1, 2, pattern.shape), 0.0)
    h = np.triu(h) + np.triu(h, 1).T
    assert (h != 0).sum() == pattern.nnz  # the pattern is symmetric
    seeds = sp.compressed_seeds(colors, np.float64)  # (c, n)
    rows, cols = pattern.coo()
    assert_allclose(sp.star_recover(pattern, colors, h @ seeds.T), h[rows, cols],
                    rtol=1e-14, atol=0)


# --- every op row ----------------------------------------------------------------------------


def test_every_op_row_says_how_its_pattern_propagates():
    """A row without a rule would make every result element depend on every input
    element: correct, but it would hide the sparsity of every graph through it."""
    assert [name for name, op in OPS.items() if op.pattern is None] == []
    assert sorted(name for name, op in OPS.items() if op.bilinear) == ["conv", "matmul", "mul"]


ROWS = [r for r in TABLE if r.floats and r.differentiable]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_op_pattern_covers_the_dense_jacobian(r):
    plan, inputs, _ = setup(r)
    wrt = float_names(plan, r.names)
    check_pattern(plan, inputs, wrt, ("y",))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("r", ROWS, ids=[r.id for r in ROWS])
def test_op_hessian_pattern_covers_the_dense_hessian(r):
    plan, inputs, _ = setup(r)
    graph, loss = with_loss(plan.graph, ["y"])
    plan = compile(graph)
    wrt = float_names(plan, r.names)
    check_hessian(plan, inputs, wrt, loss)


# --- random graphs -----------------------------------------------------------------------------


@SETTINGS
@given(valid_graphs())
def test_random_graph_patterns_and_compressed_jacobians(case):
    graph, inputs = case
    plan = compile(graph)
    check_pattern(plan, inputs, tuple(inputs), tuple(graph.outputs))


@SETTINGS
@given(valid_graphs())
def test_random_graph_hessian_patterns(case):
    graph, inputs = case
    graph, loss = with_loss(graph, graph.outputs)
    check_hessian(compile(graph), inputs, tuple(inputs), loss)


# --- the planner ---------------------------------------------------------------------------------


def tridiagonal(n, dtype="float64"):
    """o[i] = sin(x[i]) + x[i+1]^2 x[i+2]: each o[i] reads three neighbours; loss = sum(o)."""
    nodes = [Node("a", "slice", ["x"], {"starts": [0], "stops": [n - 2], "axes": [0]}),
             Node("b", "slice", ["x"], {"starts": [1], "stops": [n - 1], "axes": [0]}),
             Node("c", "slice", ["x"], {"starts": [2], "stops": [n], "axes": [0]}),
             Node("b2", "square", ["b"]), Node("bc", "mul", ["b2", "c"]),
             Node("s", "sin", ["a"]), Node("o", "add", ["s", "bc"]), Node("loss", "sum", ["o"])]
    return Graph([Input("x", dtype, [n])], nodes, ["o", "loss"])


def test_a_banded_jacobian_takes_three_forward_sweeps():
    plan = compile(tridiagonal(300))
    x = {"x": np.random.default_rng(0).normal(size=300)}
    r = plan.jacobian(x, of=["o"], sparsity="auto")
    d = r.decision
    assert (d.sparsity, d.mode, d.colors_forward, d.nnz) == ("sparse", "forward", 3, 3 * 298)
    assert "3 column colors" in d.reason and "sparse forward" in d.reason
    block = r.jacobian["o", "x"]
    assert isinstance(block, sparse.SparseBlock) and block.shape == (298, 300)
    dense = plan.jacobian(x, of=["o"], sparsity="dense")
    assert_allclose(block.todense(), dense.jacobian["o", "x"], rtol=RTOL, atol=ATOL)
    # the wire's default (None): compressed, but the block stays a dense array
    default = plan.jacobian(x, of=["o"])
    assert default.decision.sparsity == "sparse"
    assert isinstance(default.jacobian["o", "x"], np.ndarray)
    assert_allclose(default.jacobian["o", "x"], dense.jacobian["o", "x"], rtol=RTOL,
                    atol=ATOL)


def test_a_banded_hessian_takes_three_hvps():
    plan = compile(tridiagonal(200))
    x = {"x": np.random.default_rng(1).normal(size=200)}
    r = plan.hessian(x, of="loss", sparsity="auto")
    assert r.decision.sparsity == "sparse" and r.decision.colors_forward == 3
    dense = plan.hessian(x, of="loss", sparsity="dense")
    assert_allclose(r.hessian["x", "x"].todense(), dense.hessian["x", "x"], rtol=1e-10,
                    atol=1e-12)
    assert_allclose(r.gradient["x"], dense.gradient["x"], rtol=RTOL, atol=ATOL)


def test_an_arrowhead_hessian_takes_two_star_colors():
    """f = sum((x_i x_0)^2 + sin(x_i)): x_0 meets every other variable, so a coloring of
    the columns needs n colors; a star coloring needs 2."""
    n = 300
    g = Graph([Input("x", "float64", [n])],
              [Node("a", "slice", ["x"], {"starts": [0], "stops": [1], "axes": [0]}),
               Node("m", "mul", ["x", "a"]), Node("q", "square", ["m"]),
               Node("s", "sin", ["x"]), Node("t", "add", ["q", "s"]), Node("l", "sum", ["t"])],
              ["l"])
    plan = compile(g)
    x = {"x": np.random.default_rng(4).normal(size=n)}
    r = plan.hessian(x, of="l", sparsity="auto")
    assert r.decision.sparsity == "sparse" and r.decision.colors_forward == 2
    dense = plan.hessian(x, of="l", sparsity="dense")
    assert_allclose(r.hessian["x", "x"].todense(), dense.hessian["x", "x"], rtol=1e-10,
                    atol=1e-12)


def test_dense_behaviour_is_unchanged_when_sparsity_does_not_pay():
    """tanh(W x) with a full W: every output reads every input, so no coloring beats the
    dense sweeps: the answer is the dense path's, decision and blocks alike."""
    rng = np.random.default_rng(2)
    g = Graph([Input("x", "float64", [6])],
              [Node("h", "matmul", ["W", "x"]), Node("o", "tanh", ["h"])], ["o"],
              {"W": rng.normal(size=(8, 6))})
    plan = compile(g)
    x = {"x": rng.normal(size=6)}
    dense = plan.jacobian(x, sparsity="dense")
    for sparsity in ("auto", None):
        r = plan.jacobian(x, sparsity=sparsity)
        same = ("mode", "n", "m", "cost_forward", "cost_reverse", "sparsity")
        assert [getattr(r.decision, f) for f in same] == [getattr(dense.decision, f)
                                                            for f in same]
        assert r.decision.sparsity == "dense" and r.decision.nnz == 48
        assert r.decision.reason.startswith(dense.decision.reason)
        assert "too dense to color" in r.decision.reason
        np.testing.assert_array_equal(r.jacobian["o", "x"], dense.jacobian["o", "x"])


def test_scalar_loss_gradients_never_look_for_a_pattern():
    plan = compile(tridiagonal(50))
    plan.jacobian({"x": np.ones(50)}, of=["loss"])
    assert plan.patterns == {}


def test_a_pattern_too_large_for_the_budget_falls_back_to_dense(monkeypatch):
    rng = np.random.default_rng(3)
    g = Graph([Input("x", "float64", [40])],
              [Node("h", "matmul", ["W", "x"]), Node("o", "sin", ["h"])], ["o"],
              {"W": rng.normal(size=(40, 40))})
    plan = compile(g)
    x = {"x": rng.normal(size=40)}
    shapes = plan.bind(x).shapes
    analysis = sparse.jacobian_analysis(plan, shapes, ("x",), ("o",), max_entries=100)
    assert analysis.pattern is None
    monkeypatch.setattr(sp, "MAX_PATTERN_ENTRIES", 100)  # the server's bound, lowered
    r = plan.jacobian(x, sparsity="sparse")
    assert r.decision.sparsity == "dense" and "too large" in r.decision.reason


def test_pattern_caches_are_bounded_and_counted():
    plan = compile(tridiagonal(400))
    base = plan.cache_bytes
    for n in range(10):  # more shapes than the cache keeps? one shape, many wrt/of keys
        plan.jacobian({"x": np.ones(400)}, of=["o"], sparsity="sparse", mode=["forward", "reverse"][n % 2])
    assert len(plan.patterns) <= sparse.PATTERN_CACHE
    assert plan.cache_bytes > base
    assert sum(a.nbytes for a in plan.patterns.values()) <= sparse.PATTERN_CACHE_BYTES


def test_unknown_sparsity_is_refused_naming_the_field():
    from gradserve.engine import DifferentiationError
    plan = compile(tridiagonal(10))
    with pytest.raises(DifferentiationError) as info:
        plan.jacobian({"x": np.ones(10)}, sparsity="sometimes")
    assert info.value.field == "sparsity"


# Zero-size inputs: each rule that lays an input out as rows of a slice (reductions,
# softmax's and cumsum's axis) once asked reshape for -1 of an empty array, which numpy
# cannot infer (found by bench/fuzz_server.py: a sparse Jacobian of a reduction over an
# input with an empty axis was an internal error). The sparse path answers as the dense.
EMPTY_SLICES = [(op, shape, attrs)
                for op in ("sum", "mean", "max", "min", "prod", "cumsum", "softmax",
                           "log_softmax")
                for shape, attrs in (((0, 3), {"axes": [1]}), ((3, 0), {"axes": [0]}),
                                     ((3, 0), {"axes": [1]}), ((0,), {}), ((2, 0, 3), {}))]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("op, shape, attrs", EMPTY_SLICES,
                         ids=[f"{op}-{shape}-{attrs}" for op, shape, attrs in EMPTY_SLICES])
def test_zero_size_inputs_take_the_sparse_path_as_the_dense(op, shape, attrs):
    if op in ("cumsum", "softmax", "log_softmax"):  # one axis, not a list
        attrs = {"axis": attrs["axes"][0]} if "axes" in attrs else {}
    try:
        plan = compile(Graph(inputs=[Input("x", "float64", list(shape))],
                             nodes=[Node("y", op, ["x"], attrs)], outputs=["y"]))
        x = {"x": np.zeros(shape)}
        dense = plan.jacobian(x, sparsity="dense").jacobian
    except EngineError:  # refused by the op's own rule (an empty softmax, max of nothing)
        return
    got = plan.jacobian(x, sparsity="sparse").jacobian
    for key, block in dense.items():
        found = got[key]
        found = found.todense() if hasattr(found, "todense") else found  # (rows, columns)
        assert np.size(found) == np.size(block)
        assert_allclose(np.ravel(found), np.ravel(block))
