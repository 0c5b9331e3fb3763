"""Timing: warm up, size each repeat to a time budget, repeat, summarise.

A measurement is a `step(k)` callable that does k units of work (training steps, chunks of
sampled characters, generate_names calls) and returns how many items (characters, names) it
produced. The first call pays for numba's compilation or cache load and is never timed;
then the units per repeat are chosen so that a repeat lasts about `target_s`. A call can
have a fixed cost besides its units (a `generate` call starts its chunk loop, encodes its
context and builds its first state), so the estimate doubles a call's
units until that adds a tenth of a repeat: the difference is units' time without the fixed
cost. Every repeat then gives one items-per-second rate.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field


@dataclass
class Plan:
    repeats: int  # timed repeats
    target_s: float  # wanted length of one repeat
    warmup: int = 2  # untimed calls of step(1); the first compiles
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
    # Double the call until doubling adds a tenth of a repeat: that difference is units'
    # time without the call's fixed cost (and without compilation, if dt still held it).
    n, floor = 1, plan.target_s / 10
    while n < plan.max_units:
        m = min(2 * n, plan.max_units)
        dt2 = timed(m)
        if dt2 - dt >= floor or m == plan.max_units:
            break
        n, dt = m, dt2
    if n < plan.max_units:
        per_unit = max((dt2 - dt) / (m - n), 1e-12)
        fixed = max(dt - n * per_unit, 0.0)
        out.units = int(min(max(round((plan.target_s - fixed) / per_unit), 1), plan.max_units))
    else:
        out.units = plan.max_units
    for _ in range(plan.repeats):
        t0 = time.perf_counter()
        items = step(out.units)
        sync()
        out.rates.append(items / (time.perf_counter() - t0))
    return out


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    return statistics.median(values), min(values), max(values)
