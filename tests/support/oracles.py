"""Oracles for the engine tests, independent of the engine: plain NumPy.

- `numeric_jvp` / `numeric_jacobian`: central finite differences in float64;
- `dot`: the inner product of two dicts of arrays (for the VJP dot-product test);
- `random_inputs`: inputs drawn from a per-op safe domain (away from kinks, poles and ties);
- `reference`: each op as a plain NumPy expression;
- `selection_matrix`: the Jacobian of a concat (repeated references too).
"""

from __future__ import annotations

import math

import numpy as np

# --- finite differences --------------------------------------------------------------


def numeric_jvp(f, inputs, tangents, eps=1e-6):
    """(f(x + eps t) - f(x - eps t)) / (2 eps), in float64.

    `f` maps a dict name -> array to a dict name -> array; inputs missing from
    `tangents` are held fixed, and so are integer and bool inputs (kept as they are).
    Returns a dict shaped like f's result.
    """
    x = {k: np.asarray(v, dtype=np.float64) if np.asarray(v).dtype.kind == "f" else v
         for k, v in inputs.items()}
    t = {k: np.asarray(v, dtype=np.float64) for k, v in tangents.items()}
    plus = {k: v + eps * t[k] if k in t else v for k, v in x.items()}
    minus = {k: v - eps * t[k] if k in t else v for k, v in x.items()}
    f_plus, f_minus = f(plus), f(minus)
    return {k: (np.asarray(f_plus[k], np.float64) - np.asarray(f_minus[k], np.float64)) / (2 * eps)
            for k in f_plus}


def numeric_jacobian(f, inputs, wrt=None, eps=1e-6):
    """Jacobian blocks {(of, wrt): array shaped of.shape + wrt.shape}, one unit direction
    at a time."""
    outputs = {k: np.asarray(v) for k, v in f(inputs).items()}
    blocks = {}
    for name in (list(inputs) if wrt is None else wrt):
        shape = np.shape(inputs[name])
        columns = []
        for i in range(int(np.prod(shape, dtype=int))):
            unit = np.zeros(shape)
            unit.flat[i] = 1.0
            columns.append(numeric_jvp(f, inputs, {name: unit}, eps))
        for out, value in outputs.items():
            stacked = (np.stack([c[out] for c in columns], axis=-1) if columns
                       else np.zeros(value.shape + (0,)))
            blocks[out, name] = stacked.reshape(value.shape + shape)
    return blocks


def dot(a, b, batched=False):
    """<a, b>: sum over the keys of `a` of sum(a[k] * b[k]) in float64 (a key missing from
    `b` counts as zero). With `batched`, the leading (direction) axis is kept: shape (k,)."""
    total = 0.0
    for key, x in a.items():
        if key not in b:
            continue
        prod = np.asarray(x, np.float64) * np.asarray(b[key], np.float64)
        total = total + (prod.reshape(prod.shape[0], -1).sum(axis=1) if batched else prod.sum())
    return total


# --- safe random inputs --------------------------------------------------------------

# Each op's operands are drawn from a domain that keeps finite differences honest:
# no poles (log, sqrt, reciprocal, tan), no kinks (abs, relu) and no ties (max, maximum).
OP_DOMAINS = {
    "div": ("real", "nonzero"),
    "pow": ("positive", "real"),
    "maximum": ("distinct", "distinct"),
    "minimum": ("distinct", "distinct"),
    "tan": ("tan",),
    "log": ("positive",),
    "sqrt": ("positive",),
    "reciprocal": ("nonzero",),
    "abs": ("nonzero",),
    "relu": ("nonzero",),
    "log1p": ("above_minus_one",),
    "max": ("distinct",),
    "min": ("distinct",),
    "max_pool": ("distinct",),
    **{op: ("distinct", "distinct") for op in ("equal", "not_equal", "less", "less_equal",
                                                "greater", "greater_equal")},
    "where": ("bool", "real", "real"),
    "take": ("real", "index:2"),
}


def domains_for(op, arity):
    """The domain of each of an op's `arity` operands ("real" unless OP_DOMAINS says otherwise)."""
    return OP_DOMAINS.get(op, ("real",) * arity)


def _sample(rng, shape, domain):
    """Floats of a domain; "bool" and "index:N" (int64 in [-N, N)) keep their own dtype."""
    if domain == "bool":
        return rng.random(shape) < 0.5
    if domain.startswith("index"):
        kind, n = domain.split(":")
        dtype = np.int32 if kind == "index32" else np.int64
        return rng.integers(-int(n), int(n), shape).astype(dtype)
    if domain == "real":
        return rng.uniform(-2.0, 2.0, shape)
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    if domain == "tan":
        return rng.uniform(-1.2, 1.2, shape)
    if domain == "above_minus_one":
        return rng.uniform(-0.5, 2.0, shape)
    raise ValueError(f"unknown domain {domain!r}")


def random_inputs(rng, specs, dtype="float64"):
    """Draw {name: array} for `specs`, a list of (name, shape, domain).

    Operands in the "bool" and "index:N" domains keep their own dtype. Operands in the
    "distinct" domain are drawn together: every element of all of
    them is a different point of a grid 0.25 apart (jittered by < 0.05), so no two
    elements are within 0.15 of each other, whatever broadcasting pairs them with.
    """
    out = {}
    distinct = [(name, shape) for name, shape, domain in specs if domain == "distinct"]
    sizes = [int(np.prod(shape, dtype=int)) for _, shape in distinct]
    grid = (rng.permutation(sum(sizes)) - sum(sizes) / 2) * 0.25
    grid = grid + rng.uniform(-0.05, 0.05, grid.shape)
    start = 0
    for (name, shape), size in zip(distinct, sizes):
        out[name] = grid[start:start + size].reshape(shape)
        start += size
    for name, shape, domain in specs:
        if domain != "distinct":
            out[name] = _sample(rng, shape, domain)
    return {name: np.asarray(out[name], dtype=dtype) if out[name].dtype.kind == "f"
            else out[name] for name, _, _ in specs}


# --- NumPy references ------------------------------------------------------------------


def _axes(axes):
    return None if axes is None else tuple(axes)


def _logsumexp(x, axis=-1, keepdims=False):
    m = np.max(x, axis=axis, keepdims=True)
    out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def _softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _slice(x, starts, stops, axes=None):
    index = [slice(None)] * np.ndim(x)
    for axis, start, stop in zip(range(len(starts)) if axes is None else axes, starts, stops):
        index[axis] = slice(start, stop)
    return x[tuple(index)]


def _erf(x):
    return np.vectorize(math.erf, otypes=[np.float64])(x).astype(np.result_type(x, np.float32))


def _clip(x, min=None, max=None):
    return np.clip(x, min, max) if min is not None or max is not None else x


def _cumsum(x, axis, reverse=False, exclusive=False):
    y = np.flip(x, axis) if reverse else x
    c = np.cumsum(y, axis=axis)
    if exclusive:
        c = c - y
    return np.flip(c, axis) if reverse else c


def _pad(x, pads, value=0.0):
    n = np.ndim(x)
    if n == 0:  # np.pad refuses a scalar; padding it is the identity
        return np.array(x)
    return np.pad(x, list(zip(pads[:n], pads[n:])), constant_values=value)


def _windows(x, kernel, strides, pads, dilations, fill):
    """Each window of x (N, C, *S) by plain Python iteration over the output positions:
    yields (output shape, output position, the window (N, C, *kernel))."""
    d = len(kernel)
    strides = strides or [1] * d
    pads = pads or [0] * (2 * d)
    dilations = dilations or [1] * d
    xp = np.pad(x, [(0, 0), (0, 0)] + list(zip(pads[:d], pads[d:])), constant_values=fill)
    out = [(xp.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
           for i in range(d)]
    for pos in np.ndindex(*out):
        index = tuple(slice(p * s, p * s + dl * (k - 1) + 1, dl)
                      for p, s, dl, k in zip(pos, strides, dilations, kernel))
        yield out, pos, xp[(slice(None), slice(None)) + index]


def _conv(x, w, strides=None, pads=None, dilations=None, groups=1):
    d, (n_out, cg), og = x.ndim - 2, w.shape[:2], w.shape[0] // groups
    y = None
    for out, pos, patch in _windows(x, w.shape[2:], strides, pads, dilations, 0):
        if y is None:
            y = np.zeros((x.shape[0], n_out) + tuple(out), np.result_type(x, w))
        for g in range(groups):
            y[(slice(None), slice(g * og, (g + 1) * og)) + pos] = np.tensordot(
                patch[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og],
                axes=(list(range(1, d + 2)), list(range(1, d + 2))))
    return y


def _pool(reduce):
    def pool(x, kernel_shape, strides=None, pads=None, dilations=None, count_include_pad=False):
        fill = -np.inf if reduce == "max" else 0
        ones = np.ones((1, 1) + x.shape[2:])
        counts = {pos: patch.sum() for _, pos, patch in
                  _windows(ones, kernel_shape, strides, pads, dilations, 0)}
        y = None
        for out, pos, patch in _windows(x, kernel_shape, strides, pads, dilations, fill):
            if y is None:
                y = np.zeros(x.shape[:2] + tuple(out), x.dtype)
            flat = patch.reshape(patch.shape[:2] + (int(np.prod(patch.shape[2:])),))
            if reduce == "max":
                y[(...,) + pos] = flat.max(axis=-1)
            else:
                y[(...,) + pos] = flat.sum(axis=-1) / (
                    flat.shape[-1] if count_include_pad else counts[pos])
        return y
    return pool


REFERENCE = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
    "pow": lambda a, b: a ** b,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "neg": np.negative,
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "square": np.square,
    "reciprocal": lambda x: 1 / x,
    "abs": np.abs,
    "tanh": np.tanh,
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "relu": lambda x: np.maximum(x, 0),
    "softplus": lambda x: np.logaddexp(0, x),
    "log1p": np.log1p,
    "sum": lambda x, axes=None, keepdims=False: np.sum(x, axis=_axes(axes), keepdims=keepdims),
    "mean": lambda x, axes=None, keepdims=False: np.mean(x, axis=_axes(axes), keepdims=keepdims),
    "max": lambda x, axes=None, keepdims=False: np.max(x, axis=_axes(axes), keepdims=keepdims),
    "reshape": lambda x, shape: np.reshape(x, shape),
    "transpose": lambda x, perm=None: np.transpose(x, perm),
    "broadcast_to": lambda x, shape: np.broadcast_to(x, shape).copy(),
    "concat": lambda *xs, axis=0: np.concatenate(xs, axis=axis),
    "slice": _slice,
    "matmul": np.matmul,
    "softmax": _softmax,
    "log_softmax": lambda x, axis=-1: x - _logsumexp(x, axis=axis, keepdims=True),
    "logsumexp": _logsumexp,
    "erf": _erf,
    "min": lambda x, axes=None, keepdims=False: np.min(x, axis=_axes(axes), keepdims=keepdims),
    "prod": lambda x, axes=None, keepdims=False: np.prod(x, axis=_axes(axes), keepdims=keepdims),
    "equal": np.equal,
    "not_equal": np.not_equal,
    "less": np.less,
    "less_equal": np.less_equal,
    "greater": np.greater,
    "greater_equal": np.greater_equal,
    "where": np.where,
    "clip": _clip,
    "cumsum": _cumsum,
    "pad": _pad,
    "take": lambda x, indices, axis=0: np.take(x, indices, axis=axis),
    "cast": lambda x, dtype: x.astype(dtype),
    "conv": _conv,
    "max_pool": _pool("max"),
    "avg_pool": _pool("avg"),
}


def reference(op, args, attrs=None):
    """The value of `op` on `args` (a list of arrays) with `attrs`, computed by NumPy."""
    return np.asarray(REFERENCE[op](*args, **dict(attrs or {})))


def selection_matrix(refs, axis, shapes):
    """The Jacobian of concat(refs, axis) by NumPy alone: S (output elements x input
    elements, the inputs end to end in `shapes` order, a dict name -> shape) with
    S[i, j] = 1 where output element i copies input element j. Then y = S x, a VJP is
    S^T c, and sum(y * y) has gradient 2 S^T y and Hessian 2 S^T S."""
    offsets, at = {}, 0
    for name, s in shapes.items():
        offsets[name] = at
        at += int(np.prod(s))
    numbers = {name: np.arange(int(np.prod(s))).reshape(s) + offsets[name]
               for name, s in shapes.items()}
    copied = np.concatenate([numbers[r] for r in refs], axis=axis).ravel()
    s = np.zeros((copied.size, at))
    s[np.arange(copied.size), copied] = 1.0
    return s


def flatten(arrays, names):
    """The arrays named, raveled end to end as one float64 vector."""
    return np.concatenate([np.ravel(arrays[n]) for n in names]).astype(np.float64)


def unflatten(vector, shapes):
    """flatten's inverse: name -> the vector's next prod(shape) entries, reshaped."""
    out, at = {}, 0
    for name, s in shapes.items():
        n = int(np.prod(s))
        out[name] = vector[at:at + n].reshape(s)
        at += n
    return out
