"""Choosing forward or reverse mode for a Jacobian."""

from __future__ import annotations

from dataclasses import dataclass

# Cost of one reverse direction in forward directions. CasADi (ad_weight = 0.33)
# and ADOL-C's jacobian() take a reverse sweep as about twice a forward one; for
# this engine bench/bench_planner.py measured them about equal (median 0.94 over
# 34 shapes, crossovers at n/m = 0.95-1.35), and any ratio from 0.5 to 1.43
# picked as well as the best, so 1.25.
REVERSE_COST_RATIO = 1.25


@dataclass(frozen=True)
class PlannerDecision:
    mode: str  # "forward" or "reverse"
    n: int  # scalar elements of the inputs differentiated (directions forward mode needs)
    m: int  # scalar elements of the outputs differentiated (directions reverse mode needs)
    cost_forward: float  # in units of one forward direction
    cost_reverse: float
    reason: str


def plan_mode(n: int, m: int, ratio: float = REVERSE_COST_RATIO,
              forced: str | None = None) -> PlannerDecision:
    """Forward iff n <= ratio * m.

    A Jacobian of n inputs and m outputs takes n forward directions (one per
    input element) or m reverse directions (one per output element), and a
    reverse direction costs about `ratio` forward ones: CasADi and ADOL-C take 2,
    this engine measures 1.25 (REVERSE_COST_RATIO). `forced` names the mode the
    caller asked for; the figures are reported either way.
    """
    cost_forward, cost_reverse = float(n), float(ratio * m)
    if forced is not None:
        return PlannerDecision(forced, n, m, cost_forward, cost_reverse,
                            f"{forced} mode requested by the caller")
    why = (f"{n} input elements (one forward direction each) against {m} output "
           f"elements (one reverse direction each, costing {ratio:g} forward ones): ")
    if n <= ratio * m:
        return PlannerDecision("forward", n, m, cost_forward, cost_reverse,
                            why + f"forward costs {cost_forward:g} <= reverse {cost_reverse:g}")
    return PlannerDecision("reverse", n, m, cost_forward, cost_reverse,
                        why + f"reverse costs {cost_reverse:g} < forward {cost_forward:g}")
