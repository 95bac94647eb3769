"""The SGD worker: holds the parameters and the data, asks a gradient source
(gradserve servers, see gradients.py) for each minibatch's gradient, and
updates the parameters with SGD and momentum (PyTorch's rule):

    v <- momentum * v + grad;    theta <- theta - lr * v

Minibatches: each epoch visits the training set in a fresh random order drawn
from the batch sampler's generator; the last batch of an epoch may be smaller.
Each epoch ends with an evaluation of the held-out split.

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
from dataclasses import asdict, dataclass, replace
from typing import Callable, Protocol

import numpy as np

from .datasets import Dataset
from .gradients import Gradient
from .models import DTYPE, ModelSpec, one_hot

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
    interrupt to lose nothing).
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
        self.state: TrainState | None = None

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
        every = self.config.checkpoint_every
        if not self.config.checkpoint:
            return False
        if state.step == self.total_steps:
            return True
        return state.step % every == 0 if every else epoch_ended


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
