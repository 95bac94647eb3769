"""Products: MatMul, Gemm, Einsum."""

from __future__ import annotations

from ..registry import _out, converts
from ..values import _dtype_of, _FoldError, _prod, _shape_of


@converts("MatMul")
def _matmul(imp, node, x, attrs):
    return imp.e.matmul(x[0], x[1], name=_out(node))


@converts("Gemm")
def _gemm(imp, node, x, attrs):
    e = imp.e
    a = e.transpose(x[0], [1, 0]) if attrs.get("transA", 0) else x[0]
    b = e.transpose(x[1], [1, 0]) if attrs.get("transB", 0) else x[1]
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    c = x[2] if len(x) > 2 else None
    last = c is None or beta == 0
    y = e.matmul(a, b, name=_out(node) if last and alpha == 1.0 else None)
    if alpha != 1.0:
        y = e.mul(y, e.const(alpha, y), name=_out(node) if last else None)
    if last:
        return y
    if beta != 1.0:
        c = e.mul(c, e.const(beta, c))
    return e.add(y, c, name=_out(node))

@converts("Einsum")
def _einsum(imp, node, x, attrs):
    """The two-operand contractions exporters emit (attention's 'bhqd,bhkd->bhqk' and
    the like): transposes, a reshape-free batched matmul, a transpose back."""
    eq = attrs["equation"].replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != 2 or "." in eq or not rhs:
        raise _FoldError(f"einsum {eq!r}: only explicit two-operand contractions are supported")
    a, b = terms
    contracted = [c for c in a if c in b and c not in rhs]
    batch = [c for c in rhs if c in a and c in b]
    free_a = [c for c in rhs if c in a and c not in b]
    free_b = [c for c in rhs if c in b and c not in a]
    if sorted(batch + free_a + contracted) != sorted(a) or \
            sorted(batch + free_b + contracted) != sorted(b) or len(set(a)) != len(a):
        raise _FoldError(f"einsum {eq!r} is not a plain batched contraction")
    e = imp.e
    sa, sb = _shape_of(x[0]), _shape_of(x[1])
    size = {c: d for c, d in zip(a, sa)} | {c: d for c, d in zip(b, sb)}
    ta = e.transpose(x[0], [a.index(c) for c in batch + free_a + contracted])
    tb = e.transpose(x[1], [b.index(c) for c in batch + contracted + free_b])
    nb = [size[c] for c in batch]
    ma = e.reshape(ta, nb + [_prod(size[c] for c in free_a), _prod(size[c] for c in contracted)])
    mb = e.reshape(tb, nb + [_prod(size[c] for c in contracted), _prod(size[c] for c in free_b)])
    y = e.reshape(e.matmul(ma, mb), nb + [size[c] for c in free_a] + [size[c] for c in free_b])
    order = batch + free_a + free_b
    return e.transpose(y, [order.index(c) for c in rhs], name=_out(node)) \
        if order != list(rhs) else e.cast(y, _dtype_of(y), name=_out(node))
