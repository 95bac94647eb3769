"""engine.sgd_steps: K SGD steps with momentum on a plan equal K steps taken one
Jacobian at a time with PyTorch's rule (bitwise), and PyTorch's own SGD (to float32
rounding); the caller's arrays are never written; the budget is admitted before any
step and the check runs inside every step."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve.engine import (DeadlineExceeded, DifferentiationError, Graph, Input, Node,
                              ResourceLimitError, compile, sgd_steps)

LR, MU = 0.1, 0.9


def mlp_plan(dtype="float32", extra=False):
    """X @ W1 + b1 -> relu -> @ W2 + b2 -> softmax cross-entropy against one-hot Y;
    `extra`: a parameter U that does not reach the loss (its gradient is zero)."""
    inputs = [Input("X", dtype, [-1, 5]), Input("Y", dtype, [-1, 3]),
              Input("W1", dtype, [5, 4]), Input("b1", dtype, [4]),
              Input("W2", dtype, [4, 3]), Input("b2", dtype, [3])]
    nodes = [Node("m1", "matmul", ["X", "W1"]), Node("a1", "add", ["m1", "b1"]),
             Node("h1", "relu", ["a1"]), Node("m2", "matmul", ["h1", "W2"]),
             Node("z", "add", ["m2", "b2"]), Node("lp", "log_softmax", ["z"], {"axis": -1}),
             Node("yl", "mul", ["Y", "lp"]), Node("s", "sum", ["yl"], {"axes": [-1]}),
             Node("ms", "mean", ["s"]), Node("loss", "neg", ["ms"])]
    outputs = ["loss"]
    if extra:
        inputs.append(Input("U", dtype, [2]))
        nodes.append(Node("u", "sum", ["U"]))
        outputs.append("u")
    return compile(Graph(inputs, nodes, outputs))


def start(dtype=np.float32, k=5, batch=7, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    params = {"W1": rng.standard_normal((5, 4)), "b1": rng.standard_normal(4) * 0.1,
              "W2": rng.standard_normal((4, 3)), "b2": np.zeros(3)}
    params = {n: p.astype(dtype) for n, p in params.items()}
    steps = []
    for n in sizes or [batch] * k:
        labels = rng.integers(0, 3, n)
        steps.append({"X": rng.standard_normal((n, 5)).astype(dtype),
                      "Y": np.eye(3, dtype=dtype)[labels]})
    return params, steps


def one_jacobian_at_a_time(plan, params, steps, velocity=None):
    """A worker's loop: one Plan.jacobian of the loss per step, PyTorch's rule."""
    params = {n: p.copy() for n, p in params.items()}
    velocity = {n: (velocity or {}).get(n, np.zeros_like(p)).copy() for n, p in params.items()}
    losses = []
    for batch in steps:
        r = plan.jacobian({**batch, **params}, wrt=list(params), of=["loss"])
        losses.append(float(r.outputs["loss"]))
        for name, p in params.items():
            lr, mu = p.dtype.type(LR), p.dtype.type(MU)
            velocity[name] = mu * velocity[name] + r.jacobian["loss", name].reshape(p.shape)
            params[name] = p - lr * velocity[name]
    return params, velocity, losses


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("k", [5, 1])  # (one step: updated parameter by parameter)
def test_k_steps_equal_k_jacobians_bitwise(dtype, stacked, k):
    plan = mlp_plan(np.dtype(dtype).name)
    params, steps = start(dtype, k=k)
    before = {n: p.copy() for n, p in params.items()}
    velocity = {"W1": np.full((5, 4), 0.5, dtype)}  # one buffer given, the others zeros
    batches = ({n: np.stack([s[n] for s in steps]) for n in ("X", "Y")} if stacked
               else steps)
    result = sgd_steps(plan, params, batches, learning_rate=LR, momentum=MU,
                       velocity=velocity, loss="loss")
    expected, expected_velocity, losses = one_jacobian_at_a_time(plan, params, steps, velocity)
    assert result.losses == losses
    for name in params:
        np.testing.assert_array_equal(result.parameters[name], expected[name])
        np.testing.assert_array_equal(result.velocity[name], expected_velocity[name])
        assert result.parameters[name].dtype == dtype
        np.testing.assert_array_equal(params[name], before[name])  # the caller's: unchanged
    np.testing.assert_array_equal(velocity["W1"], np.full((5, 4), 0.5, dtype))


def test_steps_equal_pytorch_sgd_with_a_short_last_batch():
    torch = pytest.importorskip("torch")
    plan = mlp_plan()
    params, steps = start(k=4, sizes=[7, 7, 7, 3])
    result = sgd_steps(plan, params, steps, learning_rate=LR, momentum=MU, loss="loss")
    w = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    optimizer = torch.optim.SGD(list(w.values()), lr=LR, momentum=MU)
    losses = []
    for batch in steps:
        optimizer.zero_grad()
        logits = torch.relu(torch.from_numpy(batch["X"]) @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["Y"]))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    np.testing.assert_allclose(result.losses, losses, rtol=1e-5)
    for name, p in w.items():
        np.testing.assert_allclose(result.parameters[name], p.detach().numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(result.velocity[name],
                                   optimizer.state[p]["momentum_buffer"].numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_a_parameter_that_does_not_reach_the_loss_keeps_its_value():
    plan = mlp_plan(extra=True)
    params, steps = start(k=3)
    params["U"] = np.array([1.0, -2.0], np.float32)
    result = sgd_steps(plan, params, steps, learning_rate=LR, momentum=MU, loss="loss")
    np.testing.assert_array_equal(result.parameters["U"], params["U"])
    np.testing.assert_array_equal(result.velocity["U"], np.zeros(2, np.float32))
    expected, _, losses = one_jacobian_at_a_time(plan, params, steps)
    assert result.losses == losses
    np.testing.assert_array_equal(result.parameters["W1"], expected["W1"])


def test_one_scalar_parameter_steps_as_its_jacobian_does():
    """One parameter element: the planner picks forward mode for its Jacobian; the steps
    take the same path, so they still equal one Jacobian at a time."""
    plan = compile(Graph([Input("x", "float64", [3]), Input("w", "float64", [])],
                         [Node("wx", "mul", ["x", "w"]), Node("s", "sin", ["wx"]),
                          Node("loss", "sum", ["s"])], ["loss"]))
    xs = np.linspace(0.1, 0.9, 12).reshape(4, 3)
    result = sgd_steps(plan, {"w": np.float64(0.7)}, {"x": xs}, learning_rate=LR,
                       momentum=MU)
    w, v = 0.7, 0.0
    for x in xs:  # the closed form: d/dw sum(sin(w x)) = sum(x cos(w x))
        v = MU * v + float(np.sum(x * np.cos(w * x)))
        w = w - LR * v
    np.testing.assert_allclose(result.parameters["w"], w, rtol=1e-12)
    expected, _, _ = one_jacobian_at_a_time(plan, {"w": np.float64(0.7)},
                                            [{"x": x} for x in xs])
    np.testing.assert_array_equal(result.parameters["w"], expected["w"])


def test_a_loss_of_several_elements_is_refused_before_any_step():
    plan = compile(Graph([Input("x", "float32", [3]), Input("w", "float32", [3])],
                         [Node("loss", "mul", ["x", "w"])], ["loss"]))
    calls = []
    with pytest.raises(DifferentiationError, match="the loss has 3 elements") as err:
        sgd_steps(plan, {"w": np.ones(3, np.float32)}, {"x": np.ones((2, 3), np.float32)},
                  learning_rate=LR, check=lambda: calls.append(1))
    assert err.value.field == "loss" and calls == [1]  # checked once, before step 1 ran


def test_the_budget_is_admitted_before_any_step_and_checked_inside_each():
    plan = mlp_plan()
    params, steps = start(k=3)
    with pytest.raises(ResourceLimitError, match="max_request_flops"):
        sgd_steps(plan, params, steps, learning_rate=LR, loss="loss", max_flops=10)
    checks = []
    sgd_steps(plan, params, steps, learning_rate=LR, loss="loss",
              check=lambda: checks.append(1))
    assert len(checks) >= 2 * len(steps)  # between steps and inside each sweep
    with pytest.raises(DeadlineExceeded):
        sgd_steps(plan, params, steps, learning_rate=LR, loss="loss", deadline=0.0)


def _outcome(plan, params, batches, **kwargs):
    """An sgd_steps call's error (type, message, field), or None when it steps."""
    try:
        sgd_steps(plan, params, batches, learning_rate=LR, momentum=MU, loss="loss", **kwargs)
    except Exception as err:  # noqa: BLE001  (compared whole against a fresh plan's)
        return type(err), str(err), getattr(err, "field", None)
    return None


@pytest.mark.parametrize("k", [1, 3])
def test_a_later_call_of_the_same_forms_steps_and_checks_as_a_fresh_plan(k):
    """A call of the forms an earlier call checked reuses what it kept (no checks
    again): its steps equal one Jacobian at a time bitwise, calls of other forms get a
    fresh plan's errors, and the limits, the deadline and the checks still apply."""
    plan = mlp_plan()
    params, steps = start(k=3 * k)
    velocity = {"W1": np.full((5, 4), 0.5, np.float32)}
    expected, expected_velocity, expected_losses = one_jacobian_at_a_time(
        mlp_plan(), params, steps, velocity)
    losses = []
    for call in range(3):  # each call from the last one's parameters and buffers
        chunk = steps[call * k:(call + 1) * k]
        result = sgd_steps(plan, params, {n: np.stack([s[n] for s in chunk]) for n in "XY"},
                           learning_rate=LR, momentum=MU, velocity=velocity, loss="loss")
        params, velocity, losses = result.parameters, result.velocity, losses + result.losses
    assert losses == expected_losses
    for name in params:
        np.testing.assert_array_equal(params[name], expected[name])
        np.testing.assert_array_equal(velocity[name], expected_velocity[name])
    assert any(key[0] == "last" for key in plan.loss_tails)  # (what the later calls reused)

    batch = {n: np.stack([s[n] for s in steps[:k]]) for n in "XY"}
    short = {n: a[:, :3] for n, a in batch.items()}
    wrong = [
        (params, batch, {"velocity": {"W1": np.zeros((4, 5), np.float32)}}),
        (params, batch, {"velocity": {"W9": np.zeros((5, 4), np.float32)}}),
        (params, batch, {"velocity": {"W1": np.zeros((5, 4), np.float64)}}),
        ({**params, "W1": params["W1"].astype(np.float64)}, batch, {}),
        ({**params, "W1": params["W1"][:4]}, batch, {}),
        ({**params, "W1": params["W1"].tolist()}, batch, {}),
        (params, {**batch, "Z": batch["X"]}, {}),
        (params, {"Y": batch["Y"], "X": batch["X"][..., :4]}, {}),
        (params, {**batch, "W1": batch["X"]}, {}),
        (params, {"X": batch["X"]}, {}),
        (params, short, {}),
        (params, batch, {"max_flops": 10}),
        (params, batch, {"deadline": 0.0}),
    ]
    for case in wrong:
        fresh = mlp_plan()
        assert _outcome(plan, *case[:2], **case[2]) == _outcome(fresh, *case[:2], **case[2])
    # (a fresh plan's figure counts compiling the sweep too)
    refused = _outcome(plan, params, batch, max_bytes=1000)
    assert refused[0] is ResourceLimitError and "over the limit of 1,000" in refused[1]
    assert refused[::2] == _outcome(mlp_plan(), params, batch, max_bytes=1000)[::2]
    assert _outcome(plan, params, batch, max_flops=10)[0] is ResourceLimitError
    assert _outcome(plan, params, batch, deadline=0.0)[0] is DeadlineExceeded
    assert _outcome(plan, params, short) is None  # a short batch steps
    checks = []
    sgd_steps(plan, params, batch, learning_rate=LR, loss="loss",
              check=lambda: checks.append(1))
    assert len(checks) >= 2 * k  # between steps and inside each sweep


@pytest.mark.parametrize("sum_attrs, mean_attrs, y_shape", [
    ({"axes": [-1]}, {}, [-1, 3]),  # the usual loss: row sums, their mean
    ({"axes": [0], "keepdims": True}, {"axes": [1, 0]}, [-1, 3]),
    ({}, {}, [-1, 3]),  # one sum of everything, the mean of a scalar
    ({"axes": [-1]}, {}, [1, 3]),  # Y broadcast against the batch: not fused
])
def test_a_fused_loss_tail_steps_as_the_jacobians_do_bitwise(sum_attrs, mean_attrs, y_shape):
    """The training sweep runs -mean(sum(Y * lp)) as one step (engine/losses.py) where the
    two factors have one shape: the same bits as the four nodes' Jacobian, whatever the
    axes; a Y that broadcasts takes the plan's own steps."""
    from gradserve.engine import losses

    inputs = [Input("X", "float64", [-1, 5]), Input("Y", "float64", y_shape),
              Input("W", "float64", [5, 3]), Input("b", "float64", [3])]
    nodes = [Node("m", "matmul", ["X", "W"]), Node("z", "add", ["m", "b"]),
             Node("lp", "log_softmax", ["z"], {"axis": -1}), Node("yl", "mul", ["Y", "lp"]),
             Node("s", "sum", ["yl"], sum_attrs), Node("ms", "mean", ["s"], mean_attrs),
             Node("loss", "neg", ["ms"])]
    plan = compile(Graph(inputs, nodes, ["loss"]))
    rng = np.random.default_rng(3)
    params = {"W": rng.standard_normal((5, 3)), "b": rng.standard_normal(3)}
    rows = 1 if y_shape[0] == 1 else 6
    steps = [{"X": rng.standard_normal((6, 5)),
              "Y": np.eye(3)[rng.integers(0, 3, rows)] * rng.uniform(0.5, 2)}
             for _ in range(3)]
    bound = plan.bind({**steps[0], **params})
    fused = losses.sweep_steps(plan, "loss", bound.shapes)
    assert (len(fused.steps) == len(plan.steps) - 3) == (rows == 6)
    result = sgd_steps(plan, params, steps, learning_rate=LR, momentum=MU)
    expected, expected_velocity, losses_by_jacobian = one_jacobian_at_a_time(plan, params,
                                                                             steps)
    assert result.losses == losses_by_jacobian
    for name in params:
        np.testing.assert_array_equal(result.parameters[name], expected[name])
        np.testing.assert_array_equal(result.velocity[name], expected_velocity[name])


def test_a_tail_value_read_elsewhere_is_not_fused():
    """A value of the tail that another node (or an output) reads keeps the four steps."""
    from gradserve.engine import losses

    for extra, outputs in (([Node("t", "exp", ["s"])], ["loss", "t"]), ([], ["loss", "ms"])):
        plan = compile(Graph(
            [Input("a", "float32", [4]), Input("b", "float32", [4])],
            [Node("yl", "mul", ["a", "b"]), Node("s", "sum", ["yl"]),
             Node("ms", "mean", ["s"]), Node("loss", "neg", ["ms"])] + extra, outputs))
        assert losses.loss_steps(plan, "loss").steps is plan.steps


def test_the_compiled_sweep_is_the_reverse_sweep():
    """engine/sweeps.py's compiled_reverse runs what reverse_sweep runs: the same values
    and cotangents (bitwise), the same checks, for values that fan out, are dropped to
    their shapes on the way, or reach no cotangent."""
    from gradserve.engine.sweeps import compiled_reverse, reverse_sweep

    plan = compile(Graph(
        [Input("x", "float64", [40, 3]), Input("w", "float64", [3]),
         Input("u", "float64", [2])],
        [Node("a", "mul", ["x", "w"]), Node("b", "sin", ["a"]), Node("c", "mul", ["a", "b"]),
         Node("d", "exp", ["c"]), Node("e", "add", ["d", "a"]), Node("s", "sum", ["e"]),
         Node("t", "sum", ["u"]), Node("loss", "mul", ["s", "s"])], ["loss", "t"]))
    rng = np.random.default_rng(5)
    inputs = {"x": rng.standard_normal((40, 3)), "w": rng.standard_normal(3),
              "u": rng.standard_normal(2)}
    assert any(st.drop for st in plan.steps)  # a value reduced to its shape on the way
    for plan_, wrt in ((plan, ("w", "u", "x")), (mlp_plan("float64"), ("W1", "b1", "W2"))):
        if plan_ is not plan:
            params, steps = start(np.float64)
            inputs = {**steps[0], **params}
        loss = plan_.slot["loss"]
        needs = plan_.needs(wrt)
        seeds = {loss: np.ones((1,) + np.shape(plan_.evaluate(inputs)["loss"]))}
        wanted = [loss] + [plan_.slot[n] for n in wrt]
        checked, compiled_checks = [], []
        vals = plan_.bind(inputs).vals
        cots = reverse_sweep(plan_.steps, vals, seeds, needs, lambda: checked.append(1),
                             plan_.points)
        run = compiled_reverse(plan_.steps, needs, plan_.points, (loss,), wanted)
        values, compiled_cots = run(plan_.bind(inputs).vals, seeds,
                                    lambda: compiled_checks.append(1))
        assert len(checked) == len(compiled_checks) > 0
        np.testing.assert_array_equal(values[0], vals[loss])
        for s, g in zip(wanted, compiled_cots):
            if cots[s] is None:
                assert g is None
            else:
                np.testing.assert_array_equal(g, cots[s])


@pytest.mark.parametrize("op, attrs, shapes", [
    ("matmul", {}, [(6, 5), (5, 3)]),
    ("matmul", {}, [(1, 5), (5, 1)]),
    ("add", {}, [(6, 3), (3,)]),
    ("add", {}, [(6, 3), (1, 3)]),
    ("add", {}, [(6, 1), (6, 3)]),
    ("add", {}, [(2, 6, 3), (6, 1)]),
    ("add", {}, [(6, 3), (6, 3)]),
    ("relu", {}, [(6, 3)]),
    ("log_softmax", {"axis": 1}, [(6, 3)]),
    ("log_softmax", {"axis": 0}, [(6, 3)]),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_direct_kernels_are_their_rows_bitwise(op, attrs, shapes, dtype):
    """engine/direct.py's kernels (a compiled training sweep's eval and vjps at known
    shapes) compute what the op's row computes, bit for bit, for one seed direction."""
    from gradserve.engine import direct
    from gradserve.engine.ops import OPS

    row = OPS[op]
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal(s).astype(dtype) for s in shapes]
    if op == "relu":
        xs[0][0] = 0  # the kink: relu'(0) = 0 in both
    ans = row.eval(*xs, **attrs)
    g = rng.standard_normal((1,) + ans.shape).astype(dtype)
    found = direct.kernels(op, attrs, shapes, ans.shape)
    assert found is not None
    names = {f"x{i}": x for i, x in enumerate(xs)}

    def run(src):
        code = src.format(*names, g="g", ans="ans")
        return eval(code, dict(direct.ENV), {**names, "g": g, "ans": ans})  # noqa: S307

    if found.eval is not None:
        value = run(found.eval)
        assert value.dtype == ans.dtype
        np.testing.assert_array_equal(value, ans)
    assert found.vjps
    for pos, src in found.vjps.items():
        expected = row.vjp(pos, g, tuple(xs), ans, **attrs)
        pulled = run(src)
        assert pulled.shape == expected.shape and pulled.dtype == expected.dtype
        np.testing.assert_array_equal(pulled, expected)


def _deep_plan(layers):
    """An MLP of `layers` dense layers of 4 (three steps each) and the usual loss tail."""
    inputs = [Input("X", "float32", [-1, 4]), Input("Y", "float32", [-1, 4])]
    nodes, h = [], "X"
    for k in range(layers):
        inputs += [Input(f"W{k}", "float32", [4, 4]), Input(f"b{k}", "float32", [4])]
        nodes += [Node(f"m{k}", "matmul", [h, f"W{k}"]), Node(f"a{k}", "add", [f"m{k}", f"b{k}"]),
                  Node(f"h{k}", "tanh", [f"a{k}"])]
        h = f"h{k}"
    return inputs, nodes, h


def _concat_plan(n):
    """n scalar parameters concatenated: one step of n input references."""
    inputs = [Input("Y", "float32", [-1, 4])] + [Input(f"p{k}", "float32", [1])
                                                  for k in range(n)]
    nodes = [Node("c", "concat", [f"p{k}" for k in range(n)], {"axis": 0}),
             Node("r", "reshape", ["c"], {"shape": [-1, 4]})]
    return inputs, nodes, "r"


@pytest.mark.parametrize("make, size", [(_deep_plan, 83), (_concat_plan, 1000)])
def test_compiling_a_training_sweep_takes_at_most_its_declared_memory(make, size):
    """The call that compiles a training sweep (engine/losses.py) declares the memory the
    compiling takes: measured by tracemalloc over the whole call, under the figure its
    admission adds; over a limit below that figure it is refused before compiling, and
    a later call that finds the sweep compiled is not charged for it. (A concat of 1000
    parameters took ~900 MB to compile when each of its vjp calls listed all 1000.) What it
    keeps, the graph cache counts (it counted 7 KB for the 1000 references' 0.5 MB)."""
    import gc
    import tracemalloc

    from gradserve.engine import losses

    inputs, nodes, h = make(size)
    nodes += [Node("lp", "log_softmax", [h], {"axis": -1}), Node("yl", "mul", ["Y", "lp"]),
              Node("s", "sum", ["yl"], {"axes": [-1]}), Node("ms", "mean", ["s"]),
              Node("loss", "neg", ["ms"])]
    plan = compile(Graph(inputs, nodes, ["loss"]))
    rng = np.random.default_rng(0)
    params = {i.name: (rng.standard_normal([d for d in i.shape]) * 0.3).astype(np.float32)
              for i in inputs[2 if make is _deep_plan else 1:]}
    rows = 2 if make is _deep_plan else size // 4  # (the concat's values, 4 a row)
    batch = {"Y": np.eye(4, dtype=np.float32)[rng.integers(0, 4, rows)][None]}
    if make is _deep_plan:
        batch["X"] = rng.standard_normal((1, rows, 4)).astype(np.float32)
    shapes = plan.bind({**{n: b[0] for n, b in batch.items()}, **params}).shapes
    tail = losses.sweep_steps(plan, "loss", shapes)
    declared = losses.compile_bytes(plan, "loss", tail, tuple(params), shapes)
    assert declared > 0
    with pytest.raises(ResourceLimitError, match="bytes of intermediates"):
        sgd_steps(plan, params, batch, learning_rate=LR, max_bytes=declared - 1)
    assert not any(k[0] == "compiled" for k in plan.loss_tails)  # refused before compiling

    counted = plan.cache_bytes
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        first = sgd_steps(plan, params, batch, learning_rate=LR).losses
        peak = tracemalloc.get_traced_memory()[1] - base
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - base  # (the result's arrays are gone)
    finally:
        tracemalloc.stop()
    assert 0 < peak <= declared, (peak, declared)
    # what the compiled sweep keeps, as the graph cache counts it (Plan.cache_bytes)
    assert 0 < kept <= plan.cache_bytes - counted, (kept, plan.cache_bytes - counted)
    assert losses.compile_bytes(plan, "loss", tail, tuple(params), shapes) == 0
    again = sgd_steps(plan, params, batch, learning_rate=LR, max_bytes=declared - 1)
    assert again.losses == first
