"""The numba kernel provider (engine/kernels.py, engine/depthwise_numba.py): the same
depthwise convolution as the numpy kernels and as PyTorch, values and both gradients,
float32 and float64, 1-d to 3-d, strides, dilations, padding; a cancellation or
deadline stops it between chunks; the seam's choices. Skipped when numba is not
installed (the `numba` extra; the `test` extra installs it)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import numba  # noqa: F401
except ImportError as e:  # absent, or an install that does not load
    pytest.skip(f"numba does not import ({e}): pip install 'gradserve[numba]'",
                allow_module_level=True)

from gradserve.engine import Budget, Graph, Input, Node, compile  # noqa: E402
from gradserve.engine import costs, depthwise, depthwise_numba, kernels  # noqa: E402

torch = pytest.importorskip("torch", reason="PyTorch is the oracle here")

# (x shape, kernel, strides, pads, dilations)
CASES = {
    "1-d": ((2, 3, 11), (4,), (1,), (2, 1), (1,)),
    "1-d strided dilated": ((2, 3, 17), (3,), (3,), (1, 2), (2,)),
    "2-d same": ((2, 5, 9, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    "2-d strided uneven pads": ((2, 6, 11, 9), (3, 3), (2, 3), (1, 1, 0, 2), (1, 2)),
    "2-d big dilated kernel": ((1, 3, 40, 6), (7, 2), (1, 1), (2, 0, 1, 3), (5, 2)),
    "2-d huge stride": ((1, 3, 9, 900), (2, 3), (4, 700), (0, 1, 0, 0), (3, 1)),
    "3-d": ((1, 4, 5, 6, 4), (2, 3, 1), (1, 1, 1), (1, 0, 1, 0, 1, 0), (1, 1, 2)),
    "3-d strided": ((2, 3, 7, 6, 8), (3, 2, 3), (2, 1, 3), (1, 1, 0, 1, 2, 0), (1, 2, 1)),
}


@pytest.fixture
def provider():
    """Switch the process's provider for a test, and back."""
    before = kernels.active()

    def switch(name):
        return kernels.use(name)
    yield switch
    kernels.use(before)


def _plan(xs, kernel, strides, pads, dilations, dtype):
    c = xs[1]
    attrs = {"strides": list(strides), "pads": list(pads), "dilations": list(dilations),
             "groups": c}
    g = Graph([Input("x", dtype, list(xs)), Input("w", dtype, [c, 1, *kernel])],
              [Node("y", "conv", ["x", "w"], attrs)], ["y"], {})
    return compile(g)


def _torch(x, w, g, strides, pads, dilations):
    d = len(strides)
    begin, end = pads[:d], pads[d:]
    tx = torch.from_numpy(np.array(x)).requires_grad_()
    tw = torch.from_numpy(np.array(w)).requires_grad_()
    # pad explicitly (PyTorch's padding is symmetric), last axis first
    spread = [p for axis in reversed(range(d)) for p in (begin[axis], end[axis])]
    xp = torch.nn.functional.pad(tx, spread)
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d,
            torch.nn.functional.conv3d)[d - 1]
    y = conv(xp, tw, stride=strides, dilation=dilations, groups=x.shape[1])
    y.backward(torch.from_numpy(np.array(g)))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy()


def _close(a, b, dtype, what):
    tol = 2e-5 if dtype == "float32" else 1e-12
    scale = max(np.max(np.abs(b)), 1.0) if b.size else 1.0
    assert a.shape == b.shape, what
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_kernels_equal_numpys_and_pytorchs(case, dtype, provider):
    xs, kernel, strides, pads, dilations = CASES[case]
    rng = np.random.default_rng(len(case))
    x = rng.standard_normal(xs).astype(dtype)
    w = rng.standard_normal((xs[1], 1) + kernel).astype(dtype)
    x.flags.writeable = w.flags.writeable = False  # as a request's decoded buffers
    results = {}
    for name in ("numpy", "numba"):
        assert provider(name) == name
        plan = _plan(xs, kernel, strides, pads, dilations, dtype)
        y = plan.evaluate({"x": x, "w": w})["y"]
        g = np.random.default_rng(1).standard_normal(y.shape).astype(dtype)
        g.flags.writeable = False
        cot = plan.vjp({"x": x, "w": w}, {"y": g[None]}, wrt=["x", "w"]).cotangents
        results[name] = (y, cot["x"][0], cot["w"][0])
    ref = _torch(x, w, g, strides, pads, dilations)
    for what, got, numpy_got, want in zip(("values", "dx", "dw"), results["numba"],
                                          results["numpy"], ref):
        assert got.dtype == np.dtype(dtype), what
        _close(got, numpy_got, dtype, f"{case} {what}: numba vs numpy")
        _close(got, want, dtype, f"{case} {what}: numba vs PyTorch")


@pytest.mark.parametrize("case", ["1-d strided dilated", "2-d strided uneven pads", "3-d"])
def test_numba_kernels_take_seed_directions(case):
    """k weight stacks (forward mode) and k cotangents at once equal the numpy kernels'."""
    xs, kernel, strides, pads, dilations = CASES[case]
    rng = np.random.default_rng(7)
    x = rng.standard_normal(xs)
    w = rng.standard_normal((3, xs[1], 1) + kernel)
    out = tuple(depthwise.conv(x, w, strides, pads, dilations,
                               _out(xs[2:], kernel, strides, pads, dilations)).shape[3:])
    a = depthwise.conv(x, w, strides, pads, dilations, out)
    b = depthwise_numba.conv(x, w, strides, pads, dilations, out)
    np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(a.shape)
    np.testing.assert_allclose(depthwise_numba.weight_grad(g, x, kernel, strides, pads, dilations),
                               depthwise.weight_grad(g, x, kernel, strides, pads, dilations),
                               rtol=1e-12, atol=1e-12)
    gx = g.reshape((-1,) + g.shape[2:])
    np.testing.assert_allclose(
        depthwise_numba.input_grad(gx, w[0], xs[2:], strides, pads, dilations),
        depthwise.input_grad(gx, w[0], xs[2:], strides, pads, dilations),
        rtol=1e-12, atol=1e-12)


def _out(spatial, kernel, strides, pads, dilations):
    d = len(spatial)
    return tuple((s + pads[i] + pads[d + i] - dilations[i] * (k - 1) - 1) // strides[i] + 1
                 for i, (s, k) in enumerate(zip(spatial, kernel)))


@pytest.mark.parametrize("mode", ["evaluate", "vjp"])
def test_cancellation_stops_the_numba_kernels_between_chunks(mode, provider, monkeypatch):
    """One (image, channel) pair per compiled call: the check runs before each, and a
    cancellation raised mid-kernel stops it there (the deadline is the same check)."""
    provider("numba")
    monkeypatch.setattr(depthwise_numba, "CHUNK_FLOPS", 1)
    xs = (4, 8, 10, 10)
    plan = _plan(xs, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "float64")
    x = np.ones(xs)
    w = np.ones((8, 1, 3, 3))
    run = ((lambda b: plan.evaluate({"x": x, "w": w}, budget=b)) if mode == "evaluate" else
           (lambda b: plan.vjp({"x": x, "w": w}, {"y": np.ones((1,) + xs)}, budget=b)))
    with costs.counting() as total:
        run(None)
    assert total[0] >= 32  # one pass per pair at least

    class Gone(Exception):
        pass
    calls = []

    def cancel():
        calls.append(1)
        if len(calls) == 10:
            raise Gone
    with costs.counting() as passes, pytest.raises(Gone):
        run(Budget(cancel=cancel))
    assert 0 < passes[0] < total[0]


def test_a_passed_deadline_stops_the_numba_kernels(provider, monkeypatch):
    from gradserve.engine import DeadlineExceeded
    provider("numba")
    monkeypatch.setattr(depthwise_numba, "CHUNK_FLOPS", 1)
    plan = _plan((2, 4, 6, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "float64")
    with pytest.raises(DeadlineExceeded):
        plan.evaluate({"x": np.ones((2, 4, 6, 6)), "w": np.ones((4, 1, 3, 3))},
                      budget=Budget(deadline=0.0))


def test_the_seam_chooses_and_refuses(provider, monkeypatch):
    assert provider("numpy") == "numpy"
    assert kernels.depthwise() is depthwise
    assert provider("auto") == "numba"
    assert kernels.depthwise() is depthwise_numba
    assert kernels.warm_up() == "numba"
    with pytest.raises(kernels.KernelProviderError, match="expected one of auto, numpy, numba"):
        kernels.use("fortran")
    # numba that does not import: auto falls back, numba is an error naming the fix
    monkeypatch.setattr(kernels, "_numba_depthwise", lambda: (None, "ImportError: no numba"))
    assert provider("auto") == "numpy"
    with pytest.raises(kernels.KernelProviderError, match=r"gradserve\[numba\]"):
        kernels.use("numba")


def test_the_kernels_work_where_no_cache_folder_can_be_written(tmp_path):
    """A read-only install with no writable cache folder (numba finds no cache locator and
    refuses cache=True): the kernels compile in memory instead of failing to import."""
    import subprocess
    import sys
    script = (
        "import numba.core.caching as caching\n"
        "caching.CacheImpl._locator_classes = []  # no folder numba may write\n"
        "import numpy as np\n"
        "from gradserve.engine import depthwise, depthwise_numba, kernels\n"
        "assert kernels.use('numba') == 'numba'\n"
        "kernels.warm_up()\n"
        "x = np.arange(2 * 3 * 5 * 4.0).reshape(2, 3, 5, 4)\n"
        "w = np.ones((1, 3, 1, 2, 3))\n"
        "args = ((1, 1), (1, 0, 0, 1), (1, 1), (5, 3))\n"
        "assert np.array_equal(depthwise_numba.conv(x, w, *args), depthwise.conv(x, w, *args))\n"
        "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
