"""Conv at the CPU's speed (issue 20 item 6): the engine's conv against PyTorch's
single-thread conv, per layer shape, forward and forward + backward.

Each layer is a one-node graph y = conv(x, w) compiled once; "fwd" is plan.evaluate,
"fwd+bwd" is plan.vjp with a fixed cotangent of y wrt x and w (the forward sweep and
both transposes). PyTorch: torch.nn.functional.conv2d with one intra-op thread, the
same fwd and y.backward(g) with both leaves requiring grad. Both sides run one BLAS
thread (OPENBLAS_NUM_THREADS=1 is set here before NumPy loads), so the ratio compares
the algorithms, not the thread counts. Gradients are checked against torch's.

One row per kernel provider (engine/kernels.py): "numpy" (the default kernels),
"numba" (the compiled depthwise kernels, when numba is installed; the dense layers run
the same numpy kernels under either provider, so they get no numba row), and "general"
(the numpy provider with the shape-specific kernels - engine/depthwise.py, windows.py's
flat-row gather, engine/rowshifts.py - turned off: the gathered im2col kernels every shape
used before).

Then, per phase (windows.conv, conv_input_grad, conv_weight_grad called directly) for
P9's stride-1 layers: the numpy kernels with engine/rowshifts.py (2-d stride-1
values and both transposes) against the same kernels with them turned off (the
dispatch before them: flat rows, the scatter), interleaved, with the same-round ratio.
All providers and torch are timed round by round, interleaved; each ratio is the
median over rounds of that round's engine / torch time, with its interquartile range.
Print the load average with the figures: this machine is shared.

glibc's malloc thresholds are raised as a server sets them at start (mmap 32 MiB,
trim 1 GiB: freed blocks are reused, not faulted in afresh; it took the ResNet 3x3
forward from 17 to 10 ms here); --default-malloc measures with glibc's defaults.

    python bench/bench_conv.py            # about a minute
    python bench/bench_conv.py --quick
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))

from _timing import (FULL, QUICK, load_torch, measure, parse_args,  # noqa: E402
                     print_environment, print_table, torch_skip_message)

import numpy as np  # noqa: E402

from gradserve.engine import Graph, Input, Node, compile  # noqa: E402
from gradserve.engine import depthwise, kernels, rowshifts, windows  # noqa: E402

# (name, x shape, w shape, strides, pads, groups)
LAYERS = [
    # P9's models (bench/bench_onnx.py): LeNet-5 b32, the small ResNet b16 (16 channels)
    ("lenet conv1 b32", (32, 1, 28, 28), (6, 1, 5, 5), (1, 1), (2, 2, 2, 2), 1),
    ("lenet conv2 b32", (32, 6, 14, 14), (16, 6, 5, 5), (1, 1), (0, 0, 0, 0), 1),
    ("resnet stem 3->16 b16", (16, 3, 16, 16), (16, 3, 3, 3), (1, 1), (1, 1, 1, 1), 1),
    ("resnet 3x3 16 b16", (16, 16, 16, 16), (16, 16, 3, 3), (1, 1), (1, 1, 1, 1), 1),
    ("resnet 3x3 s2 16->32 b16", (16, 16, 16, 16), (32, 16, 3, 3), (2, 2), (1, 1, 1, 1), 1),
    ("resnet 1x1 s2 16->32 b16", (16, 16, 16, 16), (32, 16, 1, 1), (2, 2), (0, 0, 0, 0), 1),
    # wider layers
    ("resnet 3x3 64 b16", (16, 64, 16, 16), (64, 64, 3, 3), (1, 1), (1, 1, 1, 1), 1),
    ("resnet 3x3 s2 64->128 b16", (16, 64, 16, 16), (128, 64, 3, 3), (2, 2), (1, 1, 1, 1), 1),
    ("resnet 1x1 s2 64->128 b16", (16, 64, 16, 16), (128, 64, 1, 1), (2, 2), (0, 0, 0, 0), 1),
    ("depthwise 3x3 64 b16", (16, 64, 16, 16), (64, 1, 3, 3), (1, 1), (1, 1, 1, 1), 64),
    ("depthwise 3x3 s2 64 b16", (16, 64, 16, 16), (64, 1, 3, 3), (2, 2), (1, 1, 1, 1), 64),
]


def engine_layer(x_shape, w_shape, strides, pads, groups, rng):
    g = Graph([Input("x", "float32", list(x_shape)), Input("w", "float32", list(w_shape))],
              [Node("y", "conv", ["x", "w"], {"strides": list(strides), "pads": list(pads),
                                              "groups": groups})], ["y"], {})
    plan = compile(g)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(np.float32)
    y = plan.evaluate({"x": x, "w": w})["y"]
    cot = rng.standard_normal(y.shape).astype(np.float32)
    inputs = {"x": x, "w": w}
    return (lambda: plan.evaluate(inputs),
            lambda: plan.vjp(inputs, {"y": cot}),
            x, w, cot)


def _never(*args, **kwargs):
    return False


def general_kernels_only(fn):
    """fn run with the shape-specific kernels turned off (the gathered kernels only)."""
    def run():
        saved = depthwise.applies, windows.flat_rows, rowshifts.applies
        depthwise.applies = windows.flat_rows = rowshifts.applies = _never
        try:
            return fn()
        finally:
            depthwise.applies, windows.flat_rows, rowshifts.applies = saved
    return run


def without_row_shifts(fn):
    """fn run with engine/rowshifts.py turned off (the kernels dispatched before)."""
    def run():
        saved = rowshifts.applies
        rowshifts.applies = _never
        try:
            return fn()
        finally:
            rowshifts.applies = saved
    return run


# P9's stride-1 layers, per phase: (name, x shape, w shape, pads)
PHASE_LAYERS = [LAYERS[1], LAYERS[0], LAYERS[3]]


def phases(settings, rng):
    """Rows: per layer and phase, the time with row shifts, without, and the ratio."""
    rows = []
    for name, xs, ws, strides, pads, groups in PHASE_LAYERS:
        geometry = dict(strides=strides, pads=pads, dilations=(1, 1), groups=groups)
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        y = windows.conv(x, w[None], **geometry)[0]
        g = rng.standard_normal(y.shape).astype(np.float32)
        calls = {"values": lambda: windows.conv(x, w[None], **geometry),
                 "input's transpose": lambda: windows.conv_input_grad(g, w, xs[2:], **geometry),
                 "weight's transpose": lambda: windows.conv_weight_grad(g[None], x, ws[2:],
                                                                        **geometry)}
        funcs = {}
        for phase, call in calls.items():
            funcs[f"{phase} new"] = call
            funcs[f"{phase} old"] = without_row_shifts(call)
        t = measure(funcs, settings)
        for phase in calls:
            rows.append([name, phase, f"{t[f'{phase} new'].median * 1e6:.0f}",
                         f"{t[f'{phase} old'].median * 1e6:.0f}",
                         ratio(t, f"{phase} new", f"{phase} old")])
    return rows


def on(provider, fn):
    """fn run on the given kernel provider."""
    def run():
        kernels.use(provider)
        return fn()
    return run


def ratio(t, engine, baseline):
    """Median and interquartile range over rounds of engine / baseline (same round)."""
    r = sorted(a / b for a, b in zip(t[engine].times, t[baseline].times))
    q = statistics.quantiles(r, n=4)
    return f"{statistics.median(r):.2f}x ({q[0]:.2f}-{q[2]:.2f})"


def keep_freed_memory() -> bool:
    """glibc's mmap and trim thresholds raised, as the server does at start."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.mallopt(-3, 32 << 20) and libc.mallopt(-1, 1 << 30))
    except (OSError, AttributeError, TypeError):
        return False


def _warm():
    import time
    began = time.perf_counter()
    kernels.warm_up()
    return time.perf_counter() - began


def main(argv=None):
    args = parse_args(__doc__.splitlines()[0], argv, extra=lambda p: p.add_argument(
        "--default-malloc", action="store_true",
        help="keep glibc's default malloc thresholds (fresh pages for every large array)"))
    settings = QUICK if args.quick else FULL
    if not args.default_malloc:
        print(f"malloc thresholds raised: {keep_freed_memory()}")
    print_environment()
    torch = load_torch()
    if torch is None:
        print(torch_skip_message())
        return 0
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    numba = kernels.use("auto") == "numba"
    if numba:
        print(f"numba kernels compiled or loaded in {_warm():.1f} s")
    else:
        print("numba is not installed: no numba rows (pip install 'gradserve[numba]')")
    rows = []
    for name, xs, ws, strides, pads, groups in LAYERS:
        fwd, both, x, w, cot = engine_layer(xs, ws, strides, pads, groups, rng)
        tx = torch.from_numpy(x).requires_grad_()
        tw = torch.from_numpy(w).requires_grad_()
        tg = torch.from_numpy(cot)
        tp = (pads[0], pads[1])

        def t_fwd():
            with torch.no_grad():
                return torch.nn.functional.conv2d(tx, tw, stride=strides, padding=tp,
                                                  groups=groups)

        def t_both():
            tx.grad = tw.grad = None
            torch.nn.functional.conv2d(tx, tw, stride=strides, padding=tp,
                                       groups=groups).backward(tg)

        t_both()
        providers = ["general", "numpy"]
        if numba and groups == xs[1] == ws[0]:
            providers.append("numba")
        for provider in providers[1:]:
            got = on(provider, both)().cotangents
            for key, ref in (("x", tx.grad), ("w", tw.grad)):
                err = (np.max(np.abs(got[key] - ref.numpy()))
                       / (np.max(np.abs(ref.numpy())) or 1))
                if err > 1e-3:
                    print(f"{name} ({provider}): d{key} differs from torch by {err:.2e}")
                    return 1
        funcs = {"torch fwd": t_fwd, "torch fwd+bwd": t_both}
        for provider in providers:
            run = (lambda f: on("numpy", general_kernels_only(f))) if provider == "general" \
                else (lambda f, p=provider: on(p, f))
            funcs[f"{provider} fwd"] = run(fwd)
            funcs[f"{provider} fwd+bwd"] = run(both)
        t = measure(funcs, settings)
        for provider in providers:
            rows.append([name, provider]
                        + [f"{t[f'{provider} fwd'].median * 1e3:.2f}",
                           f"{t['torch fwd'].median * 1e3:.2f}",
                           ratio(t, f"{provider} fwd", "torch fwd"),
                           f"{t[f'{provider} fwd+bwd'].median * 1e3:.2f}",
                           f"{t['torch fwd+bwd'].median * 1e3:.2f}",
                           ratio(t, f"{provider} fwd+bwd", "torch fwd+bwd")])
    kernels.use("auto")
    print_table(["layer", "kernels", "fwd ms", "torch", "ratio", "f+b ms", "torch", "ratio"],
                rows, title="conv per layer shape, float32, one thread each, medians; ratios "
                "engine / torch per round, median (interquartile range); target <= 1.0x")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    kernels.use("numpy")
    print_table(["layer", "phase", "row shifts us", "without us", "ratio"], phases(settings, rng),
                title="per phase, numpy kernels, with engine/rowshifts.py and without "
                "(the kernels before them); ratio per round, median (interquartile range)")
    kernels.use("auto")
    print(f"load average: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
