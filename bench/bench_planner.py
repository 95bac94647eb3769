"""Calibrate the mode planner's constant c in "forward iff n <= c * m".

A Jacobian with n input elements and m output elements takes one batched
forward sweep with k = n directions or one batched reverse sweep with k = m
directions. The planner (gradserve.engine.planner) assumes a reverse
direction costs REVERSE_COST_RATIO (2.0, CasADi's and ADOL-C's figure) forward
ones. This script measures that ratio for this engine and checks the choices
it leads to. For each graph family and each (n, m) of a sweep it measures:

  * the whole Jacobian in each mode: plan.jacobian(mode="forward") and
    plan.jacobian(mode="reverse") -- which one is faster, and by how much;
  * the cost per direction of each mode: plan.jvp / plan.vjp with k batched
    random directions, k in {1, K/2, K} (K = n forward, m reverse; {1, K} for
    shapes whose Jacobians take over 0.1 s), fitted as time ~= a + b * k;
    b_rev / b_fwd is the cost of one reverse direction in forward directions,
    i.e. the c the planner's model calls for.

Graph families (float64, weights are graph constants):

  tanh(Wx)   y = tanh(W x), W (m, n), n in {10, 100, 1000}
  chain      y = chain6(T(chain6(x))): 6 elementwise ops (sin, tanh, mul 0.9,
             cos, sigmoid, add 0.9) on the n-vector, a linear map T from n to
             m elements (sum over groups of n/g, then tile to m, g = gcd(n, m)),
             6 more elementwise ops on the m-vector
  mlp        y = V tanh(U x + b) + d, hidden width 32

Then it reports the crossover n/m where the two modes cost the same (per
family and n, interpolated between the measured shapes), counts the cases
where the current REVERSE_COST_RATIO made "auto" pick the slower mode and by
how much, does the same for other values of c, and prints a recommended c.

"pick / best" is the time of the mode the planner picks over the time of the
faster mode (1.00x: it picked the faster one); a pick within 2% of the faster
mode counts as a tie, not as the slower mode. Times are medians of >= 7
repeats (bench/_timing.py), the Jacobians and sweeps of one shape interleaved;
nothing asserts on time. The recommendation comes from these measurements
only: run it on the machines the service runs on (and with their
OPENBLAS_CORETYPE) before changing REVERSE_COST_RATIO.

Run from the repository root:

    python bench/bench_planner.py             # about 1-2 minutes
    python bench/bench_planner.py --quick     # under a minute, fewer shapes
    python bench/bench_planner.py --json planner.json
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from math import gcd

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing as T  # noqa: E402  (sets OMP_WAIT_POLICY first)
import numpy as np  # noqa: E402

from gradserve.engine import Graph, Input, Node, compile  # noqa: E402
from gradserve.engine import planner  # noqa: E402

fmt = T.fmt_time
CYCLE = ("sin", "tanh", "mul", "cos", "sigmoid", "add")
HIDDEN = 32

# n -> the m values measured; n / m runs from 5 down to 0.25 so that every
# candidate c between 0.25 and 5 is tested on both sides. tanh(Wx) at n = 1000
# stops at m = 700: at m = 1000 either mode takes 0.15-2 s per Jacobian (each of
# the 1000 directions is its own matrix-vector product over the 8 MB W), which
# makes that one shape cost about a minute.
GRID = {
    "tanh(Wx)": {10: (2, 3, 5, 7, 10, 20, 40), 100: (20, 30, 50, 70, 100, 200, 400),
                 1000: (200, 300, 500, 700)},
    "chain": {12: (3, 4, 6, 8, 12, 24, 48), 120: (24, 40, 60, 80, 120, 240, 480),
              960: (192, 320, 480, 640, 960)},
    "mlp": {10: (2, 3, 5, 7, 10, 20, 40), 100: (20, 30, 50, 70, 100, 200, 400),
            1000: (200, 300, 500, 700, 1000, 2000)},
}
QUICK_GRID = {
    "tanh(Wx)": {10: (2, 5, 10, 20), 100: (20, 50, 100, 200), 1000: (200, 500)},
    "chain": {12: (3, 6, 12, 24), 120: (24, 60, 120, 240)},
    "mlp": {10: (2, 5, 10, 20), 100: (20, 50, 100, 200), 1000: (200, 500, 1000)},
}
# Short repeats: there are a few hundred measurements.
FULL = T.Settings(repeat=9, target=0.015)
QUICK = T.Settings(repeat=7, target=0.004, quick=True)
NICE_C = (0.25, 0.33, 0.5, 0.67, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0)


# --- graph families -----------------------------------------------------------------

def tanh_wx(n, m, rng):
    W = rng.standard_normal((m, n)) / math.sqrt(n)
    return Graph([Input("x", "float64", [n])],
                 [Node("h", "matmul", ["W", "x"]), Node("y", "tanh", ["h"])], ["y"], {"W": W})


def _chain(nodes, prev, tag):
    for i, op in enumerate(CYCLE):
        args = [prev, "c"] if op in ("mul", "add") else [prev]
        nodes.append(Node(f"{tag}{i}", op, args))
        prev = f"{tag}{i}"
    return prev


def chain(n, m, rng):
    nodes = []
    prev = _chain(nodes, "x", "a")
    g = gcd(n, m)
    if g != n:  # sum groups of n/g consecutive elements: n -> g
        nodes += [Node("grouped", "reshape", [prev], {"shape": [g, n // g]}),
                  Node("reduced", "sum", ["grouped"], {"axes": [1]})]
        prev = "reduced"
    if g != m:  # tile: g -> m
        nodes += [Node("row", "reshape", [prev], {"shape": [1, g]}),
                  Node("tiled", "broadcast_to", ["row"], {"shape": [m // g, g]}),
                  Node("flat", "reshape", ["tiled"], {"shape": [m]})]
        prev = "flat"
    prev = _chain(nodes, prev, "b")
    nodes.append(Node("y", "neg", [prev]))
    return Graph([Input("x", "float64", [n])], nodes, ["y"], {"c": np.float64(0.9)})


def mlp(n, m, rng):
    consts = {"U": rng.standard_normal((HIDDEN, n)) / math.sqrt(n),
              "b": rng.standard_normal(HIDDEN) * 0.1,
              "V": rng.standard_normal((m, HIDDEN)) / math.sqrt(HIDDEN),
              "d": rng.standard_normal(m) * 0.1}
    return Graph([Input("x", "float64", [n])],
                 [Node("u", "matmul", ["U", "x"]), Node("ub", "add", ["u", "b"]),
                  Node("h", "tanh", ["ub"]), Node("v", "matmul", ["V", "h"]),
                  Node("y", "add", ["v", "d"])], ["y"], consts)


FAMILIES = {"tanh(Wx)": tanh_wx, "chain": chain, "mlp": mlp}


# --- measuring one shape -----------------------------------------------------------

def fit_line(ks, ts):
    """Least-squares a, b of t ~= a + b * k."""
    if len(set(ks)) < 2:
        return ts[0], 0.0
    b, a = np.polyfit(np.asarray(ks, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def k_values(K):
    return sorted({1, max(1, K // 2), K})


# Seconds (both Jacobians of a shape, once): above it a shape is "heavy" and is
# measured with fewer k values and repeats, to keep the run within minutes.
HEAVY = 0.1


# b_rev / b_fwd is only meaningful where the directions are a fair part of the
# cost: below this share of the sweep's time (b*K / (a + b*K)), it is noise.
MIN_DIRECTION_SHARE = 0.25


def measure_shape(family, n, m, settings, rng):
    plan = compile(FAMILIES[family](n, m, rng))
    x = rng.standard_normal(n) * 0.5
    inputs = {"x": x}

    # The two modes must agree before their times mean anything.
    start = time.perf_counter()
    jf = plan.jacobian(inputs, mode="forward").jacobian["y", "x"]
    jr = plan.jacobian(inputs, mode="reverse").jacobian["y", "x"]
    agree = float(np.max(np.abs(jf - jr)))
    # A heavy shape (both Jacobians together over HEAVY seconds) gets the two
    # end points of the k sweep only and the minimum number of repeats.
    heavy = time.perf_counter() - start > HEAVY
    if heavy:
        settings = T.Settings(repeat=7, target=settings.target, quick=settings.quick)

    def ks(K):
        return [1, K] if heavy and K > 1 else k_values(K)
    tan = {k: rng.standard_normal((k, n)) for k in ks(n)}
    cot = {k: rng.standard_normal((k, m)) for k in ks(m)}
    funcs = {"jac forward": lambda: plan.jacobian(inputs, mode="forward"),
             "jac reverse": lambda: plan.jacobian(inputs, mode="reverse")}
    for k, t in tan.items():
        funcs[f"jvp k={k}"] = lambda t=t: plan.jvp(inputs, {"x": t})
    for k, g in cot.items():
        funcs[f"vjp k={k}"] = lambda g=g: plan.vjp(inputs, {"y": g}, wrt=("x",))

    t = T.measure(funcs, settings)
    a_f, b_f = fit_line(list(tan), [t[f"jvp k={k}"].median for k in tan])
    a_r, b_r = fit_line(list(cot), [t[f"vjp k={k}"].median for k in cot])
    share_f = b_f * n / (a_f + b_f * n)
    share_r = b_r * m / (a_r + b_r * m)
    return {"family": family, "n": n, "m": m,
            "t_forward": t["jac forward"].median, "t_reverse": t["jac reverse"].median,
            "a_fwd": a_f, "b_fwd": b_f, "a_rev": a_r, "b_rev": b_r,
            "b_ratio": b_r / b_f if b_f > 0 else float("nan"),
            "direction_share_fwd": share_f, "direction_share_rev": share_r,
            "b_ratio_reliable": bool(b_f > 0 and b_r > 0 and min(share_f, share_r)
                                     >= MIN_DIRECTION_SHARE),
            "fwd_rev_max_abs_diff": agree,
            "timings": {name: tm.as_dict() for name, tm in t.items()}}


# --- analysis --------------------------------------------------------------------------

def ratio_cell(case):
    text = f"{case['b_ratio']:.2f}"
    return text if case["b_ratio_reliable"] else f"({text})"


def median_ratio(cases):
    good = [cs["b_ratio"] for cs in cases if cs["b_ratio_reliable"]]
    return statistics.median(good) if good else float("nan")


def choice(case, c):
    """The mode the engine's planner picks with REVERSE_COST_RATIO = c."""
    return planner.plan_mode(case["n"], case["m"], ratio=c).mode


def best(case):
    return "forward" if case["t_forward"] <= case["t_reverse"] else "reverse"


def cost(case, mode):
    return case["t_forward"] if mode == "forward" else case["t_reverse"]


def slowdown(case, c):
    """Time of the mode c picks over the faster mode's (1.0 = picked the faster)."""
    return cost(case, choice(case, c)) / cost(case, best(case))


# A pick within 2% of the faster mode is a tie: the repeats are noisier than that.
TIE = 1.02


def slower(case, c) -> bool:
    return slowdown(case, c) > TIE


def score(cases, c):
    s = [slowdown(case, c) for case in cases]
    wrong = [x for x in s if x > TIE]
    return {"c": c, "wrong": len(wrong), "cases": len(cases),
            "worst": max(s), "geomean": math.exp(statistics.fmean(math.log(x) for x in s)),
            "time_over_best": sum(cost(cs, choice(cs, c)) for cs in cases)
            / sum(cost(cs, best(cs)) for cs in cases)}


def crossover(cases):
    """n/m where the two modes cost the same for one family and n: a least-squares
    line through log(t_fwd / t_rev) against log(n / m), solved for zero (robust
    to one noisy shape). A string when it lies outside the measured range."""
    r = np.log([cs["n"] / cs["m"] for cs in cases])
    d = np.log([cs["t_forward"] / cs["t_reverse"] for cs in cases])
    slope, icpt = np.polyfit(r, d, 1)
    lo, hi = math.exp(r.min()), math.exp(r.max())
    if (d < 0).all():
        return f"> {hi:.3g}"  # forward faster everywhere measured
    if (d > 0).all():
        return f"< {lo:.3g}"  # reverse faster everywhere measured
    if slope <= 0:  # forward does not get relatively dearer as n/m grows: noise
        return "unclear"
    x = math.exp(-icpt / slope)
    return f"> {hi:.3g}" if x > hi else f"< {lo:.3g}" if x < lo else x


def recommend(cases, anchor, tolerance=0.01):
    """The c to recommend, and the ranges of c that do about as well.

    Decisions only change where c crosses a measured n/m, so each interval
    between consecutive measured ratios is scored once (geometric mean over the
    cases of picked time / faster time). Intervals within `tolerance` of the
    best are equally good given the noise; of the "nice" values inside them the
    one nearest `anchor` (the measured crossover) is recommended."""
    ratios = sorted({cs["n"] / cs["m"] for cs in cases})
    # c in [lo, hi) picks forward exactly for the cases with n/m <= lo.
    intervals = [(0.0, ratios[0])] + list(zip(ratios, ratios[1:])) + [(ratios[-1], math.inf)]
    scored = []
    for lo, hi in intervals:
        probe = lo * (1 + 1e-9) if lo > 0 else hi / 2  # inside [lo, hi), clear of rounding
        scored.append((lo, hi, score(cases, probe)["geomean"]))
    best_g = min(g for _, _, g in scored)
    good = [(lo, hi) for lo, hi, g in scored if g <= best_g * (1 + tolerance)]
    merged = []
    for lo, hi in good:
        if merged and merged[-1][1] == lo:
            merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    inside = [c for c in NICE_C if any(lo <= c < hi for lo, hi in merged)]
    if inside:
        rec = min(inside, key=lambda c: abs(math.log(c / anchor)))
    else:
        lo, hi = min(merged, key=lambda iv: abs(math.log(max(iv[0], 1e-9) / anchor)))
        rec = float(f"{(lo * hi) ** 0.5 if math.isfinite(hi) and lo > 0 else max(lo, hi / 2):.2g}")
    return rec, merged


def fmt_ranges(ranges):
    parts = []
    for lo, hi in ranges:
        if lo == 0:
            parts.append(f"c < {hi:.3g}")
        elif math.isinf(hi):
            parts.append(f"c >= {lo:.3g}")
        else:
            parts.append(f"{lo:.3g} <= c < {hi:.3g}")
    return " or ".join(parts)


def main(argv=None):
    args = T.parse_args(__doc__, argv)
    settings = QUICK if args.quick else FULL
    grid = QUICK_GRID if args.quick else GRID
    current = planner.REVERSE_COST_RATIO
    clock = T.RunClock()
    print("gradserve planner calibration" + (" (--quick)" if args.quick else ""))
    env = T.print_environment(with_torch=False)
    print(f"current rule: forward iff n <= c * m with c = REVERSE_COST_RATIO = {current:g}\n")

    rng = np.random.default_rng(0)
    cases = []
    for family, per_n in grid.items():
        for n, ms in per_n.items():
            for m in ms:
                cases.append(measure_shape(family, n, m, settings, rng))

    rows = []
    for cs in cases:
        pick = choice(cs, current)
        rows.append([cs["family"], cs["n"], cs["m"], f"{cs['n'] / cs['m']:.2f}",
                     fmt(cs["t_forward"]), fmt(cs["t_reverse"]),
                     f"{cs['t_reverse'] / cs['t_forward']:.2f}",
                     fmt(cs["b_fwd"]), fmt(cs["b_rev"]), ratio_cell(cs),
                     pick, f"{slowdown(cs, current):.2f}x"
                     + (" SLOWER" if slower(cs, current) else "")])
    T.print_table(["family", "n", "m", "n/m", "fwd jac", "rev jac", "rev/fwd",
                   "b_fwd", "b_rev", "b_rev/b_fwd", f"auto c={current:g}", "pick / best"],
                  rows, title="Jacobian in each mode, and the per-direction cost b of each "
                  "mode (jvp/vjp with k directions, fit a + b*k)")
    print(f"(b_rev/b_fwd in parentheses: the directions are under "
          f"{MIN_DIRECTION_SHARE:.0%} of a sweep's time there, fixed costs dominate and the "
          "ratio is noise; left out of the medians below)\n")

    diffs = max(cs["fwd_rev_max_abs_diff"] for cs in cases)
    print(f"forward and reverse Jacobians agree to {diffs:.2g} (max abs diff over all cases)\n")

    rows, crossovers, per_family = [], [], {}
    for family, per_n in grid.items():
        fam = [cs for cs in cases if cs["family"] == family]
        per_family[family] = median_ratio(fam)
        for n in per_n:
            group = [cs for cs in fam if cs["n"] == n]
            good = [cs["b_ratio"] for cs in group if cs["b_ratio_reliable"]]
            x = crossover(group)
            if isinstance(x, float):
                crossovers.append(x)
            rows.append([family, n, x if isinstance(x, str) else f"{x:.2f}",
                         f"{statistics.median(good):.2f}" if good else "-",
                         f"{min(good):.2f}-{max(good):.2f}" if good else "-",
                         f"{len(good)} of {len(group)}"])
    T.print_table(["family", "n", "crossover n/m (equal cost)", "median b_rev/b_fwd",
                   "range", "shapes used"], rows,
                  title="Where the modes cost the same: forward is faster below the crossover")

    b_all = median_ratio(cases)
    cross_med = statistics.median(crossovers) if crossovers else float("nan")
    anchor = cross_med if crossovers else b_all
    rec, good = recommend(cases, anchor)
    candidates = sorted(set(NICE_C) | {current, rec})
    rows = []
    for c in candidates:
        s = score(cases, c)
        rows.append([f"{c:g}" + (" (current)" if c == current else "")
                     + (" (recommended)" if c == rec else ""),
                     f"{s['wrong']} of {s['cases']}", f"{s['worst']:.2f}x",
                     f"{s['geomean']:.3f}x", f"{s['time_over_best']:.3f}x"])
    T.print_table(["c", "slower mode picked (by > 2%)", "worst pick / best",
                   "geomean pick / best", "total time / best"], rows,
                  title="Choices each c makes on the measured cases")

    cur = score(cases, current)
    wrong_cases = [cs for cs in cases if slower(cs, current)]
    print(f"With c = {current:g} (current): auto picked the slower mode (by more than 2%) in "
          f"{cur['wrong']} of {cur['cases']} cases" + (":" if wrong_cases else "."))
    for cs in sorted(wrong_cases, key=lambda cs: -slowdown(cs, current)):
        print(f"  {cs['family']} n={cs['n']} m={cs['m']}: picked {choice(cs, current)}, "
              f"{slowdown(cs, current):.2f}x the time of {best(cs)} "
              f"({fmt(cost(cs, choice(cs, current)))} vs {fmt(cost(cs, best(cs)))})")
    rs = score(cases, rec)
    left = sorted((cs for cs in cases if slower(cs, rec)), key=lambda cs: -slowdown(cs, rec))
    if left:
        print(f"With c = {rec:g} (recommended), the slower mode is still picked for: "
              + "; ".join(f"{cs['family']} n={cs['n']} m={cs['m']} {slowdown(cs, rec):.2f}x"
                          for cs in left))
        small = [cs for cs in left if not cs["b_ratio_reliable"]]
        if small:
            fixed = [cs for cs in cases if not cs["b_ratio_reliable"]]
            a_f = statistics.median(cs["a_fwd"] for cs in fixed)
            a_r = statistics.median(cs["a_rev"] for cs in fixed)
            print(f"  ({len(small)} of these are shapes where fixed costs dominate (b_rev/b_fwd "
                  f"in parentheses above): a sweep's fixed cost a decides there, median "
                  f"{fmt(a_r)} reverse against {fmt(a_f)} forward, so forward tends to win "
                  "whatever n/m; a ratio c cannot express a fixed cost)")
    used = sum(1 for cs in cases if cs["b_ratio_reliable"])
    print(f"per-direction cost b_rev/b_fwd: median {b_all:.2f} over {used} shapes ("
          + ", ".join(f"{f} {v:.2f}" for f, v in per_family.items()) + "); "
          f"measured crossovers n/m: median {cross_med:.2f} "
          f"({', '.join(f'{x:.2f}' for x in sorted(crossovers))})")
    print(f"CONCLUSION: recommended c = {rec:g} (REVERSE_COST_RATIO is {current:g}): "
          f"{fmt_ranges(good)} picks as well as any c on these cases (geomean within 1%); "
          f"with c = {rec:g} auto picks the slower mode in {rs['wrong']} of {rs['cases']} cases "
          f"(worst {rs['worst']:.2f}x, geomean {rs['geomean']:.3f}x) against {cur['wrong']} "
          f"(worst {cur['worst']:.2f}x, geomean {cur['geomean']:.3f}x) with c = {current:g}.")

    run = clock.print_summary()
    if args.json:
        T.write_json(args.json, {
            "benchmark": "bench_planner", "quick": args.quick, "environment": env,
            "settings": vars(settings), "reverse_cost_ratio": current, "cases": cases,
            "per_family_b_ratio": per_family, "median_b_ratio": b_all,
            "crossovers": crossovers, "recommended_c": rec,
            "good_c_ranges": [[lo, hi if math.isfinite(hi) else None] for lo, hi in good],
            "scores": [score(cases, c) for c in candidates], "run": run})
    return 0


if __name__ == "__main__":
    sys.exit(main())
