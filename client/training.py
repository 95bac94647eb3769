"""The SGD worker: holds the parameters and the data, asks a gradient source
(gradserve servers, see gradients.py) for each minibatch's gradient, and
updates the parameters with SGD and momentum (PyTorch's rule):

    v <- momentum * v + grad;    theta <- theta - lr * v

Minibatches: each epoch visits the training set in a fresh random order drawn
from the batch sampler's generator; the last batch of an epoch may be smaller.
Each epoch ends with an evaluation of the held-out split.

Against one server over unary calls, the state lives on the server (the tensor
store, StoredTraining): the data sets are put once, each TrainSteps call carries
only its minibatches' row numbers and K, and the epoch's short last batch, its
evaluation and the parameters ride in the epoch's last call (and in a checkpoint's;
`state` read in between fetches them). A server that lost the state (restarted)
gets the last state known put again and the steps since are replayed, each
reported to `on_step` once. Those calls are pipelined (TrainConfig.pipeline, on by
default): call n+1, whose rows and version are known in advance, is sent before
n's reply has come, so that the server steps n+1 while this side reads n's reply
and reports its steps (_StoredCalls). Results are applied in order, so the
losses, evaluations, checkpoints and parameters are those of one call at a time,
bitwise; an error, or an exception in on_step, leaves the Trainer where one call
at a time would (the call in flight is waited for and discarded). `state` read
in on_step applies the call in flight first when it has stepped: it may be a
step (a call) ahead of the one reported, and is always one state of the run.

A step's update is applied only after its gradient has arrived, and the state
(parameters, optimizer state, step, epoch, the sampler's RNG state, the epoch's
running loss, the history) is replaced as a whole after each step. A
checkpoint is that state written atomically (a temporary file, then
os.replace), so a run resumed from a checkpoint continues exactly where it
stopped and ends with the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import deque
from concurrent.futures import CancelledError, Future
from dataclasses import asdict, dataclass, replace
from typing import Callable, NamedTuple, Protocol

import grpc
import numpy as np

from .datasets import Dataset
from .gradients import Gradient, RemoteGradient
from .models import DTYPE, LOGITS, LOSS, ModelSpec, one_hot
from .store import VELOCITY, stored_gone

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not belong to this run."""


class GradientSource(Protocol):
    def __call__(self, params: dict, X: np.ndarray, Y: np.ndarray) -> Gradient: ...

    def evaluate(self, params: dict, X: np.ndarray, Y: np.ndarray) -> tuple[float, np.ndarray]: ...


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.0
    seed: int = 0
    checkpoint: str | None = None  # a path; None: no checkpoints
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of each epoch
    steps_per_call: int = 1  # SGD steps the server runs per call (TrainSteps when > 1)
    # Against one server (the state stored there): send each call before the previous
    # one's reply has come (two in flight), so that the server's work and this side's
    # overlap. The same calls, steps and results as one call at a time.
    pipeline: bool = True

    def __post_init__(self):
        problems = [f"{name} must be {rule}, got {getattr(self, name)}"
                    for name, ok, rule in (
                        ("epochs", self.epochs >= 1, ">= 1"),
                        ("batch_size", self.batch_size >= 1, ">= 1"),
                        ("lr", self.lr > 0, "> 0"),
                        ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
                        ("checkpoint_every", self.checkpoint_every >= 0, ">= 0"),
                        ("steps_per_call", self.steps_per_call >= 1, ">= 1"))
                    if not ok]
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean of the epoch's minibatch losses, weighted by batch size
    test_loss: float
    test_accuracy: float


@dataclass(frozen=True)
class TrainState:
    params: dict  # name -> float32 array
    velocity: dict  # name -> float32 array (momentum buffer)
    batch_rng_state: dict  # the sampler's bit_generator.state at the start of `epoch`
    step: int = 0  # steps applied
    epoch: int = 0  # the epoch in progress, 0-based
    epoch_loss_sum: float = 0.0  # sum of loss * batch size over this epoch's steps so far
    history: tuple = ()  # EpochRecord per finished epoch


class Trainer:
    """Trains `spec` on `data` with gradients from `gradient`; `run` returns the final state.

    `on_step(state, gradient)` is called after each step has been applied.
    `self.state` is always the state after the last applied step (save it on an
    interrupt to lose nothing). When the state is stored on the server and run()
    ends with an error (or an interrupt) mid-epoch, `self.state` is the last state
    whose parameters this side holds (the epoch's start or the last checkpoint):
    the server's copy is deleted on the way out, and a resume from it replays the
    steps since to the same result.
    """

    step_in_rounds = False  # True: single steps go through _steps too (local SGD)

    def __init__(self, spec: ModelSpec, data: Dataset, gradient: GradientSource,
                 config: TrainConfig):
        if data.num_features != spec.num_features or data.num_classes != spec.num_classes:
            raise ValueError(f"the model takes {spec.num_features} features and "
                             f"{spec.num_classes} classes; the data set has "
                             f"{data.num_features} and {data.num_classes}")
        self.spec, self.data, self.gradient, self.config = spec, data, gradient, config
        self.Y_train = one_hot(data.y_train, data.num_classes)
        self.Y_test = one_hot(data.y_test, data.num_classes)
        self.steps_per_epoch = math.ceil(len(data.y_train) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        self._state: TrainState | None = None
        self._stored: StoredTraining | None = None  # while run() trains on the server
        self._calls: _StoredCalls | None = None  # its calls (in flight), meanwhile
        self._stale = False  # _state's parameters are older than its step (on the server)

    @property
    def state(self) -> TrainState | None:
        """The state after the last applied step (its parameters fetched from the server
        when they live there, after the calls in flight that stepped are applied; if
        that fails, the last state fetched)."""
        if self._stale and self._stored is not None and self._calls is not None:
            self._calls.settle()  # the server's state is then this side's (see _StoredCalls)
        if self._stale and self._stored is not None:
            try:
                self._state = self._stored.fetch(self._state)
                self._stale = False
            except grpc.RpcError:
                return self._stored.synced
        return self._state

    @state.setter
    def state(self, value: TrainState | None) -> None:
        self._state, self._stale = value, False

    # --- state ---------------------------------------------------------------------

    def initial_state(self) -> TrainState:
        """Parameters and the batch sampler, both drawn from the seed (independent streams)."""
        init_seed, batch_seed = np.random.SeedSequence(self.config.seed).spawn(2)
        params = self.spec.init_params(np.random.default_rng(init_seed))
        return TrainState(params=params,
                          velocity={k: np.zeros_like(v) for k, v in params.items()},
                          batch_rng_state=np.random.default_rng(batch_seed).bit_generator.state)

    def start(self, resume: bool = False) -> TrainState:
        """The checkpoint's state when resuming from an existing checkpoint, else a fresh one."""
        path = self.config.checkpoint
        if resume and path and os.path.exists(path):
            return load_checkpoint(path, self.run_identity())
        return self.initial_state()

    def run_identity(self) -> dict:
        """What a checkpoint must agree on to be resumed by this run."""
        c = self.config
        return {"model": self.spec.description, "l2": self.spec.l2,
                "dataset": self.data.description, "seed": c.seed, "batch_size": c.batch_size,
                "lr": c.lr, "momentum": c.momentum}

    # --- training --------------------------------------------------------------------

    def run(self, state: TrainState,
            on_step: Callable[[TrainState, Gradient], None] | None = None) -> TrainState:
        if isinstance(self.gradient, RemoteGradient) and self.gradient.stored_training:
            return self._run_stored(state, on_step)
        self.state = state
        X, Y, batch = self.data.X_train, self.Y_train, self.config.batch_size
        while state.epoch < self.config.epochs:
            order, next_epoch_rng_state = _epoch_order(state.batch_rng_state, len(X))
            last = self.steps_per_epoch - 1
            b = state.step - state.epoch * self.steps_per_epoch
            while b <= last:
                k = self._group(b, last, state.step, len(X))
                if k == 1 and not self.step_in_rounds:
                    rows = order[b * batch:(b + 1) * batch]
                    gradient = self.gradient(state.params, X[rows], Y[rows])
                    state = self._apply(state, gradient, len(rows))
                    done = [(state, gradient)]
                else:
                    done = self._steps(state, X, Y, [order[i * batch:(i + 1) * batch]
                                                     for i in range(b, b + k)])
                    state = done[-1][0]
                b += k
                if b > last:
                    state = self._end_epoch(state, next_epoch_rng_state)
                    done[-1] = (state, done[-1][1])
                self.state = state
                if self._checkpoint_due(state, epoch_ended=b > last):
                    save_checkpoint(self.config.checkpoint, state, self.run_identity())
                if on_step is not None:
                    for step_state, gradient in done:
                        on_step(step_state, gradient)
        return state

    def _group(self, b: int, last: int, step: int, n: int) -> int:
        """How many steps, from batch b, go in one call: steps_per_call at most, never
        past the epoch's end or a checkpoint, and full batches only (the stack of
        minibatches must be one array)."""
        k = min(self.config.steps_per_call, last - b + 1)
        every = self.config.checkpoint_every
        if every and self.config.checkpoint:
            k = min(k, every - step % every)
        if b + k - 1 == last and n - last * self.config.batch_size < self.config.batch_size:
            k -= 1  # the epoch's last batch is short: it goes alone
        return max(k, 1)

    def _steps(self, state: TrainState, X, Y, rows: list) -> list:
        """len(rows) steps in one call (TrainSteps): the server applies the same rule as
        _apply, so the parameters equal those of one step per call. Returns (state,
        gradient) per step; the parameters are known only after the last one, so the
        earlier states carry those (for progress; nothing else reads them)."""
        result = self.gradient.steps(state.params, state.velocity, np.stack([X[r] for r in rows]),
                                     np.stack([Y[r] for r in rows]), lr=self.config.lr,
                                     momentum=self.config.momentum)
        params = {k: v.astype(DTYPE, copy=False) for k, v in result.parameters.items()}
        velocity = dict(result.velocity)
        done, loss_sum = [], state.epoch_loss_sum
        for i, (loss, r) in enumerate(zip(result.losses, rows)):
            loss_sum = loss_sum + loss * len(r)
            done.append((replace(state, params=params, velocity=velocity,
                                 step=state.step + i + 1, epoch_loss_sum=loss_sum),
                         Gradient(loss, {}, "reverse", None)))
        return done

    def _run_stored(self, state: TrainState, on_step) -> TrainState:
        """run() with the state on the server (see the module's docstring)."""
        stored = self._stored = StoredTraining(self.gradient, self.data.X_train, self.Y_train,
                                               self.data.X_test, self.Y_test, self.config)
        depth = 2 if self.config.pipeline else 1
        reported = state.step  # on_step has heard of every step up to here
        try:
            stored.start(state)
            self.state = state
            calls = self._calls = _StoredCalls(self, stored, state, depth)
            while True:
                try:
                    more = calls.advance()
                except grpc.RpcError as err:
                    if not stored_gone(err):
                        raise
                    state = stored.restore()  # a server that lost it: replay from there
                    calls = self._calls = _StoredCalls(self, stored, state, depth)
                    continue
                while calls.applied:  # (a read of `state` in on_step may apply the next)
                    for step_state, gradient in calls.applied.popleft():
                        if step_state.step > reported:
                            reported = step_state.step
                            if on_step is not None:
                                on_step(step_state, gradient)
                if not more:
                    return self.state
        finally:
            if self._calls is not None:
                self._calls.drain()  # a call in flight ahead: waited for, discarded
            if self._stale:  # ended by an error mid-epoch: see the class's docstring
                self._state, self._stale = stored.synced, False
            self._calls = self._stored = None
            stored.close()

    def _stored_calls(self, state: TrainState):
        """The TrainSteps calls of a stored run from `state` to its end, in order: the
        steps' rows, whether the call ends an epoch (its evaluation) and whether a
        checkpoint is due after it (both return the parameters). All known in advance,
        so a call can be sent before the previous one's reply has come."""
        n, batch, spe = len(self.data.X_train), self.config.batch_size, self.steps_per_epoch
        step, rng_state = state.step, state.batch_rng_state
        for epoch in range(state.epoch, self.config.epochs):
            order, next_epoch_rng_state = _epoch_order(rng_state, n)
            last, b = spe - 1, step - epoch * spe
            while b <= last:
                k = min(self.config.steps_per_call, last - b + 1)
                every = self.config.checkpoint_every
                if every and self.config.checkpoint:
                    k = min(k, every - step % every)
                rows = [order[i * batch:(i + 1) * batch] for i in range(b, b + k)]
                ends_epoch = b + k - 1 == last
                yield _Call(rows, ends_epoch, self._checkpoint_due_at(step + k, ends_epoch),
                            next_epoch_rng_state)
                b, step = b + k, step + k
            rng_state = next_epoch_rng_state

    def _stored_result(self, state: TrainState, call: "_Call", result,
                       stored: "StoredTraining") -> tuple[TrainState, list]:
        """The state after `call` and (state, gradient) per step it made."""
        done, loss_sum = [], state.epoch_loss_sum
        for i, (loss, r) in enumerate(zip(result.losses, call.rows)):
            loss_sum += loss * len(r)
            done.append((replace(state, step=state.step + i + 1, epoch_loss_sum=loss_sum),
                         Gradient(loss, {}, "reverse", None)))
        state = done[-1][0]
        if call.ends_epoch:
            evaluation = result.evaluation
            test_loss = float(evaluation[LOSS])
            accuracy = float(np.mean(np.argmax(evaluation[LOGITS], axis=1)
                                     == self.data.y_test))
            record = EpochRecord(state.epoch + 1, state.epoch_loss_sum / len(self.data.y_train),
                                 test_loss, accuracy)
            state = replace(state, epoch=state.epoch + 1, epoch_loss_sum=0.0,
                            batch_rng_state=call.next_epoch_rng_state,
                            history=state.history + (record,))
        if call.ends_epoch or call.due:  # the parameters, as of this step
            state = stored.with_state(state, result.parameters, result.velocity)
            stored.synced = state
        done[-1] = (state, done[-1][1])
        return state, done

    def evaluate(self, params) -> tuple[float, float]:
        """(loss, accuracy) on the held-out split."""
        loss, logits = self.gradient.evaluate(params, self.data.X_test, self.Y_test)
        return loss, float(np.mean(np.argmax(logits, axis=1) == self.data.y_test))

    def _apply(self, state: TrainState, gradient: Gradient, batch_size: int) -> TrainState:
        lr, momentum = np.float32(self.config.lr), np.float32(self.config.momentum)
        velocity = {k: momentum * v + gradient.grads[k] for k, v in state.velocity.items()}
        params = {k: (p - lr * velocity[k]).astype(DTYPE, copy=False)
                  for k, p in state.params.items()}
        return replace(state, params=params, velocity=velocity, step=state.step + 1,
                       epoch_loss_sum=state.epoch_loss_sum + gradient.loss * batch_size)

    def _end_epoch(self, state: TrainState, next_epoch_rng_state: dict) -> TrainState:
        test_loss, test_accuracy = self.evaluate(state.params)
        record = EpochRecord(state.epoch + 1, state.epoch_loss_sum / len(self.data.y_train),
                             test_loss, test_accuracy)
        return replace(state, epoch=state.epoch + 1, epoch_loss_sum=0.0,
                       batch_rng_state=next_epoch_rng_state,
                       history=state.history + (record,))

    def _checkpoint_due(self, state: TrainState, epoch_ended: bool) -> bool:
        return self._checkpoint_due_at(state.step, epoch_ended)

    def _checkpoint_due_at(self, step: int, epoch_ended: bool) -> bool:
        every = self.config.checkpoint_every
        if not self.config.checkpoint:
            return False
        if step == self.total_steps:
            return True
        return step % every == 0 if every else epoch_ended


class StoredTraining:
    """A training run's state and data sets in one server's tensor store: the data put
    once, the parameters and momentum buffers put at the start (and again after the
    server lost them), TrainSteps by rows and versions, the parameters fetched on
    demand."""

    def __init__(self, gradient: RemoteGradient, X, Y, X_test, Y_test, config: TrainConfig):
        self.client, self.graph = gradient.client, gradient.graph
        self.config = config
        # The data sets are put once per gradient source (and freed with it): runs on
        # the same arrays share them.
        key = tuple(map(id, (X, Y, X_test, Y_test)))
        sets = gradient.stored_sets.get(key)
        if sets is None:
            sets = gradient.stored_sets[key] = (self.client.put({"X": X, "Y": Y}),
                                                self.client.put({"X": X_test, "Y": Y_test}))
        self._train, self._test = sets  # (the handles keep the arrays: the ids stay valid)
        self.handle = None
        self.version = 0
        self.synced: TrainState | None = None  # the last state whose parameters we hold

    def start(self, state: TrainState) -> None:
        tensors = dict(state.params)
        tensors.update({VELOCITY + k: v for k, v in state.velocity.items()})
        self.handle, self.version, self.synced = self.client.put(tensors), 0, state

    def restore(self) -> TrainState:
        """The server lost the state: put the data sets and the last state fetched again
        (the data handles put themselves again); continue from that state."""
        for handle in (self._train, self._test):
            self.client._put(handle)
        self.start(self.synced)
        return self.synced

    def send(self, call: "_Call", version: int, wait: bool) -> "Future | _Done":
        """TrainSteps for `call` from state `version`: a Future of its TrainStepsResult
        (with the parameters and buffers at an epoch's end or a checkpoint; the
        evaluation at an epoch's end). `wait`: the blocking call, its outcome read as a
        done Future's (_Done)."""
        sync = call.ends_epoch or call.due
        evaluate = call.ends_epoch
        send = self.client.train_steps if wait else self.client.train_steps_async
        kwargs = dict(learning_rate=self.config.lr, momentum=self.config.momentum, loss=LOSS,
                      state_version=version, data=self._train,
                      rows=np.concatenate(call.rows), batch_sizes=[len(r) for r in call.rows],
                      evaluate_data=self._test if evaluate else None,
                      evaluate_outputs=[LOSS, LOGITS] if evaluate else None,
                      return_state=sync)
        if not wait:
            return send(self.graph, self.handle, **kwargs)
        try:
            return _Done(send(self.graph, self.handle, **kwargs))
        except grpc.RpcError as err:
            return _Done(error=err)

    @staticmethod
    def with_state(state: TrainState, params: dict, velocity: dict) -> TrainState:
        return replace(state, params={k: np.array(v, dtype=DTYPE) for k, v in params.items()},
                       velocity={k: np.array(v) for k, v in velocity.items()})

    def fetch(self, state: TrainState) -> TrainState:
        """`state` with the server's parameters and momentum buffers."""
        tensors = self.client.get(self.handle)
        return self.with_state(
            state, {k: v for k, v in tensors.items() if not k.startswith(VELOCITY)},
            {k[len(VELOCITY):]: v for k, v in tensors.items() if k.startswith(VELOCITY)})

    def close(self) -> None:
        if self.handle is not None:
            try:
                self.client.delete(self.handle)
            except grpc.RpcError:
                pass  # the server is gone: so are its handles


class _Done(NamedTuple):
    """A blocking call's outcome, read as the Future of a call that ended is read (a
    Future's lock and condition cost more than the rest of a step's bookkeeping)."""

    value: object = None
    error: BaseException | None = None

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value

    def exception(self):
        return self.error


class _Call(NamedTuple):
    """One TrainSteps call of a stored run (Trainer._stored_calls)."""

    rows: list  # the row numbers of each step's minibatch
    ends_epoch: bool  # the epoch's last call: the evaluation, the parameters back
    due: bool  # a checkpoint after it: the parameters back
    next_epoch_rng_state: dict  # the sampler's state for the next epoch


# StateConflict's text (server/training.py): the server's version, then the call's
_VERSIONS = re.compile(r"the state is at version (\d+), this call steps from (\d+)")


class _StoredCalls:
    """A stored run's calls, up to `depth` in flight: call n+1 is sent, with the version
    n's reply will carry (n's + 1), before n's reply is waited for, so that the server
    steps n+1 while this side reads n's reply and reports its steps. Results are
    applied one at a time, in order, as one call at a time would apply them.

    A call that reaches the server before its predecessor stepped is refused without
    stepping (FAILED_PRECONDITION: the state is at an earlier version); it and the calls
    behind it are sent again, in order, once the calls ahead of them are in. Any other
    error of call n is raised after the calls sent behind it have ended, their results
    discarded: the Trainer is then where one call at a time leaves it (they may have
    stepped the server's state, which the run then deletes or replaces)."""

    def __init__(self, trainer: Trainer, stored: StoredTraining, state: TrainState,
                 depth: int):
        self.trainer, self.stored, self.depth, self.state = trainer, stored, depth, state
        self.planned = trainer._stored_calls(state)
        self.sent: deque = deque()  # (call, version, Future, sent ahead), oldest first
        self.applied: deque = deque()  # per call applied: (state, gradient) per step
        self.sent_again = 0  # calls refused as ahead of the state, then sent again

    def advance(self, send: bool = True) -> bool:
        """Send calls up to the depth (`send`), wait for the oldest and apply its result;
        False when no call is left."""
        while send and len(self.sent) < self.depth:
            call = next(self.planned, None)
            if call is None:
                break
            self._send(call)
        if not self.sent:
            return False
        call, version, future, ahead = self.sent[0]  # (drain() waits for it if interrupted)
        try:
            result = future.result()
        except grpc.RpcError as err:
            self.sent.popleft()
            behind = self.drain()
            if not (ahead and _ahead(err)):
                raise
            self.sent_again += 1
            for again in (call, *behind):
                self._send(again)
            return True
        self.sent.popleft()
        if result.state_version != version + 1:
            raise RuntimeError(f"TrainSteps from state version {version} replied version "
                               f"{result.state_version}, not {version + 1}")
        self.stored.version = result.state_version
        trainer = self.trainer
        self.state, done = trainer._stored_result(self.state, call, result, self.stored)
        trainer._state, trainer._stale = self.state, self.state is not self.stored.synced
        if call.due:
            save_checkpoint(trainer.config.checkpoint, self.state, trainer.run_identity())
        self.applied.append(done)
        return True

    def _send(self, call: _Call) -> None:
        version = self.stored.version + len(self.sent)
        self.sent.append((call, version, self.stored.send(call, version, self.depth == 1),
                          bool(self.sent)))

    def settle(self) -> None:
        """Apply the calls in flight that succeeded (sending none), so that the server's
        state is the Trainer's (a read of Trainer.state fetches it): the state read may
        then be a step or a call ahead of the one being reported. A failed call is left
        for advance()."""
        while self.sent and self.sent[0][2].exception() is None:
            self.advance(send=False)

    def drain(self) -> list:
        """Wait for the calls in flight and discard their outcomes: their calls, in order."""
        calls = []
        while self.sent:
            call, _, future, _ = self.sent.popleft()
            try:
                future.exception()
            except CancelledError:  # nothing to wait for
                pass
            calls.append(call)
        return calls


def _ahead(err: grpc.RpcError) -> bool:
    """A call refused because the state had not reached its version yet."""
    if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
        return False
    versions = _VERSIONS.search(err.details() or "")
    return versions is not None and int(versions[1]) < int(versions[2])


def _epoch_order(rng_state: dict, n: int) -> tuple[np.ndarray, dict]:
    """An epoch's visiting order drawn from the sampler at `rng_state`, and the state after."""
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    return rng.permutation(n), rng.bit_generator.state


# --- checkpoints -----------------------------------------------------------------------

def save_checkpoint(path: str, state: TrainState, identity: dict) -> None:
    """Write `state` to `path` atomically: readers see the old file or the new one, never half."""
    meta = {"format": CHECKPOINT_FORMAT, "identity": identity, "step": state.step,
            "epoch": state.epoch, "epoch_loss_sum": state.epoch_loss_sum,
            "batch_rng_state": state.batch_rng_state,
            "history": [asdict(r) for r in state.history]}
    arrays = {f"param.{k}": v for k, v in state.params.items()}
    arrays.update({f"velocity.{k}": v for k, v in state.velocity.items()})
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str, identity: dict | None = None) -> TrainState:
    """The state saved at `path`; with `identity`, refuse a checkpoint of another run."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            params = {k[6:]: archive[k] for k in archive.files if k.startswith("param.")}
            velocity = {k[9:]: archive[k] for k in archive.files if k.startswith("velocity.")}
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: not a gradserve checkpoint ({err})") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')}, "
                              f"this version reads {CHECKPOINT_FORMAT}")
    if identity is not None:
        saved = meta["identity"]
        differ = [k for k in identity if json.dumps(saved.get(k)) != json.dumps(identity[k])]
        if differ:
            details = "; ".join(f"{k}: checkpoint {saved.get(k)}, now {identity[k]}"
                                for k in differ)
            raise CheckpointError(f"{path} belongs to another run ({details}). Resume with the "
                                  "same settings, or use a new --checkpoint path")
    return TrainState(params=params, velocity=velocity, batch_rng_state=meta["batch_rng_state"],
                      step=meta["step"], epoch=meta["epoch"],
                      epoch_loss_sum=meta["epoch_loss_sum"],
                      history=tuple(EpochRecord(**r) for r in meta["history"]))
