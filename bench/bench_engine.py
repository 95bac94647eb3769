"""Engine benchmarks P1-P4: gradserve.engine against PyTorch eager and hand-written numpy.

What is measured (all through a compiled Plan, inputs already numpy arrays):

  P1  seed gradient: o = (x + y) * sin(x), float32 shape [1]. plan.jacobian
      (mode "auto"), plan.vjp and plan.evaluate, against PyTorch eager (build
      the leaf tensors from the numpy inputs with requires_grad, forward,
      backward, gradients back as numpy, every call) and hand-written numpy.
                                                target: jacobian <= 0.40x torch
  P2  a 100-op elementwise chain on a float64 scalar (shape ()), cycling sin,
      tanh, mul by the constant 0.9, cos, sigmoid, add the constant 0.9;
      forward + backward = plan.jacobian(mode="reverse"), reported per op,
      against the same chain in torch eager and a hand-written numpy closure
      tape (no graph).                          target: <= 0.35x torch per op
      (issue 18's goal: <= 0.25x; P1's: <= 0.15x). Also printed: where an op's
      time goes, the op rules' own calls against the interpreter's share.
  P3  MLP 784-256-256-10, batch 128, float32, softmax cross-entropy on one-hot
      labels (log_softmax, mul, sum over axis 1, mean, neg); the loss gradient
      wrt all weights and biases by plan.vjp, against the hand-written numpy
      forward + backward (and torch eager, for reference). The gradients are
      checked against numpy (max abs diff).    target: <= 1.15x numpy
  P4  Jacobian of tanh(W x), float64, W a graph constant, (n, m) = (1000, 10)
      and (10, 1000): engine "auto" against forced "forward" and "reverse"
      (target: auto <= 1.10x the better fixed mode) and against
      torch.autograd.functional.jacobian with its best strategy among
      reverse-mode (vectorize False and True) and forward-mode (vectorize True)
      (target: <= 0.50x). Every Jacobian is checked against the closed form
      (1 - tanh(W x)**2)[:, None] * W.

Figures are medians of >= 7 repeats, the repeats of the things compared
interleaved (bench/_timing.py); ratios are taken within this run only, since
the machine is shared, and the run's load average is printed at the end (P3
is BLAS-bound and suffers most when other processes compete for the CPUs).
The BLAS kernel in use and OPENBLAS_CORETYPE are printed first. Nothing here
asserts on time: a target missed prints NOT MET. The exit status is 1 only if
a correctness check fails.

Run from the repository root (torch is optional: pip install -e '.[bench]'):

    python bench/bench_engine.py              # about a minute
    python bench/bench_engine.py --quick      # about 10 seconds
    python bench/bench_engine.py --json out.json
    python bench/bench_engine.py --only P3,P4

On a busy machine (another process keeping a CPU busy) OpenBLAS's two
threads make P3 10-80x slower and erratic (a matrix product waits for its
descheduled worker thread), while torch's passive OpenMP threads cope; with
OPENBLAS_NUM_THREADS=1 in the environment P3 stays steady there. The BLAS
line printed first shows the thread count in use.
"""

from __future__ import annotations

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _timing as T  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)
import numpy as np  # noqa: E402

from gradserve.engine import Graph, Input, Node, compile  # noqa: E402

torch = T.load_torch()
fmt = T.fmt_time


def record_target(*args, **kwargs) -> dict:
    """A target's figures; the ratio lines are printed together at the end."""
    return T.ratio_line(*args, echo=False, **kwargs)


class Checks:
    """Correctness checks (not timing): printed, recorded, and decide the exit status."""

    def __init__(self):
        self.records = []

    def __call__(self, what: str, diff: float, tol: float) -> None:
        ok = bool(diff <= tol)
        self.records.append({"check": what, "diff": float(diff), "tol": tol, "ok": ok})
        print(f"  check {what}: {diff:.3g} (tolerance {tol:g}) {'ok' if ok else 'MISMATCH'}")

    @property
    def failed(self):
        return [r for r in self.records if not r["ok"]]


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rows_of(timings, per=1.0, note=None):
    note = note or {}
    return [[name, fmt(t.median / per), fmt(t.min / per), f"{100 * t.spread:.0f}%",
             f"{t.repeat}x{t.number}", note.get(name, "")] for name, t in timings.items()]


# spread: interquartile range of the repeats over their median (noise indicator)
HEADERS = ["measurement", "median", "min", "spread", "repeats x calls", "note"]


# --- P1 ---------------------------------------------------------------------------

def bench_p1(settings, checks):
    graph = Graph([Input("x", "float32", [1]), Input("y", "float32", [1])],
                  [Node("s", "add", ["x", "y"]), Node("sx", "sin", ["x"]),
                   Node("o", "mul", ["s", "sx"])], ["o"])
    plan = compile(graph)
    x = np.float32([np.pi])
    y = np.float32([np.pi])
    inputs = {"x": x, "y": y}
    one = np.float32([1.0])

    def numpy_hand():
        s = x + y
        sx = np.sin(x)
        return s * sx, sx + s * np.cos(x), sx  # o, do/dx, do/dy

    funcs = {
        "engine jacobian (auto)": lambda: plan.jacobian(inputs),
        "engine vjp": lambda: plan.vjp(inputs, {"o": one}),
        "engine evaluate (no derivative)": lambda: plan.evaluate(inputs),
        "numpy hand-written": numpy_hand,
    }
    if torch is not None:
        def torch_eager():
            xt = torch.tensor(x, requires_grad=True)
            yt = torch.tensor(y, requires_grad=True)
            o = (xt + yt) * torch.sin(xt)
            o.backward()
            return xt.grad.numpy(), yt.grad.numpy()
        funcs["torch eager"] = torch_eager

    r = plan.jacobian(inputs)
    v = plan.vjp(inputs, {"o": one})
    _, ref_dx, ref_dy = numpy_hand()
    print("P1  seed gradient o = (x + y) * sin(x), float32 [1], x = y = pi")
    print(f"  auto mode: {r.mode} ({r.decision.reason})")
    checks("P1 jacobian vs numpy", max(max_abs(r.jacobian["o", "x"][0], ref_dx),
                                       max_abs(r.jacobian["o", "y"][0], ref_dy)), 1e-6)
    checks("P1 vjp vs numpy", max(max_abs(v.cotangents["x"], ref_dx),
                                  max_abs(v.cotangents["y"], ref_dy)), 1e-6)
    if torch is not None:
        gx, gy = funcs["torch eager"]()
        checks("P1 torch vs numpy", max(max_abs(gx, ref_dx), max_abs(gy, ref_dy)), 1e-6)

    t = T.measure(funcs, settings)
    T.print_table(HEADERS, rows_of(t, note={
        "engine jacobian (auto)": f"{r.mode} mode, the P1 figure",
        "torch eager": "tensors with requires_grad + forward + backward"}))
    base = t["torch eager"].median if torch is not None else None
    note = T.noise_note(t["engine jacobian (auto)"], t.get("torch eager"))
    targets = [record_target("P1 seed gradient", t["engine jacobian (auto)"].median, base,
                             0.40, skipped="torch not installed", note=note),
               record_target("P1 seed gradient (issue 18's goal)",
                             t["engine jacobian (auto)"].median, base, 0.15,
                             skipped="torch not installed", note=note)]
    return {"timings": t, "mode": r.mode}, targets


# --- P2 ---------------------------------------------------------------------------

CYCLE = ("sin", "tanh", "mul", "cos", "sigmoid", "add")
CHAIN_OPS = 100
CHAIN_CONST = 0.9


def chain_graph(length=CHAIN_OPS):
    nodes, prev = [], "x"
    for i in range(length):
        op = CYCLE[i % len(CYCLE)]
        args = [prev, "c"] if op in ("mul", "add") else [prev]
        nodes.append(Node(f"n{i}", op, args))
        prev = f"n{i}"
    return Graph([Input("x", "float64", [])], nodes, [prev],
                 {"c": np.float64(CHAIN_CONST)}), prev


def numpy_chain_tape(x0, length=CHAIN_OPS):
    """Reverse mode by hand: a tape of closures, no graph, numpy scalar ufuncs."""
    c = np.float64(CHAIN_CONST)
    tape = []
    h = x0
    for i in range(length):
        op = CYCLE[i % 6]
        if op == "sin":
            tape.append(lambda g, h=h: g * np.cos(h))
            h = np.sin(h)
        elif op == "tanh":
            h = np.tanh(h)
            tape.append(lambda g, a=h: g * (1 - a * a))
        elif op == "mul":
            tape.append(lambda g: g * c)
            h = h * c
        elif op == "cos":
            tape.append(lambda g, h=h: -g * np.sin(h))
            h = np.cos(h)
        elif op == "sigmoid":
            h = 1 / (1 + np.exp(-h))
            tape.append(lambda g, a=h: g * (a * (1 - a)))
        else:
            tape.append(lambda g: g)
            h = h + c
    g = np.float64(1.0)
    for back in reversed(tape):
        g = back(g)
    return h, g


def bench_p2(settings, checks):
    graph, out = chain_graph()
    plan = compile(graph)
    x = np.float64(0.3)
    inputs = {"x": x}
    one = np.float64(1.0)
    funcs = {
        "engine jacobian (reverse)": lambda: plan.jacobian(inputs, mode="reverse"),
        "engine jacobian (auto)": lambda: plan.jacobian(inputs),
        "engine vjp": lambda: plan.vjp(inputs, {out: one}),
        "engine evaluate (no derivative)": lambda: plan.evaluate(inputs),
        "numpy hand-written closure tape": lambda: numpy_chain_tape(x),
    }
    if torch is not None:
        c = CHAIN_CONST
        table = {"sin": torch.sin, "tanh": torch.tanh, "cos": torch.cos,
                 "sigmoid": torch.sigmoid, "mul": lambda v: v * c, "add": lambda v: v + c}
        steps = [table[CYCLE[i % len(CYCLE)]] for i in range(CHAIN_OPS)]

        def torch_eager():
            xt = torch.tensor(float(x), dtype=torch.float64, requires_grad=True)
            h = xt
            for f in steps:
                h = f(h)
            h.backward()
            return xt.grad.item()
        funcs["torch eager"] = torch_eager

    print(f"P2  {CHAIN_OPS}-op elementwise chain on a float64 scalar ({', '.join(CYCLE)}; "
          f"constant {CHAIN_CONST}), forward + backward, per op")
    r = plan.jacobian(inputs, mode="reverse")
    d_engine = float(r.jacobian[out, "x"])
    _, d_hand = numpy_chain_tape(x)

    def rel(a, b):
        return abs(a - b) / max(abs(b), np.finfo(np.float64).tiny)
    checks("P2 jacobian vs numpy tape (relative)", rel(d_engine, float(d_hand)), 1e-9)
    if torch is not None:
        checks("P2 torch vs numpy tape (relative)", rel(funcs["torch eager"](), float(d_hand)),
               1e-9)
    print(f"  d out / dx = {d_engine:.6g} (auto mode: {plan.jacobian(inputs).mode})")

    t = T.measure(funcs, settings)
    T.print_table(["measurement", "median per op", "min per op", "spread", "repeats x calls",
                   "note"],
                  rows_of(t, per=CHAIN_OPS, note={
                      "engine jacobian (reverse)": "the P2 figure",
                      "torch eager": "leaf tensor + 100 ops + backward"}))
    base = t["torch eager"].median / CHAIN_OPS if torch is not None else None
    note = T.noise_note(t["engine jacobian (reverse)"], t.get("torch eager"))
    per_op = t["engine jacobian (reverse)"].median / CHAIN_OPS
    targets = [record_target("P2 100-op chain per op", per_op, base, 0.35,
                             skipped="torch not installed", note=note),
               record_target("P2 100-op chain per op (issue 18's goal)", per_op, base, 0.25,
                             skipped="torch not installed", note=note)]
    split = per_node_split(plan, inputs)
    print("  where an op's time goes (CPU time per op, fwd+bwd, best of repeats): "
          f"{fmt(split['total'])} = rules {fmt(split['eval'])} eval + {fmt(split['vjp'])} "
          f"vjp (the same calls replayed without the interpreter) + "
          f"{fmt(split['interpreter'])} interpreter and per-call setup")
    return {"timings": t, "ops": CHAIN_OPS, "per_node": split}, targets


def per_node_split(plan, inputs, repeats=15, calls=200) -> dict:
    """A reverse-mode Jacobian's CPU time per op, split into the op rules' own work (each
    step's eval and vjp called in sweep order on the values the sweep computes, no
    interpreter) and the rest (the sweeps' loops, binding, seeds, the result). CPU time
    of this process, the best of `repeats`: steadier than wall time on a shared box."""
    import time
    steps = plan.steps
    vals = plan.bind(inputs).vals
    for st in steps:
        vals[st.out] = st.eval(*[vals[i] for i in st.ins])
    forward = [(st.eval, tuple(vals[i] for i in st.ins)) for st in steps]
    g = np.ones((1,), np.float64)
    backward = [(st.vjp, tuple(vals[i] for i in st.ins), vals[st.out]) for st in reversed(steps)]

    def rules_eval():
        for f, xs in forward:
            f(*xs)

    def rules_vjp():
        for vjp, xs, ans in backward:
            vjp(0, g, xs, ans)

    def best(f):
        out = float("inf")
        for _ in range(repeats):
            start = time.process_time()
            for _ in range(calls):
                f()
            out = min(out, (time.process_time() - start) / calls)
        return out / len(steps)

    total = best(lambda: plan.jacobian(inputs, mode="reverse"))
    ev, vjp = best(rules_eval), best(rules_vjp)
    return {"total": total, "eval": ev, "vjp": vjp, "interpreter": total - ev - vjp}


# --- P3 ---------------------------------------------------------------------------

def bench_p3(settings, checks):
    rng = np.random.default_rng(0)
    B, D, H, C = 128, 784, 256, 10
    f32 = np.float32
    params = {"W1": (rng.standard_normal((D, H)) * 0.05).astype(f32), "b1": np.zeros(H, f32),
              "W2": (rng.standard_normal((H, H)) * 0.05).astype(f32), "b2": np.zeros(H, f32),
              "W3": (rng.standard_normal((H, C)) * 0.05).astype(f32), "b3": np.zeros(C, f32)}
    X = rng.standard_normal((B, D)).astype(f32)
    Y = np.eye(C, dtype=f32)[rng.integers(0, C, B)]
    ins = ([Input(k, "float32", v.shape) for k, v in params.items()]
           + [Input("X", "float32", X.shape), Input("Y", "float32", Y.shape)])
    nodes = [Node("m1", "matmul", ["X", "W1"]), Node("a1", "add", ["m1", "b1"]),
             Node("h1", "relu", ["a1"]),
             Node("m2", "matmul", ["h1", "W2"]), Node("a2", "add", ["m2", "b2"]),
             Node("h2", "relu", ["a2"]),
             Node("m3", "matmul", ["h2", "W3"]), Node("z", "add", ["m3", "b3"]),
             Node("lp", "log_softmax", ["z"], {"axis": -1}), Node("yl", "mul", ["Y", "lp"]),
             Node("s", "sum", ["yl"], {"axes": [1]}), Node("mean", "mean", ["s"]),
             Node("loss", "neg", ["mean"])]
    plan = compile(Graph(ins, nodes, ["loss"]))
    inputs = dict(params, X=X, Y=Y)
    wrt = tuple(params)
    seed = {"loss": np.ones((), f32)}

    def engine():
        return plan.vjp(inputs, seed, wrt=wrt)

    W1, b1, W2, b2, W3, b3 = (params[k] for k in ("W1", "b1", "W2", "b2", "W3", "b3"))

    def numpy_hand():
        a1 = X @ W1 + b1
        h1 = np.maximum(a1, 0)
        a2 = h1 @ W2 + b2
        h2 = np.maximum(a2, 0)
        z = h2 @ W3 + b3
        zm = z - z.max(1, keepdims=True)
        lp = zm - np.log(np.exp(zm).sum(1, keepdims=True))
        loss = -(Y * lp).sum(1).mean()
        dz = (np.exp(lp) - Y) / f32(B)
        gW3 = h2.T @ dz
        gb3 = dz.sum(0)
        dh2 = dz @ W3.T
        dh2 *= a2 > 0
        gW2 = h1.T @ dh2
        gb2 = dh2.sum(0)
        dh1 = dh2 @ W2.T
        dh1 *= a1 > 0
        gW1 = X.T @ dh1
        gb1 = dh1.sum(0)
        return loss, {"W1": gW1, "b1": gb1, "W2": gW2, "b2": gb2, "W3": gW3, "b3": gb3}

    funcs = {"engine vjp": engine, "numpy hand-written": numpy_hand}
    if torch is not None:
        tp = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in params.items()}
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)
        tlist = [tp[k] for k in wrt]

        def torch_eager():
            h1 = torch.relu(Xt @ tp["W1"] + tp["b1"])
            h2 = torch.relu(h1 @ tp["W2"] + tp["b2"])
            z = h2 @ tp["W3"] + tp["b3"]
            loss = -(Yt * torch.log_softmax(z, dim=1)).sum(1).mean()
            grads = torch.autograd.grad(loss, tlist)
            return loss.item(), {k: g.numpy() for k, g in zip(wrt, grads)}
        funcs["torch eager (reference)"] = torch_eager

    print(f"P3  MLP {D}-{H}-{H}-{C}, batch {B}, float32, softmax cross-entropy, "
          "gradient wrt all weights and biases")
    r = engine()
    loss_np, g_np = numpy_hand()
    diff = max(max_abs(r.cotangents[k], g_np[k]) for k in wrt)
    dtypes = sorted({str(r.cotangents[k].dtype) for k in wrt})
    print(f"  engine gradient dtypes: {', '.join(dtypes)}; loss {float(r.outputs['loss']):.6f}")
    checks("P3 engine vs numpy gradients, max abs diff", diff, 1e-5)
    checks("P3 engine vs numpy loss", max_abs(r.outputs["loss"], loss_np), 1e-5)
    if torch is not None:
        _, g_t = torch_eager()
        checks("P3 torch vs numpy gradients, max abs diff",
               max(max_abs(g_t[k], g_np[k]) for k in wrt), 1e-5)

    t = T.measure(funcs, settings)
    T.print_table(HEADERS, rows_of(t, note={
        "engine vjp": "the P3 figure",
        "numpy hand-written": "fused softmax-CE gradient, in-place relu masks",
        "torch eager (reference)": "persistent leaf tensors, autograd.grad"}))
    targets = [record_target("P3 MLP fwd+bwd", t["engine vjp"].median,
                             t["numpy hand-written"].median, 1.15, baseline_name="numpy",
                             note=T.noise_note(t["engine vjp"], t["numpy hand-written"]))]
    if torch is not None:
        print(f"  (reference: engine / torch eager = "
              f"{t['engine vjp'].median / t['torch eager (reference)'].median:.2f}x, "
              f"numpy / torch eager = "
              f"{t['numpy hand-written'].median / t['torch eager (reference)'].median:.2f}x)")
    return {"timings": t, "max_abs_diff": diff}, targets


# --- P4 ---------------------------------------------------------------------------

def bench_p4(settings, checks):
    rng = np.random.default_rng(0)
    results, targets = {}, []
    print("P4  Jacobian of tanh(W x), float64, W a graph constant")
    for n, m in ((1000, 10), (10, 1000)):
        W = rng.standard_normal((m, n)) / np.sqrt(n)
        x = rng.standard_normal(n)
        plan = compile(Graph([Input("x", "float64", [n])],
                             [Node("h", "matmul", ["W", "x"]), Node("y", "tanh", ["h"])],
                             ["y"], {"W": W}))
        inputs = {"x": x}
        closed = (1 - np.tanh(W @ x) ** 2)[:, None] * W
        print(f"  n={n} inputs, m={m} outputs")
        auto = plan.jacobian(inputs)
        print(f"  auto mode: {auto.mode} ({auto.decision.reason})")
        for mode in ("auto", "forward", "reverse"):
            J = plan.jacobian(inputs, mode=mode).jacobian["y", "x"]
            checks(f"P4 ({n}, {m}) engine {mode} vs closed form", max_abs(J, closed), 1e-12)

        funcs = {
            "engine auto": lambda: plan.jacobian(inputs),
            "engine forward": lambda: plan.jacobian(inputs, mode="forward"),
            "engine reverse": lambda: plan.jacobian(inputs, mode="reverse"),
            "numpy closed form": lambda: (1 - np.tanh(W @ x) ** 2)[:, None] * W,
        }
        strategies = []
        if torch is not None:
            Wt, xt = torch.from_numpy(W), torch.from_numpy(x)
            jac = torch.autograd.functional.jacobian

            def f(v):
                return torch.tanh(Wt @ v)
            for strategy, vectorize in (("reverse-mode", False), ("reverse-mode", True),
                                        ("forward-mode", True)):
                name = f"torch jacobian {strategy}, vectorize={vectorize}"
                call = (lambda s=strategy, v=vectorize:
                        jac(f, xt, strategy=s, vectorize=v).numpy())
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # vmap's "experimental" notices
                    try:
                        Jt = call()
                    except Exception as e:  # a strategy this torch does not support
                        print(f"  {name}: failed ({type(e).__name__}: {e}); left out")
                        continue
                checks(f"P4 ({n}, {m}) {name} vs closed form", max_abs(Jt, closed), 1e-12)
                funcs[name] = call
                strategies.append(name)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = T.measure(funcs, settings)
        best_fixed = min(("engine forward", "engine reverse"), key=lambda k: t[k].median)
        best_torch = min(strategies, key=lambda k: t[k].median) if strategies else None
        T.print_table(HEADERS, rows_of(t, note={
            "engine auto": f"picked {auto.mode}",
            best_fixed: "better fixed mode",
            **({best_torch: "best torch strategy"} if best_torch else {})}))
        targets.append(record_target(
            f"P4 (n={n}, m={m}) auto vs better fixed mode", t["engine auto"].median,
            t[best_fixed].median, 1.10, baseline_name=best_fixed.replace("engine ", ""),
            note=T.noise_note(t["engine auto"], t[best_fixed])))
        targets.append(record_target(
            f"P4 (n={n}, m={m}) auto vs best torch jacobian", t["engine auto"].median,
            t[best_torch].median if best_torch else None, 0.50,
            note=T.noise_note(t["engine auto"], t[best_torch] if best_torch else None),
            baseline_name=("torch " + best_torch.split("jacobian ")[1]) if best_torch
            else "torch", skipped="torch not installed"))
        results[f"n={n},m={m}"] = {"timings": t, "auto_mode": auto.mode,
                                   "best_fixed": best_fixed, "best_torch": best_torch}
    return results, targets


def main(argv=None):
    def only(parser):
        parser.add_argument("--only", metavar="P1,P3", default="P1,P2,P3,P4",
                            help="run only these benchmarks (comma-separated)")
    args = T.parse_args(__doc__, argv, only)
    wanted = {w.strip().upper() for w in args.only.split(",") if w.strip()}
    clock = T.RunClock()
    print("gradserve engine benchmarks" + (" (--quick)" if args.quick else ""))
    env = T.print_environment()
    if torch is None:
        print(T.torch_skip_message() + "\n")
    checks = Checks()
    sections, targets = {}, []
    for key, bench in (("P1", bench_p1), ("P2", bench_p2), ("P3", bench_p3), ("P4", bench_p4)):
        if key not in wanted:
            continue
        data, lines = bench(args.settings, checks)
        sections[key] = data
        targets += lines
        print()

    print("Targets (ratios measured in this run; medians)")
    for rec in targets:
        T.ratio_line(rec["name"], rec["value"], rec["baseline"], rec["target"], rec["better"],
                     baseline_name=rec["baseline_name"], skipped="torch not installed",
                     note=rec["note"])
    met = sum(1 for r in targets if r["met"])
    measured = sum(1 for r in targets if r["met"] is not None)
    print(f"{met} of {measured} targets met"
          + (f", {len(targets) - measured} skipped" if measured < len(targets) else ""))
    if checks.failed:
        print("CORRECTNESS CHECKS FAILED: " + "; ".join(r["check"] for r in checks.failed))
    run = clock.print_summary()

    if args.json:
        T.write_json(args.json, {"benchmark": "bench_engine", "quick": args.quick,
                                 "environment": env, "settings": vars(args.settings),
                                 "sections": sections, "targets": targets, "run": run,
                                 "checks": checks.records})
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
