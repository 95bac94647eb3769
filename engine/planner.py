"""Choosing forward or reverse mode for a Jacobian."""

from __future__ import annotations

from dataclasses import dataclass

# Cost of one reverse sweep in forward sweeps. CasADi (ad_weight = 0.33) and
# ADOL-C's jacobian() both take a reverse sweep as about twice a forward one;
# bench/bench_planner.py measures it for this engine.
REVERSE_COST_RATIO = 2.0


@dataclass(frozen=True)
class ModeDecision:
    mode: str  # "forward" or "reverse"
    n: int  # scalar elements of the inputs differentiated (directions forward mode needs)
    m: int  # scalar elements of the outputs differentiated (directions reverse mode needs)
    cost_forward: float  # in units of one forward sweep
    cost_reverse: float
    reason: str


def plan_mode(n: int, m: int, ratio: float = REVERSE_COST_RATIO,
              forced: str | None = None) -> ModeDecision:
    """Forward iff n <= ratio * m.

    A Jacobian of n inputs and m outputs takes n forward sweeps (one per input
    direction) or m reverse sweeps (one per output direction), and a reverse
    sweep costs about `ratio` forward ones (CasADi, ADOL-C). `forced` names the
    mode the caller asked for; the figures are reported either way.
    """
    cost_forward, cost_reverse = float(n), float(ratio * m)
    if forced is not None:
        return ModeDecision(forced, n, m, cost_forward, cost_reverse,
                            f"{forced} mode requested by the caller")
    if n <= ratio * m:
        return ModeDecision("forward", n, m, cost_forward, cost_reverse,
                            f"n={n} inputs <= {ratio:g} x m={m} outputs: "
                            f"{n} forward directions cost no more than {m} reverse ones")
    return ModeDecision("reverse", n, m, cost_forward, cost_reverse,
                        f"n={n} inputs > {ratio:g} x m={m} outputs: "
                        f"{m} reverse directions cost less than {n} forward ones")
