"""What the kept residuals save a PyTorch training step through the bridge.

A PyTorch model whose loss is a remote graph (gradserve.client.torch.remote_function):
each step is one Evaluate (forward) and one VJP (backward). With the residuals kept
(the default), the VJP sends a handle and the server runs only the reverse sweep;
without them, the server runs the forward sweep a second time. Measured on
(a) the MLP 784-256-256-10, batch 128, softmax cross-entropy (P3's model), and
(b) the MLP 64-64-64-10, batch 64, the training benchmark's model, against a
`gradserve serve` process on loopback, with the two ways interleaved round by round
(bench/_timing.py). Also printed: the server's CPU time per step, read from /proc.

    python bench/bench_bridge.py [--quick] [--json out.json]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import _timing as T  # noqa: E402  (sets OMP_WAIT_POLICY before torch is imported)
import numpy as np  # noqa: E402

from gradserve.client import Client, GraphBuilder  # noqa: E402
from support.process_stats import cpu_seconds  # noqa: E402
from support.server_process import ServerProcess  # noqa: E402


def mlp_graph(sizes, batch):
    g = GraphBuilder()
    x = g.input("x", "float32", [batch, sizes[0]])
    y = g.input("y", "float32", [batch, sizes[-1]])
    h = x
    params = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        w, bias = g.input(f"w{i}", "float32", [a, b]), g.input(f"b{i}", "float32", [b])
        params += [(f"w{i}", (a, b)), (f"b{i}", (b,))]
        h = h @ w + bias
        if i < len(sizes) - 2:
            h = g.relu(h)
    g.output("loss", -g.mean(g.sum(g.log_softmax(h, axis=1) * y, axes=[1])))
    return g, params


def main(argv=None) -> int:
    args = T.parse_args(__doc__.splitlines()[0], argv)
    settings = T.QUICK if args.quick else T.FULL
    torch = T.load_torch()
    if torch is None:
        print(T.torch_skip_message())
        return 0
    from gradserve.client import _remote
    from gradserve.client.torch import remote_function

    T.print_environment()
    results = {}
    with ServerProcess("--port", "0") as server:
        address = server.wait_serving()
        with Client(address, timeout=60) as client:
            for label, sizes, batch in (("MLP 784-256-256-10, batch 128", (784, 256, 256, 10), 128),
                                        ("MLP 64-64-64-10, batch 64", (64, 64, 64, 10), 64)):
                g, shapes = mlp_graph(sizes, batch)
                f = remote_function(client, g)
                rng = np.random.default_rng(0)
                params = [torch.tensor(rng.standard_normal(s).astype(np.float32) * 0.05,
                                       requires_grad=True) for _, s in shapes]
                x = torch.tensor(rng.standard_normal((batch, sizes[0])).astype(np.float32))
                y = torch.tensor(np.eye(sizes[-1], dtype=np.float32)[rng.integers(0, sizes[-1], batch)])
                names = [n for n, _ in shapes]

                def step():
                    loss = f(x=x, y=y, **dict(zip(names, params)))
                    loss.backward()
                    for p in params:
                        p.grad = None

                evaluate = _remote.RemoteGraph.evaluate

                def step_recompute():
                    _remote.RemoteGraph.evaluate = lambda self, values, keep=False: evaluate(
                        self, values, False)
                    try:
                        step()
                    finally:
                        _remote.RemoteGraph.evaluate = evaluate

                timings = T.measure({"kept residuals": step, "recomputed": step_recompute},
                                    settings)
                cpu = {}
                for name, fn in (("kept residuals", step), ("recomputed", step_recompute)):
                    before = cpu_seconds(server.proc.pid)
                    for _ in range(50):
                        fn()
                    cpu[name] = (cpu_seconds(server.proc.pid) - before) / 50
                rows = [(name, T.fmt_time(t.median), T.fmt_time(cpu[name]))
                        for name, t in timings.items()]
                T.print_table(("step", "median per step", "server CPU per step"), rows,
                              title=f"\n{label}: a training step through the PyTorch bridge")
                saving = timings["kept residuals"].median / timings["recomputed"].median
                print(f"kept / recomputed step time: {saving:.2f}x; server CPU "
                      f"{cpu['kept residuals'] / cpu['recomputed']:.2f}x")
                results[label] = {"kept": timings["kept residuals"].median,
                                  "recomputed": timings["recomputed"].median,
                                  "server_cpu_kept": cpu["kept residuals"],
                                  "server_cpu_recomputed": cpu["recomputed"]}
        server.stop()
    if args.json:
        T.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
