"""Choosing forward or reverse mode for a Jacobian, and the scheme for second order."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    # Sparsity (engine/sparse.py): "dense" (the directions above), or "sparse" (compressed
    # directions, one per color); the pattern's nonzeros and the colors each way, when the
    # pattern was found (-1 and 0 otherwise).
    sparsity: str = "dense"
    nnz: int = -1
    colors_forward: int = 0
    colors_reverse: int = 0


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


def plan_sparsity(n: int, m: int, nnz: int | None, colors_forward: int | None,
                  colors_reverse: int | None, *, mode: str = "auto", sparsity: str = "auto",
                  ratio: float = REVERSE_COST_RATIO) -> PlannerDecision:
    """Dense or compressed sweeps for a Jacobian whose pattern has `nnz` nonzeros.

    Dense, plan_mode's rule: n forward or ratio * m reverse directions. Compressed (Coleman
    and More; CasADi and ColPack do the same): one forward direction per column color, or
    one reverse direction (costing `ratio`) per row color. The cheapest wins; "sparse"
    takes the cheaper compressed way even when dense is cheaper, "dense" never compresses,
    and a mode the caller forced restricts the choice to that direction. Without a pattern
    (too large to find) the answer is dense, as plan_mode.
    """
    dense = plan_mode(n, m, ratio, forced=None if mode == "auto" else mode)
    if nnz is None or colors_forward is None or sparsity == "dense":
        return _dense_because(dense, nnz, n * m, sparsity)
    fwd, rev = float(colors_forward), float(ratio * colors_reverse)
    figures = dict(nnz=nnz, colors_forward=colors_forward, colors_reverse=colors_reverse)
    dense_cost = min(dense.cost_forward, dense.cost_reverse) if mode == "auto" else (
        dense.cost_forward if mode == "forward" else dense.cost_reverse)
    if mode == "forward" or (mode == "auto" and fwd <= rev):
        pick, cost = "forward", fwd
    else:
        pick, cost = "reverse", rev
    about = (f"the pattern has {nnz} nonzeros of {n * m}: {colors_forward} column colors "
             f"(forward directions) and {colors_reverse} row colors (reverse, costing "
             f"{ratio:g} forward ones each)")
    if sparsity == "sparse" or cost < dense_cost:
        reason = (f"sparse {pick}: {about}; compressed {pick} costs {cost:g} against dense "
                  f"{dense_cost:g} ({n} input and {m} output elements)")
        return PlannerDecision(pick, n, m, fwd, rev, reason, "sparse", **figures)
    return replace(dense, reason=dense.reason + f"; sparsity does not pay: {about}",
                   **figures)


def plan_sparse_hessian(n: int, nnz: int | None, colors: int | None, *,
                        sparsity: str = "auto", ratio: float = HVP_COST_RATIO) -> PlannerDecision:
    """A Hessian from n Hessian-vector products (dense), or from one per color of a star
    coloring of its pattern (symmetric: each entry is read back directly)."""
    dense = plan_second_order(n, n, ratio, what="the Hessian's n columns")
    if nnz is None or colors is None or sparsity == "dense":
        return _dense_because(dense, nnz, n * n, sparsity)
    about = (f"the Hessian's pattern has {nnz} nonzeros of {n * n}: {colors} star colors, "
             f"one Hessian-vector product each, against {n}")
    figures = dict(nnz=nnz, colors_forward=colors, colors_reverse=0)
    if sparsity == "sparse" or colors < n:
        compressed = plan_second_order(n, colors, ratio, what=f"{colors} compressed columns")
        return replace(compressed, reason=f"sparse: {about}; " + compressed.reason,
                       sparsity="sparse", **figures)
    return replace(dense, reason=dense.reason + f"; sparsity does not pay: {about}", **figures)


def _dense_because(dense: PlannerDecision, nnz, entries, sparsity) -> PlannerDecision:
    """The dense decision, saying why sparsity was not used: not asked for, no pattern
    found within its bound, or a pattern too dense to color."""
    if sparsity == "dense":
        return dense
    if nnz is None:
        return replace(dense, reason=dense.reason
                       + "; sparsity: the pattern was too large to find, so dense")
    return replace(dense, nnz=nnz, reason=dense.reason + (
        f"; sparsity: the pattern has {nnz} nonzeros of {entries}, too dense to color, "
        "so dense"))
