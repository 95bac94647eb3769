"""Local SGD across replicas (DiLoCo, arXiv 2311.08105): communicate every H steps,
not every step.

A round starts from the global parameters theta. Each minibatch of the round's H
is split into one shard per replica (as data parallelism splits it); replica s
runs the H inner SGD steps on its shards in one TrainSteps call (K = H steps per
call), with its own momentum buffer, and returns its parameters theta_s. The
client averages the deltas, weighted by shard size,

    delta = sum_s w_s (theta - theta_s)

and applies the outer optimizer, SGD with Nesterov momentum (PyTorch's rule):

    m <- mu * m + delta;    theta <- theta - eta * (delta + mu * m)

One round is one round of communication for H steps. With H = 1, eta = 1 and
mu = 0 the round's result is sum_s w_s theta_s = theta - lr * (the whole batch's
gradient): today's data parallelism (DataParallelGradient), one call per step.

Exactly once: a round's update is applied only after every shard's result has
arrived. A shard belongs to the run, not to a server: when a server stays
unreachable after its client's retries, its shards go to the servers left, with
the same request (TrainSteps changes nothing on the server), so the result is
the same as without the failure. Rounds end every H steps of an epoch and at its
end, whatever the checkpoint settings; checkpoints (at round ends only: the first
one at or past each multiple of checkpoint_every) hold the outer state: TrainState.velocity keeps the outer momentum under "outer.NAME" and shard
s's inner momentum under "shardS.NAME"; a resumed run ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Sequence

import grpc
import numpy as np

from .datasets import Dataset
from .gradients import DEFAULT_RETRIES, Gradient, RemoteGradient
from .models import DTYPE, ModelSpec
from .training import TrainConfig, Trainer, TrainState

log = logging.getLogger("gradserve.client")

OUTER = "outer"


@dataclass(frozen=True)
class OuterConfig:
    """The outer loop: rounds of `sync_every` inner steps, then the outer optimizer
    (DiLoCo's defaults: learning rate 0.7, Nesterov momentum 0.9)."""

    sync_every: int = 16
    outer_lr: float = 0.7
    outer_momentum: float = 0.9

    def __post_init__(self):
        problems = [f"{name} must be {rule}, got {getattr(self, name)}"
                    for name, ok, rule in (
                        ("sync_every", self.sync_every >= 1, ">= 1"),
                        ("outer_lr", self.outer_lr > 0, "> 0"),
                        ("outer_momentum", 0 <= self.outer_momentum < 1, "in [0, 1)"))
                    if not ok]
        if problems:
            raise ValueError("; ".join(problems))


def shard_key(shard: int, name: str) -> str:
    return f"shard{shard}.{name}"


class LocalSGDTrainer(Trainer):
    """Trainer whose every group of steps is one local-SGD round over `replicas`
    (one shard each; see the module's docstring). `rounds` counts the rounds this
    run made (its communication rounds)."""

    step_in_rounds = True  # single steps are rounds of one step too

    def __init__(self, spec: ModelSpec, data: Dataset, replicas: Sequence[RemoteGradient],
                 config: TrainConfig, outer: OuterConfig):
        if not replicas:
            raise ValueError("local SGD needs at least one server")
        self.replicas = list(replicas)  # the servers still reachable
        super().__init__(spec, data, _Evaluator(self.replicas),
                         replace(config, steps_per_call=outer.sync_every))
        self.outer, self.shards = outer, len(replicas)
        self.rounds = 0
        self._round_from = 0  # the step the last round started from
        self._pool = ThreadPoolExecutor(self.shards, thread_name_prefix="gradserve-local-sgd")

    def initial_state(self) -> TrainState:
        state = super().initial_state()
        zeros = {k: np.zeros_like(v) for k, v in state.params.items()}
        velocity = {f"{OUTER}.{k}": v for k, v in zeros.items()}
        for s in range(self.shards):
            velocity.update({shard_key(s, k): v.copy() for k, v in zeros.items()})
        return replace(state, velocity=velocity)

    def run_identity(self) -> dict:
        return {**super().run_identity(), "sync_every": self.outer.sync_every,
                "outer_lr": self.outer.outer_lr, "outer_momentum": self.outer.outer_momentum,
                "shards": self.shards}

    def _group(self, b: int, last: int, step: int, n: int) -> int:
        """A round's steps from batch b: H, fewer at the epoch's end (whose short last
        batch goes alone). Unlike Trainer._group, checkpoints do not cut rounds: where
        rounds end must not depend on how often the run is saved."""
        k = min(self.outer.sync_every, last - b + 1)
        if b + k - 1 == last and n - last * self.config.batch_size < self.config.batch_size:
            k -= 1
        return max(k, 1)

    def _checkpoint_due(self, state: TrainState, epoch_ended: bool) -> bool:
        """At the end of a round that reached a multiple of checkpoint_every (or per
        epoch, and at the end): the state between rounds only."""
        every = self.config.checkpoint_every
        if not self.config.checkpoint:
            return False
        if state.step == self.total_steps:
            return True
        return state.step // every > self._round_from // every if every else epoch_ended

    def _steps(self, state: TrainState, X, Y, rows: list) -> list:
        """One round over the minibatches `rows`: (state, gradient) per step, as
        Trainer._steps returns them (the parameters known after the round only)."""
        self._round_from = state.step
        names = list(state.params)
        shards = [[part for part in np.array_split(r, self.shards)] for r in rows]
        work = {}
        for s in range(self.shards):
            if len(shards[0][s]) == 0:
                continue  # a batch smaller than the shard count: this shard sits out
            velocity = {k: state.velocity[shard_key(s, k)] for k in names}
            work[s] = (velocity, np.stack([X[step[s]] for step in shards]),
                       np.stack([Y[step[s]] for step in shards]))
        results = self._run(state.params, work)
        total = len(rows[0])
        weights = {s: np.float32(len(shards[0][s]) / total) for s in results}
        delta = {k: sum(weights[s] * (state.params[k] - results[s].parameters[k])
                        for s in results) for k in names}
        velocity = dict(state.velocity)
        for s, result in results.items():
            velocity.update({shard_key(s, k): result.velocity[k] for k in names})
        eta, mu = np.float32(self.outer.outer_lr), np.float32(self.outer.outer_momentum)
        params = {}
        for k in names:
            m = mu * state.velocity[f"{OUTER}.{k}"] + delta[k]
            velocity[f"{OUTER}.{k}"] = m.astype(DTYPE, copy=False)
            params[k] = (state.params[k] - eta * (delta[k] + mu * m)).astype(DTYPE, copy=False)
        self.rounds += 1
        done, loss_sum = [], state.epoch_loss_sum
        for i, r in enumerate(rows):
            loss = sum(float(weights[s]) * results[s].losses[i] for s in results)
            loss_sum += loss * len(r)
            done.append((replace(state, params=params, velocity=velocity,
                                 step=state.step + i + 1, epoch_loss_sum=loss_sum),
                         Gradient(loss, {}, "reverse", None)))
        return done

    def _run(self, params: dict, work: dict) -> dict:
        """Every shard's TrainSteps result; shard s goes to server s (mod the servers
        left). A server still UNAVAILABLE after its client's retries is dropped and
        its shards are sent to the others."""
        results, pending = {}, dict(work)
        lr, momentum = self.config.lr, self.config.momentum
        while pending:
            placed = {s: self.replicas[i % len(self.replicas)]
                      for i, s in enumerate(sorted(pending))}
            futures = {s: self._pool.submit(placed[s].steps, params, velocity, Xs, Ys,
                                            lr=lr, momentum=momentum)
                       for s, (velocity, Xs, Ys) in pending.items()}
            unreachable, last = set(), None
            for s, future in futures.items():
                try:
                    results[s] = future.result()
                    del pending[s]
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    unreachable.add(placed[s])
                    last = err
            if unreachable and len(unreachable) == len(self.replicas):
                raise last
            for replica in unreachable:
                log.warning("server %s is unreachable: its shards go to the other servers",
                            replica.address)
                self.replicas.remove(replica)
                replica.close()
        return results

    def close(self) -> None:
        self._pool.shutdown()
        for replica in self.replicas:
            replica.close()


class _Evaluator:
    """The Trainer's gradient source for evaluations (on the first server left)."""

    def __init__(self, replicas: Sequence[RemoteGradient]):
        self._replicas = replicas

    def evaluate(self, params, X, Y):
        return self._replicas[0].evaluate(params, X, Y)

    def __call__(self, params, X, Y):  # never called: every step is in a round
        raise AssertionError("local SGD computes steps in rounds")


def local_sgd_trainer(spec: ModelSpec, data: Dataset, addresses: Sequence[str],
                      config: TrainConfig, outer: OuterConfig, *, timeout: float = 30.0,
                      retries: int = DEFAULT_RETRIES) -> LocalSGDTrainer:
    """A LocalSGDTrainer with one RemoteGradient per address (close() closes them)."""
    graph, replicas = spec.build_graph(), []
    try:
        for address in addresses:
            replicas.append(RemoteGradient(address, graph, spec.param_names,
                                           timeout=timeout, retries=retries))
        return LocalSGDTrainer(spec, data, replicas, config, outer)
    except BaseException:
        for replica in replicas:
            replica.close()
        raise
