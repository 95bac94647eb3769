"""The SGD worker's calls pipelined (TrainConfig.pipeline, the default against one
server: call n+1 sent before n's reply has come) against one call at a time, over
real gRPC on 127.0.0.1: the same losses, evaluations, checkpoints and parameters,
bitwise; a call that reaches the server ahead of its predecessor is sent again and
steps once; a state lost mid-pipeline is restored as before; an error or an
exception in on_step leaves the Trainer where one call at a time leaves it."""

from __future__ import annotations

import json
from concurrent.futures import Future
from dataclasses import replace

import grpc
import numpy as np
import pytest
from numpy.testing import assert_array_equal

from gradserve import cli
from gradserve.client import Client
from gradserve.client.datasets import load_dataset
from gradserve.client.gradients import remote_gradient
from gradserve.client.models import ModelSpec
from gradserve.client.training import Trainer, TrainConfig, load_checkpoint, save_checkpoint

pytest.importorskip("sklearn", reason="the digits data set needs the train extra")

CONFIG = TrainConfig(epochs=3, lr=0.1, momentum=0.9, seed=7)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", test_fraction=0.2, seed=1)


@pytest.fixture(scope="module")
def spec(digits):
    return ModelSpec.mlp(digits.num_features, digits.num_classes, (32,))


class Stop(Exception):
    pass


def run(spec, data, config, address, on_step=None, trainer_hook=None):
    """(the final state or the exception, the trainer, (step, loss) per on_step)."""
    gradient = remote_gradient([address], spec.build_graph(), spec.param_names)
    heard = []
    try:
        trainer = Trainer(spec, data, gradient, config)
        if trainer_hook is not None:
            trainer_hook(trainer)

        def step(state, g):
            heard.append((state.step, g.loss))
            if on_step is not None:
                on_step(trainer, state, g)
        try:
            outcome = trainer.run(trainer.initial_state(), step)
        except (Stop, grpc.RpcError) as err:
            outcome = err
        return outcome, trainer, heard
    finally:
        gradient.close()


def assert_same_state(a, b):
    assert (a.step, a.epoch, a.epoch_loss_sum, a.history) == \
        (b.step, b.epoch, b.epoch_loss_sum, b.history)
    assert a.batch_rng_state == b.batch_rng_state
    for name in a.params:
        assert_array_equal(a.params[name], b.params[name], err_msg=name)
        assert_array_equal(a.velocity[name], b.velocity[name], err_msg=name)


@pytest.fixture(scope="module")
def sequential(spec, digits, address):
    state, _, heard = run(spec, digits, replace(CONFIG, pipeline=False), address)
    return state, heard


def test_pipelined_equals_one_call_at_a_time_bitwise(spec, digits, address, sequential,
                                                     tmp_path):
    want, want_heard = sequential
    got, _, heard = run(spec, digits, CONFIG, address)
    assert CONFIG.pipeline  # the default
    assert heard == want_heard  # each step once, in order, with the same loss
    assert_same_state(got, want)
    # checkpoints every 5 steps and a resume from one: the same as well
    paths = {p: str(tmp_path / f"{p}.ckpt") for p in (False, True)}

    def stop_at_31(trainer, state, g):
        if state.step == 31:
            raise Stop
    for pipeline, path in paths.items():
        config = replace(CONFIG, pipeline=pipeline, checkpoint=path, checkpoint_every=5)
        outcome, _, _ = run(spec, digits, config, address, stop_at_31)
        assert isinstance(outcome, Stop)
    saved = {p: load_checkpoint(path) for p, path in paths.items()}
    assert saved[True].step == saved[False].step == 30
    assert_same_state(saved[True], saved[False])
    gradient = remote_gradient([address], spec.build_graph(), spec.param_names)
    try:
        config = replace(CONFIG, checkpoint=paths[True], checkpoint_every=5)
        trainer = Trainer(spec, digits, gradient, config)
        assert_same_state(trainer.run(trainer.start(resume=True)), want)
    finally:
        gradient.close()


def test_a_call_that_arrives_ahead_of_its_predecessor_is_sent_again(spec, digits, address,
                                                                    sequential, monkeypatch):
    """Each epoch's last call (its evaluation) is held back on this side until the next
    call has been answered, so the next epoch's first call reaches the server first:
    refused (FAILED_PRECONDITION), sent again after, stepped once. Results bitwise those
    of one call at a time. (The order is forced, not timed: on a busy machine a timer
    could let the held call through first.)"""
    real = Client.train_steps_async
    refused = []
    held = []  # the held call's send, run once the call sent after it is answered
    evaluations = 0

    def held_back(self, graph, state, **kwargs):
        nonlocal evaluations
        if not kwargs.get("evaluate_data"):
            release = held[:]  # a held call is let go by the call sent after it
            held.clear()
            future = real(self, graph, state, **kwargs)

            def answered(f):
                refused.append(f.exception() is not None
                               and f.exception().code() == grpc.StatusCode.FAILED_PRECONDITION)
                for send in release:
                    send()
            future.add_done_callback(answered)
            return future
        evaluations += 1
        if evaluations == CONFIG.epochs:  # the run's last call: no call comes after it
            return real(self, graph, state, **kwargs)
        late: Future = Future()

        def send():
            outcome = real(self, graph, state, **kwargs)
            outcome.add_done_callback(lambda f: late.set_exception(f.exception())
                                      if f.exception() else late.set_result(f.result()))
        held.append(send)
        return late
    monkeypatch.setattr(Client, "train_steps_async", held_back)
    want, want_heard = sequential
    got, _, heard = run(spec, digits, CONFIG, address)
    assert sum(refused) >= CONFIG.epochs - 1  # each epoch's first call after the first
    assert heard == want_heard
    assert_same_state(got, want)


def test_a_state_lost_mid_pipeline_is_restored_as_before(spec, digits, address, sequential):
    """The state handle deleted while on_step runs (the next call in flight, maybe
    stepped already): NOT_FOUND, the last state fetched put again, the steps since
    replayed, each reported once."""
    want, want_heard = sequential

    def lose_state(trainer, state, g):
        if state.step in (30, 52):
            trainer.gradient.client.delete(trainer._stored.handle)
    got, _, heard = run(spec, digits, CONFIG, address, lose_state)
    assert heard == want_heard
    assert_same_state(got, want)


def sabotage_call(index: int):
    """A trainer hook: its call number `index` asks for a row the data set lacks."""
    def hook(trainer):
        planned = trainer._stored_calls

        def calls(state):
            for i, call in enumerate(planned(state)):
                yield call._replace(rows=[np.array([10 ** 6])]) if i == index else call
        trainer._stored_calls = calls
    return hook


@pytest.mark.parametrize("how", ["bad request", "exception in on_step"])
def test_an_error_leaves_the_trainer_where_one_call_at_a_time_does(spec, digits, address,
                                                                   how):
    """Call 30 refused (INVALID_ARGUMENT: a row out of range), or on_step raising at
    step 30, while the next call is in flight: the same error, and the Trainer's state
    and the steps heard are those of one call at a time."""
    on_step = hook = None
    if how == "bad request":
        hook = sabotage_call(29)
    else:
        def on_step(trainer, state, g):
            if state.step == 30:
                raise Stop
    ends = {}
    for pipeline in (False, True):
        config = replace(CONFIG, pipeline=pipeline)
        outcome, trainer, heard = run(spec, digits, config, address, on_step, hook)
        ends[pipeline] = outcome, trainer.state, heard
    (err_a, state_a, heard_a), (err_b, state_b, heard_b) = ends[False], ends[True]
    if how == "bad request":  # (grpc's error classes differ: a blocking call's, a future's)
        assert isinstance(err_a, grpc.RpcError) and isinstance(err_b, grpc.RpcError)
        assert err_a.code() == err_b.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err_a.details() == err_b.details()
    else:
        assert isinstance(err_a, Stop) and isinstance(err_b, Stop)
    assert heard_a == heard_b and heard_b[-1][0] == (29 if how == "bad request" else 30)
    assert_same_state(state_a, state_b)


def test_the_state_read_in_on_step_is_a_state_of_the_run(spec, digits, address, sequential):
    """Trainer.state read from on_step (parameters fetched from the server) while the
    next call is in flight: the parameters of the step it names, which may be the
    step in flight (applied first), never a mix."""
    config = replace(CONFIG, epochs=2)
    seen_at = {}  # one call at a time: the state read after each step
    every, _, _ = run(spec, digits, replace(config, pipeline=False), address,
                      lambda trainer, state, g: seen_at.setdefault(state.step, trainer.state))
    read = {}
    got, _, heard = run(spec, digits, config, address,
                        lambda trainer, state, g: state.step % 5 == 0
                        and read.setdefault(state.step, trainer.state))
    assert read and [s for s, _ in heard] == list(range(1, got.step + 1))
    for step, state in read.items():
        assert state.step in (step, step + 1)
        assert_same_state(state, seen_at[state.step])
    assert_same_state(got, every)


def test_the_train_command_pipelines_against_a_server_and_says_so(address, capsys):
    """`gradserve train --server`: pipelined by default, --no-pipeline one call at a
    time, the same history bitwise; without --server (the in-process server, one
    interpreter lock for both sides) one call at a time; --pipeline with --stream is
    a usage error."""
    argv = ["train", "--hidden", "16", "--epochs", "2", "--momentum", "0.9", "--json"]
    summaries = {}
    for extra in ([], ["--no-pipeline"], ["--pipeline"]):
        assert cli.main([*argv, "--server", address, *extra]) == 0
        summaries[tuple(extra)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [s["pipeline"] for s in summaries.values()] == [True, False, True]
    histories = [s["history"] for s in summaries.values()]
    assert histories[0] == histories[1] == histories[2]
    assert cli.main([*argv, "--epochs", "1"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pipeline"] is False
    assert cli.main(["train", "--hidden", "16", "--epochs", "1", "--server", address,
                     "--pipeline"]) == 0
    assert "calls pipelined (two in flight)" in capsys.readouterr().out
    assert cli.main([*argv, "--server", address, "--stream", "--pipeline"]) == 2
    assert "--pipeline pipelines the TrainSteps calls" in capsys.readouterr().err


@pytest.mark.parametrize("pipeline", [False, True], ids=["one-at-a-time", "pipelined"])
def test_a_state_saved_after_an_interrupt_resumes_to_the_same_result(spec, digits, address,
                                                                     sequential, tmp_path,
                                                                     pipeline):
    """run() ended by an exception mid-epoch (Ctrl-C: the command saves trainer.state):
    the state is the last one whose parameters this side holds (the epoch's start,
    step 23 here), never a later step with older parameters; a resume from it ends
    with the uninterrupted run's parameters, bitwise."""
    want, _ = sequential

    def interrupt_at_30(trainer, state, g):
        if state.step == 30:
            raise Stop
    config = replace(CONFIG, pipeline=pipeline)
    outcome, trainer, heard = run(spec, digits, config, address, interrupt_at_30)
    assert isinstance(outcome, Stop) and heard[-1][0] == 30
    saved = trainer.state
    assert (saved.step, saved.epoch) == (23, 1)
    path = str(tmp_path / "interrupted.ckpt")
    save_checkpoint(path, saved, trainer.run_identity())
    gradient = remote_gradient([address], spec.build_graph(), spec.param_names)
    try:
        resumed = Trainer(spec, digits, gradient, replace(config, checkpoint=path))
        assert_same_state(resumed.run(resumed.start(resume=True)), want)
    finally:
        gradient.close()
