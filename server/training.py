"""TrainSteps on the server: what is checked before the engine runs any step (the reply's
size, the call's work against max_request_flops, and the learning rate and momentum as
the steps use them, cast to each parameter's dtype), and the stored training state
(server.store): the parameters and momentum buffers stay on the server, a call carries
only its minibatches (or rows of a stored data set) and returns the losses and the
state's new version.

Exactly once: a call names the version it steps from; the state keeps the replies of
the last two calls (KEPT_REPLIES), so a retry of either (its reply lost) gets its own
reply without stepping again, and any other version is refused (FAILED_PRECONDITION
naming state_version). Two, because a client may send call n+1 before n's reply has
come (client.training pipelines its calls, versions n + 1 and n + 2): if n's reply is
lost after n+1 stepped, n's retry still gets n's losses, evaluation and (when it
asked for them) n's parameters. A call ahead of the state's version (n+1 arriving
before n) is refused the same way, without stepping; the client sends it again once
n's reply is in. The kept replies' bytes (evaluations, and the state of an older call
that returned its state) count in the store's accounting with the state's. Calls on
one state run one at a time (its lock); a call that fails changes nothing (the new
arrays replace the old only once all steps are done).

The lean path (server.lean) runs small calls through the same code on the event loop,
with a `gate`: called with the parameters before the minibatches are gathered
(batch_shapes says what they will be), it raises Declined to leave the call to a
worker (over the inline time budget); a state whose lock a worker holds is Declined
too, never waited for on the loop.
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np

from gradserve import engine
from gradserve.engine.errors import echo
from gradserve.v1 import gradient_service_pb2 as pb
from gradserve.v1.tensor_wire import TensorMessage

from .errors import BadRequest, LimitExceeded, StateConflict
from .limits import Limits
from .store import STORE_BYTES_PER_TENSOR, VELOCITY, TensorStore, tensor_nbytes

# A reply tensor's framing beyond its data and name: tags, lengths, dtype, shape.
TENSOR_FRAMING_BYTES = 64
# Replies a stored state keeps for retries: the last call's and the one before (a
# client's call in flight ahead of the one it waits for, see the docstring).
KEPT_REPLIES = 2


class Declined(Exception):
    """The lean path does not answer this call inline (server.lean): a worker will."""


def steps_of(batches) -> int | None:
    """K, the steps the batches stack, when they agree on one (the engine names what is
    wrong otherwise)."""
    if isinstance(batches, list):  # per-step dicts (rows of a stored data set)
        return len(batches)
    ks = {np.shape(b)[0] for b in batches.values() if np.ndim(b)}
    return ks.pop() if len(ks) == 1 and len(batches) else None


# (dtype, learning_rate, momentum) found fine, for the next calls of a training run
_FINE_HYPERPARAMETERS: set = set()
_FINE_KEPT = 1024


def check_hyperparameters(parameters, learning_rate: float, momentum: float) -> None:
    """learning_rate and momentum as each parameter's dtype holds them (the steps compute
    in it): 1e300 is inf in float32, 1e-320 is 0, 0.99999999999 is 1.0."""
    checked = set()  # (the same dtype holds them alike: checked once, naming its first)
    for name, value in parameters.items():
        dtype = value.dtype if isinstance(value, np.ndarray) else np.asarray(value).dtype
        if dtype.kind != "f" or dtype in checked:
            continue  # the engine refuses a parameter that is not floating
        checked.add(dtype)
        if (dtype, learning_rate, momentum) in _FINE_HYPERPARAMETERS:
            continue
        with np.errstate(over="ignore", under="ignore"):
            lr, mu = dtype.type(learning_rate), dtype.type(momentum)
        if not (np.isfinite(lr) and lr > 0):
            raise BadRequest(f"learning_rate {learning_rate!r} is {lr!r} in {dtype}, the dtype "
                             f"of parameter '{echo(name)}' the steps compute in: it must be a "
                             "finite number > 0 there", field="learning_rate")
        if not (np.isfinite(mu) and 0 <= mu < 1):
            raise BadRequest(f"momentum {momentum!r} is {mu!r} in {dtype}, the dtype of "
                             f"parameter '{echo(name)}' the steps compute in: it must be in "
                             "[0, 1) there", field="momentum")
        if len(_FINE_HYPERPARAMETERS) >= _FINE_KEPT:
            _FINE_HYPERPARAMETERS.clear()
        _FINE_HYPERPARAMETERS.add((dtype, learning_rate, momentum))


def reply_bytes(parameters, steps: int) -> int:
    """About what the reply takes on the wire: every parameter twice (its new value and
    its momentum buffer) and one double per step's loss."""
    tensors = sum(np.asarray(p).nbytes + len(name.encode()) + TENSOR_FRAMING_BYTES
                  for name, p in parameters.items())
    return 2 * tensors + 9 * steps + 128


def check_reply(parameters, steps: int, limits: Limits) -> None:
    need = reply_bytes(parameters, steps)
    if need > limits.max_message_bytes:
        raise LimitExceeded(f"the reply would take about {need:,} bytes (the parameters and "
                            f"their momentum buffers, each once), over the limit of "
                            f"{limits.max_message_bytes:,} (max_message_bytes): train fewer "
                            "or smaller parameters per call", field="parameters")


def flops_per_step(steps: int | None, limits: Limits) -> int | None:
    """max_request_flops bounds a whole TrainSteps call, K steps x one step's estimate:
    each step may need at most this (None: no limit)."""
    limit = limits.max_request_flops or None
    if limit is None or not steps or steps < 1:
        return limit
    return max(1, limit // steps)


def call_over_flops(err: Exception, steps: int, limits: Limits) -> LimitExceeded:
    """The engine's refusal of one step over its share, said of the whole call."""
    return LimitExceeded(f"{steps} steps: one step is over its share of max_request_flops "
                         f"({limits.max_request_flops:,} for the whole call, K steps x one "
                         f"step's estimate, so {limits.max_request_flops // steps:,} a step): "
                         f"{err}; send fewer steps per call", field="batches")


def is_flops_refusal(err: Exception) -> bool:
    return "(max_request_flops)" in str(err)


def step_budget(steps, check, run_limits: dict, limits: Limits) -> engine.Budget:
    """The engine's budget for each of K steps: max_request_flops bounds the whole call
    (K x one step). Without a cancellation (the lean path's calls) it is the same
    frozen Budget call after call: kept by its limits."""
    max_flops = flops_per_step(steps, limits)
    if check is not None:
        return engine.Budget(**{**run_limits, "max_flops": max_flops},
                             max_block_elements=limits.max_tensor_elements, cancel=check)
    key = (max_flops, limits.max_tensor_elements, *run_limits.items())
    budget = _BUDGETS.get(key)
    if budget is None:
        if len(_BUDGETS) >= _BUDGETS_KEPT:
            _BUDGETS.clear()
        budget = _BUDGETS[key] = engine.Budget(
            **{**run_limits, "max_flops": max_flops},
            max_block_elements=limits.max_tensor_elements)
    return budget


_BUDGETS: dict = {}  # step_budget's, by their limits
_BUDGETS_KEPT = 64


def run_steps(plan, parameters, batches, velocity, request, steps, check, run_limits: dict,
              limits: Limits, width=None):
    """The engine's K steps, max_request_flops bounding the whole call (K x one step);
    `width(flops)`, if given, the BLAS width to run them at (server.blas), `flops()` the
    call's estimated work."""
    budget = step_budget(steps, check, run_limits, limits)
    try:
        with nullcontext() if width is None else width(
                lambda: steps_flops(plan, parameters, batches)):
            return engine.sgd_steps(
                plan, parameters, batches, velocity=velocity,
                learning_rate=request.learning_rate, momentum=request.momentum,
                loss=request.loss or None, max_steps=limits.max_steps_per_call,
                budget=budget)
    except engine.ResourceLimitError as err:
        if steps and steps > 1 and is_flops_refusal(err):
            raise call_over_flops(err, steps, limits) from None
        raise


def steps_flops(plan, parameters, batches) -> int:
    """The steps' estimated work: each step's values sweep and one direction."""
    if not isinstance(batches, list):  # stacked: K steps of one minibatch shape
        k = steps_of(batches) or 0
        batches = [{name: b[0] for name, b in batches.items()}] if k else []
        counts = [k]
    else:
        counts = [1] * len(batches)
    return sum(k * plan.estimate_flops(plan.bind({**parameters, **batch}).shapes, 1)
               for k, batch in zip(counts, batches))


def split_state(tensors: dict) -> tuple[dict, dict]:
    """A stored state's parameters and momentum buffers ("velocity/NAME"), by name."""
    params, velocity = {}, {}
    skip = len(VELOCITY)
    for name, array in tensors.items():
        if name.startswith(VELOCITY):
            velocity[name[skip:]] = array
        else:
            params[name] = array
    return params, velocity


class Kept(NamedTuple):
    """A call's reply, kept with its state for a retry (TrainState._again)."""

    version: int  # the state's version the call stepped from
    message: object  # its TrainStepsResponse
    evaluation: dict | None
    tensors: dict | None  # the state it made, when it returned it (return_state)
    nbytes: int  # the message and the evaluation, as the store counts tensors


def held(arrays: dict) -> int:
    return sum(STORE_BYTES_PER_TENSOR + a.nbytes for a in arrays.values())


def kept_bytes(replies: tuple, current: dict) -> int:
    """What a state's kept replies hold beyond its current tensors, counted as the
    store counts tensors: each reply's message and evaluation, and a state kept with
    an older reply."""
    total = 0
    for kept in replies:
        total += kept.nbytes
        if kept.tensors is not None and kept.tensors is not current:
            total += held(kept.tensors)
    return total


class TrainState:
    def __init__(self, store: TensorStore, limits: Limits):
        self.store, self.limits = store, limits

    def call(self, request, graph_id: str, plan, check, run_limits: dict,
             gate=None, width=None) -> TensorMessage:
        """A TrainSteps call: on a stored state, or on the parameters it carries (bounded
        before any step: the reply, the call's FLOPs, the hyperparameters as the steps'
        dtype holds them). `gate(plan, parameters, request)`, if given, runs before the
        minibatches are gathered (see the module's docstring); `width` as run_steps
        takes it."""
        if request.state:
            return self.steps(request, graph_id, plan, check, run_limits, gate, width)
        if gate is not None:
            gate(plan, request.parameters, request)
        batches = self.batches(request)
        steps = steps_of(batches)
        check_hyperparameters(request.parameters, request.learning_rate, request.momentum)
        if steps is not None:
            check_reply(request.parameters, steps, self.limits)
        result = run_steps(plan, request.parameters, batches, request.velocity, request,
                           steps, check, run_limits, self.limits, width)
        return TensorMessage(pb.TrainStepsResponse(graph_id=graph_id, losses=result.losses),
                             {"parameters": result.parameters, "velocity": result.velocity})

    def batches(self, request):
        """The steps' minibatches: stacked `batches` (with stored_batches), or a list of
        per-step dicts gathered from the rows of the stored data set `data`."""
        if request.data:
            if request.batches or request.stored_batches:
                raise BadRequest("give batches or data (with rows), not both", field="data")
            return self._rows(request)
        if request.rows or request.batch_sizes:
            raise BadRequest("rows and batch_sizes need data (a stored data set)",
                             field="rows")
        return self.store.tensors(request.stored_batches, "stored_batches", request.batches)

    def batch_shapes(self, request) -> list[tuple[int, dict]]:
        """What batches(request) gives, without gathering it: (steps, {input: (shape,
        dtype)}) for each distinct minibatch shape. Bad requests may give anything (the
        steps refuse them)."""
        if request.data:
            data = self.store.entry(request.data, "data").tensors
            return [(count, {name: ((size, *a.shape[1:]), a.dtype) for name, a in data.items()})
                    for size, count in Counter(request.batch_sizes).items()]
        stacked = self.store.tensors(request.stored_batches, "stored_batches", request.batches)
        steps = steps_of(stacked)
        if not steps:
            return []
        return [(steps, {name: (np.shape(b)[1:], np.asarray(b).dtype)
                         for name, b in stacked.items()})]

    def _rows(self, request) -> list:
        data = self.store.entry(request.data, "data").tensors
        sizes = list(request.batch_sizes)
        rows = np.array(request.rows, np.int64)
        limit = self.limits.max_steps_per_call
        if limit and len(sizes) > limit:
            raise engine.ResourceLimitError(f"{len(sizes)} steps in one call, over the limit "
                                            f"of {limit} (max_steps_per_call)",
                                            field="batch_sizes")
        if not sizes or min(sizes) < 1 or sum(sizes) != len(rows):
            raise BadRequest(f"batch_sizes ({len(sizes)} steps, {sum(sizes)} rows, smallest "
                             f"{min(sizes, default=0)}) must be >= 1 each and sum to "
                             f"len(rows) = {len(rows)}", field="batch_sizes")
        lengths = {len(a) if a.ndim else None for a in data.values()}
        if len(lengths) != 1 or None in lengths:
            raise BadRequest("the data set's tensors need one leading axis of examples, the "
                             f"same for all (got {sorted(map(str, lengths))})", field="data")
        n = lengths.pop()
        if len(rows) and rows.view(np.uint64).max() >= n:  # (negatives too: one reduction)
            bad = int(rows[(rows < 0) | (rows >= n)][0])
            raise BadRequest(f"row {bad} is outside the data set's {n} examples",
                             field="rows")
        steps, start = [], 0
        for size in sizes:
            picked = rows[start:start + size]
            start += size
            steps.append({name: a.take(picked, axis=0) for name, a in data.items()})
        return steps

    def steps(self, request, graph_id: str, plan, check, run_limits: dict,
              gate=None, width=None) -> TensorMessage:
        if request.parameters or request.velocity:
            raise BadRequest("with a stored state, parameters and velocity come from it: "
                             "send neither", field="parameters")
        entry = self.store.entry(request.state, "state")
        if not entry.lock.acquire(blocking=gate is None):
            raise Declined("the state is busy: its call waits in a worker")
        try:
            return self._steps(entry, request, graph_id, plan, check, run_limits, gate, width)
        finally:
            entry.lock.release()

    def _steps(self, entry, request, graph_id, plan, check, run_limits, gate, width=None):
        """steps() with the state's lock held."""
        version = request.state_version
        for kept in entry.replies:
            if kept.version == version:
                return self._again(entry, kept, request)
        if version != entry.version:
            raise StateConflict(
                f"the state is at version {entry.version}, this call steps from "
                f"{version}: send the version of the last reply", field="state_version")
        params, velocity = split_state(entry.tensors)
        if gate is not None:
            gate(plan, params, request)
        batches = self.batches(request)
        steps = steps_of(batches)
        check_hyperparameters(params, request.learning_rate, request.momentum)
        if steps is not None and request.return_state:
            check_reply(params, steps, self.limits)
        result = run_steps(plan, params, batches, velocity, request, steps, check,
                           run_limits, self.limits, width)
        evaluation = None
        if request.return_state:
            state = {"parameters": result.parameters, "velocity": result.velocity}
        else:
            state = {}
        if request.evaluate_data:
            data = self.store.entry(request.evaluate_data, "evaluate_data").tensors
            outputs = plan.evaluate({**data, **result.parameters}, check=check,
                                    **run_limits)
            names = list(request.evaluate_outputs) or list(outputs)
            for i, name in enumerate(names):
                if name not in outputs:
                    raise BadRequest(f"'{name[:200]}' is not a graph output",
                                     field=f"evaluate_outputs[{i}]")
            evaluation = {name: outputs[name] for name in names}
        tensors = dict(result.parameters)
        tensors.update({VELOCITY + n: v for n, v in result.velocity.items()})
        message = pb.TrainStepsResponse(graph_id=graph_id, losses=result.losses,
                                        state_version=entry.version + 1,
                                        state_steps=entry.steps + len(result.losses))
        # the state it returned is kept with the reply (for a retry after the next call)
        replies = (*entry.replies, Kept(version, message, evaluation,
                                        tensors if request.return_state else None,
                                        message.ByteSize() + held(evaluation or {})))
        replies = replies[-KEPT_REPLIES:]
        self.store.resize(entry, tensor_nbytes(tensors) + kept_bytes(replies, tensors),
                          "state")
        entry.tensors = tensors
        entry.version += 1
        entry.steps += len(result.losses)
        entry.replies = replies
        return TensorMessage(message, {"evaluation": evaluation, **state})

    @staticmethod
    def _again(entry, kept: Kept, request) -> TensorMessage:
        """A retry of a call that stepped (one of entry.replies): its reply again, and,
        if asked, the state it made (the current one for the last call; for the one
        before, the state kept when it asked for it)."""
        version, message, evaluation, tensors, _ = kept
        state = {}
        if request.return_state:
            if version + 1 == entry.version:
                tensors = entry.tensors
            elif tensors is None:
                raise StateConflict(
                    f"the call from version {version} stepped, and the state has moved on "
                    f"to version {entry.version}: the parameters it made are no longer "
                    "held (its first attempt did not ask for them, return_state)",
                    field="state_version")
            state = dict(zip(("parameters", "velocity"), split_state(tensors)))
        return TensorMessage(message, {"evaluation": evaluation, **state})
