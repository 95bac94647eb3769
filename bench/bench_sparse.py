"""Sparse Jacobians and Hessians (issue 23): compressed sweeps through the service against
the dense sweeps, and against CasADi's own sparse Jacobian in process, same run.

Workloads (the classic sparse test problems of Moré, Garbow and Hillstrom):
- Broyden tridiagonal, n = 10,000: f_i = (3 - 2 x_i) x_i - x_{i-1} - 2 x_{i+1} + 1
- Broyden banded (bandwidth 5 here: |i - j| <= 2), n = 10,000:
  f_i = x_i (2 + 5 x_i^2) + 1 - sum_{j != i, |i-j| <= 2} x_j (1 + x_j)
- the Hessian of the chained Rosenbrock function, n = 5,000:
  f = sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2

Figures: the service's median time for the whole sparse Jacobian (one call, the pattern
cached after the first), the dense sweeps' time in the engine alone (no transport: a
lower bound of what dense costs through the service), CasADi's in-process time for its
sparse Jacobian (SX, its own coloring) plus one round trip of the service (a bare
Evaluate of a one-element graph), and the colors each used. Goals: >= 50x faster than
dense, within 3x of CasADi + one round trip.

    python bench/bench_sparse.py [--n 10000] [--hessian-n 5000] [--repeat 7]

Needs the `casadi` package for its columns (pip install casadi); without it those are
left out. The dense runs hold n directions of every value: several GB at n = 10,000.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from gradserve.client import Client, GraphBuilder
from gradserve.engine import compile as compile_graph
from gradserve.server.app import create_server
from gradserve.server.limits import Limits

GiB = 1 << 30


def shifted(g, x, n, pad, shift):
    """x[i + shift] for i in [0, n), zero outside (x padded by `pad` on each side)."""
    xp = g.pad(x, pads=[pad, pad])
    return g.slice(xp, starts=[pad + shift], stops=[pad + shift + n], axes=[0])


def tridiagonal(n):
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    f = (3.0 - 2.0 * x) * x - shifted(g, x, n, 1, -1) - 2.0 * shifted(g, x, n, 1, 1) + 1.0
    g.output("f", f)
    return g


def banded(n, half=2):
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    f = x * (2.0 + 5.0 * g.square(x)) + 1.0
    for s in [k for k in range(-half, half + 1) if k]:
        y = shifted(g, x, n, half, s)
        f = f - y * (1.0 + y)
    g.output("f", f)
    return g


def rosenbrock(n):
    g = GraphBuilder()
    x = g.input("x", "float64", [n])
    a = g.slice(x, starts=[0], stops=[n - 1], axes=[0])
    b = g.slice(x, starts=[1], stops=[n], axes=[0])
    g.output("f", g.sum(100.0 * g.square(b - g.square(a)) + g.square(1.0 - a)))
    return g


def casadi_functions(n, kind):
    import casadi as ca
    x = ca.SX.sym("x", n)
    if kind == "rosenbrock":
        a, b = x[:-1], x[1:]
        f = ca.sum1(100 * (b - a ** 2) ** 2 + (1 - a) ** 2)
        h = ca.hessian(f, x)[0]
        return ca.Function("h", [x], [h]), h.sparsity()
    xp = ca.vertcat(ca.SX.zeros(2), x, ca.SX.zeros(2))
    if kind == "tridiagonal":
        f = (3 - 2 * x) * x - xp[1:n + 1] - 2 * xp[3:n + 3] + 1
    else:
        f = x * (2 + 5 * x ** 2) + 1
        for s in (-2, -1, 1, 2):
            y = xp[2 + s:2 + s + n]
            f = f - y * (1 + y)
    jac = ca.jacobian(f, x)
    return ca.Function("j", [x], [jac]), jac.sparsity()


def casadi_colors(sparsity, symmetric):
    """The colors CasADi's own coloring needs for this pattern (star for a Hessian)."""
    return (sparsity.star_coloring() if symmetric else sparsity.uni_coloring()).size2()


def median_time(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--hessian-n", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense runs (several GB at n = 10,000)")
    args = parser.parse_args()
    try:
        import casadi  # noqa: F401
        have_casadi = True
    except ImportError:
        have_casadi = False
        print("casadi not installed: its columns are left out")

    limits = Limits(max_message_bytes=512 << 20, max_tensor_elements=1 << 30,
                    max_intermediate_bytes=16 * GiB, max_request_flops=10 ** 14)
    rng = np.random.default_rng(0)
    with create_server("127.0.0.1:0", limits) as server, \
            Client(f"127.0.0.1:{server.port}", timeout=600) as client:
        tiny = GraphBuilder()
        t = tiny.input("t", "float64", [1])
        tiny.output("o", t + 1.0)
        one = {"t": np.ones(1)}
        client.evaluate(tiny, one)
        rtt, _, _ = median_time(lambda: client.evaluate(tiny, one), 50)
        print(f"one round trip (Evaluate of a one-element graph): {rtt * 1e3:.2f} ms\n")

        rows = []
        for kind, build in (("tridiagonal", tridiagonal), ("banded", banded)):
            n = args.n
            g = build(n)
            x = {"x": rng.uniform(-1, 1, n)}
            first = time.perf_counter()
            r = client.differentiate(g, x, of=["f"], sparsity="sparse")
            first = time.perf_counter() - first
            sparse_t, lo, hi = median_time(
                lambda: client.differentiate(g, x, of=["f"], sparsity="sparse"), args.repeat)
            d = r.planner
            row = {"what": f"{kind} Jacobian n={n}", "service": sparse_t, "spread": (lo, hi),
                   "first": first, "colors": d.colors_forward if d.mode == "forward"
                   else d.colors_reverse, "mode": d.mode, "nnz": d.nnz}
            if not args.no_dense:
                plan = compile_graph(_engine_graph(g))
                dense_t = time.perf_counter()
                plan.jacobian(x, of=["f"], sparsity="dense")
                row["dense"] = time.perf_counter() - dense_t
            if have_casadi:
                fn, pattern = casadi_functions(n, kind)
                xv = x["x"]
                fn(xv)
                row["casadi"], _, _ = median_time(lambda: fn(xv), args.repeat)
                row["casadi_colors"] = casadi_colors(pattern, symmetric=False)
            rows.append(row)

        n = args.hessian_n
        g = rosenbrock(n)
        x = {"x": rng.uniform(-1, 1, n)}
        first = time.perf_counter()
        client.hessian(g, x, sparsity="sparse")
        first = time.perf_counter() - first
        sparse_t, lo, hi = median_time(lambda: client.hessian(g, x, sparsity="sparse"),
                                       args.repeat)
        plan = compile_graph(_engine_graph(g))
        h = plan.hessian(x, sparsity="sparse")
        row = {"what": f"Rosenbrock Hessian n={n}", "service": sparse_t, "spread": (lo, hi),
               "first": first, "colors": h.decision.colors_forward, "mode": "fwd-over-rev",
               "nnz": h.decision.nnz}
        if not args.no_dense:
            dense_t = time.perf_counter()
            plan.hessian(x, sparsity="dense")
            row["dense"] = time.perf_counter() - dense_t
        if have_casadi:
            fn, pattern = casadi_functions(n, "rosenbrock")
            fn(x["x"])
            row["casadi"], _, _ = median_time(lambda: fn(x["x"]), args.repeat)
            row["casadi_colors"] = casadi_colors(pattern, symmetric=True)
        rows.append(row)

    print(f"{'workload':30} {'service':>10} {'(min-max)':>17} {'first':>9} {'colors':>7} "
          f"{'dense':>9} {'x dense':>8} {'casadi':>9} {'+rtt x':>7} {'cas.col':>7}")
    for r in rows:
        lo, hi = r["spread"]
        dense = r.get("dense")
        cas = r.get("casadi")
        print(f"{r['what']:30} {r['service'] * 1e3:8.2f}ms {lo * 1e3:7.2f}-{hi * 1e3:7.2f}ms "
              f"{r['first'] * 1e3:7.0f}ms {r['colors']:>7} "
              + (f"{dense:8.2f}s {dense / r['service']:7.0f}x " if dense else f"{'-':>9} {'-':>8} ")
              + (f"{cas * 1e3:7.2f}ms {r['service'] / (cas + rtt):6.2f}x {r['casadi_colors']:>7}"
                 if cas is not None else ""))
    print("\ngoals: x dense >= 50; service / (casadi + one round trip) <= 3")


def _engine_graph(builder):
    """The builder's graph as the engine's IR (the benchmark's dense runs skip the wire)."""
    from gradserve.server.convert import graph_from_proto
    return graph_from_proto(builder.build())


if __name__ == "__main__":
    main()
