"""Linear algebra: matmul (NumPy semantics), with its bilinear second-order rules.

NumPy promotes a 1-D operand to a matrix and drops the added axis afterwards.
With a direction axis in front, that promotion is done by hand so that ordinary
batched matmul broadcasting carries the directions.
"""

from __future__ import annotations

from math import prod

import numpy as np

from .. import sparsity
from ..blocked import matmul as _mm
from ..errors import RuleError
from ..shapes import broadcast_shapes, fill_seed, fmt_shape, lift, num_elements, unbroadcast
from .table import OpDef, row

def _product(a, b):
    """a @ b. A stack of matrices times one matrix is one product over the stack's rows
    (NumPy runs one per matrix of the stack: 16 products of 7 rows took 24 us against 8
    for the one of 112 rows); the rows are a copy when the stack is not contiguous (as
    the output, within the row's declared temporaries)."""
    if b.ndim == 2 and a.ndim > 2:
        rows = a.reshape(prod(a.shape[:-1]), a.shape[-1])
        return _mm(rows, b).reshape(a.shape[:-1] + b.shape[1:])
    return _mm(a, b)


def _matmul_flops(shapes, out, **_):
    a = shapes[0]
    return 2 * num_elements(out) * (a[-1] or 1)


def _matmul_rule(shapes, dtypes):
    a, b = shapes
    if len(a) == 0 or len(b) == 0:
        raise RuleError("matmul needs operands of rank >= 1, got "
                        f"{fmt_shape(a)} and {fmt_shape(b)}")
    a2 = (1,) + a if len(a) == 1 else a
    b2 = b + (1,) if len(b) == 1 else b
    ka, kb = a2[-1], b2[-2]
    if ka is not None and kb is not None and ka != kb:
        raise RuleError(f"shapes {fmt_shape(a)} and {fmt_shape(b)} do not align: "
                        f"{ka} (dim {len(a) - 1}) != {kb} (dim {max(len(b) - 2, 0)})")
    batch = broadcast_shapes(a2[:-2], b2[:-2])
    return batch + ((a2[-2],) if len(a) > 1 else ()) + ((b2[-1],) if len(b) > 1 else ())


def _as_matrices(a_ndim, b_ndim, seed_a=None, seed_b=None, seed_out=None):
    """Promote seeds (with their direction axis) the way NumPy promotes 1-D operands."""
    if seed_a is not None and a_ndim == 1:
        seed_a = seed_a[:, None, :]
    if seed_b is not None and b_ndim == 1:
        seed_b = seed_b[..., None]
    if seed_out is not None:
        if a_ndim == 1:
            seed_out = np.expand_dims(seed_out, -1 if b_ndim == 1 else -2)
        if b_ndim == 1:
            seed_out = seed_out[..., None]
    return seed_a, seed_b, seed_out


def _from_matrix(out, a_ndim, b_ndim):
    if b_ndim == 1:
        out = out[..., 0]
    if a_ndim == 1:
        out = out[..., 0, :] if b_ndim > 1 else out[..., 0]
    return out


def _matmul_jvp(t, x, ans):
    a, b = x
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec_jvp(t, a, b)
    ta, tb, _ = _as_matrices(a.ndim, b.ndim, t[0], t[1])
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    rank = max(a2.ndim, b2.ndim)  # the direction axis must sit in front of all batch axes
    terms = []
    if ta is not None:
        terms.append(_mm(lift(ta, rank), b2))
    if tb is not None:
        terms.append(_mm(a2, lift(tb, rank)))
    out = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return fill_seed(_from_matrix(out, a.ndim, b.ndim), ans.shape)


def _matvec_jvp(t, a, b):
    """Vector @ matrix or matrix @ vector: the k directions of the vector form a
    matrix, so its term is one matrix product rather than k vector products."""
    ta, tb = t
    if a.ndim == 1:  # (K,) @ (K, N): directions (k, K) @ (K, N)
        terms = [_mm(ta, b) if ta is not None else None,
                 _mm(a, tb) if tb is not None else None]
    else:  # (M, K) @ (K,): directions (k, K) @ (K, M)
        # explicit sizes, not -1: a zero-size operand leaves -1 undetermined
        m, kk = a.shape
        terms = [_mm(ta.reshape(ta.shape[0] * m, kk), b).reshape(ta.shape[0], m)
                 if ta is not None else None,
                 _mm(tb, a.T) if tb is not None else None]
    ta_term, tb_term = terms
    return ta_term if tb_term is None else tb_term if ta_term is None else ta_term + tb_term


def _matmul_vjp(i, g, x, ans):
    a, b = x
    if a.ndim == 2 and b.ndim == 2:  # matrices (a dense layer): the products themselves
        return _mm(g, b.T) if i == 0 else _mm(a.T, g)
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec_vjp(i, g, a, b)
    _, _, g2 = _as_matrices(a.ndim, b.ndim, seed_out=g)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    if i == 0:
        # (the method: np.swapaxes's wrapper costs more)
        ga = _product(g2, b2.swapaxes(-1, -2))
        ga = ga[..., 0, :] if a.ndim == 1 else ga
        return unbroadcast(ga, a.shape)
    if b.ndim == 2 and a2.ndim > 2:
        # A weight shared across the batch: fold the batch into one product per direction.
        k, n = g2.shape[0], b2.shape[1]
        rows = a2.reshape(prod(a2.shape[:-1]), a2.shape[-1])
        return _mm(rows.T, g2.reshape(k, rows.shape[0], n))
    gb = _mm(a2.swapaxes(-1, -2), g2)
    gb = gb[..., 0] if b.ndim == 1 else gb
    return unbroadcast(gb, b.shape)


def _matvec_vjp(i, g, a, b):
    """Cotangents of a vector @ matrix or matrix @ vector product, k directions at once."""
    if a.ndim == 1:  # g (k, N)
        return _mm(g, b.T) if i == 0 else a[None, :, None] * g[:, None, :]
    # a (M, K), b (K,), g (k, M)
    return g[:, :, None] * b[None, None, :] if i == 0 else _mm(g, a)


# --- second order (bilinear: the vjp with the other operand replaced by its tangent) ---

def _matmul_curvature(i, g, x, ans, t, t_ans):
    a, b = x
    other = t[1 - i]
    if other is None:
        return None
    if a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1):
        return _matvec_curvature(i, g, a, b, other)
    ta, tb, g2 = _as_matrices(a.ndim, b.ndim, other if i == 1 else None,
                              other if i == 0 else None, g)
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    rank = max(a2.ndim, b2.ndim)
    if i == 0:  # g @ tb^T
        r = _mm(lift(g2, rank), np.swapaxes(lift(tb, rank), -1, -2))
        r = r[..., 0, :] if a.ndim == 1 else r
        return unbroadcast(r, a.shape)
    r = _mm(np.swapaxes(lift(ta, rank), -1, -2), lift(g2, rank))  # ta^T @ g
    r = r[..., 0] if b.ndim == 1 else r
    return unbroadcast(r, b.shape)


def _matvec_curvature(i, g, a, b, other):
    """Vector @ matrix or matrix @ vector: outer products by broadcasting and one
    (batched) matrix product, as _matvec_vjp (g has one direction)."""
    if a.ndim == 1:  # (K,) @ (K, N), g (1, N)
        if i == 0:  # g @ tb^T: tb (k, K, N)
            return _mm(other, g[0])
        return other[:, :, None] * g[:, None, :]  # ta (k, K) outer g
    # (M, K) @ (K,), g (1, M)
    if i == 0:
        return g[:, :, None] * other[:, None, :]  # g outer tb (k, K)
    return _mm(g[:, None, :], other)[:, 0, :]  # g @ ta: ta (k, M, K)


def _matvec_joint(i, g, gdot, x, ans, t, t_ans):
    """g_i and ġ_i together for the matrix of a matrix @ vector (or vector @ matrix)
    product: each is a sum of outer products, e.g. ġ_W = ġ x^T + g tx^T, and one batched
    product with an inner dimension of 2 writes them (about 2x faster than NumPy's
    broadcast multiply, 6x than a product with an inner dimension of 1). None: not this
    case (the caller uses vjp + curvature)."""
    a, b = x
    if gdot is None or not (a.ndim <= 2 and b.ndim <= 2 and (a.ndim == 1) != (b.ndim == 1)):
        return None
    if (a.ndim == 2) != (i == 0):
        return None  # the vector's position: a plain matrix product already
    tv = t[1] if i == 0 else t[0]  # the vector's tangent (k, K)
    if tv is None or gdot.shape[1:] != g.shape[1:]:
        return None
    k = gdot.shape[0]
    dtype = np.result_type(g, gdot, a, b, tv)
    if i == 0:  # (M, K) @ (K,): rows from the cotangents, columns from the vector
        m, n = a.shape
        left = np.zeros((k + 1, m, 2), dtype)
        left[0, :, 0] = g[0]
        left[1:, :, 0] = gdot
        left[1:, :, 1] = g[0]
        right = np.zeros((k + 1, 2, n), dtype)
        right[:, 0, :] = b
        right[1:, 1, :] = tv
    else:  # (K,) @ (K, N): rows from the vector, columns from the cotangents
        m, n = b.shape
        left = np.zeros((k + 1, m, 2), dtype)
        left[:, :, 0] = a
        left[1:, :, 1] = tv
        right = np.zeros((k + 1, 2, n), dtype)
        right[0, 0] = g[0]
        right[1:, 0] = gdot
        right[1:, 1] = g[0]
    out = _mm(left, right)
    return out[:1], out[1:]


row(OpDef("matmul", 2, _matmul_rule, _product, _matmul_jvp, _matmul_vjp,
          saves=frozenset({"x"}), float_only=False, flops=_matmul_flops,
          description="NumPy matmul: 1-D operands promoted, leading axes broadcast",
          curvature=_matmul_curvature, joint=_matvec_joint,
          pattern=sparsity.matmul_pattern, bilinear=True))
