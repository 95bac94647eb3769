"""Choosing forward or reverse mode for a Jacobian, and the scheme for second order."""

from __future__ import annotations

from dataclasses import dataclass

# Cost of one reverse direction in forward directions. CasADi (ad_weight = 0.33)
# and ADOL-C's jacobian() take a reverse sweep as about twice a forward one; for
# this engine bench/bench_planner.py measured them about equal (median 0.94 over
# 34 shapes, crossovers at n/m = 0.95-1.35), and any ratio from 0.5 to 1.43
# picked as well as the best, so 1.25.
REVERSE_COST_RATIO = 1.25

# Cost of one Hessian-vector product (forward-over-reverse, one direction) in
# gradients. bench/bench_second_order.py measured HVP / gradient on the MLP
# 784-256-256-10 loss, a 100-op scalar chain and sum(tanh(W x)) (n = 1000): 2.36-2.55,
# 2.90-3.05 and 1.63-2.06 (medians of three runs, one BLAS thread; median of the three
# cases 2.36-2.55); the textbook bound for forward-over-reverse is about 2-3 (the
# MLP's matrix products alone: 2.3). Batched, a direction costs 0.4-2.1 gradients.
HVP_COST_RATIO = 2.5


@dataclass(frozen=True)
class PlannerDecision:
    mode: str  # "forward" or "reverse"
    n: int  # scalar elements of the inputs differentiated (directions forward mode needs)
    m: int  # scalar elements of the outputs differentiated (directions reverse mode needs)
    cost_forward: float  # in units of one forward direction (second order: of one gradient)
    cost_reverse: float
    reason: str


def _count(count: int, noun: str) -> str:
    """'1 output element', '3 output elements': the noun's last word agrees with the count."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
    why = (f"{_count(n, 'input element')} (one forward direction each) against "
           f"{_count(m, 'output element')} (one reverse direction each, costing {ratio:g} "
           "forward ones): ")
    if n <= ratio * m:
        return PlannerDecision("forward", n, m, cost_forward, cost_reverse,
                            why + f"forward costs {cost_forward:g} <= reverse {cost_reverse:g}")
    return PlannerDecision("reverse", n, m, cost_forward, cost_reverse,
                        why + f"reverse costs {cost_reverse:g} < forward {cost_forward:g}")



def plan_second_order(n: int, k: int, ratio: float = HVP_COST_RATIO,
                      what: str = "Hessian-vector products") -> PlannerDecision:
    """Second order of one scalar output, decided at both levels.

    Inner level (the gradient): one output element against n input elements, so
    reverse (one reverse direction) as plan_mode would choose for any n > 1. Outer
    level (differentiating the gradient along k directions): forward, all k
    tangent directions carried by the one reverse sweep (Pearlmutter's R-op;
    forward-over-reverse is the scheme JAX's hvp and PyTorch's torch.func
    recommend). Reverse-over-reverse would need k reverse sweeps over a recorded
    reverse sweep, each costing REVERSE_COST_RATIO forward directions, and keep
    the reverse sweep's values too. An HVP direction costs about `ratio` gradients
    (HVP_COST_RATIO, measured); the decision reports the mode of the outer level
    ("forward"), n, m = 1 and both estimates in gradient units.
    """
    cost_forward = float(ratio * k)
    cost_reverse = float(REVERSE_COST_RATIO * ratio * k)
    reason = (f"forward-over-reverse: one reverse sweep carrying {_count(k, 'tangent direction')} "
              f"({what}; n = {_count(n, 'input element')}, one scalar output): inner level "
              f"reverse (1 reverse direction against {_count(n, 'forward one')}), outer level "
              f"forward ({_count(k, 'direction')} in the same sweep), about {cost_forward:g} gradients "
              f"(one HVP ~ {ratio:g} gradients) against {cost_reverse:g} "
              "for reverse-over-reverse")
    return PlannerDecision("forward", n, 1, cost_forward, cost_reverse, reason)
