"""A node's own throughput, measured so that it repeats: warm up first, then time many single calls and
take a high quantile of their rates.

On a shared machine a run is slowed by whatever else gets the CPU at that moment: timed over 50 ms runs
and reduced to their median, the same model measured from 654 to 21,680 tokens/s across 5 restarts at a
load average of 17-32 on 2 cores (the old best-of-two-calls: 1,749 to 23,669). Single calls are short
enough that some of them run undisturbed, so a high quantile of many is what the hardware does; how far
the median falls below it (``spread``) says how contended the machine was.

What a node announces is still only a claim: clients believe what they observe themselves (see
swarm.routing.believed_throughput). This measurement is what an honest node claims.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Rate:
    rate: float  # units per second: the ``quantile`` of the timed calls' rates
    spread: float  # (rate - median rate) / rate: how much the calls were disturbed (0: not at all)


def measure_rate(run: Callable[[], None], units: int, *, min_calls: int = 10, min_seconds: float = 0.3,
                 warmup_seconds: float = 0.1, quantile: float = 0.9,
                 clock: Callable[[], float] = time.perf_counter) -> Rate:
    """Call ``run`` (which processes ``units``) until ``warmup_seconds`` pass (twice at least), then time
    single calls until ``min_calls`` were made and ``min_seconds`` passed; the ``quantile`` of their rates."""
    if min_calls < 1 or units < 1 or min_seconds < 0 or warmup_seconds < 0 or not 0 <= quantile <= 1:
        raise ValueError("min_calls and units must be >= 1, min_seconds and warmup_seconds >= 0, quantile in [0, 1]")
    start, calls = clock(), 0
    while calls < 2 or clock() - start < warmup_seconds:
        run()
        calls += 1
    rates: list[float] = []
    start = clock()
    while len(rates) < min_calls or clock() - start < min_seconds:
        began = clock()
        run()
        rates.append(units / max(clock() - began, 1e-12))
    rates.sort()
    top = rates[min(len(rates) - 1, int(quantile * len(rates)))]
    return Rate(top, (top - statistics.median(rates)) / top)
