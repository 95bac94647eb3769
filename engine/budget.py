"""What one request may spend: one frozen Budget, checked in one place.

`Budget.admit` runs before any work, against what the request needs (a `Need`: its
seed directions, the reply's bytes, its largest Jacobian or Hessian block, a trace's
elements) and the plan's declared costs at the bound shapes (engine/costs.py): each
bound over the limit raises ResourceLimitError naming the limit. `Budget.check` is
the callable the sweeps run at every loop boundary (engine/sweeps.py: before heavy
ops, at least every CHUNK steps, between an op's blocks, and in every kernel loop
whose trip count the request controls, through costs.iteration): it stops the work
once the deadline has passed or `cancel` raises (a caller gone).

A limit of None is no limit. The Plan's methods take a Budget as `budget=`, or its
fields as keywords (`max_bytes=...`, and `check=` for `cancel`), combined by `Budget.of`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from typing import Callable, NamedTuple

from . import costs
from .errors import DeadlineExceeded, ResourceLimitError


class Need(NamedTuple):
    """What a request needs, known before it runs."""

    directions: int  # seed directions beside the values (0: values only)
    reply: int = 0  # bytes of the arrays the answer holds
    reply_what: str = "outputs"
    field: str = "inputs"  # the request field an over-limit reply or block is blamed on
    extra: int = 0  # bytes beyond the values and seeds (identity seeds, results, vectors)
    block: int | None = None  # elements of the largest Jacobian or Hessian block
    block_what: str = "Jacobian"
    block_hint: str = ""
    trace: int | None = None  # array elements a trace may hold
    work_directions: int | None = None  # directions of work, when not `directions`


@dataclass(frozen=True)
class Budget:
    max_bytes: int | None = None  # estimated memory: values, seeds, temporaries, reply
    max_flops: int | None = None  # estimated work
    max_reply_bytes: int | None = None  # the arrays the answer holds
    max_block_elements: int | None = None  # one Jacobian or Hessian block
    max_trace_elements: int | None = None  # the arrays a trace holds
    deadline: float | None = None  # time.monotonic() past which work stops
    cancel: Callable[[], None] | None = None  # may raise to stop the work

    def __post_init__(self):
        # any limit to admit: callers skip sizing a request (its Need) when there is none
        object.__setattr__(self, "limited", any(
            getattr(self, f) is not None for f in _LIMITS))
        # what `admit` decides by, beside the plan and the request (its deadline and
        # cancellation are not): a cache of admitted requests is keyed by it
        object.__setattr__(self, "admission", (self.max_bytes, self.max_flops,
                                               self.max_reply_bytes, self.max_block_elements,
                                               self.max_trace_elements))

    @classmethod
    def of(cls, budget: "Budget | None" = None, check=None, **limits) -> "Budget":
        """`budget` (default: no limits) with the limits given as keywords, and `check`
        as its cancellation."""
        budget = budget if budget is not None else UNLIMITED
        if check is not None:
            limits["cancel"] = check
        if not limits:
            return budget
        if limits.keys() <= _RUNNING:  # (a worker's cancellation: a copy, ~1 us, where
            new = object.__new__(cls)  # replace() runs __init__ again, ~4 us)
            new.__dict__.update(budget.__dict__)
            new.__dict__.update(limits)  # `limited` and `admission` read no running field
            return new
        unknown = set(limits) - _FIELDS
        if unknown:
            raise TypeError(f"unknown limits {sorted(unknown)} (a Budget has "
                            f"{', '.join(sorted(_FIELDS))})")
        return replace(budget, **limits)

    @property
    def check(self) -> Callable[[], None] | None:
        """The check the sweeps run between steps (None: nothing to check)."""
        cancel, deadline = self.cancel, self.deadline
        if deadline is None:
            return cancel

        def check():
            if cancel is not None:
                cancel()
            if time.monotonic() > deadline:
                raise DeadlineExceeded("the request's deadline passed")
        return check

    def admit(self, plan, shapes, need: Need) -> None:
        """Refuse, before any work, a request over any bound: its trace, its largest
        block, its reply, its work and its memory, in that order. (Callers may skip
        this when not `limited`.)"""
        if self.max_trace_elements is not None and need.trace is not None \
                and need.trace > self.max_trace_elements:
            raise ResourceLimitError(
                f"the trace would hold up to {need.trace:,} array elements, over the limit "
                f"of {self.max_trace_elements:,} (max_trace_elements): trace a smaller "
                "graph or smaller inputs", field="trace")
        if self.max_block_elements is not None and need.block is not None \
                and need.block > self.max_block_elements:
            raise ResourceLimitError(
                f"a {need.block_what} block would have {need.block:,} elements, over the "
                f"limit of {self.max_block_elements:,}: {need.block_hint}", field=need.field)
        if self.max_reply_bytes is not None and need.reply > self.max_reply_bytes:
            raise ResourceLimitError(
                f"the reply would hold about {need.reply:,} bytes of {need.reply_what}, over "
                f"the limit of {self.max_reply_bytes:,} (max_reply_bytes): ask for fewer or "
                "smaller values", field=need.field)
        if self.max_flops is None and self.max_bytes is None:
            return
        cost = plan.costs(shapes)
        if self.max_flops is not None:
            k = need.directions if need.work_directions is None else need.work_directions
            flops = costs.estimate_flops(cost, k)
            if flops > self.max_flops:
                raise ResourceLimitError(
                    f"the request needs about {flops:,} floating-point operations "
                    f"({k} seed directions), over the limit of "
                    f"{self.max_flops:,} (max_request_flops)", field="inputs")
        if self.max_bytes is not None:
            memory = costs.estimate_bytes(cost, need.directions) + need.extra + need.reply
            if memory > self.max_bytes:
                raise ResourceLimitError(
                    f"the request needs about {memory:,} bytes of intermediates "
                    f"({need.directions} seed directions), over the limit of "
                    f"{self.max_bytes:,}", field="inputs")


_FIELDS = frozenset(f.name for f in fields(Budget))
_LIMITS = tuple(f for f in _FIELDS if f.startswith("max_"))
_RUNNING = frozenset(_FIELDS - set(_LIMITS))  # deadline and cancel: checked while it runs
UNLIMITED = Budget()
