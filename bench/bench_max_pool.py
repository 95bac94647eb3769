"""max_pool's derivative kernels on LeNet-5's pooling shapes: the masked path for windows
that do not overlap (engine/windows.py, _first_maxima) against the general path (the
maxima's flat positions, then a fancy-indexed placement), both run in this process on
the same arrays (the general path by switching the fast one off), interleaved, and
PyTorch's max_pool2d forward+backward at one thread for scale. A VJP of one direction
(what a reverse sweep asks) and a JVP of one direction; float32, batch 32.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_max_pool.py [--quick]
"""

from __future__ import annotations

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import os
import sys
from unittest import mock

import numpy as np

from _timing import environment_lines, fmt_time, load_torch, measure, parse_args, print_table
from gradserve.engine import windows
from gradserve.engine.windows import Window, max_pool, max_pool_jvp, max_pool_vjp

SHAPES = {"LeNet pool1": (32, 6, 28, 28), "LeNet pool2": (32, 16, 10, 10)}


def general(f):
    def call(*args):
        with mock.patch.object(windows, "_tiled", lambda ans, w: False):
            return f(*args)
    return call


def main(argv=None) -> int:
    args = parse_args(__doc__, argv)
    for line in environment_lines():
        print(line)
    torch = load_torch()
    if torch is not None:
        torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    win = Window((2, 2), (2, 2), (0, 0, 0, 0), (1, 1))
    rows = []
    for label, shape in SHAPES.items():
        x = rng.standard_normal(shape).astype(np.float32)
        ans = max_pool(x, win)
        g = rng.standard_normal((1,) + ans.shape).astype(np.float32)
        t = rng.standard_normal((1,) + x.shape).astype(np.float32)
        assert np.array_equal(max_pool_vjp(g, x, ans, win), general(max_pool_vjp)(g, x, ans, win))
        assert np.array_equal(max_pool_jvp(t, x, ans, win), general(max_pool_jvp)(t, x, ans, win))
        funcs = {"vjp masked": lambda: max_pool_vjp(g, x, ans, win),
                 "vjp general": lambda: general(max_pool_vjp)(g, x, ans, win),
                 "jvp masked": lambda: max_pool_jvp(t, x, ans, win),
                 "jvp general": lambda: general(max_pool_jvp)(t, x, ans, win),
                 "forward": lambda: max_pool(x, win)}
        if torch is not None:
            xt = torch.tensor(x, requires_grad=True)
            gt = torch.tensor(g[0])

            def torch_step():
                xt.grad = None
                torch.nn.functional.max_pool2d(xt, 2, 2).backward(gt)
            funcs["torch fwd+bwd (1 thread)"] = torch_step
        timing = measure(funcs, args.settings)
        for name, tm in timing.items():
            rows.append((label, name, fmt_time(tm.median),
                         f"{fmt_time(tm.min)}-{fmt_time(tm.max)}"))
        for kind in ("vjp", "jvp"):
            base = timing[f"{kind} general"]
            per_round = [b / a for a, b in zip(timing[f"{kind} masked"].times, base.times)]
            print(f"{label} {kind}: masked path {base.median / timing[kind + ' masked'].median:.2f}x "
                  f"faster than the general one (per-round ratios {min(per_round):.2f}-"
                  f"{max(per_round):.2f})")
    print_table(("shape", "kernel", "median", "min-max"), rows)
    print("load average (1, 5, 15 min): {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
