"""Minibatch gradients of a model's loss, computed by gradserve servers.

- `RemoteGradient`: one server. The graph is registered once and each step is
  sent by id, as a unary Differentiate call or over one DifferentiateStream
  session (`stream=True`).
- `DataParallelGradient`: several servers. Each minibatch is split into one
  shard per server, the shards are sent concurrently (a thread and a Client per
  server), and the gradients are averaged weighted by shard size; since the
  loss is a mean over the batch, that equals the whole batch's gradient. A
  server that stays unreachable is dropped and the step recomputed without it.

Fault tolerance: a request carries everything the server needs (parameters
and data), so resending it after a failure returns the same gradient. The
Client retries UNAVAILABLE with backoff and re-registers the graph on
NOT_FOUND (a restarted server or another replica); a stream session reopens
a broken stream the same way. The caller applies a step's update only once its
gradient has arrived, so every step is applied exactly once.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Mapping, Sequence

import grpc
import numpy as np

from .builder import GraphBuilder
from .client import Client, PlannerDecision
from .models import LOGITS, LOSS

log = logging.getLogger("gradserve.client")

# Reconnect to a restarted server within about a second, instead of gRPC's
# default reconnect backoff that grows to two minutes.
DEFAULT_RETRIES = 40  # with the Client's backoff (at most 2 s apart): about a minute
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]


@dataclass(frozen=True)
class Gradient:
    loss: float
    grads: dict  # parameter name -> gradient, shaped like the parameter
    mode: str  # the mode the server chose: reverse, for a scalar loss
    planner: PlannerDecision | None


def connect(address: str, *, timeout: float = 30.0, retries: int = DEFAULT_RETRIES) -> Client:
    """A Client that waits out a server restart: `retries` retries of UNAVAILABLE,
    with backoff."""
    return Client(address, timeout=timeout, retries=retries, options=RECONNECT_OPTIONS)


class RemoteGradient:
    """Gradients of `graph`'s `loss` with respect to the parameters, from one server."""

    def __init__(self, address: str, graph: GraphBuilder, param_names: Sequence[str], *,
                 stream: bool = False, timeout: float = 30.0, retries: int = DEFAULT_RETRIES):
        self.address, self.graph, self.param_names = address, graph, list(param_names)
        # The Trainer keeps the state in this server's tensor store (unary calls only),
        # and its data sets, put once: (ids of the arrays) -> (train, test) handles
        self.stored_training = not stream
        self.stored_sets: dict = {}
        self.client = connect(address, timeout=timeout, retries=retries)
        try:
            self.client.register(graph)  # once; steps then go by id
            self._session = self.client.stream(graph) if stream else None
        except BaseException:
            self.client.close()
            raise

    def __call__(self, params: Mapping[str, np.ndarray], X: np.ndarray,
                 Y: np.ndarray) -> Gradient:
        inputs = {**params, "X": X, "Y": Y}
        if self._session is None:
            result = self.client.differentiate(self.graph, inputs, wrt=self.param_names,
                                               of=[LOSS])
        else:  # a broken stream is reopened by the session, as unary calls are retried
            result = self._session.differentiate(inputs, wrt=self.param_names, of=[LOSS])
        return Gradient(float(result.outputs[LOSS]),
                        {name: result.jacobian[LOSS, name] for name in self.param_names},
                        result.mode, result.planner)

    def steps(self, params: Mapping[str, np.ndarray], velocity: Mapping[str, np.ndarray],
              Xs: np.ndarray, Ys: np.ndarray, *, lr: float, momentum: float):
        """len(Xs) SGD steps with momentum on the server, one minibatch each, in one
        round trip (Client.train_steps). Nothing changes there: a failed call is made
        again by the caller (or the client's retries) with the same state."""
        return self.client.train_steps(self.graph, params, {"X": Xs, "Y": Ys},
                                       learning_rate=lr, momentum=momentum,
                                       velocity=velocity, loss=LOSS)

    def evaluate(self, params: Mapping[str, np.ndarray], X: np.ndarray,
                 Y: np.ndarray) -> tuple[float, np.ndarray]:
        """(loss, logits) on a whole data set, values only."""
        outputs = self.client.evaluate(self.graph, {**params, "X": X, "Y": Y})
        return float(outputs[LOSS]), outputs[LOGITS]

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
        for handles in self.stored_sets.values():
            for handle in handles:
                try:
                    self.client.delete(handle)
                except grpc.RpcError:
                    pass  # the server is gone: so are its handles
        self.client.close()


class DataParallelGradient:
    """Each minibatch split across several servers; gradients averaged by shard size.

    A server still unreachable after its client's retries is dropped (with a
    warning) and the step recomputed on the others; training goes on with them.
    """

    def __init__(self, replicas: Sequence[RemoteGradient]):
        if len(replicas) < 2:
            raise ValueError("data parallelism needs at least two servers")
        self.replicas = list(replicas)
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="gradserve-shard")

    def __call__(self, params, X, Y) -> Gradient:
        while True:
            k = len(self.replicas)
            shards = [(replica, x, y) for replica, x, y in
                      zip(self.replicas, np.array_split(X, k), np.array_split(Y, k)) if len(x)]
            futures = [self._pool.submit(replica, params, x, y) for replica, x, y in shards]
            parts, unreachable = [], []
            for (replica, x, _), future in zip(shards, futures):
                try:
                    parts.append((len(x), future.result()))
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise
                    unreachable.append((replica, err))
            if not unreachable:
                return _weighted_mean(parts, len(X))
            if len(unreachable) == len(self.replicas):
                raise unreachable[-1][1]
            for replica, err in unreachable:
                log.warning("server %s is unreachable (%s): going on without it",
                            replica.address, err.details())
                self.replicas.remove(replica)
                replica.close()

    def evaluate(self, params, X, Y):
        return self.replicas[0].evaluate(params, X, Y)

    def close(self) -> None:
        self._pool.shutdown()
        for replica in self.replicas:
            replica.close()


def _weighted_mean(parts: list[tuple[int, Gradient]], total: int) -> Gradient:
    """The whole batch's gradient from its shards' (size, gradient) pairs."""
    weights = [np.float32(n / total) for n, _ in parts]
    grads = {name: sum(w * g.grads[name] for w, (_, g) in zip(weights, parts))
             for name in parts[0][1].grads}
    loss = sum(float(w) * g.loss for w, (_, g) in zip(weights, parts))
    first = parts[0][1]
    return Gradient(loss, grads, first.mode, first.planner)


def remote_gradient(addresses: Sequence[str], graph: GraphBuilder, param_names: Sequence[str],
                    *, stream: bool = False, timeout: float = 30.0,
                    retries: int = DEFAULT_RETRIES):
    """A RemoteGradient for one address, a DataParallelGradient for several."""
    replicas = []
    try:
        for address in addresses:
            replicas.append(RemoteGradient(address, graph, param_names, stream=stream,
                                           timeout=timeout, retries=retries))
    except BaseException:
        for replica in replicas:
            replica.close()
        raise
    return replicas[0] if len(replicas) == 1 else DataParallelGradient(replicas)
