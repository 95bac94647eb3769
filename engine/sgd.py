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

from math import isfinite, prod
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import jacobian
from .budget import Budget
from .errors import DifferentiationError, InputError, ResourceLimitError
from .ir import FLOAT_DTYPES
from .losses import compile_bytes, compiled_sweep, keep as keep_binding
from .losses import sweep_steps as loss_sweep_steps
from .sweeps import reverse_sweep


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
    first = batches if stacked else (batches[0] if batches else {})
    last_key = ("last", names, loss, budget.admission if budget.limited else None)
    known = plan.loss_tails.get(last_key)
    if known is not None and not _fits(known, names, first, parameters, velocity):
        known = None
    if known is None:  # the names and every form checked in full
        _check_names(plan, names, first)
        loss = _loss_name(plan, loss)
    else:
        loss = known.loss
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
    if known is None:
        params, velocity = _checked_arrays(parameters, velocity)
        step = LossGradient(plan, names, loss, budget)
    else:  # arrays of the forms an earlier call checked (_fits)
        params, velocity = parameters, velocity or {}
        step = LossGradient(plan, names, loss, budget, known.binding)
    update = (MomentumUpdate if steps > 1 else OneUpdate)(params, velocity, learning_rate,
                                                          momentum)
    losses = []
    for k in range(steps):
        if check is not None:
            check()
        batch = {n: b[k] for n, b in batches.items()} if stacked else batches[k]
        value, gradients = step(batch, update.params)
        losses.append(value)
        update(gradients)
        if k == 0 and known is None and step.binding is not None:  # for the next call
            keep_binding(plan, last_key, Known(loss, tuple(first), step.binding,
                                               _param_forms(params)))
    return SGDResult(update.params, update.velocity, losses)


class Known(NamedTuple):
    """A training call's checked names and forms, kept on the plan (engine/losses.py's
    cache) under its parameter names, loss and limits: a later call whose batch names
    and parameter and buffer forms are the same needs none of sgd_steps' checks again
    (its batch's forms are checked against the binding as the step binds it)."""

    loss: str  # the loss's name, resolved
    batch_names: tuple  # the batch inputs' names, in the order given
    binding: "Binding"  # the first step's
    param_forms: tuple  # ((shape, dtype), ...) of the parameters, in order


def _param_forms(params: dict) -> tuple:
    return tuple((p.shape, p.dtype) for p in params.values())


def _fits(known: Known, names: tuple, first, parameters, velocity) -> bool:
    """Whether a call passes every check the call that kept `known` passed: the same
    batch names, parameters of the same forms (arrays), buffers of their parameters'."""
    if tuple(first) != known.batch_names:
        return False
    ndarray = np.ndarray
    for p, (shape, dtype) in zip(parameters.values(), known.param_forms):
        if type(p) is not ndarray or p.shape != shape or p.dtype != dtype:
            return False
    if not velocity:
        return True
    if tuple(velocity) == names:  # (a buffer for each parameter, in order: their forms)
        for v, (shape, dtype) in zip(velocity.values(), known.param_forms):
            if type(v) is not ndarray or v.shape != shape or v.dtype != dtype:
                return False
        return True
    get = parameters.get
    for name, v in velocity.items():
        p = get(name)
        if p is None or type(v) is not ndarray or v.shape != p.shape or v.dtype != p.dtype:
            return False
    return True


def _checked_arrays(parameters, given) -> tuple[dict, dict]:
    """The parameters as arrays (never written) and the momentum buffers, each checked
    against its parameter."""
    params = {n: p if type(p) is np.ndarray else np.asarray(p)
              for n, p in parameters.items()}
    velocity = {}
    for name, v in (given or {}).items():
        p = params.get(name)
        if p is None:
            raise InputError("has a momentum buffer but is not a parameter", node=name,
                             field="velocity")
        if type(v) is not np.ndarray:
            v = np.asarray(v)
        if v.shape != p.shape or v.dtype != p.dtype:
            raise InputError(f"momentum buffer {v.dtype}{list(v.shape)} does not match the "
                             f"parameter's {params[name].dtype}{list(params[name].shape)}",
                             node=name, field="velocity")
        velocity[name] = v
    return params, velocity


class MomentumUpdate:
    """v <- mu * v + g;  p <- p - lr * v, for every parameter at once: the parameters
    (and buffers) of one dtype live in one flat array, this call's own (the caller's
    arrays are copied into it, never written), so a step's update is four NumPy calls
    per dtype and one addition per gradient, in the same float arithmetic (and bits)
    as parameter by parameter. `params` and `velocity` are views into the flat arrays,
    updated in place."""

    def __init__(self, params: dict, velocity: dict, learning_rate: float, momentum: float):
        self.groups = []  # (lr, mu, flat parameters, flat buffers, flat lr * v, buffer views)
        self.params, self.velocity = dict.fromkeys(params), dict.fromkeys(params)
        for dtype, group in _layout(params).items():
            flat_p = np.concatenate([params[n] for _, n, _, _ in group], axis=None)
            if all(n in velocity for _, n, _, _ in group):
                flat_v = np.concatenate([velocity[n] for _, n, _, _ in group], axis=None)
            else:  # a buffer not given is zeros
                flat_v = np.zeros_like(flat_p)
                for _, n, part, shape in group:
                    if n in velocity:
                        flat_v[part] = velocity[n].reshape(-1)
            views = []
            for i, n, part, shape in group:
                self.params[n] = flat_p[part].reshape(shape)
                self.velocity[n] = v = flat_v[part].reshape(shape)
                views.append((i, v))
            self.groups.append((dtype.type(learning_rate), dtype.type(momentum), flat_p,
                                flat_v, np.empty_like(flat_p), views))

    def __call__(self, gradients: list) -> None:
        for lr, mu, p, v, lr_v, views in self.groups:
            np.multiply(v, mu, out=v)
            for i, v_i in views:
                v_i += gradients[i]
            np.multiply(lr, v, out=lr_v)
            p -= lr_v


class OneUpdate:
    """MomentumUpdate for a call of one step: the same arithmetic parameter by
    parameter into new arrays (four NumPy calls each, p - lr * v written over lr * v),
    without the flat arrays' copies and views, which cost more than they save over one
    step."""

    def __init__(self, params: dict, velocity: dict, learning_rate: float, momentum: float):
        self.params, self.given, self.velocity = params, velocity, {}
        self.learning_rate, self.momentum = learning_rate, momentum

    def __call__(self, gradients: list) -> None:
        params, rates, given = {}, {}, self.given
        multiply, subtract = np.multiply, np.subtract
        for (name, p), g in zip(self.params.items(), gradients):
            dtype = p.dtype
            rate = rates.get(dtype)
            if rate is None:
                rate = rates[dtype] = (dtype.type(self.learning_rate),
                                       dtype.type(self.momentum))
            lr, mu = rate
            v = given.get(name)
            v = np.zeros_like(p) if v is None else multiply(v, mu)  # (mu * 0 is 0)
            v += g
            self.velocity[name] = v
            lr_v = multiply(lr, v)
            params[name] = subtract(p, lr_v, out=lr_v) if lr_v.ndim else p - lr_v
        self.params = params


def _layout(params: dict) -> dict:
    """dtype -> [(position, name, slice of the flat array, shape)] of the parameters."""
    groups: dict = {}
    for i, (name, p) in enumerate(params.items()):
        group = groups.setdefault(p.dtype, [])
        start = group[-1][2].stop if group else 0
        group.append((i, name, slice(start, start + p.size), p.shape))
    return groups


class Binding(NamedTuple):
    """What a training step's sweep needs at one set of input forms, kept on the plan
    (engine/losses.py's cache) for the next call of the same forms and limits: no arrays,
    only shapes, the Jacobian setup, the steps (and their compiled sweep) and the slot
    list with the constants filled in."""

    shapes: dict
    setup: object  # engine/jacobian.py's JacobianSetup
    sweep: object  # engine/losses.py's LossSteps
    needs: list  # per step of the sweep, the input positions it pulls cotangents into
    compiled: object  # the sweep compiled (engine/sweeps.py's compiled_reverse), or None
    template: list  # the slot list: constants, no inputs
    forms: tuple  # ((name, slot, shape, dtype), ...) of the batch inputs
    slots: tuple  # the parameters' slots, in order


class LossGradient:
    """One step's loss and gradient, bound once per call: the names checked, the seed,
    the steps the reverse sweep runs and the budget admitted per input shapes. The
    same sweep (and bits) as the Jacobian of the loss a worker asks for one step at a
    time (Plan.jacobian, reverse mode), without assembling blocks.

    A step's batch of the same dtypes and shapes as the step before it is bound without
    Plan.bind's checks (the parameters are this call's own arrays after the first step,
    of the shapes and dtypes the first step checked); so is the first step's, given an
    earlier call's Binding whose parameter forms sgd_steps matched (Known); any other is
    bound in full, unless an earlier call bound the same forms (batch and parameters)
    under the same limits (its Binding, kept on the plan)."""

    def __init__(self, plan, names: tuple, loss: str, budget: Budget,
                 binding: Binding | None = None):
        self.plan, self.names, self.of, self.budget = plan, names, (loss,), budget
        self.loss_slot = plan.slot[loss]
        self.check = budget.check
        # of the batch last bound; one given is an earlier call's, of these parameters'
        # forms, under these limits (sgd_steps' Known)
        self.binding: Binding | None = binding

    def __call__(self, batch: Mapping, params: Mapping) -> tuple[float, list]:
        vals = self._bind_again(batch, params)
        if vals is None:
            vals = self._bind(batch, params)
            if vals is None:  # one scalar parameter: forward, as its Jacobian is
                return self._forward({**batch, **params})
        b = self.binding
        seeds = jacobian.seeds_for(self.plan, b.setup, b.shapes)
        if b.compiled is not None:  # (its gradients shaped as their parameters, 0 for none)
            values, cots = b.compiled(vals, seeds, self.check)
            return values[0].item(), cots[1:]  # (the one element, as a Python float)
        cots = reverse_sweep(b.sweep.steps, vals, seeds, b.needs, self.check, b.sweep.points)
        gradients = []
        shapes = b.shapes
        for name, s in zip(self.names, b.slots):
            g = cots[s]
            gradients.append(0 if g is None else g.reshape(shapes[name]))
        return float(vals[self.loss_slot].reshape(())), gradients

    def _bind_again(self, batch, params) -> list | None:
        """The slot list for a batch of the forms bound last (None: bind it in full)."""
        b = self.binding
        if b is None or len(batch) != len(b.forms):
            return None
        vals = b.template[:]
        for name, slot, shape, dtype in b.forms:
            value = batch.get(name)
            if type(value) is not np.ndarray or value.shape != shape or value.dtype != dtype:
                return None
            vals[slot] = value
        for s, p in zip(b.slots, params.values()):
            vals[s] = p
        return vals

    def _bind(self, batch, params) -> list | None:
        """Plan.bind's checks, the loss's size, the mode and the budget's admission at
        these shapes (or an earlier call's Binding of the same forms and limits); the
        slot list, or None when the planner picks forward mode."""
        plan, budget, loss = self.plan, self.budget, self.of[0]
        key = _forms_key(self.names, loss, budget, batch, params)
        known = plan.loss_tails.get(key) if key is not None else None
        if known is not None:
            self.binding = known
            return self._bind_again(batch, params)
        bound = plan.bind({**batch, **params})
        shapes = bound.shapes
        size = prod(shapes[loss])
        if size != 1:
            raise DifferentiationError(f"the loss has {size} elements; it must have one",
                                       node=loss, field="loss")
        setup = jacobian.setup_for(plan, bound, self.names, self.of, "auto", None)
        if setup.decision.mode != "reverse":
            return None
        b = self.binding
        reuse = b is not None and shapes is b.shapes and setup is b.setup
        sweep = b.sweep if reuse else loss_sweep_steps(plan, loss, shapes)
        if budget.limited:  # with the compiling's own memory, when this call compiles
            jacobian.admit(plan, shapes, setup, budget, extra=0 if reuse else compile_bytes(
                plan, loss, sweep, self.names, shapes))
        if reuse:
            needs, compiled = b.needs, b.compiled
        else:
            all_needs = plan.needs(setup.wrt)
            needs = [all_needs[j] for j in sweep.index]
            compiled = compiled_sweep(plan, loss, sweep, needs, self.names, shapes)
        template = bound.vals[:]
        template[:len(plan.input_names)] = [None] * len(plan.input_names)
        forms = tuple((name, plan.slot[name], value.shape, value.dtype)
                      for name in batch for value in (bound.vals[plan.slot[name]],))
        self.binding = Binding(shapes, setup, sweep, needs, compiled, template, forms,
                               tuple(plan.slot[n] for n in self.names))
        if key is not None:
            keep_binding(plan, key, self.binding)
        return bound.vals

    def _forward(self, inputs) -> tuple[float, list]:
        plan, loss = self.plan, self.of[0]
        result = plan.jacobian(inputs, wrt=self.names, of=self.of, sparsity="dense",
                               budget=self.budget)
        shapes = plan.bind(inputs).shapes
        return (float(np.asarray(result.outputs[loss]).reshape(())),
                [result.jacobian[loss, n].reshape(shapes[n]) for n in self.names])


def _forms_key(names, loss, budget, batch, params) -> tuple | None:
    """What a Binding depends on: the names, the limits admitted by, and every input's
    shape and dtype (None when an input is not an array: bound in full)."""
    forms = []
    for values in (batch, params):
        for name, value in values.items():
            if type(value) is not np.ndarray:
                return None
            forms.append((name, value.shape, value.dtype))
    return ("binding", names, loss, budget.admission if budget.limited else None,
            tuple(forms))


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
    if len(batches) == 1:  # (nothing to compare)
        return 1
    keys = set(batches[0])
    for k, batch in enumerate(batches):
        if set(batch) != keys:
            raise InputError(f"minibatch {k} has inputs {sorted(batch)}, the first has "
                             f"{sorted(keys)}", field="batches")
    return len(batches)


def _steps(batches) -> int:
    ks = {b.shape[0] if type(b) is np.ndarray and b.ndim else
          np.shape(b)[0] if np.ndim(b) else None for b in batches.values()}
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
