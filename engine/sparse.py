"""Sparse Jacobians and Hessians over a plan: the pattern from the graph, a coloring, a
few compressed sweeps through the plan's own batched JVP, VJP or HVP, and the nonzeros
read back from them.

    J S = B  (S: n x c, column c the sum of the unit vectors of the columns colored c)
    J[i, j] = B[i, color(j)]   for every (i, j) in the pattern

The planner (planner.plan_sparsity) compares the dense cost, min(n, 1.25 m) directions,
with c forward colors and 1.25 r reverse colors (a Hessian: n HVPs against c) and keeps
the dense path when sparsity does not pay.
"""

from __future__ import annotations

from math import prod
from typing import NamedTuple

import numpy as np

from . import sparsity as sp
from . import second
from .budget import Budget, Need
from .errors import DifferentiationError
from .ops.table import ZERO
from .planner import REVERSE_COST_RATIO, PlannerDecision, plan_sparse_hessian, plan_sparsity

SPARSITY_CHOICES = ("auto", "dense", "sparse")
# Per plan: patterns and colorings remembered for at most this many (shapes, wrt, of) keys
# and bytes (counted by Plan.cache_bytes, so the graph cache's bound covers them).
PATTERN_CACHE = 8
PATTERN_CACHE_BYTES = 4 << 20


class SparseBlock(NamedTuple):
    """One block d(of)/d(wrt) (or d2 f / d wrt_a d wrt_b) as a sparse matrix of shape
    (elements of `of`, elements of `wrt`): C-order flat indices, COO."""
    rows: np.ndarray  # int64
    cols: np.ndarray  # int64
    values: np.ndarray
    shape: tuple  # (rows, cols) of the matrix
    block_shape: tuple  # the dense block's shape: of.shape + wrt.shape

    def todense(self) -> np.ndarray:
        out = np.zeros(self.shape, self.values.dtype)
        out[self.rows, self.cols] = self.values
        return out.reshape(self.block_shape)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.cols.nbytes + self.values.nbytes


class Analysis(NamedTuple):
    """What sparsity knows of one (shapes, wrt, of): the pattern (None when it would be too
    large to find: dense) and its colorings."""
    pattern: sp.Pattern | None
    columns: np.ndarray | None  # column colors
    rows: np.ndarray | None  # row colors (Jacobians only)

    @property
    def nbytes(self) -> int:
        arrays = [] if self.pattern is None else [self.pattern.indptr, self.pattern.indices]
        arrays += [a for a in (self.columns, self.rows) if a is not None]
        return sum(a.nbytes for a in arrays) + 200


def check_choice(sparsity: str) -> str:
    if sparsity not in SPARSITY_CHOICES:
        raise DifferentiationError(f"unknown sparsity {sparsity!r} (auto, dense or sparse)",
                                   field="sparsity")
    return sparsity


def _patterns(plan, shapes, wrt, budget, check, upto=None):
    """Every live value's pattern over the columns of `wrt` (flattened, end to end)."""
    offsets, at = {}, 0
    for name in wrt:
        offsets[name] = at
        at += prod(shapes[name])
    columns = at
    patterns = {name: sp.identity(prod(shapes[name]), offsets[name], columns) for name in wrt}
    constants = plan.graph.constants
    for j, (node, op, attrs) in enumerate(plan.nodes):
        if check is not None and j % 64 == 0:
            check()
        ins = [patterns.get(name) for name in node.inputs]
        if all(p is None for p in ins):
            continue
        values = [constants.get(name) for name in node.inputs]
        if op.pattern is None:  # a row without a rule: every element reads every column
            size = prod(shapes[node.name])
            _spend(budget, size * columns)
            rows = np.repeat(np.arange(size, dtype=np.int64), columns)
            cols = np.tile(np.arange(columns, dtype=np.int64), size)
            patterns[node.name] = sp.from_coo(rows, cols, (size, columns))
            continue
        _spend(budget, 0, _local_upper_bound(op.pattern, [tuple(shapes[i]) for i in node.inputs],
                                             tuple(shapes[node.name]), attrs))
        patterns[node.name] = sp.node_pattern(
            op, [shapes[i] for i in node.inputs], shapes[node.name], ins, values, attrs,
            columns, budget)
        if upto is not None and node.name == upto:
            break
    return patterns, offsets, columns


def _spend(budget, entries, upper=0):
    """Take `entries` from the budget (a list holding what is left), or refuse when it
    cannot hold them, or a local rule's `upper` bound of what it would build."""
    if entries > budget[0] or upper > budget[0]:
        raise sp.TooDense
    budget[0] -= entries


def _local_upper_bound(rule, in_shapes, out, attrs) -> int:
    """Index pairs a local rule can build: one per (output element, input element it reads)."""
    size = prod(out)
    if rule is sp.elementwise or rule is sp.where_pattern or rule is sp.cast_pattern:
        return size * len(in_shapes)
    if rule is sp.matmul_pattern:
        a = in_shapes[0]
        return 2 * size * (a[-1] if a else 1)
    if rule is sp.conv_pattern:
        w = in_shapes[1]
        return 2 * size * prod(w[1:])
    if rule is sp.pool_pattern:
        return size * prod(attrs["window"].kernel)
    if rule is sp.along_axis:
        x = in_shapes[0]
        return size * x[attrs.get("axis", -1) % len(x)]
    if rule is sp.cumsum_pattern:
        x = in_shapes[0]
        return size * x[attrs.get("axis", 0) % len(x)]
    if rule is sp.take_pattern:
        x = in_shapes[0]
        return size * x[attrs.get("axis", 0) % len(x)]
    return max(size, sum(prod(s) for s in in_shapes))


def _cache(plan) -> dict:
    return plan.patterns


def _remember(plan, key, value: Analysis):
    """Keep an analysis for the next call, within PATTERN_CACHE entries and
    PATTERN_CACHE_BYTES (the oldest go first; one larger than the bound is not kept)."""
    cache = _cache(plan)
    if value.nbytes > PATTERN_CACHE_BYTES:
        return
    while cache and (len(cache) >= PATTERN_CACHE or
                     sum(a.nbytes for a in cache.values()) + value.nbytes > PATTERN_CACHE_BYTES):
        cache.pop(next(iter(cache)))
    cache[key] = value


def jacobian_analysis(plan, shapes, wrt, of, *, max_entries=None, check=None) -> Analysis:
    """The Jacobian pattern of `of` (rows, end to end) against `wrt` (columns), with its
    column and row colorings; cached per plan and shapes. Too large to find: dense."""
    def find(budget):
        patterns, _, columns = _patterns(plan, shapes, wrt, budget, check)
        return _stack([sp.empty(prod(shapes[name]), columns) if patterns.get(name) is None
                       else patterns[name] for name in of], columns)
    key = ("jacobian", tuple(tuple(shapes[x]) for x in wrt + of), wrt, of)
    return _analysis(plan, key, find, max_entries, check, sp.color_columns, sp.color_rows)


def hessian_analysis(plan, shapes, wrt, of, *, max_entries=None, check=None) -> Analysis:
    """The Hessian pattern of the scalar `of` over `wrt` (n x n, symmetric): the union over
    the nodes `of` depends on that add second-order interactions (sparsity.hessian_terms)
    of every pair of columns one of their elements depends on; with its star coloring."""
    def find(budget):
        patterns, _, columns = _patterns(plan, shapes, wrt, budget, check)
        ancestors = _ancestors(plan, of)
        rows, cols = [], []
        for node, op, _ in plan.nodes:
            if node.name not in ancestors or patterns.get(node.name) is None:
                continue
            ins = [patterns.get(name) for name in node.inputs]
            linear = op.curvature is ZERO or op.curvature is None
            if not sp.hessian_terms(linear, op.bilinear, ins, patterns[node.name]):
                continue
            a, b = sp.square_blocks(patterns[node.name], budget)
            rows.append(a)
            cols.append(b)
        if not rows:
            return sp.empty(columns, columns)
        return sp.from_coo(np.concatenate(rows), np.concatenate(cols), (columns, columns))
    key = ("hessian", tuple(tuple(shapes[x]) for x in wrt), wrt, of)
    return _analysis(plan, key, find, max_entries, check, sp.star_coloring)


def _analysis(plan, key, find, max_entries, check, *colorings) -> Analysis:
    """The cached analysis for `key`, or `find(budget)`'s pattern with its colorings (the
    rows' coloring None where only one is asked for), remembered for the next call."""
    found = _cache(plan).get(key)
    if found is not None:
        return found
    try:
        pattern = find([sp.entries_limit(max_entries)])
    except sp.TooDense:
        analysis = Analysis(None, None, None)
    else:
        colors = _colorings(pattern, check, *colorings)
        analysis = Analysis(pattern, colors[0], colors[1] if len(colors) > 1 else None)
    _remember(plan, key, analysis)
    return analysis


def _colorings(pattern, check, *colorings):
    """Each coloring of the pattern, or None for all when it is over half full (no
    coloring can pay) or too costly to color (sparsity.MAX_COLORING_WORK)."""
    rows, cols = pattern.shape
    if pattern.nnz * 2 > rows * cols:
        return (None,) * len(colorings)
    try:
        return tuple(color(pattern, check) for color in colorings)
    except sp.TooDense:
        return (None,) * len(colorings)


def _ancestors(plan, of) -> set:
    needed = {of}
    for node, _, _ in reversed(plan.nodes):
        if node.name in needed:
            needed.update(node.inputs)
    return needed


def _stack(parts, columns) -> sp.Pattern:
    indptr = [np.zeros(1, np.int64)]
    at = 0
    for p in parts:
        indptr.append(p.indptr[1:] + at)
        at += p.nnz
    return sp.Pattern(np.concatenate(indptr),
                      np.concatenate([p.indices for p in parts]) if parts
                      else np.zeros(0, np.int64),
                      (sum(p.shape[0] for p in parts), columns))


# --- the decision and the compressed sweeps ---------------------------------------------------


def decide_jacobian(analysis: Analysis, n: int, m: int, mode: str, sparsity: str,
                    ratio: float = REVERSE_COST_RATIO) -> PlannerDecision:
    p = analysis.pattern
    if p is None:
        return plan_sparsity(n, m, None, None, None, mode=mode, sparsity=sparsity, ratio=ratio)
    if analysis.columns is None:
        return plan_sparsity(n, m, p.nnz, None, None, mode=mode, sparsity=sparsity,
                             ratio=ratio)
    return plan_sparsity(n, m, p.nnz, sp.ncolors(analysis.columns), sp.ncolors(analysis.rows),
                         mode=mode, sparsity=sparsity, ratio=ratio)


def compressed_jacobian(plan, bound, wrt, of, analysis: Analysis, decision: PlannerDecision,
                        budget: Budget):
    """(outputs, values of the pattern's nonzeros in CSR order) through the sweeps the
    decision picked: forward, J S = B and J[i, j] = B[i, color(j)]; reverse, W^T J = C
    and J[i, j] = C[color(i), j]."""
    shapes = bound.shapes
    rows, cols = analysis.pattern.coo()
    dtype = np.result_type(*[plan.np_dtypes[x] for x in wrt + of])
    if decision.mode == "forward":
        seeds = _split(sp.compressed_seeds(analysis.columns, dtype), wrt, shapes, plan)
        result = plan.run_jvp(bound, seeds, budget)
        compressed = _joined(result.tangents, of, len(next(iter(seeds.values())))).T  # (m, c)
        return result.outputs, compressed[rows, analysis.columns[cols]]
    seeds = _split(sp.compressed_seeds(analysis.rows, dtype), of, shapes, plan)
    result = plan.run_vjp(bound, seeds, wrt, budget)
    compressed = _joined(result.cotangents, wrt, len(next(iter(seeds.values()))))  # (r, n)
    return result.outputs, compressed[analysis.rows[rows], cols]


def _split(seeds, names, shapes, plan) -> dict:
    """A (k, total) seed matrix as one (k,) + shape seed per name, end to end."""
    out, at, k = {}, 0, seeds.shape[0]
    for name in names:
        size = prod(shapes[name])
        out[name] = np.ascontiguousarray(seeds[:, at:at + size],
                                         plan.np_dtypes[name]).reshape((k,) + tuple(shapes[name]))
        at += size
    return out


def _joined(arrays, names, k) -> np.ndarray:
    """The (k, total) matrix of batched results, one name after the other."""
    return np.concatenate([np.asarray(arrays[name]).reshape(k, -1) for name in names], axis=1)


def split_blocks(pattern: sp.Pattern, values, shapes, row_names, col_names, dtypes):
    """The nonzeros of the stacked matrix, one SparseBlock per (row name, column name)."""
    rows, cols = pattern.coo()
    row_at = np.cumsum([0] + [prod(shapes[r]) for r in row_names])
    col_at = np.cumsum([0] + [prod(shapes[c]) for c in col_names])
    blocks = {}
    for a, r in enumerate(row_names):
        in_rows = (rows >= row_at[a]) & (rows < row_at[a + 1])
        for b, c in enumerate(col_names):
            mine = in_rows & (cols >= col_at[b]) & (cols < col_at[b + 1])
            shape = (int(row_at[a + 1] - row_at[a]), int(col_at[b + 1] - col_at[b]))
            blocks[r, c] = SparseBlock(rows[mine] - row_at[a], cols[mine] - col_at[b],
                                       values[mine].astype(dtypes[r], copy=False), shape,
                                       tuple(shapes[r]) + tuple(shapes[c]))
    return blocks


def compressed_hessian(plan, bound, wrt, of, analysis: Analysis, budget: Budget):
    """(hvp result, values of the Hessian pattern's nonzeros in CSR order): one HVP
    direction per color of a star coloring, each entry read back directly from H S = B
    (sparsity.star_recover)."""
    pattern, shapes = analysis.pattern, bound.shapes
    colors = analysis.columns
    dtype = np.result_type(*[plan.np_dtypes[x] for x in wrt])
    vectors = _split(sp.compressed_seeds(colors, dtype), wrt, shapes, plan)
    result = second.hvp(plan, bound, vectors, of, wrt, budget)
    compressed = _joined(result.hvp, wrt, len(next(iter(vectors.values())))).T  # (n, c)
    return result, sp.star_recover(pattern, colors, compressed)


# --- whole requests ---------------------------------------------------------------------------

# The dense cost below which no pattern is looked for: a Jacobian of at most this many
# dense directions (a scalar loss's gradient: one) cannot get cheaper by compression.
MIN_DENSE_COST = 2.0
# Bytes a sparse entry takes in a reply (two int64 indices and the value); the auto layout
# is sparse when that is under half the dense block's.
INDEX_BYTES = 16


def _entries_budget(max_bytes):
    """The pattern's entries, within a request's memory bound (an entry costs ~48 bytes
    while the index arrays are built and merged)."""
    limit = sp.MAX_PATTERN_ENTRIES
    return limit if max_bytes is None else max(0, min(limit, max_bytes // 48))


def _sparse_layout(sparsity, nnz, dense_elements, itemsize) -> bool:
    if sparsity == "sparse":
        return True
    return sparsity == "auto" and nnz * (INDEX_BYTES + itemsize) * 2 < dense_elements * itemsize


def _checks_only(budget: Budget) -> Budget:
    """The budget's deadline and cancellation without its limits: a compressed request is
    admitted once, for what it really needs, before its sweeps run."""
    return Budget(deadline=budget.deadline, cancel=budget.cancel)


def try_jacobian(plan, bound, wrt, of, mode, sparsity, budget: Budget):
    """A Jacobian by compressed sweeps; or, when the dense path should answer, None (no
    pattern looked for) or the planner's decision (dense, with the pattern's figures and
    why compression does not pay).

    `sparsity`: None (the planner may compress; blocks stay dense arrays: the wire's
    default), "auto" (blocks sparse when that is smaller), "sparse" (compressed and sparse
    whenever a pattern is found), "dense" (no pattern at all)."""
    if sparsity is not None:
        check_choice(sparsity)
    if sparsity == "dense":
        return None
    from .jacobian import JacobianResult
    shapes = bound.shapes
    wrt, of = plan.wrt_names(wrt), plan.of_names(of)
    n = sum(prod(shapes[w]) for w in wrt)
    m = sum(prod(shapes[o]) for o in of)
    if sparsity != "sparse" and min(n, REVERSE_COST_RATIO * m) <= MIN_DENSE_COST:
        return None
    analysis = jacobian_analysis(plan, shapes, wrt, of,
                                 max_entries=_entries_budget(budget.max_bytes),
                                 check=budget.check)
    decision = decide_jacobian(analysis, n, m, mode, sparsity or "auto")
    if decision.sparsity != "sparse":
        return decision  # the dense path answers; its decision carries the figures
    itemsize = max(plan.np_dtypes[x].itemsize for x in wrt + of)
    sparse_out = _sparse_layout(sparsity, analysis.pattern.nnz, n * m, itemsize)
    result_bytes = (analysis.pattern.nnz * (INDEX_BYTES + itemsize) if sparse_out
                    else n * m * itemsize)
    if budget.limited:
        largest = max(prod(shapes[o]) * prod(shapes[w]) for o in of for w in wrt)
        k = decision.colors_forward if decision.mode == "forward" else decision.colors_reverse
        budget.admit(plan, shapes, Need(
            max(k, 1), plan.nbytes(shapes, plan.output_names) + result_bytes,
            "outputs and Jacobian blocks", "of", extra=result_bytes,
            block=None if sparse_out else largest,
            block_hint="ask for fewer `of`/`wrt`, sparse blocks, or use JVPs/VJPs"))
    outputs, values = compressed_jacobian(plan, bound, wrt, of, analysis, decision,
                                          _checks_only(budget))
    blocks = split_blocks(analysis.pattern, values, shapes, of, wrt, plan.np_dtypes)
    if not sparse_out:
        blocks = {key: b.todense() for key, b in blocks.items()}
    return JacobianResult(outputs, blocks, decision.mode, decision)


def try_hessian(plan, bound, of, wrt, sparsity, budget: Budget):
    """A Hessian by one HVP per color of a star coloring of its pattern; or None or the
    planner's dense decision, as try_jacobian."""
    if sparsity is not None:
        check_choice(sparsity)
    if sparsity == "dense":
        return None
    shapes = bound.shapes
    out = second.scalar_of(plan, of, shapes)
    wrt = second.wrt_names(plan, wrt)
    n = sum(prod(shapes[w]) for w in wrt)
    if sparsity != "sparse" and n <= MIN_DENSE_COST:
        return None
    analysis = hessian_analysis(plan, shapes, wrt, out,
                                max_entries=_entries_budget(budget.max_bytes),
                                check=budget.check)
    p = analysis.pattern
    decision = plan_sparse_hessian(
        n, None if p is None else p.nnz,
        None if analysis.columns is None else sp.ncolors(analysis.columns),
        sparsity=sparsity or "auto")
    if decision.sparsity != "sparse":
        return decision
    itemsize = max(plan.np_dtypes[x].itemsize for x in wrt)
    sparse_out = _sparse_layout(sparsity, p.nnz, n * n, itemsize)
    result_bytes = p.nnz * (INDEX_BYTES + itemsize) if sparse_out else n * n * itemsize
    if budget.limited:
        k = max(decision.colors_forward, 1)
        largest = max(prod(shapes[a]) * prod(shapes[b]) for a in wrt for b in wrt)
        budget.admit(plan, shapes, Need(
            2 * k + 1, plan.nbytes(shapes, plan.output_names) + plan.nbytes(shapes, wrt)
            + result_bytes, "outputs, gradients and Hessian blocks", "wrt",
            extra=plan.nbytes(shapes, wrt, k) + result_bytes,
            block=None if sparse_out else largest, block_what="Hessian",
            block_hint="ask for fewer or smaller `wrt` inputs, sparse blocks, or use "
            "Hessian-vector products"))
    result, values = compressed_hessian(plan, bound, wrt, out, analysis, _checks_only(budget))
    blocks = split_blocks(p, values, shapes, wrt, wrt, plan.np_dtypes)
    if not sparse_out:
        blocks = {key: b.todense() for key, b in blocks.items()}
    return second.HessianResult(result.value, result.gradient, blocks, decision,
                                result.outputs)
