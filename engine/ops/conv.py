"""Convolution and pooling over N spatial axes, NCHW (the kernels are engine/windows.py)."""

from __future__ import annotations

import numpy as np

from .. import sparsity
from ..costs import iteration
from ..errors import RuleError
from ..shapes import fill_seed, fmt_shape
from ..windows import (Window, avg_pool, avg_pool_cost, avg_pool_vjp, conv, conv_cost,
                       conv_input_grad, conv_weight_grad, max_pool, max_pool_cost,
                       max_pool_jvp, max_pool_vjp)
from .table import ZERO, AttrSpec, OpDef, row

def _spatial_rank(shape):
    if len(shape) < 3:
        raise RuleError(f"the input must be (N, C, spatial...) with at least one spatial axis, "
                        f"got {fmt_shape(shape)}", "inputs[0]")
    return len(shape) - 2


def _spatial_ints(attrs, name, count, default, low):
    values = attrs[name]
    if values is None:
        return (default,) * count
    if len(values) != count:
        per = ("a begin value for each spatial axis, then an end value for each"
               if name == "pads" else "one per spatial axis")
        raise RuleError(f"{name} has {len(values)} values, expected {count} ({per})",
                        f"attrs.{name}")
    for v in values:
        if v < low:
            raise RuleError(f"{name} value {v} is below {low}", f"attrs.{name}")
    return tuple(values)


def _geometry(attrs, d):
    return dict(strides=_spatial_ints(attrs, "strides", d, 1, 1),
                pads=_spatial_ints(attrs, "pads", 2 * d, 0, 0),
                dilations=_spatial_ints(attrs, "dilations", d, 1, 1))


def _window_out(spatial, win):
    out = win.out(spatial)
    padded = [None if s is None else s + b + e for s, b, e in zip(spatial, win.begin, win.end)]
    for axis, (p, o, extent) in enumerate(zip(padded, out, win.extents())):
        if o is not None and o < 1:
            raise RuleError(f"spatial axis {axis}: the padded input has {p} elements, fewer "
                            f"than the (dilated) kernel's extent {extent}")
    return out


WINDOW_ATTRS = (
    AttrSpec("strides", "ints", None, "step per spatial axis; absent: 1s"),
    AttrSpec("pads", "ints", None, "begin values for each spatial axis, then end values "
             "(ONNX order); absent: 0s"),
    AttrSpec("dilations", "ints", None, "kernel dilation per spatial axis; absent: 1s"),
)


def _norm_conv(attrs, shapes):
    d = _spatial_rank(shapes[0])
    if attrs["groups"] < 1:
        raise RuleError(f"groups {attrs['groups']} is below 1", "attrs.groups")
    return dict(_geometry(attrs, d), groups=attrs["groups"])


def _conv_rule(shapes, dtypes, strides, pads, dilations, groups):
    x, w = shapes
    if len(w) != len(x):
        raise RuleError(f"the weight {fmt_shape(w)} must have the input's rank {len(x)}: "
                        "(O, C / groups, kernel...)", "inputs[1]")
    c, (o, cg) = x[1], w[:2]
    if c is not None and cg is not None and c != cg * groups:
        raise RuleError(f"the input has {c} channels, but the weight {fmt_shape(w)} takes "
                        f"{cg} per group x {groups} group(s)", "inputs[1]")
    if o is not None and o % groups:
        raise RuleError(f"{o} output channels do not split into {groups} groups",
                        "attrs.groups")
    if None in w[2:]:
        return (x[0], o) + (None,) * (len(x) - 2)
    return (x[0], o) + _window_out(x[2:], Window(w[2:], strides, pads, dilations))


def _conv_jvp(t, x, ans, **geometry):
    (tx, tw), (xv, wv) = t, x
    terms = []
    if tx is not None:
        k, n = tx.shape[0], xv.shape[0]
        tx = fill_seed(tx, xv.shape).reshape((k * n,) + xv.shape[1:])
        terms.append(conv(tx, wv[None], **geometry)[0].reshape((k,) + ans.shape))
    if tw is not None:
        terms.append(conv(xv, fill_seed(tw, wv.shape), **geometry))
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _conv_vjp(i, g, x, ans, **geometry):
    xv, wv = x
    if i == 1:
        return conv_weight_grad(g, xv, wv.shape[2:], **geometry)
    k, n = g.shape[:2]
    gx = conv_input_grad(g.reshape((k * n,) + g.shape[2:]), wv, xv.shape[2:], **geometry)
    return gx.reshape((k,) + xv.shape)


def _conv_curvature(i, g, x, ans, t, t_ans, **geometry):
    """One direction at a time (windows.py's transposes take one weight or input),
    each written into the result as it comes (no list of k parts, none at all for k or
    a size of 0)."""
    xv, wv = x
    other = t[1 - i]
    if other is None:
        return None
    other = fill_seed(other, x[1 - i].shape)
    term = np.empty((other.shape[0],) + x[i].shape, np.result_type(g, other))
    for j in range(other.shape[0]):
        iteration()
        term[j] = _conv_vjp(i, g, (xv, other[j]) if i == 0 else (other[j], wv), ans,
                            **geometry)[0]
    return term


row(OpDef(
    "conv", 2, _conv_rule, lambda x, w, **geometry: conv(x, w[None], **geometry)[0],
    _conv_jvp, _conv_vjp,
    WINDOW_ATTRS + (AttrSpec("groups", "int", 1, "channel groups (C and O divisible by it)"),),
    frozenset({"x"}), True, _norm_conv,
    "N-d convolution (cross-correlation, as ONNX Conv and PyTorch), NCHW: x (N, C, *S), "
    "weight (O, C / groups, *kernel); no bias (add it)",
    cost=conv_cost,
    curvature=_conv_curvature,
    pattern=sparsity.conv_pattern, bilinear=True))


def _norm_pool(attrs, shapes):
    d = _spatial_rank(shapes[0])
    kernel = _spatial_ints(attrs, "kernel_shape", d, None, 1)
    win = Window(kernel, **_geometry(attrs, d))
    for axis, (b, e, extent) in enumerate(zip(win.begin, win.end, win.extents())):
        if max(b, e) >= extent:
            raise RuleError(f"pads {list(win.pads)}: spatial axis {axis} is padded by "
                            f"{max(b, e)}, not less than the kernel's extent {extent} (a "
                            "window could hold only padding)", "attrs.pads")
    out = {"window": win}
    if "count_include_pad" in attrs:
        out["count_include_pad"] = attrs["count_include_pad"]
    return out


def _pool_rule(shapes, dtypes, window, count_include_pad=None):
    x = shapes[0]
    return x[:2] + _window_out(x[2:], window)


POOL_ATTRS = (AttrSpec("kernel_shape", "ints", description="window size per spatial axis"),
              ) + WINDOW_ATTRS

row(OpDef(
    "max_pool", 1, _pool_rule, lambda x, window: max_pool(x, window),
    lambda t, x, ans, window: max_pool_jvp(fill_seed(t[0], x[0].shape), x[0], ans, window),
    lambda i, g, x, ans, window: max_pool_vjp(g, x[0], ans, window),
    POOL_ATTRS, frozenset({"x", "ans"}), True, _norm_pool,
    "N-d max pooling, NCHW, padding -inf (ONNX MaxPool without ceil_mode); the derivative of "
    "a window goes to its first maximal element in row-major order (to its last NaN if it "
    "has any), as in PyTorch",
    cost=max_pool_cost,
    curvature=ZERO,
    pattern=sparsity.pool_pattern))  # piecewise linear
row(OpDef(
    "avg_pool", 1, _pool_rule,
    lambda x, window, count_include_pad: avg_pool(x, window, count_include_pad),
    lambda t, x, ans, window, count_include_pad: avg_pool(t[0], window, count_include_pad),
    lambda i, g, x, ans, window, count_include_pad: avg_pool_vjp(
        g, x[0].shape[2:], window, count_include_pad),
    POOL_ATTRS + (AttrSpec("count_include_pad", "bool", False,
                           "divide by the whole window, padding included (else by the "
                           "elements that are not padding)"),),
    frozenset(), True, _norm_pool,
    "N-d average pooling, NCHW (ONNX AveragePool without ceil_mode)",
    cost=avg_pool_cost,
    curvature=ZERO,
    pattern=sparsity.pool_pattern))  # linear
