"""What the server checks of a TrainSteps request before the engine runs any step:
the reply's size, the call's work against max_request_flops, and the learning rate
and momentum as the steps use them (cast to each parameter's dtype)."""

from __future__ import annotations

import numpy as np

from gradserve.engine.errors import echo

from .errors import BadRequest, LimitExceeded
from .limits import Limits

# A reply tensor's framing beyond its data and name: tags, lengths, dtype, shape.
TENSOR_FRAMING_BYTES = 64


def steps_of(batches) -> int | None:
    """K, the steps the batches stack, when they agree on one (the engine names what is
    wrong otherwise)."""
    ks = {np.shape(b)[0] for b in batches.values() if np.ndim(b)}
    return ks.pop() if len(ks) == 1 and len(batches) else None


def check_hyperparameters(parameters, learning_rate: float, momentum: float) -> None:
    """learning_rate and momentum as each parameter's dtype holds them (the steps compute
    in it): 1e300 is inf in float32, 1e-320 is 0, 0.99999999999 is 1.0."""
    for name, value in parameters.items():
        dtype = np.asarray(value).dtype
        if dtype.kind != "f":
            continue  # the engine refuses a parameter that is not floating
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
