"""The three sweeps over a Plan's prepared steps: values, forward mode, reverse mode.

Each is one flat loop (no recursion), so graph depth is bounded by memory only.
The loops special-case one and two inputs: for small tensors the interpreter's
own overhead is most of the cost, and building argument lists shows.

`check`, when given, is called before each step listed in `points` (see
check_points: every heavy op and at least every CHUNK steps), so a sweep whose
caller is gone stops between ops; it stops the sweep by raising.

While a sweep runs with a `check`, `checkpoint()` calls it too: an op that
splits its own work into blocks (a large matmul) checks between them, so no
single step runs long without a check.

`record`, when given, is told what each step computed (a `Recorder`): that is
how a trace is taken, by the same sweeps that answer every other request, and
how second order (forward-over-reverse) runs: as a hook of the reverse sweep.

`compiled_reverse` writes the reverse sweep over one fixed list of steps out as one
Python function, for a training call that runs it K times (engine/sgd.py): the
same semantics, no per-step dispatch.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, NamedTuple, Protocol

import numpy as np

_CHECK: ContextVar = ContextVar("gradserve_engine_check", default=None)


def checkpoint() -> None:
    """Run the current sweep's check, if it has one (ops call this between blocks)."""
    check = _CHECK.get()
    if check is not None:
        check()


@contextmanager
def _checking(check):
    token = _CHECK.set(check)
    try:
        yield
    finally:
        _CHECK.reset(token)


class Step(NamedTuple):
    node: str
    op: str
    eval: Callable
    jvp: Callable
    vjp: Callable
    ins: tuple  # input slots
    out: int  # output slot
    free: tuple = ()  # slots last used here (not outputs): freed after the step
    drop: tuple = ()  # of those, the ones no vjp reads: only their shape is kept
    twice: bool = False  # a symmetric op reading one value in both positions (x * x)


class Recorder(Protocol):
    """What a sweep reports when asked to: a hook. engine/tracing.py's recorder keeps it
    all; engine/second.py's forward-over-reverse hook carries tangents through the
    reverse sweep's forward pass and the tangents of the cotangents back."""

    def value(self, step: Step, xs: tuple, ans) -> None:
        """Reverse sweep, forward pass: `step` read `xs` and computed `ans`."""

    def forward(self, step: Step, xs: tuple, ans, ts: tuple, tangent) -> None:
        """Forward sweep: `step` read `xs` with tangents `ts` (None: no tangent) and
        computed `ans` with `tangent` (None when no tangent reached it)."""

    def backward(self, step: Step, g, cotangents: dict) -> None:
        """Reverse sweep: `step`'s adjoint `g` flowed back as `cotangents`
        (input position -> cotangent pulled into that input)."""

    # A hook may also pull the cotangents itself, in place of the steps' vjps:
    #     pull(j, step, positions, g, xs, ans) -> {position: cotangent}
    # (positions whose cotangent is None left out). Without `pull`, the vjps do.


CHUNK = 64


def check_points(heavy: list[bool]) -> tuple[int, ...]:
    """The steps to check before: the first, every heavy one, and at least every CHUNK."""
    points, last = [], None
    for j, is_heavy in enumerate(heavy):
        if last is None or is_heavy or j - last >= CHUNK:
            points.append(j)
            last = j
    return tuple(points)


def _chunks(steps, check, points):
    """The steps in chunks, calling `check` before each (no cost per step)."""
    if check is None:
        return (steps,)
    return _checked_chunks(steps, check, points)


def _checked_chunks(steps, check, points):
    ends = points[1:] + (len(steps),)
    for start, end in zip(points, ends):
        check()
        yield steps[start:end]


class Stub(NamedTuple):
    """What the reverse sweep keeps of a value no vjp reads: its shape."""

    shape: tuple
    dtype: np.dtype
    ndim: int


def _args(vals, ins):
    n = len(ins)
    if n == 1:
        return (vals[ins[0]],)
    if n == 2:
        return (vals[ins[0]], vals[ins[1]])
    return tuple([vals[i] for i in ins])


def values_sweep(steps, vals, check=None, points=()):
    if check is not None:
        with _checking(check):
            return _values(steps, vals, check, points)
    return _values(steps, vals, check, points)


def _values(steps, vals, check, points):
    for chunk in _chunks(steps, check, points):
        for st in chunk:
            ins = st.ins
            if len(ins) == 1:
                vals[st.out] = st.eval(vals[ins[0]])
            elif len(ins) == 2:
                vals[st.out] = st.eval(vals[ins[0]], vals[ins[1]])
            else:
                vals[st.out] = st.eval(*[vals[i] for i in ins])
            for s in st.free:
                vals[s] = None


def forward_sweep(steps, vals, tans, check=None, points=(), record: Recorder | None = None):
    """Values and tangents in one sweep; a node with no tangent in is skipped."""
    if check is not None:
        with _checking(check):
            return _forward(steps, vals, tans, check, points, record)
    return _forward(steps, vals, tans, check, points, record)


def _forward(steps, vals, tans, check, points, record):
    for chunk in _chunks(steps, check, points):
        for st in chunk:
            ins, out = st.ins, st.out
            xs = _args(vals, ins)
            ans = vals[out] = st.eval(*xs)
            ts = _args(tans, ins)
            for t in ts:
                if t is not None:
                    tans[out] = st.jvp(ts, xs, ans)
                    break
            if record is not None:
                record.forward(st, xs, ans, ts, tans[out])
            for s in st.free:
                vals[s] = tans[s] = None


def reverse_sweep(steps, vals, seeds, needs, check=None, points=(),
                  record: Recorder | None = None):
    """Values forward (keeping what the vjps read), then cotangents backward,
    summed where a value fans out. `needs[j]` lists the input positions of step
    j that lead back to a differentiated input. Returns the cotangent per slot."""
    if check is not None:
        with _checking(check):
            _keep_for_reverse(steps, vals, check, points, record)
            return _backward(steps, vals, seeds, needs, check, points, record)
    _keep_for_reverse(steps, vals, check, points, record)
    return _backward(steps, vals, seeds, needs, check, points, record)


def residual_sweep(steps, vals, check=None, points=()):
    """The values' half of a reverse sweep: afterwards `vals` holds what the
    vjps read (other values reduced to their shapes), for backward_sweep later."""
    if check is not None:
        with _checking(check):
            return _keep_for_reverse(steps, vals, check, points, None)
    return _keep_for_reverse(steps, vals, check, points, None)


def backward_sweep(steps, vals, seeds, needs, check=None, points=()):
    """The cotangents' half of a reverse sweep, over values a residual_sweep kept
    (`vals` is read, never changed: the same residuals serve several calls)."""
    if check is not None:
        with _checking(check):
            return _backward(steps, vals, seeds, needs, check, points, None)
    return _backward(steps, vals, seeds, needs, check, points, None)


def _keep_for_reverse(steps, vals, check, points, record):
    for chunk in _chunks(steps, check, points):
        for st in chunk:
            ins = st.ins
            if len(ins) == 1:
                xs = (vals[ins[0]],)
            elif len(ins) == 2:
                xs = (vals[ins[0]], vals[ins[1]])
            else:
                xs = tuple([vals[i] for i in ins])
            ans = vals[st.out] = st.eval(*xs)
            if record is not None:
                record.value(st, xs, ans)
            for s in st.drop:
                v = vals[s]
                vals[s] = Stub(v.shape, v.dtype, v.ndim)


def _doubled(gi):
    """gi + gi; in place when gi is a large array nothing else holds (a vjp's fresh
    result: the local name and getrefcount's argument are its only references)."""
    if gi is None:
        return None
    if (type(gi) is np.ndarray and gi.size >= IN_PLACE_ELEMENTS and gi.base is None
            and gi.flags.writeable and sys.getrefcount(gi) == 2):
        return np.add(gi, gi, out=gi)
    return gi + gi


IN_PLACE_ELEMENTS = 1 << 16


def _backward(steps, vals, seeds, needs, check, points, record):
    cots = [None] * len(vals)
    for s, g in seeds.items():
        cots[s] = g
    backward_points = frozenset(points) if check is not None else ()
    pull = getattr(record, "pull", None)
    for j in range(len(steps) - 1, -1, -1):
        if j in backward_points:
            check()
        positions = needs[j]
        if not positions:
            continue
        st = steps[j]
        ins, out = st.ins, st.out
        g = cots[out]
        if g is None:
            continue
        cots[out] = None
        if len(ins) == 1:
            xs = (vals[ins[0]],)
        elif len(ins) == 2:
            xs = (vals[ins[0]], vals[ins[1]])
        else:
            xs = tuple([vals[i] for i in ins])
        ans = vals[out]
        if st.twice and record is None and cots[ins[0]] is None and len(positions) == 2:
            # both positions pull the same cotangent: once, doubled (x * x: 2 passes, not 3;
            # 1 when the cotangent is one number broadcast, as a sum's is: a vjp is linear)
            if type(g) is np.ndarray and g.ndim and g.size and not any(g.strides):
                cots[ins[0]] = st.vjp(0, np.broadcast_to(g[(0,) * g.ndim] * 2, g.shape),
                                      xs, ans)
            else:
                cots[ins[0]] = _doubled(st.vjp(0, g, xs, ans))
            continue
        if pull is None:
            vjp = st.vjp
            pulled = {} if record is not None else None
            for pos in positions:
                gi = vjp(pos, g, xs, ans)
                if pulled is not None:
                    pulled[pos] = gi
                i = ins[pos]
                prev = cots[i]
                cots[i] = gi if prev is None else prev + gi
        else:
            pulled = pull(j, st, positions, g, xs, ans)
            for pos, gi in pulled.items():
                i = ins[pos]
                prev = cots[i]
                cots[i] = gi if prev is None else prev + gi
        if record is not None:
            record.backward(st, g, pulled)
    return cots


def compiled_reverse(steps, needs, points, seed_slots, wanted, kernels=None, stubs=None,
                     env=None, shaped=None):
    """reverse_sweep over these steps as one generated Python function, for a caller that
    runs the same sweep many times (a training call's steps): the same evals and vjps in
    the same order, the same values reduced to Stubs, the same checks before the same
    steps of both passes, cotangents summed in the same order; no per-step dispatch.
    Returns sweep(vals, seeds, check=None) -> ([value of each slot in `wanted`],
    [cotangent of each, None where none reached it]); `vals` is read, never written.
    (Generated, not looped: the one reverse sweep's semantics in straight-line code.)

    At known shapes a caller may give, per step, `kernels` (engine/direct.py's: source
    for the row's eval or vjps at those shapes, over the names in `env`) and, per slot
    reduced to its shape, its Stub made once (`stubs`), and, per slot of `wanted`, the
    shape its cotangent is returned in (`shaped`: reshaped, 0 where none reached it)."""
    lines, points = [], frozenset(points)
    env = {"Stub": Stub, **(env or {})}
    kernels = kernels or [None] * len(steps)
    stubs = stubs or {}
    made = {st.out for st in steps}
    read = sorted({i for st in steps for i in st.ins if i not in made}
                  | {s for s in wanted if s not in made})
    lines += [f"    v{i} = vals[{i}]" for i in read]
    for j, st in enumerate(steps):
        env[f"e{j}"], env[f"b{j}"] = st.eval, st.vjp
        if j in points:
            lines.append("    if check is not None: check()")
        names = [f"v{i}" for i in st.ins]
        direct = kernels[j]
        if direct is not None and direct.eval is not None:
            lines.append(f"    v{st.out} = " + direct.eval.format(*names))
        else:
            lines.append(f"    v{st.out} = e{j}({', '.join(names)})")
        for s in st.drop:
            if s in stubs:
                env[f"s{s}"] = stubs[s]
                lines.append(f"    v{s} = s{s}")
            else:
                lines.append(f"    v{s} = Stub(v{s}.shape, v{s}.dtype, v{s}.ndim)")
    cots = sorted({i for st in steps for i in st.ins} | {st.out for st in steps}
                  | set(seed_slots) | set(wanted))
    lines.append("    " + " = ".join(f"c{s}" for s in cots) + " = None")
    lines += [f"    c{s} = seeds[{s}]" for s in seed_slots]
    for j in range(len(steps) - 1, -1, -1):
        st = steps[j]
        if j in points:
            lines.append("    if check is not None: check()")
        if not needs[j]:
            continue
        names = [f"v{i}" for i in st.ins]
        vjps = kernels[j].vjps if kernels[j] is not None else {}
        lines += [f"    g = c{st.out}", "    if g is not None:", f"        c{st.out} = None"]
        if any(pos not in vjps for pos in needs[j]):  # the inputs' tuple, once per step
            lines.append("        xs = (" + "".join(f"{n}, " for n in names) + ")")
        for pos in needs[j]:
            i = st.ins[pos]
            if pos in vjps:
                pulled = vjps[pos].format(*names, g="g", ans=f"v{st.out}")
            else:
                pulled = f"b{j}({pos}, g, xs, v{st.out})"
            lines += [f"        gi = {pulled}",
                      f"        c{i} = gi if c{i} is None else c{i} + gi"]
    shaped = shaped or {}
    returned = [f"(0 if c{s} is None else c{s}.reshape({tuple(shaped[s])}))" if s in shaped
                else f"c{s}" for s in wanted]
    lines.append("    return [" + ", ".join(f"v{s}" for s in wanted) + "], ["
                 + ", ".join(returned) + "]")
    source = "def run(vals, seeds, check):\n" + "\n".join(lines) + "\n"
    exec(compile(source, "<gradserve compiled reverse sweep>", "exec"), env)  # noqa: S102
    run = env["run"]

    def sweep(vals, seeds, check=None):
        if check is not None:
            with _checking(check):
                return run(vals, seeds, check)
        return run(vals, seeds, check)
    return sweep
