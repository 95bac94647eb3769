"""P12: a gradient with respect to every parameter of a resnet50-sized model (25.5M
float32 parameters, ~102 MB) through the Client, against a `gradserve serve` process
with its default settings, vs the same forward and backward pass in local PyTorch.

    python bench/bench_big_model.py [--quick] [--experiments] [--json PATH]

The model: an MLP 1024-4096-4096-1100 (ReLU, softmax cross-entropy), 25,486,412
parameters, batch 32. gradserve's path: the parameters are put once in chunks
(Client.put, timed apart), then each gradient is one Client.differentiate naming
them: its derivatives are kept on the server (store_results) and fetched in chunks
(GetTensors), because a 102 MB reply is over the default 64 MiB message limit;
also the gradient left on the server as a handle (no transfer back). PyTorch:
the same parameters, fwd + bwd (loss.backward()) at 1 and 2 threads, the faster
the baseline. Rounds interleaved; median and spread of the per-round ratios.
Target: works with default settings, <= 2x PyTorch. Never asserts on time.
Also per gradserve call: the client's CPU and minor page faults (this process) and the
server's (/proc/PID/stat), medians over the rounds but the server's CPU, a mean (it
counts in clock ticks of 10 ms); and the fetch's share (fetched less left on the server).

The server's defaults include its BLAS widths (server/blas.py): products at one thread
while requests share it, at every CPU for a large request alone on uncontended CPUs,
as each of these calls is; the run prints how many calls ran wide (its metric).

--experiments: then, in rounds of their own, two comparisons, same-round ratios:
- the fetch alone (Client.get of a kept results handle) over one stream vs over two
  concurrent streams on two connections (two Clients, one thread each, each getting
  about half the bytes by name): whether client and server gain from both cores;
- the handle path against the default server vs against a second server started with
  `--blas-threads-alone 1` (one BLAS thread always, the default before): what
  widening a lone large request gains.
"""

from __future__ import annotations

import _timing  # noqa: F401  (first: sets OMP_WAIT_POLICY before torch is imported)

import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from _timing import RunClock, environment_lines, load_torch, parse_args, ratio_line, write_json
from gradserve.client import Client
from gradserve.client.models import LOSS, ModelSpec, one_hot

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from support.metrics import samples  # noqa: E402  (tests/support)
from support.server_process import ServerProcess  # noqa: E402

TARGET = 2.0
DEFAULT_HANDLE = "handle, default server (wide when alone)"
NARROW_HANDLE = "handle, --blas-threads-alone 1 server"
BATCH = 32
WIDTHS = (1024, 4096, 4096, 1100)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def counters(pid: int | None = None) -> tuple[float, int]:
    """(CPU seconds, minor page faults) of this process, or of process `pid`."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, usage.ru_minflt
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), int(fields[7])


def torch_step(torch, spec, params, X, y, threads):
    """fwd + bwd of the same model in PyTorch eager, at `threads` threads."""
    layers = []
    for k in range(1, len(spec.widths)):
        linear = torch.nn.Linear(*spec.param_shapes[f"W{k}"])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[f"W{k}"].T))
            linear.bias.copy_(torch.from_numpy(params[f"b{k}"]))
        layers.append(linear)
        if k < len(spec.widths) - 1:
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)

    def step():
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(Xt), yt)
            loss.backward()
            return {f"W{k}": layers[2 * (k - 1)].weight.grad for k in range(1, len(WIDTHS))}
        finally:
            torch.set_num_threads(before)
    return step


def halves(sizes: dict) -> list[list[str]]:
    """The names in two groups of about equal bytes (largest first, each to the lighter)."""
    groups, totals = [[], []], [0, 0]
    for name in sorted(sizes, key=sizes.get, reverse=True):
        k = totals.index(min(totals))
        groups[k].append(name)
        totals[k] += sizes[name]
    return groups


def concurrent_get(clients, handle_id: str, groups) -> dict:
    """Client.get of each group of names over its own client, concurrently."""
    parts, errors = [None] * len(groups), []

    def run(k):
        try:
            parts[k] = clients[k].get(handle_id, groups[k])
        except Exception as err:  # noqa: BLE001 - raised below, in this thread
            errors.append(err)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(1, len(groups))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return {name: a for part in parts for name, a in part.items()}


def experiments(address, client, graph, inputs, names, params, rounds) -> tuple[dict, str]:
    """--experiments (see the docstring): ({figure name: seconds per round}, how the
    tensors were split over the two streams)."""
    figures: dict[str, list[float]] = {}

    def timed(name, fn):
        start = time.perf_counter()
        fn()
        figures.setdefault(name, []).append(time.perf_counter() - start)

    def as_handle(c, named):
        r = c.differentiate(graph, named, wrt=names, of=[LOSS], store_results=True)
        c.delete(r.results_handle)

    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    with ServerProcess("--port", "0", "--blas-threads-alone", "1") as server2, \
            Client(address, timeout=300, options=own_connection) as second, \
            Client(server2.wait_serving(timeout=60), timeout=300) as client2:
        inputs2 = {**client2.put({k: params[k] for k in names}),
                   **{k: v for k, v in inputs.items() if k not in names}}
        kept = client.differentiate(graph, inputs, wrt=names, of=[LOSS],
                                    store_results=True).results_handle
        whole = client.get(kept)
        groups = halves({k: a.nbytes for k, a in whole.items()})
        split = concurrent_get([client, second], kept.id, groups)
        assert split.keys() == whole.keys() and all(
            np.array_equal(split[k], whole[k]) for k in whole)
        split_note = "two streams: " + " | ".join(
            f"{', '.join(g)} ({sum(whole[k].nbytes for k in g) / 1e6:.0f} MB)"
            for g in groups)
        del whole, split
        as_handle(client2, inputs2)
        time.sleep(0.5)
        for _ in range(rounds):
            timed("fetch alone: one stream (Client.get)", lambda: client.get(kept))
            timed("fetch alone: two concurrent streams",
                  lambda: concurrent_get([client, second], kept.id, groups))
            timed(DEFAULT_HANDLE, lambda: as_handle(client, inputs))
            timed(NARROW_HANDLE, lambda: as_handle(client2, inputs2))
        client.delete(kept)
    return figures, split_note


def main(argv=None) -> int:
    args = parse_args(__doc__, argv, extra=lambda parser: parser.add_argument(
        "--experiments", action="store_true",
        help="then measure two fetches over two streams and a --blas-threads 2 server"))
    rounds = 3 if args.settings.quick else 7
    for line in environment_lines():
        print(line)
    spec = ModelSpec.mlp(WIDTHS[0], WIDTHS[-1], WIDTHS[1:-1])
    rng = np.random.default_rng(0)
    params = spec.init_params(rng)
    X = rng.standard_normal((BATCH, WIDTHS[0])).astype(np.float32)
    y = rng.integers(0, WIDTHS[-1], BATCH)
    Y = one_hot(y, WIDTHS[-1])
    nbytes = sum(a.nbytes for a in params.values())
    print(f"\n== {spec.description}: {spec.num_params:,} float32 parameters "
          f"({nbytes / 1e6:.1f} MB), batch {BATCH}, {rounds} rounds\n")
    graph = spec.build_graph()
    torch = load_torch()
    clock = RunClock()
    figures: dict[str, list[float]] = {}
    costs: dict[str, list[tuple]] = {}  # per call: client CPU, faults; server CPU, faults

    def timed(name, fn, server_pid=None):
        before = (counters(), counters(server_pid)) if server_pid else None
        start = time.perf_counter()
        out = fn()
        figures.setdefault(name, []).append(time.perf_counter() - start)
        if before:
            (c0, f0), (s0, g0) = before
            (c1, f1), (s1, g1) = counters(), counters(server_pid)
            costs.setdefault(name, []).append((c1 - c0, f1 - f0, s1 - s0, g1 - g0))
        return out

    # the defaults, one process (its metrics read for how many calls ran wide)
    with ServerProcess("--port", "0", "--metrics-port", "0") as server:
        address = server.wait_serving(timeout=60)
        pid = server.proc.pid
        with Client(address, timeout=300) as client:
            info = client.server_info()
            limits = info.limits
            print(f"server defaults: max_message_bytes {limits.max_message_bytes:,}, "
                  f"max_store_bytes {limits.max_store_bytes:,} "
                  f"(per client {limits.max_store_bytes_per_client:,}); BLAS "
                  f"{info.blas_threads} thread(s), a request of "
                  f"{info.blas_alone_min_flops:,} FLOPs or more alone "
                  f"{info.blas_threads_alone or info.blas_threads} (CPU pressure at most "
                  f"{info.blas_alone_max_pressure:g}%)")
            start = time.perf_counter()
            stored = client.put(params)
            put_seconds = time.perf_counter() - start
            print(f"put once, in chunks: {fmt_ms(put_seconds)} "
                  f"({nbytes / put_seconds / 1e6:,.0f} MB/s)\n")
            inputs = {**stored, "X": X, "Y": Y}
            names = spec.param_names

            def gradient():
                r = client.differentiate(graph, inputs, wrt=names, of=[LOSS])
                return {n: r.jacobian[LOSS, n] for n in names}

            def gradient_as_handle():
                r = client.differentiate(graph, inputs, wrt=names, of=[LOSS],
                                         store_results=True)
                client.delete(r.results_handle)

            ours = gradient()  # warm-up, and the check against PyTorch
            steps = {}
            if torch is not None:
                for threads in sorted({1, torch.get_num_threads()}):
                    steps[threads] = torch_step(torch, spec, params, X, y, threads)
                theirs = steps[1]()
                worst = max(float(np.max(np.abs(ours[k] - theirs[k].numpy().T))
                                  / np.max(np.abs(theirs[k].numpy())))
                            for k in theirs)
                print(f"gradient vs PyTorch's: largest difference {worst:.1e} of the "
                      "largest entry, over the weight matrices")
                for step in steps.values():
                    step()
            del ours  # as a training loop drops each gradient once applied
            gradient_as_handle()
            for _ in range(rounds):
                timed("gradserve: gradient fetched in chunks", gradient, pid)
                timed("gradserve: gradient left on the server (handle)", gradient_as_handle,
                      pid)
                for threads, step in steps.items():
                    timed(f"torch eager fwd+bwd, {threads} thread"
                          + ("s" if threads > 1 else ""), step)
            wide = {event: sum(x.value for x in samples(
                server.metrics_port(), "gradserve_blas_wide_requests_total", event=event))
                for event in ("wide", "narrowed", "contended")}
            print(f"\ncalls run wide: {wide['wide']:.0f} of {2 * rounds + 2} (narrowed "
                  f"{wide['narrowed']:.0f}, kept narrow by CPU pressure "
                  f"{wide['contended']:.0f})")
            trials, split_note = (
                experiments(address, client, graph, inputs, names, params, rounds)
                if args.experiments else ({}, ""))
    print()
    for name, seconds in figures.items():
        print(f"{name:50} median {fmt_ms(statistics.median(seconds)):>9}, "
              f"spread {fmt_ms(min(seconds))}-{fmt_ms(max(seconds))}")
    print()
    records = []
    torch_names = [n for n in figures if n.startswith("torch")]
    for name in [n for n in figures if n.startswith("gradserve")]:
        if not torch_names:
            records.append(ratio_line(f"P12 {name}", statistics.median(figures[name]), None,
                                      TARGET, fmt=fmt_ms, skipped="torch not installed"))
            continue
        per_round = [figures[name][i] / min(figures[t][i] for t in torch_names)
                     for i in range(rounds)]
        baseline = min(statistics.median(figures[t]) for t in torch_names)
        records.append(ratio_line(
            f"P12 25.5M-parameter gradient, {name}", statistics.median(figures[name]),
            baseline, TARGET, fmt=fmt_ms,
            note=(f"per-round ratios: median {statistics.median(per_round):.2f}x, spread "
                  f"{min(per_round):.2f}-{max(per_round):.2f}x")))
    print("\nper call: client CPU, page faults | server CPU (mean), page faults")
    means = {name: [statistics.mean(c) if i == 2 else statistics.median(c)
                    for i, c in enumerate(zip(*rows))]
             for name, rows in costs.items()}
    for name, (cpu, faults, server_cpu, server_faults) in means.items():
        print(f"{name:50} {cpu * 1e3:6.1f} ms, {faults:8,.0f} | "
              f"{server_cpu * 1e3:6.1f} ms, {server_faults:8,.0f}")
    if len(means) == 2:
        (cpu, faults, server_cpu, server_faults) = (
            a - b for a, b in zip(*means.values()))
        print(f"{'the fetch (fetched less left on the server)':50} {cpu * 1e3:6.1f} ms, "
              f"{faults:8,.0f} | {server_cpu * 1e3:6.1f} ms, {server_faults:8,.0f}")
    if trials:
        print(f"\n== --experiments (rounds of their own); {split_note}\n")
        for name, seconds in trials.items():
            print(f"{name:50} median {fmt_ms(statistics.median(seconds)):>9}, "
                  f"spread {fmt_ms(min(seconds))}-{fmt_ms(max(seconds))}")
        for a, b in (("fetch alone: two concurrent streams",
                      "fetch alone: one stream (Client.get)"),
                     (DEFAULT_HANDLE, NARROW_HANDLE)):
            per_round = [x / y for x, y in zip(trials[a], trials[b])]
            print(f"{a} / {b}: per-round median {statistics.median(per_round):.2f}x, "
                  f"spread {min(per_round):.2f}-{max(per_round):.2f}x")
    print()
    run = clock.print_summary()
    if args.json:
        write_json(args.json, {"environment": environment_lines(), "put_seconds": put_seconds,
                               "seconds": figures, "p12": records, "costs_per_call": costs,
                               "experiments": trials, "run": run})
    return 0


if __name__ == "__main__":
    sys.exit(main())
