"""A large request alone on the server runs its BLAS products on more threads
(server/blas.py): the real OpenBLAS count read inside and after, from a worker thread
as the server's are; the decisions against each condition; and over real gRPC against
`gradserve serve`, its GetServerInfo bound, its metric and its answers."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import numpy as np
import pytest
from numpy.testing import assert_allclose
from threadpoolctl import threadpool_limits

from gradserve.client import Client, GraphBuilder
from gradserve.server.blas import (MIN_FLOPS, SPIN_VARIABLE, BlasWidth, CpuPressure,
                                   blas_threads, setters, usable_cpus)

from support.metrics import samples
from support.server_process import ServerProcess

LARGE = 2 * MIN_FLOPS


@pytest.fixture
def width(monkeypatch):
    """A BlasWidth of 1 thread, 2 alone, on a machine of 2 CPUs reading no pressure,
    with the process's BLAS count put back afterwards."""
    assert setters(), "NumPy's BLAS here is an OpenBLAS with openblas_set_num_threads_local"
    monkeypatch.setenv(SPIN_VARIABLE, "4")
    before = blas_threads()
    with threadpool_limits(limits=1, user_api="blas"):
        yield BlasWidth(1, 2, 2, pressure=lambda: 0.0)
    assert blas_threads() == before


def in_worker(fn):
    """fn() in another thread, as the server's workers run requests."""
    with futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_a_large_request_alone_runs_at_two_threads_in_a_worker(width):
    """OpenBLAS 0.3.31 ignores openblas_set_num_threads (what threadpoolctl calls) from
    any thread but the main one: the width is set by openblas_set_num_threads_local,
    which sets the library's count from a worker too."""
    def request():
        with width.run(lambda: 1, lambda: LARGE):
            inside = blas_threads()
        return inside, blas_threads()

    assert in_worker(request) == (2, 1)
    assert blas_threads() == 1
    assert width.counts == {"wide": 1, "narrowed": 0, "contended": 0}


def test_small_shared_contended_or_unsized_requests_stay_at_one_thread(width):
    def bad_request():
        raise ValueError("does not bind")

    cases = [(lambda: 1, lambda: MIN_FLOPS - 1),  # small
             (lambda: 2, lambda: LARGE),  # another request in progress
             (lambda: 1, bad_request)]  # the engine raises its own error next
    for in_progress, flops in cases:
        with width.run(in_progress, flops):
            assert in_worker(blas_threads) == 1
    width._pressure = lambda: 10.5  # over MAX_PRESSURE (10%)
    with width.run(lambda: 1, lambda: LARGE):
        assert blas_threads() == 1
    assert width.counts == {"wide": 0, "narrowed": 0, "contended": 1}
    width._pressure = lambda: None  # no PSI on this kernel: taken as uncontended
    with width.run(lambda: 1, lambda: LARGE):
        assert blas_threads() == 2


def test_a_request_admitted_meanwhile_narrows_at_once(width):
    """narrow() (Calls.admit) sets one thread while the wide request still runs; a
    request admitted between the decision and the widening is seen by the re-check."""
    def request():
        with width.run(lambda: 1, lambda: LARGE):
            assert blas_threads() == 2
            width.narrow()
            return blas_threads()

    assert in_worker(request) == 1
    admitted = iter([1, 2])  # one in progress at the decision, two just after
    with width.run(lambda: next(admitted), lambda: LARGE):
        assert blas_threads() == 1
    assert width.counts == {"wide": 2, "narrowed": 2, "contended": 0}


def test_the_pressure_is_the_recent_one():
    """CpuPressure: Linux's 10-s average until a reading of its own is 0.5-10 s old,
    then the stall counter's share of the time since that reading; None without PSI."""
    now, psi = [0.0], [(40.0, 0)]
    pressure = CpuPressure(read=lambda: psi[0], clock=lambda: now[0])
    assert pressure() == 40.0  # no earlier reading: the 10-s average
    now[0], psi[0] = 0.3, (40.0, 150_000)
    assert pressure() == 40.0  # the earlier one is under 0.5 s old
    now[0], psi[0] = 1.0, (40.0, 500_000)  # 0.35 s stalled in the 0.7 s since 0.3
    assert pressure() == pytest.approx(50.0)
    now[0], psi[0] = 1.6, (40.0, 500_000)  # none since the reading at 1.0
    assert pressure() == pytest.approx(0.0)
    now[0] = 30.0  # every reading over 10 s old: the 10-s average again
    psi[0] = (3.0, 500_000)
    assert pressure() == 3.0
    assert CpuPressure(read=lambda: None)() is None


def test_a_failing_request_leaves_one_thread(width):
    with pytest.raises(RuntimeError):
        with width.run(lambda: 1, lambda: LARGE):
            raise RuntimeError("the engine failed")
    assert blas_threads() == 1


def test_off_when_openblas_threads_would_spin(monkeypatch):
    """Without OPENBLAS_THREAD_TIMEOUT set before NumPy loaded OpenBLAS, its idle helpers
    spin ~0.1 s after every product: never wide then, nor at `alone` <= `threads`."""
    monkeypatch.delenv(SPIN_VARIABLE, raising=False)
    assert BlasWidth(1, 2, 2).alone == 0
    monkeypatch.setenv(SPIN_VARIABLE, "4")
    assert BlasWidth(1, 1, 2).alone == 0
    assert BlasWidth(2, 2, 2).alone == 0
    assert BlasWidth(1, 4, 2).alone == 2  # never more than the CPUs


# --- over gRPC, against `gradserve serve` ------------------------------------------

def chain(n: int, width: int, depth: int) -> GraphBuilder:
    """sum(x @ w1 @ ... @ wdepth), float32, x (n, width), each w (width, width)."""
    g = GraphBuilder()
    h = g.input("x", "float32", [n, width])
    for i in range(depth):
        h = h @ g.input(f"w{i}", "float32", [width, width])
    g.output("loss", g.sum(h))
    return g


def chain_inputs(n, width, depth, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.standard_normal((n, width), dtype=np.float32)}
    for i in range(depth):
        inputs[f"w{i}"] = (rng.standard_normal((width, width), dtype=np.float32)
                           / np.sqrt(width)).astype(np.float32)
    return inputs


def chain_gradient(inputs: dict, depth: int) -> dict:
    """The float64 oracle, by vector products only: with L = x W0...W(i-1) and
    R = W(i+1)...W(depth-1), d sum(L Wi R) / dWi = L^T 1 R^T = outer(1^T L, R 1)."""
    ws = [inputs[f"w{i}"].astype(np.float64) for i in range(depth)]
    grads = {}
    for i in range(depth):
        left = inputs["x"].astype(np.float64).sum(axis=0)
        for w in ws[:i]:
            left = left @ w
        right = np.ones(ws[-1].shape[1])
        for w in reversed(ws[i + 1:]):
            right = w @ right
        grads[f"w{i}"] = np.outer(left, right)
    return grads


def wide_counts(port: int) -> dict:
    return {event: sum(s.value for s in samples(port, "gradserve_blas_wide_requests_total",
                                               event=event))
            for event in ("wide", "narrowed", "contended")}


@pytest.fixture(scope="module")
def served():
    """`gradserve serve` with its BLAS defaults but the pressure not read (a busy test
    machine would otherwise, rightly, keep requests narrow)."""
    with ServerProcess("--port", "0", "--metrics-port", "0",
                       "--blas-alone-max-pressure", "100") as server:
        with Client(server.wait_serving(), timeout=300) as client:
            yield server, client, server.metrics_port()


def test_server_info_states_the_bound(served):
    _, client, _ = served
    info = client.server_info()
    assert info.blas_threads == 1
    assert info.blas_threads_alone == (usable_cpus() if usable_cpus() > 1 else 0)
    assert info.blas_alone_min_flops == MIN_FLOPS
    assert info.blas_alone_max_pressure == 100


def test_a_large_gradient_alone_runs_wide_and_equals_the_oracle(served):
    """4 GFLOPs estimated: wide (on a machine of 2 CPUs or more) and the same gradient
    as float64 NumPy's; a small request then is not."""
    server, client, port = served
    wide = usable_cpus() > 1
    before = wide_counts(port)
    inputs = chain_inputs(512, 1024, 2)
    r = client.differentiate(chain(512, 1024, 2), inputs, of=["loss"], wrt=["w0", "w1"])
    oracle = chain_gradient(inputs, 2)
    for name in ("w0", "w1"):
        assert_allclose(r.jacobian["loss", name], oracle[name],
                        rtol=1e-4, atol=1e-4 * np.abs(oracle[name]).max())
    small = chain_inputs(8, 16, 2)
    client.differentiate(chain(8, 16, 2), small, of=["loss"], wrt=["w0"])
    after = wide_counts(port)
    assert after["wide"] - before["wide"] == (1 if wide else 0)
    assert after["contended"] == before["contended"]  # (the pressure is not read)


def test_a_request_admitted_meanwhile_narrows_the_large_one(served):
    """A large gradient (~60 GFLOPs) runs wide; a small request admitted while it runs
    narrows it back (the metric's `narrowed`), and both answers are right."""
    server, client, port = served
    if usable_cpus() < 2:
        assert client.server_info().blas_threads_alone == 0
        return
    big, big_inputs = chain(2048, 2048, 3), chain_inputs(2048, 2048, 3, seed=1)
    small, small_inputs = chain(8, 16, 2), chain_inputs(8, 16, 2)
    for attempt in range(3):
        before = wide_counts(port)
        answers, finished = {}, []

        def large():
            answers["large"] = client.differentiate(big, big_inputs, of=["loss"],
                                                    wrt=["w2"])
            finished.append("large")

        thread = threading.Thread(target=large)
        thread.start()
        deadline = time.monotonic() + 120
        while wide_counts(port)["wide"] == before["wide"] and thread.is_alive() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        answers["small"] = client.differentiate(small, small_inputs, of=["loss"],
                                                wrt=["w0"])
        finished.append("small")
        thread.join(300)
        after = wide_counts(port)
        assert after["wide"] - before["wide"] == 1
        oracle = chain_gradient(small_inputs, 2)["w0"]
        assert_allclose(answers["small"].jacobian["loss", "w0"], oracle, rtol=1e-4,
                        atol=1e-5)
        expected = chain_gradient(big_inputs, 3)["w2"]
        assert_allclose(answers["large"].jacobian["loss", "w2"], expected, rtol=1e-3,
                        atol=1e-3 * np.abs(expected).max())
        if finished[0] == "small":  # admitted while the large one ran
            assert after["narrowed"] - before["narrowed"] == 1
            return
    pytest.fail("the large request finished before the small one three times")


def test_a_large_training_call_alone_runs_wide(served):
    """TrainSteps: 2 steps of the chain's loss on a stored state (~4 GFLOPs estimated
    with both): wide, and the parameters equal two float64 SGD steps."""
    server, client, port = served
    wide = usable_cpus() > 1
    inputs = chain_inputs(256, 1024, 2, seed=2)
    params = {name: inputs[name] for name in ("w0", "w1")}
    xs = np.stack([inputs["x"], chain_inputs(256, 1024, 2, seed=3)["x"]])
    before = wide_counts(port)
    handle = client.put(params)
    lr = 1e-4
    r = client.train_steps(chain(256, 1024, 2), handle, {"x": xs}, learning_rate=lr,
                           loss="loss", return_state=True)
    assert wide_counts(port)["wide"] - before["wide"] == (1 if wide else 0)
    expected = {name: a.astype(np.float64) for name, a in params.items()}
    for x in xs:
        grads = chain_gradient({"x": x, **expected}, 2)
        expected = {name: w - lr * grads[name] for name, w in expected.items()}
    for name, w in expected.items():
        assert_allclose(r.parameters[name], w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


def test_steps_flops_is_each_steps_estimate():
    """The estimate a training call widens by: K x (values + one direction), stacked
    minibatches or a list of per-step ones alike."""
    from gradserve import engine
    from gradserve.server.convert import graph_from_proto
    from gradserve.server.training import steps_flops
    plan = engine.compile(graph_from_proto(chain(32, 64, 2).build()))
    inputs = chain_inputs(32, 64, 2)
    params = {k: v for k, v in inputs.items() if k != "x"}
    one = plan.estimate_flops(plan.bind(inputs).shapes, 1)
    assert one >= 2 * 2 * 32 * 64 * 64  # two products' values at least
    assert steps_flops(plan, params, {"x": np.stack([inputs["x"]] * 3)}) == 3 * one
    assert steps_flops(plan, params, [{"x": inputs["x"]}] * 2) == 2 * one
