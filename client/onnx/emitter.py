"""The Emitter: the engine's ops over import-time values, folded with numpy when every
operand is known (folds.py), else added to the graph with their result's shape tracked."""

from __future__ import annotations

import numpy as np

from ..builder import GraphBuilder, Value
from .folds import BINARY_FOLDS, COMPARISONS, REDUCE_FOLDS, SOFTMAX_FOLDS, UNARY_FOLDS
from .values import (INT_MAX, MAX_FOLD_BYTES, WIRE_DTYPES, Dim, Dyn, _broadcast, _dtype_of,
                     _engine_shape, _fail, _fmt, _FoldError, _has_dim, _norm_axis, _shape_of)


class Emitter:
    """The engine's ops over import-time values: computed with numpy when every operand is
    known, else added to the graph with their result's shape tracked."""

    def __init__(self, builder: GraphBuilder, reserved: set[str]):
        self.g = builder
        self.reserved = reserved  # every tensor name of the model
        self.used: set[str] = set()
        self.out = ""  # the ONNX output being built (intermediate names start with it)
        self.static_names: dict[int, tuple[np.ndarray, str]] = {}
        self.promoted: dict[str, Value] = {}
        self.dim_sources: dict = {}  # a dynamic Dim -> (a graph input's Dyn, its axis)
        self.fold_limit = MAX_FOLD_BYTES  # what folds may allocate in all (bytes)
        self.folded = 0

    def charge(self, shape, dtype, what="a folded value"):
        """Count an import-time allocation before it is made; refuse past the bound."""
        if _has_dim(shape):
            return
        n = 1
        for d in shape:
            n *= max(int(d), 0)
        size = n * (8 if np.dtype(dtype) == object else np.dtype(dtype).itemsize)
        self.folded += size
        if self.folded > self.fold_limit:
            raise _FoldError(
                f"{what} of shape {_fmt(shape)} would take {_mib(size)} at import time "
                f"({_mib(self.folded)} folded in all), over the import-time folding bound of "
                f"{_mib(self.fold_limit)}: if the model is right, raise the bound with "
                "from_onnx(..., max_fold_bytes=N) or `gradserve graph import --max-fold-mib N`")

    # --- names and values ----------------------------------------------------------

    def fresh(self, op: str) -> str:
        base = f"{self.out}/{op}" if self.out else op
        name, k = base, 1
        while name in self.used or name in self.reserved:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name

    def name(self, name, op):
        if name is None:
            return self.fresh(op)
        self.used.add(name)
        return name

    def register_static(self, array: np.ndarray, name: str):
        self.static_names[id(array)] = (array, name)

    def value(self, x, dtype=None) -> Value:
        """The graph value of `x`: a Dyn's value, or a constant holding a known array."""
        if isinstance(x, Dyn):
            return x.value
        array = np.asarray(x)
        known = self.static_names.get(id(x))
        if array.dtype == object:
            if _has_dim(array):
                raise _FoldError(f"the dynamic dimension in {array.tolist()} is used as a "
                                 "value: give the inputs fixed sizes (input_shapes=...)")
            array = array.astype(np.int64)
        if dtype is not None:
            array = array.astype(dtype)
        if array.dtype.name not in WIRE_DTYPES:
            raise _FoldError(f"a {array.dtype.name} tensor cannot be a graph value "
                             f"(supported: {', '.join(WIRE_DTYPES)})")
        if known is not None and known[0] is x and dtype is None:
            name = known[1]
            if name not in self.promoted and _is_broadcast(array):
                self.charge(array.shape, array.dtype, "a constant")
            if name not in self.promoted:
                self.used.add(name)
                self.promoted[name] = self.g.constant(array, name=name)
            return self.promoted[name]
        self.charge(array.shape, array.dtype, "a constant")
        return self.g.constant(array, name=self.fresh("const"))

    def const(self, value, like) -> np.ndarray:
        """A Python number as an array of `like`'s dtype."""
        return np.asarray(value, dtype=_dtype_of(like))

    def node(self, op, inputs, attrs, shape, dtype, name=None) -> Dyn:
        values = [self.value(v) for v in inputs]
        v = self.g.node(op, values, attrs, name=self.name(name, op))
        return Dyn(v, shape, dtype)

    # --- elementwise ---------------------------------------------------------------

    def unary(self, op, x, name=None):
        if not isinstance(x, Dyn):
            self.charge(np.shape(x), _dtype_of(x))
            with np.errstate(all="ignore"):
                return np.asarray(UNARY_FOLDS[op](np.asarray(x)))
        return self.node(op, [x], {}, x.shape, x.dtype, name)

    def binary(self, op, a, b, name=None):
        if not isinstance(a, Dyn) and not isinstance(b, Dyn):
            a, b = np.asarray(a), np.asarray(b)
            self.charge(_broadcast(a.shape, b.shape), np.result_type(a, b))
            with np.errstate(all="ignore"):
                out = np.asarray(BINARY_FOLDS[op](a, b))
            if out.dtype == object and not _has_dim(out) and op not in COMPARISONS:
                out = out.astype(np.int64)
            return out
        if not isinstance(a, Dyn):
            a = np.asarray(a, dtype=b.dtype)
        if not isinstance(b, Dyn):
            b = np.asarray(b, dtype=a.dtype)
        shape = _broadcast(_shape_of(a), _shape_of(b))
        dtype = "bool" if op in COMPARISONS else _dtype_of(a)
        return self.node(op, [a, b], {}, shape, dtype, name)

    def add(self, a, b, name=None): return self.binary("add", a, b, name)
    def sub(self, a, b, name=None): return self.binary("sub", a, b, name)
    def mul(self, a, b, name=None): return self.binary("mul", a, b, name)
    def div(self, a, b, name=None): return self.binary("div", a, b, name)

    def where(self, cond, a, b, name=None):
        if not any(isinstance(v, Dyn) for v in (cond, a, b)):
            self.charge(_broadcast(np.shape(cond), np.shape(a), np.shape(b)), _dtype_of(a))
            return np.where(np.asarray(cond), np.asarray(a), np.asarray(b))
        if not isinstance(a, Dyn) and isinstance(b, Dyn):
            a = np.asarray(a, dtype=b.dtype)
        if not isinstance(b, Dyn) and isinstance(a, Dyn):
            b = np.asarray(b, dtype=a.dtype)
        shape = _broadcast(_shape_of(cond), _shape_of(a), _shape_of(b))
        return self.node("where", [cond, a, b], {}, shape, _dtype_of(a), name)

    def clip(self, x, low=None, high=None, name=None):
        if not isinstance(x, Dyn):
            self.charge(np.shape(x), _dtype_of(x))
            return np.clip(x, low, high)
        return self.node("clip", [x], {k: float(v) for k, v in (("min", low), ("max", high))
                                        if v is not None}, x.shape, x.dtype, name)

    def cast(self, x, dtype, name=None):
        dtype = np.dtype(dtype).name
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            if array.dtype == object:
                if np.dtype(dtype).kind in "iu":
                    return array
                if _has_dim(array):
                    raise _FoldError(f"the dynamic dimension in {array.tolist()} is cast to "
                                     f"{dtype}: give the inputs fixed sizes (input_shapes=...)")
                array = array.astype(np.int64)
            self.charge(array.shape, dtype)
            return array.astype(dtype)
        if dtype not in WIRE_DTYPES:
            raise _FoldError(f"cast to {dtype} is not supported "
                             f"(supported: {', '.join(WIRE_DTYPES)})")
        if dtype == x.dtype and name is None:
            return x
        return self.node("cast", [x], {"dtype": dtype}, x.shape, dtype, name)

    # --- shape ops -------------------------------------------------------------------

    def reshape(self, x, shape, name=None):
        shape = tuple(shape)
        if not isinstance(x, Dyn):
            if _has_dim(shape):
                _fail(f"reshape of a known value to {_fmt(shape)}")
            if _is_broadcast(np.asarray(x)):  # numpy copies it
                self.charge(shape, _dtype_of(x))
            return np.reshape(x, [int(d) for d in shape])
        if shape == x.shape and name is None:
            return x
        return self.node("reshape", [x], {"shape": _engine_shape(shape, "reshape to")},
                         shape, x.dtype, name)

    def transpose(self, x, perm, name=None):
        perm = [int(p) for p in perm]
        if not isinstance(x, Dyn):
            return np.transpose(x, perm)
        if perm == list(range(x.ndim)) and name is None:
            return x
        return self.node("transpose", [x], {"perm": perm}, tuple(x.shape[p] for p in perm),
                         x.dtype, name)

    def broadcast_to(self, x, shape, name=None):
        shape = tuple(shape)
        if not isinstance(x, Dyn):
            if not _has_dim(shape):
                return np.broadcast_to(x, [int(d) for d in shape])
        elif shape == x.shape and name is None:
            return x
        if not _has_dim(shape):
            return self.node("broadcast_to", [x], {"shape": [int(d) for d in shape]}, shape,
                             _dtype_of(x), name)
        # a dynamic dimension: broadcast by adding zeros that have it (the value's own, or
        # zeros shaped like a graph input's axis of that size: a class token expanded to
        # the batch)
        xs = (1,) * (len(shape) - len(_shape_of(x))) + tuple(_shape_of(x))
        zeros = [1 if isinstance(d, Dim) else d for d in shape]
        out = self.add(x, np.zeros(zeros, _dtype_of(x)))
        for axis, (d, have) in enumerate(zip(shape, xs)):
            if isinstance(d, Dim) and have != d:
                out = self.add(out, self._zeros_along(d, axis, len(shape), _dtype_of(x),
                                                      _shape_of(x), shape))
        return self.cast(out, _dtype_of(x), name=name) if name else out

    def _zeros_along(self, dim, axis, rank, dtype, have, want):
        """Zeros of shape (1, ..., dim, ..., 1), dim on `axis`, made from a graph input
        with an axis of that dynamic size: where(input != input-ish, 0, 0) has its
        shape and no dependence on its values (NaN and inf included)."""
        source = self.dim_sources.get(dim)
        if source is None:
            raise _FoldError(f"cannot expand {_fmt(have)} to {_fmt(want)}: the dynamic "
                             f"dimension {dim} is no graph input's own axis")
        value, at = source
        picked = self.slice(value, [0] * value.ndim, [1 if a != at else INT_MAX
                                                     for a in range(value.ndim)],
                            list(range(value.ndim)))
        line = self.reshape(picked, [dim if a == axis else 1 for a in range(rank)])
        flag = self.cast(line, "bool") if line.dtype != "bool" else line
        zero = np.zeros((), dtype)
        return self.where(flag, zero, zero)

    def concat(self, values, axis, name=None):
        ndim = len(_shape_of(values[0]))
        axis = _norm_axis(axis, ndim)
        if not any(isinstance(v, Dyn) for v in values):
            arrays = [np.asarray(v) for v in values]
            self.charge([sum(a.size for a in arrays)], arrays[0].dtype)
            kind = object if any(a.dtype == object for a in arrays) else None
            return np.concatenate([a.astype(kind) if kind else a for a in arrays], axis=axis)
        values = [v for v in values if _shape_of(v)[axis] != 0] or values[:1]
        if len(values) == 1 and name is None:
            return values[0]
        shapes = [_shape_of(v) for v in values]
        shape = list(shapes[0])
        for s in shapes[1:]:
            shape[axis] = shape[axis] + s[axis]
        dtype = next(v.dtype for v in values if isinstance(v, Dyn))
        return self.node("concat", values, {"axis": axis}, tuple(shape), dtype, name)

    def slice(self, x, starts, stops, axes, steps=None, name=None):
        """ONNX Slice with known starts, stops, axes and steps (clamped as ONNX does)."""
        shape = list(_shape_of(x))
        ndim = len(shape)
        steps = [1] * len(starts) if steps is None else steps
        picks = [None] * ndim  # (begin, end, step) per sliced axis
        for start, stop, axis, step in zip(starts, stops, axes, steps):
            axis = _norm_axis(axis, ndim)
            start, stop, step = int(start), int(stop), int(step)
            dim = shape[axis]
            if isinstance(dim, Dim):
                if step == 1 and start == 0 and stop >= 2 ** 31 - 1:
                    continue
                raise _FoldError(f"slicing the dynamic axis {axis} ({dim}) is not supported: "
                                 "give the inputs fixed sizes (input_shapes=...)")
            if step == 0:
                raise _FoldError("a slice step of 0")
            begin, end, step = slice(max(min(start, INT_MAX), -INT_MAX),
                                     max(min(stop, INT_MAX), -INT_MAX - 1), step).indices(dim)
            if (begin, max(begin, end), step) != (0, dim, 1):
                picks[axis] = (begin, end, step)  # end -1: before index 0 (a negative step)
        if not isinstance(x, Dyn):
            index = tuple(slice(None) if p is None else slice(p[0], None if p[1] < 0 else p[1],
                                                               p[2]) for p in picks)
            return np.asarray(x)[index]
        plain = [(a, p) for a, p in enumerate(picks) if p is not None and p[2] == 1]
        strided = [(a, p) for a, p in enumerate(picks) if p is not None and p[2] != 1]
        out = x
        if plain:
            spans = [(b, max(b, e)) for _, (b, e, _) in plain]
            sliced = list(x.shape)
            for (a, _), (b, e) in zip(plain, spans):
                sliced[a] = e - b
            out = self.node("slice", [x], {"starts": [b for b, _ in spans],
                                           "stops": [e for _, e in spans],
                                           "axes": [a for a, _ in plain]},
                            tuple(sliced), x.dtype, None if strided else name)
        for i, (a, (b, e, step)) in enumerate(strided):  # a step other than 1: pick indices
            out = self.take(out, np.arange(b, e, step, dtype=np.int64), a,
                            name=name if i == len(strided) - 1 else None)
        return out

    def pad(self, x, pads, value=0.0, name=None):
        if not any(pads):
            return x
        if not isinstance(x, Dyn):
            n = np.ndim(x)
            self.charge([d + b + e for d, b, e in zip(np.shape(x), pads[:n], pads[n:])],
                        _dtype_of(x))
            return np.pad(x, list(zip(pads[:n], pads[n:])), constant_values=value)
        n = x.ndim
        shape = tuple(d + b + e for d, b, e in zip(x.shape, pads[:n], pads[n:]))
        return self.node("pad", [x], {"pads": [int(p) for p in pads], "value": float(value)},
                         shape, x.dtype, name)

    def take(self, data, indices, axis, name=None):
        ndim = len(_shape_of(data))
        axis = _norm_axis(axis, ndim)
        if not isinstance(data, Dyn) and not isinstance(indices, Dyn):
            ds = np.shape(data)
            self.charge(ds[:axis] + np.shape(indices) + ds[axis + 1:], _dtype_of(data))
            return np.take(np.asarray(data), np.asarray(indices, dtype=np.int64), axis=axis)
        if not isinstance(indices, Dyn):
            indices = np.asarray(indices, dtype=np.int64)
        ds = _shape_of(data)
        shape = tuple(ds[:axis]) + tuple(_shape_of(indices)) + tuple(ds[axis + 1:])
        return self.node("take", [data, indices], {"axis": axis}, shape, _dtype_of(data), name)

    # --- reductions and nn -----------------------------------------------------------------

    def reduce(self, op, x, axes=None, keepdims=False, name=None):
        ndim = len(_shape_of(x))
        axes = list(range(ndim)) if axes is None else sorted(_norm_axis(a, ndim) for a in axes)
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            if op in ("max", "min") and any(array.shape[a] == 0 for a in axes):
                raise _FoldError(f"a {op} over an empty axis has no value in gradserve's "
                                 "engine (ONNX's identity element is not supported)")
            out = REDUCE_FOLDS[op](array, axis=tuple(axes), keepdims=keepdims)
            return np.asarray(out) if array.dtype == object else np.asarray(out, array.dtype)
        if not axes:
            return x
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims \
            else tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return self.node(op, [x], {"axes": axes, "keepdims": bool(keepdims)}, shape, x.dtype,
                         name)

    def softmax(self, op, x, axis, name=None):
        axis = _norm_axis(axis, len(_shape_of(x)))
        if not isinstance(x, Dyn):
            array = np.asarray(x)
            self.charge(array.shape, array.dtype, "softmax's intermediate")
            self.charge(array.shape, array.dtype)
            return SOFTMAX_FOLDS[op](array, axis).astype(array.dtype)
        return self.node(op, [x], {"axis": axis}, x.shape, x.dtype, name)

    def cumsum(self, x, axis, reverse=False, exclusive=False, name=None):
        axis = _norm_axis(axis, len(_shape_of(x)))
        return self.node("cumsum", [x], {"axis": axis, "reverse": bool(reverse),
                                         "exclusive": bool(exclusive)},
                         _shape_of(x), _dtype_of(x), name)

    def matmul(self, a, b, name=None):
        sa, sb = tuple(_shape_of(a)), tuple(_shape_of(b))
        a2 = (1,) + sa if len(sa) == 1 else sa
        b2 = sb + (1,) if len(sb) == 1 else sb
        if a2[-1] != b2[-2]:
            raise _FoldError(f"matmul of {_fmt(sa)} and {_fmt(sb)}: inner sizes differ")
        shape = _broadcast(a2[:-2], b2[:-2]) + ((a2[-2],) if len(sa) > 1 else ()) + \
            ((b2[-1],) if len(sb) > 1 else ())
        if not isinstance(a, Dyn) and not isinstance(b, Dyn):
            self.charge(shape, np.result_type(a, b))
            return np.matmul(a, b)
        dtype = _dtype_of(a if isinstance(a, Dyn) else b)
        return self.node("matmul", [a, b], {}, shape, dtype, name)

    def conv(self, x, w, strides, pads, dilations, groups, name=None):
        ws = _shape_of(w)
        spatial = _window_out(_shape_of(x)[2:], ws[2:], strides, pads, dilations)
        shape = (_shape_of(x)[0], ws[0]) + spatial
        return self.node("conv", [x, w], {"strides": strides, "pads": pads,
                                          "dilations": dilations, "groups": int(groups)},
                         shape, _dtype_of(x), name)

    def pool(self, op, x, kernel, strides, pads, dilations, count_include_pad=None, name=None):
        xs = _shape_of(x)
        shape = tuple(xs[:2]) + _window_out(xs[2:], kernel, strides, pads, dilations)
        attrs = {"kernel_shape": kernel, "strides": strides, "pads": pads,
                 "dilations": dilations}
        if count_include_pad is not None:
            attrs["count_include_pad"] = bool(count_include_pad)
        return self.node(op, [x], attrs, shape, _dtype_of(x), name)


def _is_broadcast(array) -> bool:
    """A broadcast view (a stride of 0): its values take more memory once copied."""
    return array.size > 1 and 0 in array.strides


def _mib(size: int) -> str:
    return f"{size / 2 ** 20:,.1f} MiB"


def _window_out(spatial, kernel, strides, pads, dilations):
    d = len(spatial)
    out = []
    for i in range(d):
        if isinstance(spatial[i], Dim):
            raise _FoldError(f"spatial axis {i} is dynamic ({spatial[i]}): give the inputs "
                             "fixed sizes (input_shapes=...)")
        extent = dilations[i] * (kernel[i] - 1) + 1
        out.append((spatial[i] + pads[i] + pads[i + d] - extent) // strides[i] + 1)
    return tuple(out)


