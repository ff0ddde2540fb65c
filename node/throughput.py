"""A node's own throughput, measured so that it repeats: warm up first, then time many single calls and
take a high quantile of their rates.

On a shared machine a call is slowed by whatever else gets the CPU at that moment. Measured across 5
restarts each (a 4-block h256 model, one block, 32 tokens; 2 cores at a load average of 17-34): the old
best of two calls gave 1,496 to 21,118 tokens/s; 50 ms runs reduced to their median, 654 to 21,680; this
(warm-up, then the 90th percentile of single calls over 0.3 s), 29,276 to 42,128 (median 34,630: within
-15%/+22%). Single calls are short enough that some of them run undisturbed, so a high quantile of many
is what the hardware does; how far the median falls below it (``spread``) says how contended the machine
was.

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
