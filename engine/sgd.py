"""K steps of SGD with momentum through a Plan, in order: what a remote training
worker would otherwise ask for one round trip at a time.

The rule is PyTorch's (dampening 0, no Nesterov), in the parameters' dtype:

    g <- d loss / d theta;    v <- momentum * v + g;    theta <- theta - lr * v

Nothing is kept between calls: the caller sends the parameters and momentum
buffers and gets new arrays back (theirs are never written), so a failed call
changes nothing. The minibatches are either stacked (one array per input, a leading
axis of steps) or a sequence of per-step dicts, whose sizes may differ (an epoch's
short last batch in the same call).
"""

from __future__ import annotations

from math import isfinite
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from .budget import Budget
from .errors import DifferentiationError, InputError, ResourceLimitError
from .ir import FLOAT_DTYPES


class SGDResult(NamedTuple):
    parameters: dict  # name -> array after the last step
    velocity: dict  # name -> momentum buffer after the last step
    losses: list  # the loss of each step, before its update (floats)


def sgd_steps(plan, parameters: Mapping[str, np.ndarray],
              batches: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
              *, learning_rate: float, momentum: float = 0.0, velocity=None, loss=None,
              max_steps: int | None = None, budget: Budget | None = None, check=None,
              **limits) -> SGDResult:
    """Run K steps: `batches` holds every graph input that is not a parameter, the
    K minibatches stacked along a new leading axis (the same K for all), or is a
    sequence of K dicts, one minibatch each. `loss`
    names the one-element output minimized (default: the graph's only output).
    The budget (or its fields as keywords, `check` its cancellation) applies to each
    step; its check runs between steps and inside each."""
    budget = Budget.of(budget, check, **limits)
    check = budget.check
    names = tuple(parameters)
    stacked = not isinstance(batches, (list, tuple))  # (an ABC check costs ~100 us)
    _check_names(plan, names, batches if stacked else (batches[0] if batches else {}))
    loss = _loss_name(plan, loss)
    if not (isfinite(learning_rate) and learning_rate > 0):
        raise DifferentiationError(f"learning_rate must be a finite number > 0, got "
                                   f"{learning_rate!r}", field="learning_rate")
    if not (isfinite(momentum) and 0 <= momentum < 1):
        raise DifferentiationError(f"momentum must be in [0, 1), got {momentum!r}",
                                   field="momentum")
    steps = _steps(batches) if stacked else _listed_steps(batches)
    if max_steps is not None and steps > max_steps:
        raise ResourceLimitError(f"{steps} steps in one call, over the limit of {max_steps} "
                                 "(max_steps_per_call)", field="batches")
    params = {n: np.array(p) for n, p in parameters.items()}  # copies, updated in place
    velocity = dict(velocity or {})
    for name, v in velocity.items():
        if name not in params:
            raise InputError("has a momentum buffer but is not a parameter", node=name,
                             field="velocity")
        v = np.asarray(v)
        if v.shape != params[name].shape or v.dtype != params[name].dtype:
            raise InputError(f"momentum buffer {v.dtype}{list(v.shape)} does not match the "
                             f"parameter's {params[name].dtype}{list(params[name].shape)}",
                             node=name, field="velocity")
        velocity[name] = v.copy()
    for name, p in params.items():
        if name not in velocity:
            velocity[name] = np.zeros_like(p)
    losses = []
    rates = {n: (p.dtype.type(learning_rate), p.dtype.type(momentum))
             for n, p in params.items()}
    for k in range(steps):
        if check is not None:
            check()
        batch = {n: b[k] for n, b in batches.items()} if stacked else batches[k]
        inputs = {**batch, **params}
        # The same Jacobian of the loss a worker asks for one step at a time, so that K
        # steps here equal K calls exactly.
        result = plan.jacobian(inputs, wrt=names, of=(loss,), budget=budget)
        value = np.asarray(result.outputs[loss])
        if value.size != 1:
            raise DifferentiationError(f"the loss has {value.size} elements; it must have one",
                                       node=loss, field="loss")
        losses.append(float(value.reshape(())))
        # In place, on this call's own copies: the same float arithmetic (and bits) as
        # v = mu * v + g; p = p - lr * v, without their temporaries.
        jacobian = result.jacobian
        for name, p in params.items():
            lr, mu = rates[name]
            v = velocity[name]
            v *= mu
            v += jacobian[loss, name].reshape(p.shape)
            p -= lr * v
    return SGDResult(params, velocity, losses)


def _check_names(plan, names, batches) -> None:
    if not names:
        raise DifferentiationError("no parameters to train", field="parameters")
    for name in names:
        if name not in plan.input_names:
            raise DifferentiationError("is not a graph input", node=name, field="parameters")
        if plan.dtypes[name] not in FLOAT_DTYPES:
            raise DifferentiationError(f"has dtype {plan.dtypes[name]}; only floating inputs "
                                       "can be trained", node=name, field="parameters")
    for name in batches:
        if name in names:
            raise InputError("is both a parameter and a batch input", node=name,
                             field="batches")
    missing = [n for n in plan.input_names if n not in names and n not in batches]
    if missing:
        raise InputError("inputs are neither parameters nor batches: " + ", ".join(missing),
                         field="batches")


def _loss_name(plan, loss) -> str:
    if loss is None:
        if len(plan.output_names) != 1:
            raise DifferentiationError("the graph has several outputs: name the loss",
                                       field="loss")
        loss = plan.output_names[0]
    if loss not in plan.output_names:
        raise DifferentiationError("is not a graph output", node=loss, field="loss")
    if plan.dtypes[loss] not in FLOAT_DTYPES:
        raise DifferentiationError(f"has dtype {plan.dtypes[loss]}; a loss is floating",
                                   node=loss, field="loss")
    return loss


def _listed_steps(batches) -> int:
    if not batches:
        raise InputError("no steps: the list of minibatches is empty", field="batches")
    keys = set(batches[0])
    for k, batch in enumerate(batches):
        if set(batch) != keys:
            raise InputError(f"minibatch {k} has inputs {sorted(batch)}, the first has "
                             f"{sorted(keys)}", field="batches")
    return len(batches)


def _steps(batches) -> int:
    ks = {np.shape(b)[0] if np.ndim(b) else None for b in batches.values()}
    if None in ks:
        raise InputError("each batch input needs a leading axis of steps", field="batches")
    if len(ks) > 1:
        raise InputError(f"batch inputs stack different numbers of steps: {sorted(ks)}",
                         field="batches")
    steps = ks.pop() if ks else 0
    if steps < 1:
        raise InputError("no steps: the batch inputs' leading axis is empty (or the graph "
                         "has no inputs besides the parameters)", field="batches")
    return steps
