"""The SGD worker end to end: real servers on 127.0.0.1, the real client, no mocks.

Accuracy on digits, the loss curve against a numpy reference, interrupt and
resume, a server killed mid-training, data parallelism over several servers,
the `gradserve train` command, and the data set loaders.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve import cli
from gradserve.client.datasets import DatasetError, load_dataset, stratified_split
from gradserve.client.gradients import DataParallelGradient, RemoteGradient, remote_gradient
from gradserve.client.models import ModelSpec, one_hot
from gradserve.client.training import CheckpointError, Trainer, TrainConfig, load_checkpoint
from support.server_process import COMMAND, ServerProcess, free_port
from support.models import reference_loss_and_grads

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("sklearn", reason="the digits data set needs the train extra")


@pytest.fixture(scope="module")
def digits():
    # Seed 1: on seed 0's split even scikit-learn's best logistic regression
    # stays near 95%, which would make a >= 95% check a coin toss.
    return load_dataset("digits", test_fraction=0.2, seed=1)


def logreg(data) -> ModelSpec:
    return ModelSpec.logistic_regression(data.num_features, data.num_classes)


def mlp(data) -> ModelSpec:
    return ModelSpec.mlp(data.num_features, data.num_classes, (64, 64))


def train(spec, data, config, addresses, *, stream=False, resume=False, on_step=None,
          retries=40):
    gradient = remote_gradient(addresses, spec.build_graph(), spec.param_names, stream=stream,
                               retries=retries)
    try:
        trainer = Trainer(spec, data, gradient, config)
        return trainer.run(trainer.start(resume), on_step)
    finally:
        gradient.close()


def assert_same_params(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        assert_allclose(a[name], b[name], rtol=rtol, atol=atol, err_msg=name)


# --- learning ------------------------------------------------------------------------------

@pytest.mark.parametrize("make_spec, config", [
    (logreg, TrainConfig(epochs=30, lr=0.2, momentum=0.9, seed=1)),
    (mlp, TrainConfig(epochs=20, lr=0.1, momentum=0.9, seed=1)),
], ids=["logreg", "mlp"])
def test_digits_reach_95_percent_through_the_service(address, digits, make_spec, config):
    modes = set()
    state = train(make_spec(digits), digits, config, [address],
                  on_step=lambda state, g: modes.add(g.mode))
    assert state.history[-1].test_accuracy >= 0.95, state.history
    assert state.step == config.epochs * math.ceil(len(digits.y_train) / config.batch_size)
    assert modes == {"reverse"}  # a scalar loss: the planner picks reverse mode
    assert all(a.dtype == np.float32 for a in state.params.values())


def numpy_sgd(spec, data, config):
    """The worker's documented algorithm, written out with the numpy reference
    model: per-step losses and the final parameters."""
    init_seed, batch_seed = np.random.SeedSequence(config.seed).spawn(2)
    params = spec.init_params(np.random.default_rng(init_seed))
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    batches = np.random.default_rng(batch_seed)
    Y = one_hot(data.y_train, data.num_classes)
    lr, momentum = np.float32(config.lr), np.float32(config.momentum)
    losses = []
    for _ in range(config.epochs):
        order = batches.permutation(len(Y))
        for start in range(0, len(Y), config.batch_size):
            rows = order[start:start + config.batch_size]
            loss, _, grads = reference_loss_and_grads(spec, params, data.X_train[rows], Y[rows])
            losses.append(loss)
            velocity = {k: momentum * velocity[k] + grads[k] for k in params}
            params = {k: params[k] - lr * velocity[k] for k in params}
    return losses, params


@pytest.mark.parametrize("make_spec", [logreg, mlp], ids=["logreg", "mlp"])
def test_loss_curve_equals_numpy_reference(address, digits, make_spec):
    spec = make_spec(digits)
    spec = ModelSpec(spec.num_features, spec.num_classes, spec.hidden, l2=1e-3)
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.5, seed=5)
    losses = []
    state = train(spec, digits, config, [address],
                  on_step=lambda state, g: losses.append(g.loss))
    expected_losses, expected_params = numpy_sgd(spec, digits, config)
    assert len(losses) == len(expected_losses) == state.step
    assert_allclose(losses, expected_losses, rtol=1e-4)
    assert_same_params(state.params, expected_params, rtol=1e-4, atol=1e-5)


# --- checkpoints -------------------------------------------------------------------------------

class Stop(Exception):
    """The worker process dying, as far as the checkpoint file can tell."""


def test_interrupt_and_resume_equals_the_uninterrupted_run(address, digits, tmp_path):
    spec = mlp(digits)
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2)
    uninterrupted = train(spec, digits, config, [address])

    path = str(tmp_path / "run.ckpt")
    checkpointed = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=2, checkpoint=path,
                               checkpoint_every=7)

    def die_at_step_30(state, gradient):
        if state.step == 30:
            raise Stop

    with pytest.raises(Stop):
        train(spec, digits, checkpointed, [address], on_step=die_at_step_30)
    saved = load_checkpoint(path)
    # Step 28 is the last multiple of 7; steps 29 and 30 are lost and redone.
    assert (saved.step, saved.epoch, len(saved.history)) == (28, 1, 1)

    resumed = train(spec, digits, checkpointed, [address], resume=True)
    assert resumed.step == uninterrupted.step
    for name in spec.param_names:
        assert_array_equal(resumed.params[name], uninterrupted.params[name], err_msg=name)
        assert_array_equal(resumed.velocity[name], uninterrupted.velocity[name], err_msg=name)
    assert resumed.history == uninterrupted.history
    assert os.listdir(tmp_path) == ["run.ckpt"]  # no temporary files left behind


def test_steps_per_call_equal_one_step_per_call(address, digits, tmp_path):
    """K = 16 steps per call (TrainSteps) gives the same parameters, momentum buffers
    and loss history as one step per call, bitwise; checkpoints every 7 steps still
    land on multiples of 7 and a resume equals the uninterrupted run."""
    spec = mlp(digits)
    one = train(spec, digits, TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=3), [address])
    many = train(spec, digits, TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=3,
                                           steps_per_call=16), [address])
    assert many.step == one.step
    for name in spec.param_names:
        assert_array_equal(many.params[name], one.params[name], err_msg=name)
        assert_array_equal(many.velocity[name], one.velocity[name], err_msg=name)
    assert many.history == one.history

    path = str(tmp_path / "k.ckpt")
    checkpointed = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=3, checkpoint=path,
                               checkpoint_every=7, steps_per_call=16)
    seen = []

    def die_at_step_30(state, gradient):
        seen.append(state.step)
        if state.step == 30:
            raise Stop

    with pytest.raises(Stop):
        train(spec, digits, checkpointed, [address], on_step=die_at_step_30)
    assert seen == list(range(1, 31))  # on_step once per step, in order
    # calls end at checkpoints; the call holding step 30 ran to step 35 and was saved
    # before on_step heard of its steps
    assert load_checkpoint(path).step == 35
    resumed = train(spec, digits, checkpointed, [address], resume=True)
    for name in spec.param_names:
        assert_array_equal(resumed.params[name], one.params[name], err_msg=name)
    assert resumed.history == one.history


def test_a_checkpoint_of_another_run_is_refused(address, digits, tmp_path):
    path = str(tmp_path / "run.ckpt")
    spec = logreg(digits)
    train(spec, digits, TrainConfig(epochs=1, seed=0, checkpoint=path), [address])
    with pytest.raises(CheckpointError, match=r"another run \(lr: checkpoint 0.1, now 0.5\)"):
        train(spec, digits, TrainConfig(epochs=2, lr=0.5, checkpoint=path), [address],
              resume=True)


# --- fault tolerance ---------------------------------------------------------------------------

def start_server_process(port: int) -> ServerProcess:
    process = ServerProcess("--port", port)
    process.wait_serving()
    return process


@pytest.mark.parametrize("model, stream", [("logreg", False), ("logreg", True), ("onnx", False)],
                         ids=["unary", "stream", "onnx-cnn"])
def test_killed_server_costs_retries_never_a_step(address, digits, model, stream, request):
    if model == "onnx":
        from gradserve.client.models import OnnxModelSpec
        spec = OnnxModelSpec(request.getfixturevalue("cnn_onnx"), digits.num_features,
                             digits.num_classes)
    else:
        spec = logreg(digits)
    config = TrainConfig(epochs=2, lr=0.2, momentum=0.9, seed=4)
    fault_free = train(spec, digits, config, [address])

    port, kill_at = free_port(), 10
    server = start_server_process(port)
    applied, step_times = [], {}
    reached, killed = threading.Event(), threading.Event()
    outcome = {}

    def on_step(state, gradient):
        applied.append(state.step)
        step_times[state.step] = time.monotonic()
        if state.step == kill_at:
            reached.set()
            killed.wait(30)  # the next step meets a dead server

    def worker():
        try:
            outcome["state"] = train(spec, digits, config, [f"127.0.0.1:{port}"],
                                     stream=stream, on_step=on_step)
        except BaseException as err:  # reported by the assertions below
            outcome["error"] = err

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert reached.wait(60), "training never reached the kill step"
        server.kill()
        killed_at = time.monotonic()
        killed.set()
        time.sleep(0.5)  # down for a while: the worker retries
        server = start_server_process(port)  # a new process: it knows no graphs
        thread.join(120)
    finally:
        killed.set()
        server.kill()
    assert "error" not in outcome, outcome.get("error")
    assert applied == list(range(1, fault_free.step + 1))  # each step once, in order
    # it waited for the new server: from the step after the kill, or (unary calls,
    # pipelined: the next call was in flight ahead while on_step ran, and may have
    # stepped on the old server before it died) the one after that
    first_to_wait = kill_at + (1 if stream else 2)
    assert step_times[first_to_wait] - killed_at >= 0.4
    assert_same_params(outcome["state"].params, fault_free.params)


# --- data parallelism --------------------------------------------------------------------------

def test_data_parallel_gradient_equals_single_server_gradient(address, start_server, digits):
    spec = mlp(digits)
    graph = spec.build_graph()
    addresses = [address] + [f"127.0.0.1:{start_server().port}" for _ in range(2)]
    params = spec.init_params(np.random.default_rng(0))
    single = remote_gradient(addresses[:1], graph, spec.param_names)
    parallel = remote_gradient(addresses, graph, spec.param_names)
    assert isinstance(single, RemoteGradient) and isinstance(parallel, DataParallelGradient)
    try:
        Y = one_hot(digits.y_train, digits.num_classes)
        for n in (64, 29, 2):  # uneven shards, and fewer rows than servers
            X_batch, Y_batch = digits.X_train[:n], Y[:n]
            whole, split = single(params, X_batch, Y_batch), parallel(params, X_batch, Y_batch)
            assert split.mode == "reverse"
            assert split.loss == pytest.approx(whole.loss, rel=1e-6)
            assert_same_params(split.grads, whole.grads, rtol=1e-5, atol=1e-7)
    finally:
        single.close()
        parallel.close()

    config = TrainConfig(epochs=1, lr=0.1, seed=3)
    assert_same_params(train(spec, digits, config, addresses).params,
                       train(spec, digits, config, addresses[:1]).params)


def test_data_parallel_training_goes_on_without_a_dead_server(address, start_server, digits,
                                                               caplog):
    spec = logreg(digits)
    config = TrainConfig(epochs=2, lr=0.2, momentum=0.9, seed=6)
    doomed = start_server()
    doomed_address = f"127.0.0.1:{doomed.port}"
    applied = []

    def on_step(state, gradient):
        applied.append(state.step)
        if state.step == 10:
            doomed.stop(grace=0)  # for good: its port refuses connections from now on

    with caplog.at_level("WARNING", logger="gradserve.client"):
        state = train(spec, digits, config, [address, doomed_address], on_step=on_step,
                      retries=2)
    assert applied == list(range(1, state.step + 1))
    assert f"server {doomed_address} is unreachable" in caplog.text
    assert_same_params(state.params, train(spec, digits, config, [address]).params)


# --- the command -------------------------------------------------------------------------------

def test_train_command_prints_json_and_writes_a_png(tmp_path):
    plot, checkpoint = tmp_path / "loss.png", tmp_path / "run.ckpt"
    command = [*COMMAND, "train", "--model", "logreg",
               "--epochs", "2", "--momentum", "0.9", "--json", "--plot", str(plot),
               "--checkpoint", str(checkpoint)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.8 < summary["test_accuracy"] <= 1.0
    assert summary["steps"] == summary["steps_this_run"] == 2 * 23
    assert summary["mode"] == "reverse" and summary["in_process_server"]
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    assert plot.read_bytes()[:8] == PNG_MAGIC

    resumed = subprocess.run([*command[:7], "3", *command[8:], "--resume"],
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert (summary["steps"], summary["steps_this_run"]) == (3 * 23, 23)
    assert "resuming from" in resumed.stderr


def test_train_command_against_running_servers(address, start_server, capsys):
    other = f"127.0.0.1:{start_server().port}"
    code = cli.main(["train", "--model", "mlp", "--hidden", "16", "--epochs", "1",
                     "--server", address, "--server", other, "--stream"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{address}, {other} (data parallel: each minibatch split in 2)" in out
    assert "over DifferentiateStream" in out and "mode     reverse" in out
    assert "test accuracy" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "logreg", "--hidden", "8"], "--hidden applies to --model mlp only"),
    (["--resume"], "--resume needs --checkpoint PATH"),
    (["--dataset", "missing.npz"], "dataset file missing.npz does not exist"),
    (["--dataset", "data.parquet"], "expected 'digits', a .npz file"),
    (["--lr", "-1"], "lr must be > 0, got -1.0"),
    (["--steps-per-call", "8", "--stream"], "goes with neither --stream"),
    (["--steps-per-call", "0"], "steps_per_call must be >= 1"),
])
def test_train_command_errors_say_what_to_fix(address, capsys, argv, message):
    code = cli.main(["train", "--server", address, "--epochs", "1", *argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err


def test_a_missing_extra_is_named(address, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if not installed
    assert cli.main(["train", "--server", address, "--dataset", "digits"]) == 2
    err = capsys.readouterr().err
    assert "the digits dataset needs scikit-learn" in err
    assert "pip install 'gradserve[train]'" in err


def test_an_unreachable_server_is_reported(capsys):
    code = cli.main(["train", "--server", f"127.0.0.1:{free_port()}", "--retries", "1",
                     "--epochs", "1"])
    assert code == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


# --- data sets ---------------------------------------------------------------------------------

def test_digits_are_scaled_and_split_by_class(digits):
    assert digits.num_features == 64 and digits.num_classes == 10
    assert digits.X_train.dtype == np.float32
    assert digits.X_train.min() == 0.0 and digits.X_train.max() == 1.0
    assert len(digits.y_train) + len(digits.y_test) == 1797
    train_share = np.bincount(digits.y_train) / np.bincount(
        np.concatenate([digits.y_train, digits.y_test]))
    assert np.all(np.abs(train_share - 0.8) < 0.02)


def test_stratified_split_is_seeded_and_disjoint():
    y = np.repeat([0, 1, 2], [10, 20, 3])
    train_a, test_a = stratified_split(y, 0.3, seed=9)
    train_b, test_b = stratified_split(y, 0.3, seed=9)
    assert_array_equal(train_a, train_b) and assert_array_equal(test_a, test_b)
    assert sorted(np.concatenate([train_a, test_a])) == list(range(len(y)))
    assert list(np.bincount(y[test_a])) == [3, 6, 1]
    assert not np.array_equal(test_a, stratified_split(y, 0.3, seed=10)[1])


def test_npz_and_csv_files(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.random((40, 3)), np.repeat([5, 7], 20)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    data = load_dataset(str(tmp_path / "d.npz"), seed=0)
    assert (data.num_features, data.classes, len(data.y_test)) == (3, (5, 7), 8)

    rows = ["f1,f2,f3,label"] + [f"{a},{b},{c},{'cat' if k == 5 else 'dog'}"
                                 for (a, b, c), k in zip(X, y)]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(str(tmp_path / "d.csv"), seed=0)
    assert data.classes == ("cat", "dog") and data.X_train.dtype == np.float32
    assert_allclose(np.sort(np.concatenate([data.X_train, data.X_test]), axis=0),
                     np.sort(X, axis=0).astype(np.float32))


@pytest.mark.parametrize("content, message", [
    ("1,2,0\n3,x,1\n", "data row 2: features must be numbers"),
    ("1,2,0\n3,1\n", "data row 2 has 2 columns, the first has 3"),
    ("1,0\n2,0\n", "needs at least 2 classes"),
    ("a,b\n", "no data rows"),
])
def test_bad_csv_files_are_explained(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset(str(path))


def test_npz_without_labels_is_explained(tmp_path):
    np.savez(tmp_path / "x.npz", X=np.zeros((4, 2)))
    with pytest.raises(DatasetError, match=r"needs arrays X \(features\) and y \(labels\)"):
        load_dataset(str(tmp_path / "x.npz"))


# --- an imported ONNX model ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory):
    """The digits CNN built with onnx.helper (tests/client/test_onnx_torch.py exports one from
    PyTorch)."""
    onnx = pytest.importorskip("onnx", reason="ONNX import needs the onnx package")
    from support.onnx_models import digits_cnn_model

    path = tmp_path_factory.mktemp("onnx") / "digits_cnn.onnx"
    onnx.save(digits_cnn_model(), path)
    return path


def test_train_command_trains_an_onnx_cnn_to_95_percent(address, cnn_onnx, capsys, tmp_path):
    checkpoint = tmp_path / "cnn.ckpt"
    argv = ["train", "--model", str(cnn_onnx), "--server", address, "--seed", "1",
            "--epochs", "12", "--lr", "0.1", "--momentum", "0.9", "--json",
            "--checkpoint", str(checkpoint)]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.95, summary["history"]
    assert summary["parameters"] == 1370 and summary["widths"] is None
    assert summary["mode"] == "reverse"
    state = load_checkpoint(str(checkpoint))
    assert set(state.params) == {"conv.weight", "conv.bias", "fc.weight", "fc.bias"}
    assert state.params["conv.weight"].shape == (8, 1, 3, 3)

    assert cli.main([*argv[:8], "13", *argv[9:], "--resume"]) == 0
    captured = capsys.readouterr()
    assert "resuming from" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["steps_this_run"] == 23


@pytest.mark.parametrize("extra, message", [
    (["--hidden", "8"], "--hidden applies to --model mlp only"),
    (["--activation", "tanh"], "--activation applies to --model mlp only"),
    (["--dataset", "WRONG"], "expected 'digits'"),
])
def test_train_command_onnx_errors(address, cnn_onnx, capsys, extra, message):
    code = cli.main(["train", "--model", str(cnn_onnx), "--server", address, "--epochs", "1",
                     *extra])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_onnx_model_that_does_not_fit_the_data_is_explained(address, capsys, tmp_path,
                                                               cnn_onnx):
    rng = np.random.default_rng(0)
    data = tmp_path / "wide.npz"
    np.savez(data, X=rng.random((40, 30)), y=np.arange(40) % 2)
    assert cli.main(["train", "--model", str(cnn_onnx), "--server", address,
                     "--dataset", str(data)]) == 2
    err = capsys.readouterr().err
    assert "input 'image' takes [?, 1, 8, 8], 64 features per sample; the data set has 30" in err
    assert cli.main(["train", "--model", str(tmp_path / "missing.onnx"), "--server",
                     address]) == 2
    assert "missing.onnx: no such file" in capsys.readouterr().err
