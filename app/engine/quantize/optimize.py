"""Choose one option per block so the model hits a target bpw at the least total error.

A knapsack: minimise sum(error_b ** norm) subject to sum(bits_b) <= target_bpw * weights. Solved
exactly by dynamic programming over a discretised budget (costs rounded *up*, so the answer always
fits), then topped up with exact bit counts while any upgrade still fits. Fully deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gptq import QuantizeError
from .measure import Measurement

UNITS = 40000


@dataclass
class Strategy:
    choice: dict[str, int]     # block -> option index
    total_bits: int
    numel: int
    objective: float

    @property
    def bpw(self) -> float:
        return self.total_bits / self.numel


def optimize(measurement: Measurement, target_bpw: float, norm: float = 2.0) -> Strategy:
    names = list(measurement.blocks)
    if not names:
        raise QuantizeError("the measurement holds no blocks", hint="Measure the model again.")
    missing = [n for n in names if n not in measurement.numel]
    if missing:
        raise QuantizeError(f"the measurement lacks weight counts for {missing[0]}",
                            hint="Give the model's config when reading an exllamav2 measurement.")
    numel = sum(measurement.numel[n] for n in names)
    budget = int(numel * target_bpw)
    costs = [np.array([o.total_bits for o in measurement.blocks[n]], dtype=np.int64) for n in names]
    errs = [np.array([max(o.error, 0.0) ** norm for o in measurement.blocks[n]]) for n in names]
    floor = sum(int(c.min()) for c in costs)
    if floor > budget:
        raise QuantizeError(f"{target_bpw} bpw is below the smallest measured size ({floor / numel:.3f} bpw)",
                            hint="Pick a higher target bpw.")
    unit = max(1, -(-budget // UNITS))
    cap = budget // unit
    inf = np.inf
    dp = np.zeros(cap + 1)  # dp[u]: least error of the blocks so far within u units
    picks = np.zeros((len(names), cap + 1), dtype=np.int16)
    for b, (c, e) in enumerate(zip(costs, errs)):
        cu = -(-c // unit)
        new = np.full(cap + 1, inf)
        pick = np.zeros(cap + 1, dtype=np.int16)
        for j in range(len(c)):  # ties keep the earlier (cheaper-listed) option: deterministic
            k = int(cu[j])
            if k > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[k:] = dp[:cap + 1 - k] + e[j]
            better = cand < new
            new[better] = cand[better]
            pick[better] = j
        dp, picks[b] = new, pick
    if not np.isfinite(dp[cap]):
        raise QuantizeError(f"no combination of options fits {target_bpw} bpw", hint="Pick a higher target bpw.")
    u = cap
    choice = [0] * len(names)
    for b in range(len(names) - 1, -1, -1):
        j = int(picks[b, u])
        choice[b] = j
        u -= int(-(-costs[b][j] // unit))
    total = sum(int(costs[b][j]) for b, j in enumerate(choice))
    # Top up: the rounding left some bits unspent; take the best error drop per bit that still fits.
    while True:
        best = None
        for b, j in enumerate(choice):
            for k in range(len(costs[b])):
                extra = int(costs[b][k] - costs[b][j])
                gain = errs[b][j] - errs[b][k]
                if gain > 0 and total + extra <= budget:
                    score = gain / max(extra, 1)
                    if best is None or score > best[0]:
                        best = (score, b, k, extra)
        if best is None:
            break
        _, b, k, extra = best
        choice[b] = k
        total += extra
    objective = float(sum(errs[b][j] for b, j in enumerate(choice)))
    return Strategy(dict(zip(names, choice)), total, numel, objective)
