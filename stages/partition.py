"""Cutting a network's units into K contiguous stages.

A pipeline runs at the pace of its slowest stage, so the cut is the contiguous split that
minimises the largest stage cost: each unit's measured training step (``pipeline/plan.py``
times them on the device), or its parameter count where measuring is not possible.
"""
from __future__ import annotations

from typing import Callable

from localpipe.stages.config import ConfigError


def units(n: int, owner: str = "") -> str:
    """How many units a network has, said right: "3 units of this network (2 blocks and the
    output layer)", "1 unit (the output layer alone)"."""
    if n == 1:
        return f"1 unit{owner} (the output layer alone)"
    blocks = "1 block" if n == 2 else f"{n - 1} blocks"
    return f"{n} units{owner} ({blocks} and the output layer)"


def check_stages(num_units: int, stages: int) -> None:
    if stages > num_units:
        raise ConfigError(f"--stages {stages} is more than the "
                          f"{units(num_units, ' of this network')}")


def split(balance: list[int], num_units: int) -> list[list[int]]:
    """Unit indices of each stage from a ``--balance`` list of units per stage."""
    if sum(balance) != num_units:
        raise ConfigError(f"--balance {','.join(map(str, balance))} sums to {sum(balance)} but "
                          f"the network has {units(num_units)}")
    bounds = [0]
    for size in balance:
        bounds.append(bounds[-1] + size)
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


def best_balance(costs: list[float], stages: int,
                 fits: Callable[[int, int], bool] | None = None) -> list[int]:
    """Units per stage of the contiguous split with the smallest maximum stage cost (exact DP;
    ties go to the split that puts more units early). ``fits(a, b)`` says whether units a..b-1
    fit on one stage's device; ConfigError if no split fits."""
    n = len(costs)
    check_stages(n, stages)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[k][i]: smallest max cost of putting the first i units into k stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                if best[k - 1][j] == inf or (fits is not None and not fits(j, i)):
                    continue
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    if best[stages][n] == inf:
        raise ConfigError(f"no cut of the {n} units into {stages} stages fits in the memory of "
                          f"one device per stage; use more stages, a smaller --batch-size or "
                          f"--balance")
    sizes, i = [], n
    for k in range(stages, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def stage_costs(costs: list[float], balance: list[int]) -> list[float]:
    return [sum(costs[i] for i in idx) for idx in split(balance, len(costs))]
