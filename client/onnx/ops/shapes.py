"""Ops that move elements: shapes, casts, slices, gathers, pads, sequences, constants."""

from __future__ import annotations

import math

import numpy as np

from ..registry import EVAL_MODE_HINT, HINTS, _out, converts
from ..values import (Dim, Dyn, Seq, _broadcast, _dtype_of, _fail, _fmt, _FoldError, _has_dim,
                      _norm_axis, _prod, _shape_of)


@converts("Identity")
def _identity(imp, node, x, attrs):
    return x[0]


@converts("Dropout")
def _dropout(imp, node, x, attrs):
    training = imp.static(x[2], "Dropout's training_mode") if len(x) > 2 else None
    if training is not None and bool(np.asarray(training).item()):
        raise _FoldError("training_mode is true: " + EVAL_MODE_HINT)
    mask = None
    if _out(node, 1) and not _has_dim(_shape_of(x[0])):
        imp.e.charge(_shape_of(x[0]), bool, "Dropout's mask")
        mask = np.ones([int(d) for d in _shape_of(x[0])], bool)
    return [x[0], mask]


@converts("Constant")
def _constant(imp, node, x, attrs):
    (key, value), = attrs.items()
    if key == "value":
        return value
    if key in ("value_float", "value_floats"):
        return np.asarray(value, np.float32)
    if key in ("value_int", "value_ints"):
        return np.asarray(value, np.int64)
    raise _FoldError(f"a constant given as {key} is not supported")


@converts("ConstantOfShape")
def _constant_of_shape(imp, node, x, attrs):
    shape = imp.ints(x[0], "the shape")
    value = attrs.get("value", np.zeros(1, np.float32))
    if _has_dim(shape):
        raise _FoldError(f"a constant of the dynamic shape {_fmt(shape)}: give the inputs "
                         "fixed sizes (input_shapes=...)")
    if any(d < 0 for d in shape):
        raise _FoldError(f"a constant of the negative shape {_fmt(shape)}")
    imp.e.charge(shape, np.asarray(value).dtype, "a constant")
    return np.full(shape, np.asarray(value).ravel()[0], dtype=np.asarray(value).dtype)


@converts("Shape")
def _shape(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    part = shape[slice(start, end)]
    return np.asarray(part, dtype=object if _has_dim(part) else np.int64)


@converts("Cast", "CastLike")
def _cast(imp, node, x, attrs):
    if node.op_type == "CastLike":
        dtype = _dtype_of(x[1])
    else:
        dtype = np.dtype(imp.onnx.helper.tensor_dtype_to_np_dtype(attrs["to"])).name
    if isinstance(x[0], Dyn) and x[0].dtype == dtype:
        return x[0]
    return imp.e.cast(x[0], dtype, name=_out(node))


@converts("Reshape")
def _reshape(imp, node, x, attrs):
    data = x[0]
    target = imp.ints(x[1], "the target shape")
    src = list(_shape_of(data))
    if not attrs.get("allowzero", 0):
        target = [src[i] if (not isinstance(d, Dim) and d == 0) else d
                  for i, d in enumerate(target)]
    if any((not isinstance(d, Dim)) and d == -1 for d in target):
        known = _prod(d for d in target if isinstance(d, Dim) or d != -1)
        target = [(_prod(src) // known) if (not isinstance(d, Dim) and d == -1) else d
                  for d in target]
    return imp.e.reshape(data, target, name=_out(node))


@converts("Flatten")
def _flatten(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axis = attrs.get("axis", 1)
    axis = axis + len(shape) if axis < 0 else axis
    return imp.e.reshape(x[0], [_prod(shape[:axis]), _prod(shape[axis:])], name=_out(node))


def _axes(imp, node, x, attrs, position=1):
    if len(x) > position and x[position] is not None:
        return imp.ints(x[position], "axes")
    return attrs.get("axes")


@converts("Squeeze")
def _squeeze(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axes = _axes(imp, node, x, attrs)
    if axes is None:
        axes = [i for i, d in enumerate(shape) if not isinstance(d, Dim) and d == 1]
    axes = {_norm_axis(a, len(shape)) for a in axes}
    return imp.e.reshape(x[0], [d for i, d in enumerate(shape) if i not in axes],
                         name=_out(node))


@converts("Unsqueeze")
def _unsqueeze(imp, node, x, attrs):
    shape = list(_shape_of(x[0]))
    axes = _axes(imp, node, x, attrs)
    rank = len(shape) + len(axes)
    axes = sorted(_norm_axis(a, rank) for a in axes)
    for a in axes:
        shape.insert(a, 1)
    if not isinstance(x[0], Dyn):
        return np.reshape(x[0], shape)
    return imp.e.reshape(x[0], shape, name=_out(node))


@converts("Transpose")
def _transpose(imp, node, x, attrs):
    perm = attrs.get("perm", list(reversed(range(len(_shape_of(x[0]))))))
    return imp.e.transpose(x[0], perm, name=_out(node))


@converts("Concat")
def _concat(imp, node, x, attrs):
    return imp.e.concat([v for v in x if v is not None], attrs["axis"], name=_out(node))


@converts("Slice")
def _slice(imp, node, x, attrs):
    starts = imp.ints(x[1], "starts")
    ends = imp.ints(x[2], "ends")
    axes = imp.ints(x[3], "axes") if len(x) > 3 and x[3] is not None else list(range(len(starts)))
    steps = imp.ints(x[4], "steps") if len(x) > 4 and x[4] is not None else None
    return imp.e.slice(x[0], starts, ends, axes, steps, name=_out(node))


@converts("Split")
def _split(imp, node, x, attrs):
    shape = _shape_of(x[0])
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    n = len(node.output)
    sizes = imp.ints(x[1], "split") if len(x) > 1 and x[1] is not None else attrs.get("split")
    if sizes is None:
        dim = shape[axis]
        if isinstance(dim, Dim):
            raise _FoldError(f"splitting the dynamic axis {axis}")
        n = attrs.get("num_outputs", n)
        chunk = -(-dim // n)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    outs, start = [], 0
    for i, size in enumerate(sizes):
        outs.append(imp.e.slice(x[0], [start], [start + size], [axis], name=_out(node, i)))
        start += size
    return outs


@converts("SplitToSequence")
def _split_to_sequence(imp, node, x, attrs):
    shape = _shape_of(x[0])
    axis = _norm_axis(attrs.get("axis", 0), len(shape))
    dim = shape[axis]
    if isinstance(dim, Dim):
        raise _FoldError(f"splitting the dynamic axis {axis}")
    split = imp.ints(x[1], "split") if len(x) > 1 and x[1] is not None else None
    if split is None:  # pieces of one, the axis dropped unless keepdims
        pieces = [imp.e.slice(x[0], [i], [i + 1], [axis]) for i in range(dim)]
        if not attrs.get("keepdims", 1):
            pieces = [imp.e.reshape(p, [d for a, d in enumerate(_shape_of(p)) if a != axis])
                      for p in pieces]
        return Seq(pieces)
    sizes = split if len(split) > 1 or np.ndim(imp.static(x[1], "split")) else \
        [split[0]] * (dim // split[0]) + ([dim % split[0]] if dim % split[0] else [])
    out, start = Seq(), 0
    for size in sizes:
        out.append(imp.e.slice(x[0], [start], [start + size], [axis]))
        start += size
    return out


@converts("SequenceConstruct")
def _sequence_construct(imp, node, x, attrs):
    return Seq(x)


@converts("SequenceAt")
def _sequence_at(imp, node, x, attrs):
    return x[0][int(np.asarray(imp.static(x[1], "position")).item())]


@converts("SequenceLength")
def _sequence_length(imp, node, x, attrs):
    return np.asarray(len(x[0]), np.int64)


@converts("ConcatFromSequence")
def _concat_from_sequence(imp, node, x, attrs):
    values, axis = list(x[0]), attrs["axis"]
    if attrs.get("new_axis", 0):
        rank = len(_shape_of(values[0])) + 1
        axis = _norm_axis(axis, rank)
        values = [imp.e.reshape(v, list(_shape_of(v))[:axis] + [1] + list(_shape_of(v))[axis:])
                  for v in values]
    return imp.e.concat(values, axis, name=_out(node))


@converts("Gather")
def _gather(imp, node, x, attrs):
    return imp.e.take(x[0], x[1], attrs.get("axis", 0), name=_out(node))


@converts("Expand")
def _expand(imp, node, x, attrs):
    target = imp.ints(x[1], "the target shape")
    shape = _broadcast(tuple(_shape_of(x[0])), tuple(target))
    return imp.e.broadcast_to(x[0], shape, name=_out(node))


@converts("Tile")
def _tile(imp, node, x, attrs):
    repeats = imp.ints(x[1], "repeats")
    if any(isinstance(r, Dim) or r < 0 for r in repeats):
        raise _FoldError(f"repeats {repeats} must be known and >= 0")
    shape = _shape_of(x[0])
    if not isinstance(x[0], Dyn):
        imp.e.charge([d * r for d, r in zip(shape, repeats)], _dtype_of(x[0]))
        return np.tile(x[0], repeats)
    out = x[0]
    for axis, r in enumerate(repeats):
        if r != 1:
            dim = out.shape[axis]
            if isinstance(dim, Dim):
                raise _FoldError(f"tiling the dynamic axis {axis}")
            imp.e.charge([dim * r], np.int64, "Tile's indices")
            out = imp.e.take(out, np.tile(np.arange(dim), r), axis)
    return imp.e.cast(out, out.dtype, name=_out(node)) if out is not x[0] else out


@converts("Pad")
def _pad(imp, node, x, attrs):
    rank = len(_shape_of(x[0]))
    pads = imp.ints(x[1], "pads") if len(x) > 1 else attrs["pads"]
    value = imp.static(x[2], "the pad value") if len(x) > 2 and x[2] is not None else 0.0
    value = float(np.asarray(value).ravel()[0]) if np.size(value) else 0.0
    axes = imp.ints(x[3], "axes") if len(x) > 3 and x[3] is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, a in enumerate(axes):
        a = _norm_axis(a, rank)
        full[a], full[a + rank] = pads[i], pads[i + len(axes)]
    mode = attrs.get("mode", "constant")
    if any(p < 0 for p in full):  # negative pads crop
        shape = _shape_of(x[0])
        cropped = imp.e.slice(x[0], [max(-p, 0) for p in full[:rank]],
                              [shape[a] - max(-full[a + rank], 0) for a in range(rank)],
                              list(range(rank)))
        return _pad_mode(imp, node, cropped, [max(p, 0) for p in full], value, mode)
    return _pad_mode(imp, node, x[0], full, value, mode)


def _pad_mode(imp, node, x, pads, value, mode):
    if mode == "constant":
        return imp.e.pad(x, pads, value, name=_out(node))
    rank = len(_shape_of(x))
    out = x
    for a in range(rank):
        b, e = pads[a], pads[a + rank]
        if not b and not e:
            continue
        n = _shape_of(out)[a]
        if isinstance(n, Dim):
            raise _FoldError(f"padding the dynamic axis {a} in mode {mode!r}")
        imp.e.charge([b + n + e], np.int64, "Pad's indices")
        idx = np.arange(-b, n + e)
        if mode == "edge":
            idx = np.clip(idx, 0, n - 1)
        elif mode == "reflect":
            period = 2 * (n - 1)
            idx = np.abs(idx) % period if period else np.zeros_like(idx)
            idx = np.where(idx >= n, period - idx, idx)
        elif mode == "wrap":
            idx = idx % n
        else:
            raise _FoldError(f"pad mode {mode!r} is not supported")
        out = imp.e.take(out, idx, a)
    return imp.e.cast(out, _dtype_of(out), name=_out(node)) if isinstance(out, Dyn) else out

@converts("OneHot")
def _one_hot(imp, node, x, attrs):
    indices, depth, values = x
    depth = int(np.asarray(imp.static(depth, "depth")).item())
    imp.e.charge([depth], np.int64, "OneHot's depth")
    values = imp.static(values, "values")
    axis = attrs.get("axis", -1)
    e = imp.e
    rank = len(_shape_of(indices)) + 1
    axis = _norm_axis(axis, rank)
    idx = e.cast(indices, "int64")
    idx = e.where(e.binary("less", idx, np.asarray(0, np.int64)),
                  e.add(idx, np.asarray(depth, np.int64)), idx)
    shape = list(_shape_of(idx))
    shape.insert(axis, 1)
    hot = e.binary("equal", e.reshape(idx, shape),
                   np.arange(depth, dtype=np.int64).reshape([-1] + [1] * (rank - axis - 1)))
    return e.where(hot, values[1], values[0], name=_out(node))


@converts("Trilu")
def _trilu(imp, node, x, attrs):
    k = int(np.asarray(imp.static(x[1], "k")).item()) if len(x) > 1 and x[1] is not None else 0
    shape = _shape_of(x[0])
    rows, cols = shape[-2], shape[-1]
    if isinstance(rows, Dim) or isinstance(cols, Dim):
        raise _FoldError("Trilu over dynamic axes")
    imp.e.charge([rows, cols], bool, "Trilu's mask")
    keep = np.triu(np.ones((rows, cols), bool), k) if attrs.get("upper", 1) else \
        np.tril(np.ones((rows, cols), bool), k)
    return imp.e.where(keep, x[0], imp.e.const(0, x[0]), name=_out(node))


@converts("Resize")
def _resize(imp, node, x, attrs):
    if attrs.get("mode", "nearest") != "nearest":
        raise _FoldError(f"mode {attrs.get('mode')!r}: " + HINTS["Resize"])
    shape = _shape_of(x[0])
    scales = imp.static(x[2], "scales") if len(x) > 2 and x[2] is not None else None
    sizes = imp.ints(x[3], "sizes") if len(x) > 3 and x[3] is not None else None
    if sizes is None:
        sizes = [d if float(f) == 1.0 else (_fail(f"resizing the dynamic axis {a}")
                                            if isinstance(d, Dim) else int(math.floor(d * f)))
                 for a, (d, f) in enumerate(zip(shape, np.asarray(scales).ravel()))]
    out = x[0]
    for axis, (dim, size) in enumerate(zip(shape, sizes)):
        if isinstance(dim, Dim) or size == dim:
            continue
        factor = size / dim
        if factor != int(factor):
            raise _FoldError(HINTS["Resize"] + f" (axis {axis}: {dim} -> {size})")
        imp.e.charge([size], np.int64, "Resize's indices")
        out = imp.e.take(out, np.repeat(np.arange(dim), int(factor)), axis)
    return imp.e.cast(out, _dtype_of(out), name=_out(node)) if isinstance(out, Dyn) else out
