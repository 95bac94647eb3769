"""Local SGD across replicas (gradserve.client.local_sgd, `gradserve train
--sync-every H`) with real servers: H = 1 with plain averaging is data
parallelism; H = 16 trains digits to >= 95% with >= 8x fewer rounds than steps;
the outer state is checkpointed and a resume (after an exception, or after kill -9
of the `gradserve train` process) ends where the uninterrupted run ends; a server
killed mid-run costs nothing but retries (its shards go to the other server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from gradserve import cli
from gradserve.client.datasets import load_dataset
from gradserve.client.gradients import remote_gradient
from gradserve.client.local_sgd import OuterConfig, local_sgd_trainer
from gradserve.client.models import ModelSpec
from gradserve.client.training import Trainer, TrainConfig, load_checkpoint
from support.server_process import COMMAND, ServerProcess

pytest.importorskip("sklearn", reason="the digits data set needs the train extra")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", test_fraction=0.2, seed=1)


def mlp(data) -> ModelSpec:
    return ModelSpec.mlp(data.num_features, data.num_classes, (32,))


def local(spec, data, config, outer, addresses, *, resume=False, on_step=None, retries=40):
    trainer = local_sgd_trainer(spec, data, addresses, config, outer, retries=retries)
    try:
        return trainer.run(trainer.start(resume), on_step), trainer.rounds
    finally:
        trainer.close()


def test_one_step_rounds_with_plain_averaging_are_data_parallelism(address, start_server,
                                                                    digits):
    spec, other = mlp(digits), f"127.0.0.1:{start_server().port}"
    config = TrainConfig(epochs=2, lr=0.1, seed=5)
    gradient = remote_gradient([address, other], spec.build_graph(), spec.param_names)
    try:
        trainer = Trainer(spec, digits, gradient, config)
        parallel = trainer.run(trainer.start())
    finally:
        gradient.close()
    state, rounds = local(spec, digits, config, OuterConfig(1, 1.0, 0.0), [address, other])
    assert rounds == state.step == parallel.step
    for name in spec.param_names:
        assert_allclose(state.params[name], parallel.params[name], rtol=1e-4, atol=1e-6,
                        err_msg=name)
    assert [round(h.test_accuracy, 6) for h in state.history] == \
        [round(h.test_accuracy, 6) for h in parallel.history]


def test_sixteen_steps_per_round_reach_95_percent_with_8x_fewer_rounds(address, start_server,
                                                                        digits):
    spec, other = mlp(digits), f"127.0.0.1:{start_server().port}"
    config = TrainConfig(epochs=10, batch_size=32, lr=0.1, seed=1)
    state, rounds = local(spec, digits, config, OuterConfig(16), [address, other])
    print(f"\nH=16 on 2 servers: {state.step} steps in {rounds} rounds, test accuracy "
          f"{state.history[-1].test_accuracy:.3f}")
    assert state.history[-1].test_accuracy >= 0.95, state.history
    assert rounds * 8 <= state.step
    assert all(a.dtype == np.float32 for a in state.params.values())


def test_interrupt_and_resume_equals_the_uninterrupted_run(address, start_server, digits,
                                                          tmp_path):
    spec, other = mlp(digits), f"127.0.0.1:{start_server().port}"
    outer = OuterConfig(8)
    config = TrainConfig(epochs=3, lr=0.1, momentum=0.5, seed=2)
    uninterrupted, _ = local(spec, digits, config, outer, [address, other])

    path = str(tmp_path / "run.ckpt")
    checkpointed = TrainConfig(epochs=3, lr=0.1, momentum=0.5, seed=2, checkpoint=path,
                               checkpoint_every=8)

    class Stop(Exception):
        pass

    def die_at_step_30(state, gradient):
        if state.step == 30:
            raise Stop

    with pytest.raises(Stop):
        local(spec, digits, checkpointed, outer, [address, other], on_step=die_at_step_30)
    saved = load_checkpoint(path)
    # rounds: 1-8, 9-16, 17-22, 23 (the epoch's short batch), 24-31, ...: the round
    # holding step 30 passed 24, a multiple of 8, and was saved before on_step ran
    assert saved.step == 31
    # the outer momentum and each shard's inner momentum are in the checkpoint
    for name in spec.param_names:
        for key in (f"outer.{name}", f"shard0.{name}", f"shard1.{name}"):
            assert np.any(saved.velocity[key] != 0), key
    resumed, _ = local(spec, digits, checkpointed, outer, [address, other], resume=True)
    assert resumed.step == uninterrupted.step
    for name in spec.param_names:
        assert_array_equal(resumed.params[name], uninterrupted.params[name], err_msg=name)
    assert resumed.history == uninterrupted.history


def test_a_killed_server_costs_retries_never_a_step(address, digits):
    spec = mlp(digits)
    outer, config = OuterConfig(8), TrainConfig(epochs=2, lr=0.1, seed=4)
    reference, _ = local(spec, digits, config, outer, [address, address])
    with ServerProcess("--port", "0") as server:
        doomed = server.wait_serving()
        applied = []

        def on_step(state, gradient):
            applied.append(state.step)
            if state.step == 16:
                server.kill()  # kill -9: its shard of the next round goes to the other

        state, rounds = local(spec, digits, config, outer, [doomed, address],
                              on_step=on_step, retries=2)
    assert applied == list(range(1, reference.step + 1))  # each step once, in order
    for name in spec.param_names:  # shards belong to the run, not to a server
        assert_allclose(state.params[name], reference.params[name], rtol=1e-5, atol=1e-7,
                        err_msg=name)


def test_train_command_kill_9_and_resume(address, start_server, tmp_path):
    other = f"127.0.0.1:{start_server().port}"
    base = [*COMMAND, "train", "--model", "mlp", "--hidden", "16", "--epochs", "6",
            "--server", address, "--server", other, "--sync-every", "4", "--json"]
    whole = tmp_path / "whole.ckpt"
    done = subprocess.run([*base, "--checkpoint", str(whole)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["local_sgd"] == {"sync_every": 4, "outer_lr": 0.7, "outer_momentum": 0.9,
                                    "rounds_this_run": 6 * 7}  # 23 steps: 4 x 5, 2, 1
    path = tmp_path / "run.ckpt"
    command = [*base, "--checkpoint", str(path), "--checkpoint-every", "4"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (path.exists() and load_checkpoint(str(path)).step >= 40):
            assert proc.poll() is None, "finished before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = load_checkpoint(str(path)).step
    assert killed_at < 6 * 23
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    a, b = load_checkpoint(str(whole)), load_checkpoint(str(path))
    assert a.step == b.step == 6 * 23
    for name in a.params:
        assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert a.history == b.history


@pytest.mark.parametrize("argv, message", [
    (["--sync-every", "4", "--stream"], "goes with neither --stream nor --steps-per-call"),
    (["--sync-every", "4", "--steps-per-call", "8"], "neither --stream nor --steps-per-call"),
    (["--outer-lr", "0.5"], "--outer-lr and --outer-momentum go with --sync-every H"),
    (["--sync-every", "0"], "sync_every must be >= 1, got 0"),
    (["--sync-every", "4", "--outer-momentum", "1"], "outer_momentum must be in [0, 1), got 1"),
])
def test_local_sgd_flag_errors(address, capsys, argv, message):
    assert cli.main(["train", "--server", address, "--epochs", "1", *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_command_prints_the_local_sgd_summary(address, start_server, capsys):
    other = f"127.0.0.1:{start_server().port}"
    assert cli.main(["train", "--model", "mlp", "--hidden", "16", "--epochs", "1",
                     "--server", address, "--server", other, "--sync-every", "16"]) == 0
    out = capsys.readouterr().out
    assert f"{address}, {other} (local SGD: each minibatch split in 2, averaged every 16 " \
           "steps; 3 rounds)" in out  # 23 steps: 16, 6, and the short last batch
    assert "test accuracy" in out
