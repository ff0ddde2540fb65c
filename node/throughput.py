"""A node's own throughput, measured so that it repeats: warm up first, then time several runs of at
least ``min_seconds`` each and take the median (one stall or one cold start does not decide it).

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
    median: float  # units per second, the median of the timed runs
    spread: float  # (fastest - slowest) / median of the timed runs: how much to trust the figure


def measure_rate(run: Callable[[], None], units: int, *, runs: int = 5, min_seconds: float = 0.05,
                 warmup_seconds: float = 0.1, clock: Callable[[], float] = time.perf_counter) -> Rate:
    """Call ``run`` (which processes ``units``) until ``warmup_seconds`` pass (twice at least), then time
    ``runs`` runs, each repeating ``run`` until ``min_seconds`` pass; the median rate and the spread."""
    if runs < 1 or units < 1 or min_seconds <= 0 or warmup_seconds < 0:
        raise ValueError("runs and units must be >= 1, min_seconds > 0, warmup_seconds >= 0")
    _repeat(run, warmup_seconds, clock, at_least=2)
    rates = []
    for _ in range(runs):
        calls, seconds = _repeat(run, min_seconds, clock)
        rates.append(units * calls / max(seconds, 1e-12))
    median = statistics.median(rates)
    return Rate(median, (max(rates) - min(rates)) / median)


def _repeat(run: Callable[[], None], seconds: float, clock: Callable[[], float], at_least: int = 1
            ) -> tuple[int, float]:
    """Call ``run`` until ``seconds`` pass (``at_least`` times); how many calls, and how long they took."""
    start, calls = clock(), 0
    while True:
        run()
        calls += 1
        elapsed = clock() - start
        if calls >= at_least and elapsed >= seconds:
            return calls, elapsed
