"""The memory budget's solver: one choice per unit (keep, a compressed form, recompute) that
holds at most the budget at the least added step time (``passes/memory_budget/planner.py`` builds the
units and their choices).

``solve_dp`` is a multiple-choice knapsack over bytes in cells of budget/4096, each choice
rounded up so the plan always fits; ``solve`` takes greedy's plan instead where that rounding
lost a faster one that fits. ``solve_greedy`` (most bytes saved per second first) and
``solve_exact`` (brute force, the tests' reference) are kept for comparison.

Plans of equal time are told apart the same way whatever the prices' values: the DP adds
whole tenths of a picosecond (integers: a sum does not depend on its order) and a plan's
total is :func:`plan_seconds` (``math.fsum``). With float sums in the order each path took,
the plan for 6 identical blocks priced alike recomputed blocks 0 and 4, or 0 and 5, depending
on the price's value.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

__all__ = ["Choice", "plan_seconds", "solve", "solve_dp", "solve_greedy", "solve_exact"]

#: the DP's unit of time (seconds): 0.1 ps tells apart the smallest floored prices (1e-10 s),
#: and int64 holds sums of prices up to 4e5 s
_QUANTUM = 1e-13
#: the DP's "no plan": above any sum of prices, and far enough below int64's end to add one
_NONE = 2**62


@dataclass(frozen=True)
class Choice:
    """One way to treat a unit: its bytes held after forward and its added seconds."""

    name: str
    bytes: float
    seconds: float


def plan_seconds(plan: list[Choice]) -> float:
    """A plan's added seconds, the same for any order of its choices (``math.fsum``)."""
    return math.fsum(c.seconds for c in plan)


def _pareto(choices: list[Choice]) -> list[Choice]:
    kept = []
    for c in sorted(choices, key=lambda c: (c.seconds, c.bytes)):
        if not kept or c.bytes < kept[-1].bytes:
            kept.append(c)
    return kept  # increasing time, strictly decreasing bytes


def solve_greedy(units: list[list[Choice]], budget: float) -> list[Choice]:
    """Greedy multiple-choice knapsack: least added time with total bytes <= budget.

    Returns the choice per unit (the smallest choices when the budget cannot be met).
    """
    fronts = [_pareto(u) for u in units]
    picked = [0] * len(fronts)

    def total() -> float:
        return sum(f[i].bytes for f, i in zip(fronts, picked))

    while total() > budget:
        best, best_ratio = None, -1.0
        for u, (front, i) in enumerate(zip(fronts, picked)):
            for j in range(i + 1, len(front)):
                saved = front[i].bytes - front[j].bytes
                added = max(front[j].seconds - front[i].seconds, 1e-12)
                # an upgrade that alone closes the gap is judged by the time it adds
                ratio = saved / added if total() - saved > budget else 1e18 / added
                if ratio > best_ratio:
                    best, best_ratio = (u, j), ratio
        if best is None:
            break
        picked[best[0]] = best[1]
    # undo what is no longer needed, most expensive first
    for u in sorted(range(len(fronts)), key=lambda u: -fronts[u][picked[u]].seconds):
        while picked[u] > 0:
            front = fronts[u]
            if total() - front[picked[u]].bytes + front[picked[u] - 1].bytes <= budget:
                picked[u] -= 1
            else:
                break
    return [f[i] for f, i in zip(fronts, picked)]


def solve_dp(units: list[list[Choice]], budget: float, resolution: int = 4096) -> list[Choice]:
    """Multiple-choice knapsack by dynamic programming over bytes: least added time with total
    bytes <= budget, what the planner uses.

    Bytes are counted in cells of ``budget / resolution``, each choice's rounded *up*, so a
    plan it returns always fits; it is optimal among plans that fit ``budget`` minus one cell
    per unit (the tests check this against brute force). Greedy (:func:`solve_greedy`) can
    stall in a poor plan where a cheap form that saves a little competes with one that saves
    more: on ViT-B/16 at budget 0.5 it chose DropIT on 8 blocks and kept one whole, where 1-bit /
    recompute-the-cheap-op forms on 9 blocks fit at less time. Returns the smallest choices
    when nothing fits.
    """
    fronts = [_pareto(u) for u in units]
    smallest = [f[-1] for f in fronts]
    if sum(c.bytes for c in smallest) > budget or not fronts:
        return smallest
    cell = budget / resolution if budget > 0 else 1.0

    def cells(c: Choice) -> int:  # rounded up, so a plan the DP returns always fits
        if budget > 0:
            return math.ceil(c.bytes / cell - 1e-9)
        return 0 if c.bytes <= 0 else resolution + 1

    # best[c]: least time (in _QUANTUM) of the units so far in at most c cells; how[u][c]: the
    # choice it took. Integers: equal plans tie exactly, and the first choice and cell keep them
    best = torch.zeros(resolution + 1, dtype=torch.int64)
    how: list[torch.Tensor] = []
    for front in fronts:
        nxt = torch.full((resolution + 1,), _NONE, dtype=torch.int64)
        arg = torch.zeros(resolution + 1, dtype=torch.int64)
        for j, c in enumerate(front):
            w = cells(c)
            if w > resolution:
                continue
            cand = torch.full((resolution + 1,), _NONE, dtype=torch.int64)
            cand[w:] = best[: resolution + 1 - w] + round(c.seconds / _QUANTUM)
            better = cand < nxt
            nxt = torch.where(better, cand, nxt)
            arg = torch.where(better, torch.full_like(arg, j), arg)
        best = nxt.clamp(max=_NONE)
        how.append(arg)
    if int(best[resolution]) >= _NONE:
        return smallest  # every fitting plan is lost to the rounding: the smallest one fits
    picked: list[Choice] = []
    c = resolution
    for front, arg in zip(reversed(fronts), reversed(how)):
        choice = front[int(arg[c])]
        picked.append(choice)
        c -= cells(choice)
    return picked[::-1]


def solve(units: list[list[Choice]], budget: float) -> list[Choice]:
    """The planner's solver: :func:`solve_dp`'s plan, or :func:`solve_greedy`'s where that is
    faster and fits (a plan within one rounding cell per unit of the budget, which the DP's
    rounding can lose)."""
    dp, greedy = solve_dp(units, budget), solve_greedy(units, budget)

    def key(plan: list[Choice]) -> tuple[bool, float]:
        return (math.fsum(c.bytes for c in plan) > budget, plan_seconds(plan))

    return min((dp, greedy), key=key)


def solve_exact(units: list[list[Choice]], budget: float) -> list[Choice] | None:
    """Brute-force optimum (small problems only); None when no assignment fits."""
    best, best_time = None, math.inf
    for combo in itertools.product(*[_pareto(u) for u in units]):
        if sum(c.bytes for c in combo) <= budget:
            t = sum(c.seconds for c in combo)
            if t < best_time:
                best, best_time = list(combo), t
    return best
