"""P10: Hessian-vector products (forward-over-reverse) against gradients, and against
PyTorch's torch.func.jvp(torch.func.grad(f)), in the same run.

Three scalar losses, engine alone (no gRPC):
(a) the MLP 784-256-256-10 (tanh, log_softmax cross-entropy), batch 128, with respect
    to its six parameters;
(b) a 100-op scalar chain (sin, mul, tanh, add, sigmoid, square, repeated);
(c) sum(tanh(W x)) with n = 1000, with respect to W and x.

For each: the gradient (one reverse sweep, Plan.vjp), one HVP (Plan.hvp, one
direction), 8 batched HVPs, and PyTorch's gradient and HVP on the same function in
the same dtype. Goals: HVP / gradient <= 3x, and HVP / PyTorch's HVP <= 1x. The
measured HVP / gradient ratios calibrate engine.planner.HVP_COST_RATIO. Prints
figures and ratios; asserts nothing about time.

    python bench/bench_second_order.py [--threads N] [--quick] [--json PATH]
"""

from __future__ import annotations

import statistics

import _timing  # noqa: F401  (first: OMP_WAIT_POLICY before numpy/torch load)
from _timing import (RunClock, fmt_time, load_torch, measure, noise_note, parse_args,
                     print_environment, print_table, ratio_line, torch_skip_message,
                     write_json)

import numpy as np

from gradserve.engine import HVP_COST_RATIO, Graph, Input, Node, compile

DTYPE = "float32"
K_BATCH = 8


class Case:
    """A scalar loss as an engine graph and as a torch function of the same inputs."""

    def __init__(self, name, graph, inputs, wrt, torch_loss):
        self.name, self.plan, self.inputs, self.wrt = name, compile(graph), inputs, wrt
        self.torch_loss = torch_loss  # (params tuple, fixed dict) -> scalar tensor
        rng = np.random.default_rng(1)
        self.vectors = {w: rng.standard_normal(inputs[w].shape).astype(DTYPE) for w in wrt}
        self.batch = {w: rng.standard_normal((K_BATCH,) + inputs[w].shape).astype(DTYPE)
                      for w in wrt}
        self.one = {"L": np.ones((), DTYPE)}


def mlp_case(rng) -> Case:
    sizes = [784, 256, 256, 10]
    batch = 128
    inputs = {"X": rng.standard_normal((batch, 784)).astype(DTYPE),
              "Y": np.eye(10, dtype=DTYPE)[rng.integers(0, 10, batch)]}
    nodes, h = [], "X"
    wrt = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w, bias = f"W{i}", f"b{i}"
        inputs[w] = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(DTYPE)
        inputs[bias] = np.zeros(b, DTYPE)
        wrt += [w, bias]
        nodes += [Node(f"m{i}", "matmul", [h, w]), Node(f"z{i}", "add", [f"m{i}", bias])]
        h = f"z{i}"
        if i < 2:
            nodes.append(Node(f"h{i}", "tanh", [h]))
            h = f"h{i}"
    nodes += [Node("lp", "log_softmax", [h]), Node("ly", "mul", ["lp", "Y"]),
              Node("s", "sum", ["ly"]), Node("L", "mul", ["s", "scale"])]
    graph = Graph([Input(n, DTYPE, v.shape) for n, v in inputs.items()], nodes, ["L"],
                  {"scale": np.array(-1.0 / batch, DTYPE)})

    def torch_loss(params, fixed):
        import torch
        w0, b0, w1, b1, w2, b2 = params
        h = torch.tanh(fixed["X"] @ w0 + b0)
        h = torch.tanh(h @ w1 + b1)
        z = h @ w2 + b2
        return -(torch.log_softmax(z, dim=-1) * fixed["Y"]).sum() / batch
    return Case("(a) MLP 784-256-256-10, batch 128", graph, inputs, wrt, torch_loss)


CHAIN_OPS = ["sin", "mul", "tanh", "add", "sigmoid", "square"]


def chain_case(rng) -> Case:
    inputs = {"x": np.array(0.7, DTYPE)}
    nodes, h = [], "x"
    for i in range(100):
        op = CHAIN_OPS[i % len(CHAIN_OPS)]
        name = "L" if i == 99 else f"c{i}"
        nodes.append(Node(name, op, [h, "x"] if op in ("mul", "add") else [h]))
        h = name
    graph = Graph([Input("x", DTYPE, ())], nodes, ["L"])

    def torch_loss(params, fixed):
        import torch
        (x,) = params
        h = x
        for i in range(100):
            op = CHAIN_OPS[i % len(CHAIN_OPS)]
            h = {"sin": torch.sin, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
                 "square": torch.square, "mul": lambda v: v * x,
                 "add": lambda v: v + x}[op](h)
        return h
    return Case("(b) 100-op scalar chain", graph, inputs, ["x"], torch_loss)


def tanh_case(rng) -> Case:
    n = 1000
    inputs = {"W": (rng.standard_normal((n, n)) / np.sqrt(n)).astype(DTYPE),
              "x": rng.standard_normal(n).astype(DTYPE)}
    graph = Graph([Input("W", DTYPE, (n, n)), Input("x", DTYPE, (n,))],
                  [Node("h", "matmul", ["W", "x"]), Node("t", "tanh", ["h"]),
                   Node("L", "sum", ["t"])], ["L"])

    def torch_loss(params, fixed):
        import torch
        w, x = params
        return torch.tanh(w @ x).sum()
    return Case("(c) sum(tanh(W x)), n = 1000", graph, inputs, ["W", "x"], torch_loss)


def torch_funcs(case, torch):
    fixed = {k: torch.from_numpy(v) for k, v in case.inputs.items() if k not in case.wrt}
    params = tuple(torch.from_numpy(case.inputs[w]) for w in case.wrt)
    tangents = tuple(torch.from_numpy(case.vectors[w]) for w in case.wrt)

    def f(p):
        return case.torch_loss(p, fixed)
    grad = torch.func.grad(f)

    def hvp():
        return torch.func.jvp(grad, (params,), (tangents,))[1]
    return {"torch gradient": lambda: grad(params), "torch HVP": hvp,
            "check": lambda: (grad(params), hvp())}


def check_against_torch(case, torch):
    """The engine's gradient and HVP equal PyTorch's (float32 tolerance)."""
    grads, hv = torch_funcs(case, torch)["check"]()
    ours = case.plan.hvp(case.inputs, case.vectors, of="L", wrt=case.wrt)
    worst = 0.0
    for w, g, h in zip(case.wrt, grads, hv):
        for mine, theirs in ((ours.gradient[w], g.numpy()), (ours.hvp[w], h.numpy())):
            scale = max(float(np.max(np.abs(theirs))), 1e-6)
            worst = max(worst, float(np.max(np.abs(mine - theirs))) / scale)
    return worst


def main(argv=None):
    args = parse_args(__doc__, argv, extra=lambda p: p.add_argument(
        "--threads", type=int, default=1,
        help="BLAS threads for numpy and torch alike (default 1, as `gradserve serve "
        "--blas-threads`: two threads on a busy 2-core machine make products erratic)"))
    from threadpoolctl import threadpool_limits
    threadpool_limits(limits=args.threads, user_api="blas")
    torch = load_torch()
    if torch is not None:
        torch.set_num_threads(args.threads)
    clock = RunClock()
    print_environment()
    print(f"threads: {args.threads} (numpy's BLAS and torch)")
    print()
    rng = np.random.default_rng(0)
    cases = [mlp_case(rng), chain_case(rng), tanh_case(rng)]
    record = {"cases": {}, "lines": []}
    ratios = []
    for case in cases:
        plan, inputs, wrt = case.plan, case.inputs, case.wrt
        funcs = {
            "gradient": lambda: plan.vjp(inputs, case.one, wrt=wrt),
            "HVP": lambda: plan.hvp(inputs, case.vectors, of="L", wrt=wrt),
            f"{K_BATCH} HVPs batched": lambda: plan.hvp(inputs, case.batch, of="L", wrt=wrt),
        }
        agreement = None
        if torch is not None:
            tf = torch_funcs(case, torch)
            funcs["torch gradient"], funcs["torch HVP"] = tf["torch gradient"], tf["torch HVP"]
            agreement = check_against_torch(case, torch)
        t = measure(funcs, args.settings)
        grad = t["gradient"].median
        rows = [(name, fmt_time(v.median), f"{v.median / grad:.2f}",
                 f"{100 * v.spread:.0f}%") for name, v in t.items()]
        print_table(["", "median", "/ gradient", "spread"], rows, title=case.name)
        if agreement is not None:
            print(f"  engine vs torch, gradient and HVP: max relative difference "
                  f"{agreement:.1e}")
        hvp_ratio = t["HVP"].median / grad
        ratios.append(hvp_ratio)
        record["lines"].append(ratio_line(
            f"P10 {case.name} HVP / gradient", t["HVP"].median, grad, 3.0,
            baseline_name="gradient", note=noise_note(t["HVP"], t["gradient"])))
        record["lines"].append(ratio_line(
            f"P10 {case.name} HVP vs torch.func", t["HVP"].median,
            t["torch HVP"].median if "torch HVP" in t else None, 1.0,
            skipped=None if torch is not None else torch_skip_message(),
            note=noise_note(t["HVP"], t.get("torch HVP"))))
        per_direction = t[f"{K_BATCH} HVPs batched"].median / K_BATCH / grad
        print(f"  {K_BATCH} batched HVPs: {per_direction:.2f} gradients per direction")
        print()
        record["cases"][case.name] = {"timings": t, "hvp_over_gradient": hvp_ratio,
                                      "batched_per_direction": per_direction,
                                      "torch_agreement": agreement}
    print(f"HVP / gradient over the three cases: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}, max {max(ratios):.2f} "
          f"(engine.planner.HVP_COST_RATIO = {HVP_COST_RATIO:g})")
    record["run"] = clock.print_summary()
    if args.json:
        write_json(args.json, record)


if __name__ == "__main__":
    main()
