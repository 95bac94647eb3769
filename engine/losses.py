"""What a training call's reverse sweep runs (engine/sgd.py), kept per plan.

The usual loss, mean cross-entropy written -mean(sum(Y * log_softmax(z))), ends in four
nodes (mul, sum, mean, neg) whose reverse sweep broadcasts a scalar three times before
the product with Y: four steps' dispatch and two broadcast views for what is one
product of the scalar -1/n with Y. `loss_steps` finds that tail in a plan's steps once
and gives the steps with the four replaced by one: its values are the four rows' own
evals in order (the same bits), its cotangent the scalar's product with the other
factor, in the same float arithmetic as the four rows' vjps (the same bits). Its costs
are at most the four rows' (the same forward values, fewer backward arrays), so a
plan's declared costs still bound it.

`compiled_sweep` gives those steps' reverse sweep at one set of input shapes as one
generated function (engine/sweeps.py's compiled_reverse: the same sweep without
per-step dispatch), with engine/direct.py's kernels where a row has them and the fused
tail's own, and the values dropped to their shapes as Stubs made once. The plan's
`loss_tails` cache holds both, and sgd.py's Bindings and Knowns (a call's checked
names and forms), 16 entries in all, no arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import direct
from .ops.reductions import _count, _expand, _mean
from .sweeps import Step, Stub, compiled_reverse

_TAIL = ("mul", "sum", "mean", "neg")


class LossSteps(NamedTuple):
    steps: list  # the plan's steps with the tail replaced (or the plan's own)
    points: tuple  # where the sweep checks, as in the plan's
    index: tuple  # per step, the plan's step whose needs (input positions) it has
    fused: tuple  # the names of the product's two factors when the tail was fused, else ()
    chain: tuple = ()  # the tail's four node names (neg, mean, sum, mul) when fused


def loss_steps(plan, loss: str) -> LossSteps:
    """The steps a reverse sweep of `loss` runs (cached per plan and loss name)."""
    found = plan.loss_tails.get(loss)
    if found is None:
        found = _loss_steps(plan, plan.slot[loss])
        keep(plan, loss, found)
    return found


# A training call's sweep is compiled (engine/sweeps.py's compiled_reverse) for plans of
# at most this many steps and input references; longer ones run in the interpreter.
# Compiling takes memory while it runs (Python's parser and compiler over the generated
# source: measured ~40 KB a step of dense layers, their references included, ~18 KB a
# reference of a concat's; 10 MB for 254 steps), declared as COMPILE_STEP_BYTES per step plus
# COMPILE_REFERENCE_BYTES per reference on the call that compiles (compile_bytes), and
# keeps ~700 bytes a step and ~550 a reference, counted in Plan.cache_bytes as
# COMPILED_STEP_BYTES and COMPILED_REFERENCE_BYTES per entry of the plan's `loss_tails`.
COMPILED_MAX_STEPS = 256
COMPILED_MAX_REFERENCES = 1024
COMPILE_STEP_BYTES = 32 << 10
COMPILE_REFERENCE_BYTES = 24 << 10
COMPILED_STEP_BYTES = 1024
COMPILED_REFERENCE_BYTES = 1024


def kept_bytes(plan) -> int:
    """What one entry of a plan's `loss_tails` may keep (a compiled sweep, the most)."""
    return (COMPILED_STEP_BYTES * len(plan.steps)
            + COMPILED_REFERENCE_BYTES * plan.references)


def plan_compiles(plan) -> bool:
    """Whether a plan's whole reverse sweep is short enough to compile (Plan.run_vjp)."""
    return (len(plan.steps) <= COMPILED_MAX_STEPS
            and plan.references <= COMPILED_MAX_REFERENCES)


def plan_compile_bytes(plan) -> int:
    """The memory compiling a plan's whole reverse sweep takes while it runs."""
    return COMPILE_STEP_BYTES * len(plan.steps) + COMPILE_REFERENCE_BYTES * plan.references


def _compiles(tail: LossSteps) -> bool:
    return (len(tail.steps) <= COMPILED_MAX_STEPS
            and sum(len(st.ins) for st in tail.steps) <= COMPILED_MAX_REFERENCES)


def _compiled_key(plan, loss: str, tail: LossSteps, names: tuple, shapes: dict) -> tuple:
    return ("compiled", loss, bool(tail.fused), names,
            tuple(shapes[n] for n in plan.input_names))


def compile_bytes(plan, loss: str, tail: LossSteps, names: tuple, shapes: dict) -> int:
    """The memory compiled_sweep takes while it compiles these steps (0: nothing to
    compile, kept from an earlier call or run in the interpreter)."""
    if not _compiles(tail) or _compiled_key(plan, loss, tail, names, shapes) in plan.loss_tails:
        return 0
    return (COMPILE_STEP_BYTES * len(tail.steps)
            + COMPILE_REFERENCE_BYTES * sum(len(st.ins) for st in tail.steps))


def compiled_sweep(plan, loss: str, tail: LossSteps, needs: list, names: tuple, shapes: dict):
    """run(vals, seeds, check) -> ([loss value, parameter values...], [the loss's
    cotangent, then each parameter's gradient in its shape, 0 where none]) for a
    training step's reverse sweep over `tail`'s steps at these shapes (engine/direct.py's
    kernels where a row has one; cached per plan, loss, tail, parameter names and input
    shapes), or None for a plan too long to compile."""
    if not _compiles(tail):
        return None
    key = _compiled_key(plan, loss, tail, names, shapes)
    found = plan.loss_tails.get(key)
    if found is None:
        wanted = [plan.slot[loss]] + [plan.slot[n] for n in names]
        slot_names = list(plan.slot)
        kernels = []
        for st, j in zip(tail.steps, tail.index):
            node, op, attrs = plan.nodes[j]
            if st.op == "mean_product":
                kernels.append(_tail_kernels(plan, tail, shapes))
            else:
                kernels.append(direct.kernels(op.name, attrs, [shapes[n] for n in node.inputs],
                                              shapes[node.name]))
        stubs = {s: Stub(shapes[slot_names[s]], plan.np_dtypes[slot_names[s]],
                         len(shapes[slot_names[s]]))
                 for st in tail.steps for s in st.drop}
        shaped = {plan.slot[n]: tuple(int(d) for d in shapes[n]) for n in names}
        found = compiled_reverse(tail.steps, needs, tail.points, (plan.slot[loss],), wanted,
                                 kernels, stubs, {**direct.ENV, **_TAIL_ENV}, shaped)
        keep(plan, key, found)
    return found


def keep(plan, key, value) -> None:
    """Keep `value` in the plan's cache of training sweeps (16 entries at most)."""
    if len(plan.loss_tails) >= 16:
        plan.loss_tails.pop(next(iter(plan.loss_tails)), None)
    plan.loss_tails[key] = value


def sweep_steps(plan, loss: str, shapes: dict) -> LossSteps:
    """The steps for a reverse sweep of `loss` at these shapes: with the tail fused when
    its product's two factors have one shape and dtype (no broadcasting between them),
    else the plan's own."""
    tail = loss_steps(plan, loss)
    if tail.fused:
        a, b = tail.fused
        if shapes[a] == shapes[b] and plan.dtypes[a] == plan.dtypes[b]:
            return tail
    return plain(plan)


def plain(plan) -> LossSteps:
    """The plan's own steps."""
    return LossSteps(plan.steps, plan.points, tuple(range(len(plan.steps))), ())


def _loss_steps(plan, loss_slot: int) -> LossSteps:
    steps = plan.steps
    plain_steps = plain(plan)
    producer = {st.out: j for j, st in enumerate(steps)}
    readers: dict = {}
    for st in steps:
        for i in st.ins:
            readers[i] = readers.get(i, 0) + 1
    outputs = {plan.slot[n] for n in plan.output_names}
    chain, slot = [], loss_slot
    for op in reversed(_TAIL):  # neg, mean, sum, mul: each reading the next one's value
        j = producer.get(slot)
        if j is None or steps[j].op != op:
            return plain_steps
        if chain and (slot in outputs or readers.get(slot) != 1):
            return plain_steps  # an intermediate value someone else reads: not fused
        chain.append(j)
        slot = steps[j].ins[0]
    neg, mean, total, mul = (steps[j] for j in chain)
    if len(mul.ins) != 2:
        return plain_steps
    attrs = {j: plan.nodes[j][2] for j in chain}
    fused = Step(neg.node, "mean_product", _evaluate(mul, total, mean, neg),
                 None, _pull(attrs[chain[2]], attrs[chain[1]]), mul.ins, neg.out,
                 _without(chain, steps, "free"), _without(chain, steps, "drop"))
    gone = set(chain[1:])  # mul, sum and mean: the fused step stands where neg stood
    new_steps, index, at = [], [], {}
    for j, st in enumerate(steps):
        if j in gone:
            at[j] = len(new_steps)  # (their check points move to the next step kept)
            continue
        at[j] = len(new_steps)
        new_steps.append(fused if j == chain[0] else st)
        index.append(chain[3] if j == chain[0] else j)
    points = tuple(sorted({min(at[j], len(new_steps) - 1) for j in plan.points}))
    names = list(plan.slot)
    return LossSteps(new_steps, points, tuple(index), tuple(names[s] for s in mul.ins),
                     tuple(steps[j].node for j in chain))


def _without(chain, steps, field) -> tuple:
    """The slots the four steps free (or drop), less the three values no longer made."""
    made = {steps[j].out for j in chain[1:]}
    return tuple(s for j in reversed(chain) for s in getattr(steps[j], field)
                 if s not in made)


def _evaluate(mul, total, mean, neg):
    f, g, h, k = mul.eval, total.eval, mean.eval, neg.eval

    def evaluate(a, b):
        return k(h(g(f(a, b))))
    return evaluate


def _pull(sum_attrs, mean_attrs):
    """d loss / d factor i: -g / n, the mean's count, with the reduced axes put back,
    times the other factor (the mean's, sum's and mul's vjps without broadcasting)."""
    sum_axes, sum_keep = sum_attrs["axes"], sum_attrs["keepdims"]
    mean_axes, mean_keep = mean_attrs["axes"], mean_attrs["keepdims"]

    def vjp(i, g, x, ans):
        shape = x[0].shape
        summed = (tuple(1 if d in sum_axes else n for d, n in enumerate(shape)) if sum_keep
                  else tuple(n for d, n in enumerate(shape) if d not in sum_axes))
        g = _expand(-g, mean_axes, mean_keep) / _count(summed, mean_axes)
        return _expand(g, sum_axes, sum_keep) * x[1 - i]
    return vjp


_TAIL_ENV = {"negative": np.negative, "multiply": np.multiply, "add_reduce": np.add.reduce,
             "mean_": _mean}


def _tail_kernels(plan, tail: LossSteps, shapes) -> direct.Kernels:
    """The fused tail's eval and pull as direct kernels at these shapes: the four rows'
    calls (mul, sum, mean, neg) and _pull's, its shapes and count worked out once."""
    _, mean, total, _ = tail.chain
    attrs = {node.name: a for node, _, a in plan.nodes}
    sum_axes, sum_keep = attrs[total]["axes"], attrs[total]["keepdims"]
    mean_axes, mean_keep = attrs[mean]["axes"], attrs[mean]["keepdims"]
    evaluate = (f"negative(mean_(add_reduce(multiply({{0}}, {{1}}), axis={sum_axes}, "
                f"keepdims={sum_keep}, dtype={{0}}.dtype), {mean_axes}, {mean_keep}))")
    g_shape, pulled = (1,) + shapes[mean], "(-{g})"
    if not mean_keep and mean_axes:
        g_shape = _inserted(g_shape, mean_axes)
        pulled += f".reshape({g_shape})"
    pulled = f"({pulled} / {_count(shapes[total], mean_axes)})"
    if not sum_keep and sum_axes:
        pulled += f".reshape({_inserted(g_shape, sum_axes)})"
    return direct.Kernels(evaluate, {0: pulled + " * {1}", 1: pulled + " * {0}"})


def _inserted(shape: tuple, axes) -> tuple:
    """_expand's shape: a unit axis after the direction axis for each reduced axis."""
    shape = list(shape)
    for a in sorted(axes):
        shape.insert(a + 1, 1)
    return tuple(shape)
