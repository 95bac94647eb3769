"""Sparsity of Jacobians and Hessians, found from the graph without evaluating it, and the
colorings that compress them into a few sweeps.

A pattern says which elements of the inputs differentiated (flattened and laid end to end,
`n` columns) each element of a value depends on: a boolean matrix with one row per element
of the value, kept as CSR (`indptr`, sorted `indices`). Each op's row carries a `pattern`
rule giving, for each of its inputs, the local dependency (output element, input element)
as two index arrays; composing those with the inputs' patterns gives the node's. The
patterns are exact in the sense that matters: they never miss a nonzero (a structural
zero may be kept as a nonzero where an op's rule is conservative, e.g. `take` with
indices known only at run time).

Colorings (Coleman and Moré 1983; Gebremedhin, Manne and Pothen 2005): columns that share
no row can be seeded together, so a forward sweep with one direction per color gives all
of them (column coloring); rows that share no column likewise in reverse (row coloring).
A Hessian is symmetric: a column coloring of its pattern (distance-2 coloring of its
adjacency graph) lets one Hessian-vector product per color recover it directly.

Every array this module builds is counted against `max_entries` before it is made, so a
dense or huge graph gives up (TooDense) instead of allocating: the planner then keeps the
dense Jacobian.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from .errors import ResourceLimitError
from .windows import Window

# A pattern (all values of a request) may hold at most this many entries unless the
# caller sets its own bound: 2M entries are ~50 MB of int64 index arrays while they are built.
MAX_PATTERN_ENTRIES = 2_000_000
# A greedy coloring looks at every (column, row, column) triple: sum over rows of their
# length squared. Past this many (~1 s of Python) the pattern is treated as too dense.
MAX_COLORING_WORK = 4_000_000


class TooDense(Exception):
    """The pattern would exceed its entry bound: the caller keeps the dense result."""


@dataclass(frozen=True)
class Pattern:
    """A boolean matrix in CSR form: row r depends on columns indices[indptr[r]:indptr[r+1]]."""

    indptr: np.ndarray  # int64, rows + 1
    indices: np.ndarray  # int64, sorted within each row
    shape: tuple  # (rows, columns)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def coo(self) -> tuple[np.ndarray, np.ndarray]:
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr))
        return rows, self.indices

    def transpose(self) -> "Pattern":
        rows, cols = self.coo()
        return from_coo(cols, rows, (self.shape[1], self.shape[0]))

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        rows, cols = self.coo()
        out[rows, cols] = True
        return out


def empty(rows: int, columns: int) -> Pattern:
    return Pattern(np.zeros(rows + 1, np.int64), np.zeros(0, np.int64), (rows, columns))


def from_coo(rows, cols, shape) -> Pattern:
    """The CSR pattern of (rows, cols) pairs, duplicates merged."""
    nrows, ncols = shape
    rows = np.asarray(rows, np.int64)
    cols = np.asarray(cols, np.int64)
    if rows.size:
        key = np.unique(rows * max(ncols, 1) + cols)
        rows, cols = np.divmod(key, max(ncols, 1))
    counts = np.bincount(rows, minlength=nrows)
    indptr = np.zeros(nrows + 1, np.int64)
    np.cumsum(counts, out=indptr[1:])
    return Pattern(indptr, cols, (nrows, ncols))


def identity(size: int, offset: int, columns: int) -> Pattern:
    """An input's own pattern: element i depends on column offset + i."""
    return Pattern(np.arange(size + 1, dtype=np.int64),
                   np.arange(offset, offset + size, dtype=np.int64), (size, columns))


# --- local patterns, the op rows' `pattern` field -----------------------------------------
# A rule gets (shapes, out_shape, constant values or None per input, op_eval=the row's
# eval, **attrs) and returns one entry per input: None (no derivative through it), "same"
# (elementwise, same shape: element i depends on element i) or (out_index, in_index)
# int64 arrays.


def _index(shape) -> np.ndarray:
    return np.arange(prod(shape), dtype=np.int64).reshape(shape)


def elementwise(shapes, out, values=None, **_):
    """Element i of the result depends on the broadcast element of each input."""
    local = []
    for s in shapes:
        if tuple(s) == tuple(out):
            local.append("same")
        else:
            src = np.broadcast_to(_index(s), out).ravel()
            local.append((np.arange(src.size, dtype=np.int64), src))
    return local


def no_derivative(shapes, out, values=None, **_):
    return [None] * len(shapes)


def where_pattern(shapes, out, values=None, **_):
    """where(cond, a, b): through a and b elementwise, not through the condition."""
    return [None] + elementwise(shapes[1:], out)


def reduction(shapes, out, values=None, axes=None, keepdims=False, **_):
    """Each result element depends on every element of its reduced slice."""
    shape = tuple(shapes[0])
    axes = tuple(range(len(shape))) if axes is None else tuple(a % len(shape) for a in axes)
    kept = [a for a in range(len(shape)) if a not in axes]
    # sizes spelled out: with an empty shape, -1 does not say how many (a zero-size
    # input whose kept or reduced axes are empty)
    src = _index(shape).transpose(kept + list(axes)).reshape(
        prod(shape[a] for a in kept), prod(shape[a] for a in axes))
    dst = np.repeat(np.arange(src.shape[0], dtype=np.int64), src.shape[1])
    return [(dst, src.ravel())]


def _slices(shape: tuple, axis: int) -> np.ndarray:
    """The flat indices of `shape`'s elements as rows along `axis`: (slices, length),
    the count of slices spelled out (reshape's -1 cannot infer it from an empty shape)."""
    slices = prod(n for a, n in enumerate(shape) if a != axis)
    return np.moveaxis(_index(shape), axis, -1).reshape(slices, shape[axis])


def along_axis(shapes, out, values=None, axis=-1, **_):
    """softmax, log_softmax: each element depends on its whole slice along the axis."""
    shape = tuple(shapes[0])
    axis %= len(shape)
    length = shape[axis]
    idx = _slices(shape, axis)  # (slices, L)
    cube = (idx.shape[0], length, length)
    dst = np.broadcast_to(idx[:, :, None], cube).ravel()
    src = np.broadcast_to(idx[:, None, :], cube).ravel()
    return [(dst, src)]


def logsumexp_pattern(shapes, out, values=None, axis=-1, keepdims=False, **_):
    return reduction(shapes, out, axes=(axis,), keepdims=keepdims)


def cumsum_pattern(shapes, out, values=None, axis=0, reverse=False, exclusive=False, **_):
    shape = tuple(shapes[0])
    axis %= len(shape)
    length = shape[axis]
    i, j = np.tril_indices(length, -1 if exclusive else 0)  # out position i sums inputs j
    if reverse:
        i, j = length - 1 - i, length - 1 - j
    idx = _slices(shape, axis)  # (rows, L)
    dst = idx[:, i].ravel()
    src = idx[:, j].ravel()
    return [(dst, src)]


def moves(shapes, out, values=None, op_eval=None, **attrs):
    """Ops that move elements (reshape, transpose, slice, broadcast_to): the op's own eval
    run on the index array says where each element comes from."""
    src = np.asarray(op_eval(_index(shapes[0]), **attrs), np.int64).ravel()
    return [(np.arange(src.size, dtype=np.int64), src)]


def pad_moves(shapes, out, values=None, op_eval=None, **attrs):
    """pad: as moves, padding filled with -1 (an element from nowhere)."""
    src = np.asarray(op_eval(_index(shapes[0]), **dict(attrs, value=-1)), np.int64).ravel()
    keep = src >= 0
    return [(np.arange(src.size, dtype=np.int64)[keep], src[keep])]


def concat_pattern(shapes, out, values=None, op_eval=None, axis=0, **attrs):
    """concat: each element comes from one element of one input; with repeated references
    (attrs["refs"]) the row's own eval places them. Grouped by input in one sort."""
    offsets = np.cumsum([0] + [prod(s) for s in shapes])
    parts = [_index(s) + off for s, off in zip(shapes, offsets)]
    joined = (np.concatenate(parts, axis=axis) if op_eval is None
              else np.asarray(op_eval(*parts, axis=axis, **attrs), np.int64)).ravel()
    owner = np.searchsorted(offsets, joined, side="right") - 1
    dst = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[dst], np.arange(len(shapes) + 1))
    src = joined[dst] - offsets[owner[dst]]
    return [(dst[a:b], src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def take_pattern(shapes, out, values=None, axis=0, **_):
    """take(x, indices): with constant indices exact; otherwise every element depends on
    the whole slice of x along the axis (any index could be chosen at run time)."""
    shape = tuple(shapes[0])
    axis %= len(shape)
    indices = values[1] if values is not None else None
    if indices is not None:
        idx = np.take(_index(shape), np.asarray(indices, np.int64) % shape[axis], axis=axis)
        return [(np.arange(idx.size, dtype=np.int64), idx.ravel()), None]
    # out shape: shape[:axis] + indices.shape + shape[axis+1:]
    before, after = prod(shape[:axis]), prod(shape[axis + 1:])
    middle = prod(out) // max(before * after, 1) if before * after else 0
    o = _index((before, middle, after))
    src = _index((before, shape[axis], after))
    dst = np.repeat(o[:, :, :, None], shape[axis], axis=3)  # (before, middle, after, L)
    srcs = np.broadcast_to(src.transpose(0, 2, 1)[:, None, :, :],
                           (before, middle, after, shape[axis]))
    return [(dst.ravel(), srcs.ravel()), None]


def matmul_pattern(shapes, out, values=None, **_):
    """NumPy matmul: out[..., i, j] depends on a[..., i, :] and b[..., :, j]."""
    a_shape, b_shape = tuple(shapes[0]), tuple(shapes[1])
    a = _index(a_shape)
    b = _index(b_shape)
    if a.ndim == 1:
        a = a[None, :]
    if b.ndim == 1:
        b = b[:, None]
    k = a.shape[-1]
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = np.broadcast_to(a, batch + a.shape[-2:])
    b = np.broadcast_to(b, batch + b.shape[-2:])
    rows, cols = a.shape[-2], b.shape[-1]
    o = _index(batch + (rows, cols))
    dst = np.broadcast_to(o[..., None], batch + (rows, cols, k))
    src_a = np.broadcast_to(a[..., :, None, :], batch + (rows, cols, k))
    src_b = np.broadcast_to(np.swapaxes(b, -1, -2)[..., None, :, :], batch + (rows, cols, k))
    return [(dst.ravel(), src_a.ravel()), (dst.ravel(), src_b.ravel())]


def _window_pairs(spatial, out_spatial, window):
    """For every (output position, kernel offset) inside the input: the flat output
    position, the flat kernel offset and the flat input position, per spatial axis
    combined (no Python loop over offsets or pixels)."""
    outs, kers, ins, valid = [], [], [], None
    grids = np.meshgrid(*[np.arange(p) for p in out_spatial],
                        *[np.arange(k) for k in window.kernel], indexing="ij")
    d = len(spatial)
    pos_out = np.ravel_multi_index(grids[:d], out_spatial) if d else np.zeros((), np.int64)
    pos_ker = np.ravel_multi_index(grids[d:], window.kernel) if d else np.zeros((), np.int64)
    coords = []
    for axis in range(d):
        c = (grids[axis] * window.strides[axis] + grids[d + axis] * window.dilations[axis]
             - window.begin[axis])
        ok = (c >= 0) & (c < spatial[axis])
        valid = ok if valid is None else valid & ok
        coords.append(np.clip(c, 0, spatial[axis] - 1))
    pos_in = np.ravel_multi_index(coords, spatial)
    outs, kers, ins = pos_out[valid], pos_ker[valid], pos_in[valid]
    return outs.astype(np.int64), kers.astype(np.int64), ins.astype(np.int64)


def pool_pattern(shapes, out, values=None, window=None, **_):
    x = tuple(shapes[0])
    n, c, spatial = x[0], x[1], x[2:]
    out_spatial = tuple(out[2:])
    po, _, pi = _window_pairs(spatial, out_spatial, window)
    plane_out, plane_in = prod(out_spatial), prod(spatial)
    planes = np.arange(n * c, dtype=np.int64)[:, None]
    return [((planes * plane_out + po).ravel(), (planes * plane_in + pi).ravel())]


def conv_pattern(shapes, out, values=None, strides=None, pads=None, dilations=None,
                 groups=1, **_):
    x, w = tuple(shapes[0]), tuple(shapes[1])
    window = Window(tuple(w[2:]), tuple(strides), tuple(pads), tuple(dilations))
    n, c, spatial = x[0], x[1], x[2:]
    o_channels, cg = w[0], w[1]
    out_spatial = tuple(out[2:])
    po, pk, pi = _window_pairs(spatial, out_spatial, window)
    plane_out, plane_in, kernel = prod(out_spatial), prod(spatial), prod(window.kernel)
    og = o_channels // groups if groups else 0
    oc = np.arange(o_channels, dtype=np.int64)
    # output channel oc reads input channels (oc // og) * cg + [0, cg)
    ic = (oc // max(og, 1))[:, None] * cg + np.arange(cg, dtype=np.int64)[None, :]  # (O, cg)
    b = np.arange(n, dtype=np.int64)
    dst = ((b[:, None, None, None] * o_channels + oc[None, :, None, None]) * plane_out
           + po[None, None, None, :])
    src_x = ((b[:, None, None, None] * c + ic[None, :, :, None]) * plane_in
             + pi[None, None, None, :])
    src_w = ((oc[None, :, None, None] * cg + np.arange(cg)[None, None, :, None]) * kernel
             + pk[None, None, None, :])
    shape = (n, o_channels, cg, po.size)
    dst = np.broadcast_to(dst, shape).ravel()
    return [(dst, np.broadcast_to(src_x, shape).ravel()),
            (dst, np.broadcast_to(src_w, shape).ravel())]


def local_entries(rule_name, shapes, out) -> int:
    """An upper bound of the entries a local rule builds, before it builds them."""
    size = prod(out)
    ins = [prod(s) for s in shapes]
    return size * max(sum(ins), 1)


# --- composing patterns through a graph --------------------------------------------------


def _compose(local, pattern: Pattern, rows: int, budget: list) -> tuple:
    """(rows, cols) of the product of a local dependency with an input's pattern."""
    if local == "same":
        r, c = pattern.coo()
        return r, c
    dst, src = local
    starts = pattern.indptr[src]
    lengths = pattern.indptr[src + 1] - starts
    total = int(lengths.sum())
    budget[0] -= total
    if budget[0] < 0:
        raise TooDense
    keep = lengths > 0
    dst, starts, lengths = dst[keep], starts[keep], lengths[keep]
    out_rows = np.repeat(dst, lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cols = pattern.indices[np.repeat(starts, lengths) + np.arange(total, dtype=np.int64) - first]
    return out_rows, cols


def node_pattern(row, shapes, out_shape, in_patterns, values, attrs, columns, budget):
    """The pattern of one node's value from its inputs' patterns (None: depends on no
    column)."""
    if all(p is None for p in in_patterns):
        return None
    local = row.pattern([tuple(s) for s in shapes], tuple(out_shape), values,
                        op_eval=row.eval, **attrs)
    size = prod(out_shape)
    if len(in_patterns) == 1 and local[0] == "same":
        return in_patterns[0]
    rows, cols = [], []
    for loc, p in zip(local, in_patterns):
        if loc is None or p is None:
            continue
        r, c = _compose(loc, p, size, budget)
        rows.append(r)
        cols.append(c)
    if not rows:
        return None
    return from_coo(np.concatenate(rows), np.concatenate(cols), (size, columns))


def hessian_terms(linear: bool, bilinear: bool, in_patterns, out_pattern) -> bool:
    """Whether this node adds second-order interactions among the columns its element
    depends on: a nonlinear op always; a bilinear one (mul, matmul, conv) only when two of
    its inputs depend on the columns; a linear one (its curvature is ZERO: piecewise
    linear ops too) never."""
    if out_pattern is None or linear:
        return False
    if bilinear:
        return sum(p is not None for p in in_patterns) >= 2
    return True


def square_blocks(pattern: Pattern, budget: list) -> tuple[np.ndarray, np.ndarray]:
    """Every (a, b) with a and b in one row of the pattern: the interactions a nonlinear
    function of that element can create."""
    lengths = np.diff(pattern.indptr)
    total = int((lengths.astype(np.int64) ** 2).sum())
    budget[0] -= total
    if budget[0] < 0:
        raise TooDense
    rows_a, rows_b = [], []
    # group rows by length so that each group is one vectorized outer product
    for length in np.unique(lengths):
        if length == 0:
            continue
        which = np.nonzero(lengths == length)[0]
        block = pattern.indices[pattern.indptr[which][:, None] + np.arange(length)]
        rows_a.append(np.repeat(block, length, axis=1).ravel())
        rows_b.append(np.tile(block, (1, length)).ravel())
    if not rows_a:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(rows_a), np.concatenate(rows_b)


# --- colorings ----------------------------------------------------------------------------


def color_columns(pattern: Pattern, check=None) -> np.ndarray:
    """Greedy distance-1 coloring of the columns' intersection graph: columns sharing a
    row get different colors (natural order, which is optimal for banded patterns).
    Returns one color per column; columns of no row get color 0. Plain Python lists: per
    column the work is a few neighbours, where NumPy's per-call cost would dominate."""
    lengths = np.diff(pattern.indptr)
    if int((lengths.astype(np.int64) ** 2).sum()) > MAX_COLORING_WORK:
        raise TooDense  # columns sharing long rows: coloring would cost more than it saves
    rows_of = pattern.transpose()
    n = pattern.shape[1]
    indptr, indices = pattern.indptr.tolist(), pattern.indices.tolist()
    cptr, cidx = rows_of.indptr.tolist(), rows_of.indices.tolist()
    colors = [-1] * n
    for j in range(n):
        if check is not None and j % 256 == 0:
            check()
        used = set()
        for r in cidx[cptr[j]:cptr[j + 1]]:
            for k in indices[indptr[r]:indptr[r + 1]]:
                used.add(colors[k])
        c = 0
        while c in used:
            c += 1
        colors[j] = c
    return np.asarray(colors, np.int64)


def star_coloring(pattern: Pattern, check=None) -> np.ndarray:
    """Greedy star coloring of a symmetric pattern's adjacency graph (Gebremedhin, Manne
    and Pothen 2005, Algorithm 4.1): a distance-1 coloring in which every path on four
    vertices has three colors, so each off-diagonal entry of a symmetric matrix can be read
    back directly from the products with one seed per color (star_recover). It can need
    far fewer colors than a coloring of the columns: an arrowhead pattern (a dense row
    and column plus the diagonal) takes 2, not n."""
    n = pattern.shape[0]
    lengths = np.diff(pattern.indptr)
    if int((lengths.astype(np.int64) ** 2).sum()) > MAX_COLORING_WORK // 4:
        raise TooDense
    indptr, indices = pattern.indptr.tolist(), pattern.indices.tolist()
    nbrs = [[k for k in indices[indptr[v]:indptr[v + 1]] if k != v] for v in range(n)]
    colors = [-1] * n
    forbidden: dict = {}
    work = 0
    for v in range(n):
        if check is not None and v % 256 == 0:
            check()
        for w in nbrs[v]:
            if colors[w] >= 0:
                forbidden[colors[w]] = v
        for w in nbrs[v]:
            if colors[w] < 0:
                for x in nbrs[w]:
                    if colors[x] >= 0:
                        forbidden[colors[x]] = v
            else:
                for x in nbrs[w]:
                    if x == v or colors[x] < 0:
                        continue
                    for y in nbrs[x]:
                        work += 1
                        if y != w and colors[y] == colors[w]:
                            forbidden[colors[x]] = v
                            break
        if work > MAX_COLORING_WORK:
            raise TooDense
        c = 0
        while forbidden.get(c) == v:
            c += 1
        colors[v] = c
    return np.asarray(colors, np.int64)


def star_recover(pattern: Pattern, colors: np.ndarray, compressed: np.ndarray) -> np.ndarray:
    """The values of a symmetric matrix's nonzeros (CSR order) from B = H S, S the star
    coloring's seeds: H[i, j] = B[i, color(j)] when j is i's only neighbour of that color,
    else B[j, color(i)] (a star coloring guarantees one of the two); the diagonal
    H[i, i] = B[i, color(i)]."""
    rows, cols = pattern.coo()
    k = max(ncolors(colors), 1)
    # how many neighbours of each row have each color
    counts = np.zeros((pattern.shape[0], k), np.int64)
    off = rows != cols
    np.add.at(counts, (rows[off], colors[cols[off]]), 1)
    direct = (rows == cols) | (counts[rows, colors[cols]] == 1)
    return np.where(direct, compressed[rows, colors[cols]], compressed[cols, colors[rows]])


def color_rows(pattern: Pattern, check=None) -> np.ndarray:
    """Rows sharing a column get different colors (a column coloring of the transpose)."""
    return color_columns(pattern.transpose(), check)


def ncolors(colors: np.ndarray) -> int:
    return int(colors.max()) + 1 if colors.size else 0


def compressed_seeds(colors: np.ndarray, dtype) -> np.ndarray:
    """The (colors, n) seed matrix: direction c is the sum of the unit vectors of the
    columns of color c."""
    k = max(ncolors(colors), 1)  # one (zero) direction for an empty pattern
    seeds = np.zeros((k, colors.size), dtype)
    seeds[colors, np.arange(colors.size)] = 1
    return seeds


def check_coloring(pattern: Pattern, colors: np.ndarray) -> bool:
    """Whether no row holds two columns of one color (tests and assertions)."""
    rows, cols = pattern.coo()
    key = rows * max(ncolors(colors), 1) + colors[cols]
    return np.unique(key).size == key.size


def entries_limit(limit) -> int:
    if limit is None:
        return MAX_PATTERN_ENTRIES
    if limit < 0:
        raise ResourceLimitError("the pattern bound must be positive", field="sparsity")
    return int(limit)



def cast_pattern(shapes, out, values=None, dtype=None, **_):
    """A cast to a floating dtype passes each element's derivative on; to an integer or
    bool dtype it has none."""
    return ["same" if dtype in ("float32", "float64") else None]
