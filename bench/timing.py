"""Timing: warm up, size each repeat to a time budget, repeat, summarise.

A measurement is a `step(k)` callable that does k units of work (training steps, chunks of
sampled characters, generate_names calls) and returns how many items (characters, names) it
produced. The first call pays for numba's compilation or cache load and is never timed;
the last warm-up call estimates a unit's time, from which the units per repeat are chosen
so that a repeat lasts about `target_s`. A call can have a fixed cost besides its units
(sampling prepares its weights once per `generate`: ~30 ms, against ~10 ms for a 50-character
unit at 3x512), so a short estimate is redone with more units until it lasts a tenth of a
repeat. Every repeat then gives one items-per-second rate.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Plan:
    repeats: int  # timed repeats
    target_s: float  # wanted length of one repeat
    warmup: int = 2  # untimed calls of step(1); the first compiles, the last starts the estimate
    max_units: int = 100_000  # cap on units per repeat


FULL = Plan(repeats=5, target_s=3.0)
QUICK = Plan(repeats=2, target_s=0.3, warmup=1)  # first call doubles as the estimate


@dataclass
class Timing:
    rates: list[float] = field(default_factory=list)  # items per second, one per repeat
    units: int = 0  # units per repeat
    first_s: float = 0.0  # the first warm-up call (compilation or cache load included)


def measure(step, plan: Plan, sync=lambda: None) -> Timing:
    """Warm up, then plan.repeats timed repeats of step(units); `sync` waits for a device."""
    out = Timing()

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        step(n)
        sync()
        return time.perf_counter() - t0

    for i in range(max(plan.warmup, 1)):
        dt = timed(1)
        if i == 0:
            out.first_s = dt
    n, floor = 1, plan.target_s / 10
    while dt < floor and n < plan.max_units:
        n = min(plan.max_units, max(2 * n, math.ceil(n * floor / max(dt, 1e-9))))
        dt = timed(n)
    out.units = int(min(max(round(plan.target_s * n / max(dt, 1e-9)), 1), plan.max_units))
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        items = step(out.units)
        sync()
        out.rates.append(items / (time.perf_counter() - t0))
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)
