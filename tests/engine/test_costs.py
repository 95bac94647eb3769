"""Costs proven, not hoped: every op row's declared cost bounds what its kernels incur.

Each op in OPS is driven through random shapes and attributes, adversarial ones among
them (huge windows, many groups, huge dilation, zero-size axes, float64 and float32), in
every mode: values (evaluate), forward (a JVP of k directions), reverse (a VJP of k
directions) and second order (k Hessian-vector products of sum(op(...))). For each run:

- memory: the peak NumPy allocation of the run (tracemalloc sees NumPy's arrays), taken
  after a warm-up run filled the plan's caches, must be refused as a limit: with
  max_bytes below the measured peak (less SLACK for the interpreter's own objects), the
  plan refuses the request before running it, so its estimate is at least the peak;
- loop passes: the passes of the kernels' Python loops (counted as they run,
  costs.counting()) are at most the plan's declared loops for the values and each
  direction;
- work: the FLOPs of the op by an independent formula (FLOPS below: passes over the
  elements, 2mnk for products), per direction as much again, plus
  costs.LOOP_FLOPS for each pass of a kernel's Python loop (counted as the kernels run,
  costs.counting()), must be refused as a limit in the same way.

A row that under-declares fails here with the op, the mode and the case.
"""

from __future__ import annotations

import tracemalloc
from math import prod

import numpy as np
import pytest

from gradserve.engine import Graph, Input, Node, ResourceLimitError, compile
from gradserve.engine import costs, kernels, rowshifts, windows
from gradserve.engine.ops import OPS
from gradserve.engine.ops.table import no_cotangent

SLACK = 16 * 1024  # bytes of interpreter objects (tuples, dicts, results) beside the arrays
CASES = 6  # random cases per op
ADVERSARIAL = 4  # and adversarial ones (huge windows, many groups, empty axes...)

UNARY = ("neg", "sin", "cos", "tan", "exp", "log", "sqrt", "square", "reciprocal", "abs",
         "tanh", "sigmoid", "relu", "softplus", "log1p", "erf")
POSITIVE = ("log", "sqrt", "reciprocal", "log1p")
BINARY = ("add", "sub", "mul", "div", "pow", "maximum", "minimum")
COMPARISONS = ("equal", "not_equal", "less", "less_equal", "greater", "greater_equal")
REDUCTIONS = ("sum", "mean", "max", "min", "prod")


def _shape(rng, rank=None, low=1, high=24):
    rank = int(rng.integers(1, 4)) if rank is None else rank
    return tuple(int(d) for d in rng.integers(low, high, rank))


def _values(rng, shape, dtype, positive=False):
    x = rng.standard_normal(shape)
    if positive:
        x = np.abs(x) + 0.5
    return x.astype(dtype)


def _zero(shape, rng):
    """The shape with one axis made empty."""
    s = list(shape)
    s[int(rng.integers(len(s)))] = 0
    return tuple(s)


def _case(op, rng, dtype, adversarial):
    """(inputs by name, attrs) of one random case of `op`."""
    f = lambda shape, **kw: _values(rng, shape, dtype, **kw)  # noqa: E731
    if op in UNARY:
        shape = _shape(rng, high=40)
        if adversarial:
            shape = _zero(shape, rng) if rng.random() < 0.5 else (int(rng.integers(70_000,
                                                                                   140_000)),)
        return {"a": f(shape, positive=op in POSITIVE)}, {}
    if op in BINARY + COMPARISONS:
        shape = _shape(rng, high=40)
        other = tuple(1 if rng.random() < 0.3 else d for d in shape)[int(rng.integers(2)):]
        if adversarial:
            shape = _zero(shape, rng)
            other = shape
        a, b = f(shape, positive=op == "pow"), f(other)
        return ({"a": a, "b": b} if rng.random() < 0.5 else {"a": f(other, positive=op == "pow"),
                                                              "b": f(shape)}), {}
    if op in REDUCTIONS + ("cumsum", "softmax", "log_softmax", "logsumexp"):
        shape = _shape(rng, high=30)
        if adversarial:
            shape = _zero(shape, rng) if op in ("sum", "mean", "prod", "cumsum") else (
                (2, 40_000) if rng.random() < 0.5 else (40_000, 3))
        x = f(shape, positive=op == "prod")
        if op == "prod":
            x = (x / np.exp(np.mean(np.log(np.abs(x) + 1e-30)))).astype(dtype)
            if x.size:
                x[tuple(rng.integers(0, d) for d in shape)] = 0
        axis = int(rng.integers(-len(shape), len(shape)))
        if op in REDUCTIONS:
            axes = sorted({int(a) for a in rng.integers(0, len(shape), int(rng.integers(1, 3)))})
            return {"a": x}, {"axes": axes, "keepdims": bool(rng.random() < 0.5)}
        if op == "cumsum":
            return {"a": x}, {"axis": axis, "reverse": bool(rng.random() < 0.5),
                              "exclusive": bool(rng.random() < 0.5)}
        if op == "logsumexp":
            return {"a": x}, {"axis": axis, "keepdims": bool(rng.random() < 0.5)}
        return {"a": x}, {"axis": axis}
    if op == "reshape":
        shape = _shape(rng, high=30)
        return {"a": f(shape)}, {"shape": [-1, shape[-1]] if rng.random() < 0.5 else
                                 list(reversed(shape))[:1] + [-1]}
    if op == "transpose":
        shape = _shape(rng, high=30)
        return {"a": f(shape)}, {"perm": [int(p) for p in rng.permutation(len(shape))]}
    if op == "broadcast_to":
        shape = _shape(rng, high=30)
        small = tuple(1 if rng.random() < 0.5 else d for d in shape)
        big = (int(rng.integers(1, 2000)),) + shape if adversarial else shape
        return {"a": f(small)}, {"shape": list(big)}
    if op == "concat":
        shape = _shape(rng, high=30)
        axis = int(rng.integers(len(shape)))
        parts = {}
        for i in range(int(rng.integers(1, 4))):
            s = list(shape)
            s[axis] = 0 if adversarial and i == 0 else int(rng.integers(1, 20))
            parts[f"a{i}"] = f(tuple(s))
        return parts, {"axis": axis}
    if op == "slice":
        shape = _shape(rng, high=40)
        starts = [int(rng.integers(-d, d)) for d in shape]
        stops = [int(rng.integers(-d, d + 5)) for d in shape]
        return {"a": f(shape)}, {"starts": starts, "stops": stops}
    if op == "pad":
        shape = _shape(rng, high=30)
        pads = [int(p) for p in rng.integers(0, 8, 2 * len(shape))]
        if adversarial:  # wide padding of one axis
            pads[int(rng.integers(len(pads)))] = int(rng.integers(2000, 4000))
        return {"a": f(shape)}, {"pads": pads, "value": float(rng.standard_normal())}
    if op == "take":
        shape = _shape(rng, high=30)
        axis = int(rng.integers(len(shape)))
        n = shape[axis]
        idx = rng.integers(-n, n, _shape(rng, high=10) if not adversarial else (5000,))
        return {"a": f(shape), "i": idx.astype(np.int64)}, {"axis": axis}
    if op == "matmul":
        m, k, n = (int(d) for d in rng.integers(1, 60, 3))
        if adversarial:
            m, k, n = [(0, k, n), (m, 0, n), (1, 4000, 1), (300, 1, 300)][int(rng.integers(4))]
        batch = _shape(rng, rank=int(rng.integers(0, 2)), high=4)
        a = f(batch + (m, k)) if rng.random() < 0.8 else f((k,))
        b = f((k, n)) if rng.random() < 0.5 else f(batch + (k, n))
        return {"a": a, "b": b}, {}
    if op == "where":
        shape = _shape(rng, high=40)
        return {"c": rng.random(shape) < 0.5, "a": f(shape), "b": f(shape[1:])}, {}
    if op == "clip":
        lo = float(rng.standard_normal())
        return {"a": f(_shape(rng, high=40))}, {"min": lo, "max": lo + float(rng.random())}
    if op == "cast":
        target = "float32" if dtype == np.float64 else "float64"
        return {"a": f(_shape(rng, high=40))}, {"dtype": target}
    if op == "conv":
        return _conv_case(rng, f, adversarial)
    if op in ("max_pool", "avg_pool"):
        return _pool_case(op, rng, f, adversarial)
    raise AssertionError(f"no case generator for op {op!r}: add one")


def _conv_case(rng, f, adversarial):
    d = int(rng.integers(1, 3))
    groups = int(rng.choice([1, 1, 2, 3]))
    cg, og = int(rng.integers(1, 4)), int(rng.integers(1, 4))
    n = int(rng.integers(1, 3))
    kernel = [int(k) for k in rng.integers(1, 4, d)]
    dil = [int(k) for k in rng.integers(1, 3, d)]
    stride = [int(k) for k in rng.integers(1, 3, d)]
    if adversarial:
        kind = int(rng.integers(5))
        if kind == 0:  # many groups of one channel
            groups, cg, og, kernel, dil, stride = 20_000, 1, 1, [1] * d, [1] * d, [1] * d
            d = len(kernel)
        elif kind == 4:  # depthwise (engine/depthwise.py): a channel per group
            groups, cg, og = int(rng.integers(2, 40)), 1, 1
            kernel = [int(rng.integers(1, 9)) for _ in range(d)]
        elif kind == 1:  # a huge dilation
            dil = [int(rng.integers(200, 400))] + dil[1:]
        elif kind == 2:  # a big kernel
            kernel = [int(rng.integers(20, 40))] + kernel[1:]
        else:  # no input channels
            cg = 0
    spatial = [int(dl * (k - 1) + 1 + rng.integers(0, 12)) for k, dl in zip(kernel, dil)]
    pads = [int(p) for p in rng.integers(0, 3, 2 * d)]
    if adversarial and groups == 20_000:
        spatial = [2] * d
    x = f((n, cg * groups) + tuple(spatial))
    w = f((og * groups, cg) + tuple(kernel))
    return {"x": x, "w": w}, {"strides": stride, "pads": pads, "dilations": dil,
                              "groups": groups}


def _pool_case(op, rng, f, adversarial):
    d = int(rng.integers(1, 3))
    kernel = [int(k) for k in rng.integers(1, 4, d)]
    dil = [int(k) for k in rng.integers(1, 3, d)]
    stride = [int(k) for k in rng.integers(1, 3, d)]
    many = 0
    if adversarial:
        kind = rng.random()
        if kind < 0.35:  # a huge window
            kernel = [int(rng.integers(30, 60)) for _ in range(d)]
        elif kind < 0.7:  # a huge dilation
            dil = [int(rng.integers(100, 300))] + dil[1:]
        else:  # many small windows
            many = int(rng.integers(100, 300))
    extents = [dl * (k - 1) + 1 for k, dl in zip(kernel, dil)]
    if rng.random() < 0.5:  # windows that do not overlap (max_pool's masked path)
        stride = [int(e + rng.integers(0, 2)) for e in extents]
    spatial = [int(e + rng.integers(0, 10)) + many for e in extents]
    pads = [int(rng.integers(0, min(3, e))) for e in extents + extents]
    attrs = {"kernel_shape": kernel, "strides": stride, "pads": pads, "dilations": dil}
    if op == "avg_pool":
        attrs["count_include_pad"] = bool(rng.random() < 0.5)
    x = f((int(rng.integers(1, 3)), int(rng.integers(1, 4))) + tuple(spatial))
    if op == "max_pool" and rng.random() < 0.3:
        x.flat[int(rng.integers(x.size))] = np.nan
    return {"x": x}, attrs


# --- the work an op does, by formula (independent of the rows' declarations) -------------

def _matmul_flops(a, b):
    a2 = a if len(a) > 1 else (1,) + a
    b2 = b if len(b) > 1 else b + (1,)
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    return 2 * prod(batch) * a2[-2] * a2[-1] * b2[-1]


PASSES = {"erf": 20, "softmax": 4, "log_softmax": 4, "logsumexp": 4, "pow": 2,
          "sigmoid": 3, "softplus": 3}
# Per seed direction where the derivative is cheaper than the op (erf': one exp).
DIRECTION_PASSES = {"erf": 5}


def flops(op, shapes, out, attrs, passes=PASSES) -> int:
    """The op's floating-point operations on these shapes: passes over its elements
    (one for most, more for composite formulas), 2mnk for products, out * window for
    windows."""
    if op == "matmul":
        return _matmul_flops(*shapes)
    if op == "conv":
        return 2 * prod(out) * prod(shapes[1][1:])
    if op in ("max_pool", "avg_pool"):
        return prod(out) * prod(attrs["kernel_shape"])
    largest = max([prod(out)] + [prod(s) for s in shapes])
    return passes.get(op, 1) * largest


# --- running and measuring ----------------------------------------------------------------

def _graph(op, inputs, attrs, second, refs=None):
    nodes = [Node("y", op, list(inputs) if refs is None else refs, attrs)]
    if second:
        nodes.append(Node("s", "sum", ["y"], {}))
    return Graph([Input(n, v.dtype.name, list(v.shape)) for n, v in inputs.items()],
                 nodes, ["s" if second else "y"])


def _runs(op, inputs, attrs, rng, refs=None):
    """mode -> (run(**limits), seed directions as the plan counts them, plan); `refs`: the
    node's references, when not each input once."""
    plan = compile(_graph(op, inputs, attrs, second=False, refs=refs))
    runs = {"values": (lambda **kw: plan.evaluate(inputs, **kw), 0, plan)}
    floats = [n for n, v in inputs.items() if v.dtype.kind == "f"]
    out_dtype = plan.dtypes["y"]
    if OPS[op].vjp is no_cotangent or not floats or out_dtype not in ("float32", "float64"):
        return runs
    k = int(rng.integers(1, 7))
    y_shape = tuple(plan.shapes["y"])
    tangents = {n: rng.standard_normal((k,) + inputs[n].shape).astype(inputs[n].dtype)
                for n in floats}
    cot = {"y": rng.standard_normal((k,) + y_shape).astype(out_dtype)}
    runs["forward"] = (lambda **kw: plan.jvp(inputs, tangents, **kw), k, plan)
    runs["reverse"] = (lambda **kw: plan.vjp(inputs, cot, wrt=floats, **kw), k, plan)
    second = compile(_graph(op, inputs, attrs, second=True, refs=refs))
    runs["second"] = (lambda **kw: second.hvp(inputs, tangents, wrt=floats, **kw), 2 * k + 1,
                      second)
    return runs


def _measure(run):
    run()  # warm: the plan's caches fill outside the measurement (a VJP's form is seen
    run()  # once, then its sweep compiled: engine/compiled.py's run_vjp)
    tracemalloc.start()
    try:
        with costs.counting() as passes:
            run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, passes[0]


def _prove(op, inputs, attrs, rng, what, refs=None):
    for mode, (run, directions, plan) in _runs(op, inputs, attrs, rng, refs).items():
        peak, passes = _measure(run)
        shapes = [v.shape for v in inputs.values()]
        out = tuple(plan.shapes["y"])
        # a node reading values more than once: one step of index work per reference
        gather = 0 if refs is None else len(refs)
        work = (flops(op, shapes, out, attrs) + gather
                + (flops(op, shapes, out, attrs, {**PASSES, **DIRECTION_PASSES}) + gather)
                * directions
                + costs.LOOP_FLOPS * passes)
        label = f"{op} {mode} {what}: {attrs} on {shapes}"
        declared = plan.costs(plan.shapes)
        assert passes <= declared.loops + directions * declared.direction_loops, (
            f"{label}: {passes} loop passes ran, {declared.loops} + {directions} x "
            f"{declared.direction_loops} declared")
        if peak > SLACK:
            with pytest.raises(ResourceLimitError, match="bytes"):
                run(max_bytes=peak - SLACK)
                pytest.fail(f"{label}: ran within {peak - SLACK:,} bytes; measured peak "
                            f"{peak:,} (less {SLACK:,} slack) is above the declared estimate")
        if work > 0:
            with pytest.raises(ResourceLimitError, match="floating-point"):
                run(max_flops=work - 1)
                pytest.fail(f"{label}: {work:,} FLOPs ({passes} loop passes) is above the "
                            "declared estimate")


def test_the_table_covers_every_op():
    covered = set(UNARY + BINARY + COMPARISONS + REDUCTIONS) | {
        "cumsum", "softmax", "log_softmax", "logsumexp", "reshape", "transpose",
        "broadcast_to", "concat", "slice", "pad", "take", "matmul", "where", "clip", "cast",
        "conv", "max_pool", "avg_pool"}
    assert covered == set(OPS)


@pytest.mark.parametrize("op", sorted(OPS))
def test_declared_costs_bound_what_the_kernels_incur(op):
    rng = np.random.default_rng(sum(map(ord, op)))
    for i in range(CASES + ADVERSARIAL):
        dtype = (np.float64, np.float32)[i % 2]
        adversarial = i >= CASES
        inputs, attrs = _case(op, rng, dtype, adversarial)
        _prove(op, inputs, attrs, rng, f"case {i} ({np.dtype(dtype).name}"
               f"{', adversarial' if adversarial else ''})")


# conv's kernels for particular shapes (engine/depthwise.py, windows.py's flat rows,
# engine/rowshifts.py), each proven on shapes that reach it: (x shape, w shape,
# strides, pads, dilations, groups)
CONV_KERNEL_CASES = {
    "depthwise 2-d": ((2, 5, 9, 7), (5, 1, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 5),
    "depthwise big dilated kernel": ((1, 3, 40, 6), (3, 1, 7, 2), [1, 1], [2, 0, 1, 3],
                                     [5, 2], 3),
    "depthwise 1-d, many channels": ((2, 300, 11), (300, 1, 4), [1], [2, 1], [1], 300),
    "depthwise 3-d": ((1, 4, 5, 6, 4), (4, 1, 2, 3, 1), [1, 1, 1], [1, 0, 1, 0, 1, 0],
                      [1, 1, 2], 4),
    "depthwise strided": ((2, 6, 11, 9), (6, 1, 3, 3), [2, 3], [1, 1, 0, 2], [1, 2], 6),
    "depthwise huge stride": ((1, 3, 9, 900), (3, 1, 2, 3), [4, 700], [0, 1, 0, 0], [3, 1],
                              3),
    "depthwise huge dilation": ((2, 4, 7, 700), (4, 1, 2, 3), [1, 2], [0, 0, 1, 1],
                                [2, 300], 4),
    "flat rows 2-d": ((3, 6, 14, 14), (16, 6, 5, 5), [1, 1], [0, 0, 0, 0], [1, 1], 1),
    "flat rows, many outputs from one channel": ((2, 1, 12, 12), (64, 1, 2, 2), [1, 1],
                                                 [0, 0, 0, 0], [1, 1], 1),
    "flat rows, the transpose too": ((2, 7, 8, 8), (5, 7, 3, 3), [1, 1], [1, 1, 1, 1],
                                     [1, 1], 1),
    "flat rows dilated": ((2, 3, 13, 9), (4, 3, 3, 2), [1, 1], [2, 0, 1, 3], [2, 3], 1),
    "flat rows, a tall dilated kernel": ((1, 2, 300, 6), (3, 2, 4, 2), [1, 1], [0, 0, 1, 1],
                                         [90, 1], 1),
    "flat rows 3-d": ((2, 3, 6, 9, 10), (4, 3, 2, 2, 3), [1, 1, 1], [1, 0, 0, 0, 0, 1],
                      [1, 1, 1], 1),
    "flat rows, ResNet's 16x16": ((3, 4, 16, 16), (6, 4, 3, 3), [1, 1], [1, 1, 1, 1],
                                  [1, 1], 1),
    "flat rows, an image per pass of the weight's transpose": (
        (3, 128, 4, 4), (512, 128, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    "flat rows, 31 a row": ((2, 2, 5, 32), (8, 2, 2, 3), [1, 1], [0, 1, 1, 0], [1, 1], 1),
    "31 a row, too many channels out for flat rows": ((2, 2, 5, 32), (40, 2, 2, 3), [1, 1],
                                                      [0, 1, 1, 0], [1, 1], 1),
    # row shifts (2-d, stride 1, one group; the flat rows' 2-d cases above reach them too)
    "row shifts, LeNet's conv2": ((3, 6, 14, 14), (16, 6, 5, 5), [1, 1], [0, 0, 0, 0],
                                  [1, 1], 1),
    "row shifts, a wide kernel row (a pass per column)": (
        (1, 2, 3, 300), (3, 2, 2, 150), [1, 1], [0, 5, 1, 7], [1, 1], 1),
    "row shifts, dilated columns, pads past the kernel": (
        (2, 3, 5, 9), (4, 3, 2, 3), [1, 1], [3, 1, 2, 4], [1, 3], 1),
    "row shifts, a tall kernel, many outputs": ((2, 2, 40, 3), (64, 2, 9, 1), [1, 1],
                                                [4, 0, 4, 0], [1, 1], 1),
    "row shifts, many channels in (the transpose a row-shift convolution)": (
        (2, 64, 5, 5), (8, 64, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    # the weight's transpose by row shifts (rowshifts.weight_applies)
    "row shifts, the weight's transpose in passes of output rows": (
        (8, 32, 8, 8), (16, 32, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    "row shifts, the weight's transpose, a product per pass": (
        (8, 64, 8, 8), (64, 64, 3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    "row shifts, few outputs (g read transposed in the weight's transpose)": (
        (10, 2, 9, 7), (3, 2, 4, 2), [1, 1], [2, 1, 0, 1], [1, 2], 1),
    "row shifts, a wide kernel row over many channels (the weight's rows the most held)": (
        (2, 16, 2, 256), (1, 16, 1, 64), [1, 1], [0, 0, 0, 0], [1, 1], 1),
}


def _numba_installed():
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


# Every case runs on numpy's kernels; the depthwise ones on numba's too (it compiles
# those only, and declares their costs itself).
PROVIDER_CASES = [(case, "numpy") for case in sorted(CONV_KERNEL_CASES)] + [
    pytest.param(case, "numba", marks=pytest.mark.skipif(
        not _numba_installed(), reason="numba is not installed (the numba extra)"))
    for case in sorted(CONV_KERNEL_CASES) if case.startswith("depthwise")]


@pytest.mark.parametrize("case, provider", PROVIDER_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_declared_costs_bound_the_shape_specific_conv_kernels(case, dtype, provider):
    xs, ws, strides, pads, dilations, groups = CONV_KERNEL_CASES[case]
    rng = np.random.default_rng(len(case))
    inputs = {"x": rng.standard_normal(xs).astype(dtype),
              "w": rng.standard_normal(ws).astype(dtype)}
    before = kernels.active()
    kernels.use(provider)
    try:
        kernels.warm_up()  # numba compiles outside the measurement
        _prove("conv", inputs, {"strides": strides, "pads": pads, "dilations": dilations,
                                "groups": groups}, rng,
               f"{case} ({np.dtype(dtype).name}, {provider} kernels)")
    finally:
        kernels.use(before)



WEIGHT_ROW_SHIFT_CASES = [c for c in sorted(CONV_KERNEL_CASES)
                          if c.startswith("row shifts") and "weight's" in c]


@pytest.mark.parametrize("case", WEIGHT_ROW_SHIFT_CASES)
@pytest.mark.parametrize("directions", [1, 3])
def test_row_shifts_weight_transpose_holds_what_it_declares(case, directions):
    """The weight's transpose alone (the whole op's declaration above also counts the
    forward's rows, which hide this term): its peak beyond g, x and its result, and its
    loop passes, within rowshifts.weight_grad_cost per direction times the directions."""
    xs, ws, strides, pads, dilations, _ = CONV_KERNEL_CASES[case]
    win = windows.Window(tuple(ws[2:]), tuple(strides), tuple(pads), tuple(dilations))
    rng = np.random.default_rng(len(case))
    for dtype in (np.float32, np.float64):
        assert rowshifts.weight_applies(xs, win, 1, np.dtype(dtype).itemsize)
        x = rng.standard_normal(xs).astype(dtype)
        g = rng.standard_normal((directions, xs[0], ws[0]) + win.out(xs[2:])).astype(dtype)
        held, loops = rowshifts.weight_grad_cost(xs, ws[0], win, 1, np.dtype(dtype).itemsize)
        peak, passes = _measure(lambda: rowshifts.weight_grad(g, x, win))
        result = directions * prod(ws) * np.dtype(dtype).itemsize
        assert peak - result <= directions * held + SLACK, (case, dtype, peak, held)
        assert passes <= directions * loops, (case, passes, loops)


# max_pool's masked path (windows that do not overlap; engine/windows.py _first_maxima):
# (x shape, kernel, strides, pads, dilations)
MAX_POOL_TILED_CASES = {
    "LeNet's": ((4, 6, 28, 28), [2, 2], [2, 2], [0, 0, 0, 0], [1, 1]),
    "many tiny windows, 1-d": ((2, 3, 6001), [2], [2], [1, 0], [1]),
    "one-element windows": ((2, 5, 9, 9), [1, 1], [1, 1], [0, 0, 0, 0], [1, 1]),
    "huge tiled windows": ((1, 2, 121, 92), [40, 30], [40, 31], [1, 2, 3, 4], [1, 1]),
    "gaps and padding": ((2, 3, 17, 13), [3, 2], [4, 3], [1, 0, 2, 1], [1, 1]),
    "dilated, not overlapping": ((2, 2, 30, 11), [3, 2], [9, 5], [2, 0, 1, 1], [4, 3]),
    "3-d": ((1, 2, 6, 8, 10), [2, 2, 2], [2, 2, 2], [0, 1, 0, 1, 0, 1], [1, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(MAX_POOL_TILED_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_declared_costs_bound_max_pool_on_windows_that_do_not_overlap(case, dtype):
    xs, kernel, strides, pads, dilations = MAX_POOL_TILED_CASES[case]
    rng = np.random.default_rng(len(case))
    _prove("max_pool", {"x": rng.standard_normal(xs).astype(dtype)},
           {"kernel_shape": kernel, "strides": strides, "pads": pads,
            "dilations": dilations}, rng, f"{case} ({np.dtype(dtype).name})")


def test_declared_costs_bound_a_concat_of_repeated_references():
    """concat reading some values many times (the plan gathers from the distinct values
    with index arrays): its declared cost still bounds the kernels, in every mode, for
    few and many references, small and large values, an empty value among them."""
    rng = np.random.default_rng(19)
    for i in range(8):
        dtype = (np.float64, np.float32)[i % 2]
        shape = _shape(rng, high=12)
        axis = int(rng.integers(len(shape)))
        inputs = {}
        for j in range(int(rng.integers(1, 4))):
            s = list(shape)
            s[axis] = 0 if i >= 6 and j == 0 else int(rng.integers(1, 6))
            inputs[f"a{j}"] = _values(rng, tuple(s), dtype)
        many = int(rng.integers(2, 40)) if i % 3 else int(rng.integers(2_000, 20_000))
        names = list(inputs)
        refs = names + [names[int(n)] for n in rng.integers(len(names), size=many)]
        _prove("concat", inputs, {"axis": axis}, rng,
               f"case {i} ({np.dtype(dtype).name}, {len(refs)} references)", refs)


def test_declared_costs_bound_a_training_step_with_its_loss_tail_fused():
    """engine/losses.py runs a loss's -mean(sum(Y * lp)) tail as one step in a training
    step's sweep: the plan's declared costs (of the four nodes it replaces) still bound
    what the step takes, memory and FLOPs (an independent count: each node's FLOPs, once
    for the values and once for the one cotangent)."""
    from gradserve.engine import losses, sgd_steps

    rng = np.random.default_rng(23)
    for i in range(6):
        dtype = (np.float32, np.float64)[i % 2]
        rows, features, classes = (int(n) for n in rng.integers(1, 300, 3))
        inputs = [Input("X", np.dtype(dtype).name, [-1, features]),
                  Input("Y", np.dtype(dtype).name, [-1, classes]),
                  Input("W", np.dtype(dtype).name, [features, classes])]
        nodes = [Node("z", "matmul", ["X", "W"]),
                 Node("lp", "log_softmax", ["z"], {"axis": -1}),
                 Node("yl", "mul", ["Y", "lp"]), Node("s", "sum", ["yl"], {"axes": [-1]}),
                 Node("ms", "mean", ["s"]), Node("loss", "neg", ["ms"])]
        plan = compile(Graph(inputs, nodes, ["loss"]))
        batch = {"X": _values(rng, (rows, features), dtype),
                 "Y": np.eye(classes, dtype=dtype)[rng.integers(0, classes, rows)]}
        params = {"W": _values(rng, (features, classes), dtype)}
        shapes = plan.bind({**batch, **params}).shapes
        assert losses.sweep_steps(plan, "loss", shapes).fused  # the fused tail runs

        def run(**limits):
            return sgd_steps(plan, params, [batch], learning_rate=0.1, momentum=0.9,
                             **limits)
        peak, passes = _measure(run)
        out = (rows, classes)
        node_flops = (_matmul_flops((rows, features), (features, classes))
                      + flops("log_softmax", [out], out, {})
                      + flops("mul", [out, out], out, {}) + flops("sum", [out], (rows,), {})
                      + flops("mean", [(rows,)], (), {}) + flops("neg", [()], (), {}))
        work = 2 * node_flops + costs.LOOP_FLOPS * passes
        label = f"case {i}: {rows}x{features} -> {classes} ({np.dtype(dtype).name})"
        if peak > SLACK:
            with pytest.raises(ResourceLimitError, match="bytes"):
                run(max_bytes=peak - SLACK)
                pytest.fail(f"{label}: ran within {peak - SLACK:,} bytes; measured peak "
                            f"{peak:,}")
        with pytest.raises(ResourceLimitError, match="floating-point"):
            run(max_flops=work - 1)
            pytest.fail(f"{label}: {work:,} FLOPs is above the declared estimate")
