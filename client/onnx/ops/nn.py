"""Convolutions, pooling and normalization layers."""

from __future__ import annotations

from ..registry import EVAL_MODE_HINT, _out, converts
from ..values import Dim, _FoldError, _norm_axis, _shape_of


def _window(imp, node, attrs, spatial, kernel):
    d = len(kernel)
    strides = list(attrs.get("strides", [1] * d))
    dilations = list(attrs.get("dilations", [1] * d))
    pads = list(attrs.get("pads", [0] * (2 * d)))
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * d)
        for i in range(d):
            if isinstance(spatial[i], Dim):
                raise _FoldError("auto_pad on a dynamic spatial axis")
            out = -(-spatial[i] // strides[i])
            total = max((out - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1
                        - spatial[i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + d] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * d)
    return strides, pads, dilations


@converts("Conv")
def _conv(imp, node, x, attrs):
    w = x[1]
    ws = _shape_of(w)
    kernel = list(attrs.get("kernel_shape", ws[2:]))
    strides, pads, dilations = _window(imp, node, attrs, _shape_of(x[0])[2:], kernel)
    bias = x[2] if len(x) > 2 else None
    e = imp.e
    y = e.conv(x[0], w, strides, pads, dilations, attrs.get("group", 1),
               name=_out(node) if bias is None else None)
    if bias is None:
        return y
    rank = len(_shape_of(x[0]))
    return e.add(y, e.reshape(bias, [ws[0]] + [1] * (rank - 2)), name=_out(node))


def _ceil_pads(spatial, kernel, strides, pads, dilations):
    """Extra end padding that makes floor division give ONNX's ceil_mode sizes."""
    d = len(kernel)
    pads = list(pads)
    for i in range(d):
        extent = dilations[i] * (kernel[i] - 1) + 1
        span = spatial[i] + pads[i] + pads[i + d] - extent
        out = -(-span // strides[i]) + 1
        if (out - 1) * strides[i] >= spatial[i] + pads[i]:  # the last window would start in padding
            out -= 1
        pads[i + d] += max((out - 1) * strides[i] + extent - (spatial[i] + pads[i] + pads[i + d]),
                           0)
    return pads


@converts("MaxPool", "AveragePool")
def _pool(imp, node, x, attrs):
    if _out(node, 1):
        raise _FoldError("MaxPool's Indices output is not supported")
    kernel = list(attrs["kernel_shape"])
    spatial = _shape_of(x[0])[2:]
    strides, pads, dilations = _window(imp, node, attrs, spatial, kernel)
    op = "max_pool" if node.op_type == "MaxPool" else "avg_pool"
    count = None if op == "max_pool" else bool(attrs.get("count_include_pad", 0))
    if attrs.get("ceil_mode", 0):
        extra = _ceil_pads(spatial, kernel, strides, pads, dilations)
        if extra != pads and count:
            raise _FoldError("ceil_mode with count_include_pad is not supported")
        pads = extra
    return imp.e.pool(op, x[0], kernel, strides, pads, dilations, count, name=_out(node))


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(imp, node, x, attrs):
    op = "mean" if node.op_type == "GlobalAveragePool" else "max"
    rank = len(_shape_of(x[0]))
    return imp.e.reduce(op, x[0], list(range(2, rank)), True, name=_out(node))


def _channel(imp, v, rank):
    """A per-channel vector (C,) shaped to broadcast against (N, C, *spatial)."""
    return imp.e.reshape(v, [_shape_of(v)[0]] + [1] * (rank - 2))


@converts("BatchNormalization")
def _batch_norm(imp, node, x, attrs):
    if attrs.get("training_mode", 0) or any(_out(node, i) for i in (1, 2)):
        raise _FoldError("training mode (running statistics as outputs) is not supported: "
                         + EVAL_MODE_HINT)
    data, scale, bias, mean, var = x
    e = imp.e
    rank = len(_shape_of(data))
    eps = attrs.get("epsilon", 1e-5)
    factor = e.mul(scale, e.unary("reciprocal", e.unary("sqrt", e.add(var, e.const(eps, var)))))
    shift = e.sub(bias, e.mul(mean, factor))
    return e.add(e.mul(data, _channel(imp, factor, rank)), _channel(imp, shift, rank),
                 name=_out(node))


def _normalize(imp, x, axes, eps):
    """(x - mean) / sqrt(var + eps) over axes, with the mean and 1/sqrt(var + eps)."""
    e = imp.e
    mean = e.reduce("mean", x, axes, True)
    centered = e.sub(x, mean)
    var = e.reduce("mean", e.unary("square", centered), axes, True)
    inv = e.unary("reciprocal", e.unary("sqrt", e.add(var, e.const(eps, var))))
    return e.mul(centered, inv), mean, inv


@converts("LayerNormalization")
def _layer_norm(imp, node, x, attrs):
    data = x[0]
    rank = len(_shape_of(data))
    axis = _norm_axis(attrs.get("axis", -1), rank)
    y, mean, inv = _normalize(imp, data, list(range(axis, rank)), attrs.get("epsilon", 1e-5))
    e = imp.e
    scale = x[1] if len(x) > 1 else None
    bias = x[2] if len(x) > 2 else None
    if scale is not None:
        y = e.mul(y, scale, name=None if bias is not None else _out(node))
    if bias is not None:
        y = e.add(y, bias, name=_out(node))
    return [y, mean, inv]


@converts("InstanceNormalization")
def _instance_norm(imp, node, x, attrs):
    data, scale, bias = x
    rank = len(_shape_of(data))
    y, _, _ = _normalize(imp, data, list(range(2, rank)), attrs.get("epsilon", 1e-5))
    e = imp.e
    return e.add(e.mul(y, _channel(imp, scale, rank)), _channel(imp, bias, rank),
                 name=_out(node))


@converts("GroupNormalization")
def _group_norm(imp, node, x, attrs):
    """Statistics per group of num_groups channels; scale and bias per channel (opset 21;
    per group in opset 18, where they have num_groups entries)."""
    data, scale, bias = x
    shape = list(_shape_of(data))
    groups = int(attrs["num_groups"])
    channels = shape[1]
    if isinstance(channels, Dim) or channels % groups:
        raise _FoldError(f"{channels} channels do not split into {groups} groups")
    e = imp.e
    rank = len(shape)
    grouped = e.reshape(data, [shape[0], groups, channels // groups] + shape[2:])
    y, _, _ = _normalize(imp, grouped, list(range(2, rank + 1)), attrs.get("epsilon", 1e-5))
    y = e.reshape(y, shape)
    if _shape_of(scale)[0] == groups and groups != channels:  # opset 18: one per group
        scale = e.reshape(e.broadcast_to(e.reshape(scale, [groups, 1]),
                                          [groups, channels // groups]), [channels])
        bias = e.reshape(e.broadcast_to(e.reshape(bias, [groups, 1]),
                                        [groups, channels // groups]), [channels])
    return e.add(e.mul(y, _channel(imp, scale, rank)), _channel(imp, bias, rank),
                 name=_out(node))


@converts("RMSNormalization")
def _rms_norm(imp, node, x, attrs):
    data, scale = x[0], x[1]
    rank = len(_shape_of(data))
    axis = _norm_axis(attrs.get("axis", -1), rank)
    e = imp.e
    ms = e.reduce("mean", e.unary("square", data), list(range(axis, rank)), True)
    inv = e.unary("reciprocal", e.unary("sqrt", e.add(ms, e.const(attrs.get("epsilon", 1e-5),
                                                                  ms))))
    return e.mul(e.mul(data, inv), scale, name=_out(node))


@converts("DepthToSpace", "SpaceToDepth")
def _depth_space(imp, node, x, attrs):
    b = int(attrs["blocksize"])
    n, c, h, w = _shape_of(x[0])
    e = imp.e
    if node.op_type == "SpaceToDepth":
        y = e.reshape(x[0], [n, c, h // b, b, w // b, b])
        crd = attrs.get("mode", "DCR") == "CRD"  # a mode since opset 26
        y = e.transpose(y, [0, 1, 3, 5, 2, 4] if crd else [0, 3, 5, 1, 2, 4])
        return e.reshape(y, [n, c * b * b, h // b, w // b], name=_out(node))
    if attrs.get("mode", "DCR") == "DCR":
        y = e.transpose(e.reshape(x[0], [n, b, b, c // (b * b), h, w]), [0, 3, 4, 1, 5, 2])
    else:  # CRD
        y = e.transpose(e.reshape(x[0], [n, c // (b * b), b, b, h, w]), [0, 1, 4, 2, 5, 3])
    return e.reshape(y, [n, c // (b * b), h * b, w * b], name=_out(node))
