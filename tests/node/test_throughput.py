"""A node's own throughput measurement: a cold start and a stall do not decide the figure."""
import pytest

from node.throughput import measure_rate


class ScriptedClock:
    """A clock that advances by the next scripted duration on each run (and stays put when read)."""

    def __init__(self, durations):
        self.now, self.durations = 0.0, list(durations)

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        self.now += self.durations.pop(0) if self.durations else 0.01


def test_warm_up_and_median_ignore_a_cold_start_and_a_stall():
    # two cold calls (1 s each: allocation, thread pools), then 10 ms per call with one 2 s stall
    clock = ScriptedClock([1.0, 1.0] + [0.01] * 12 + [2.0] + [0.01] * 40)
    rate = measure_rate(clock.run, 32, runs=5, min_seconds=0.05, warmup_seconds=0.1, clock=clock)
    assert rate.median == pytest.approx(3200.0)  # 32 units per 10 ms
    assert rate.spread > 0.9  # the stall is visible in the spread, not in the figure
    # (the old measurement, the best of two calls without warm-up, said 32 units/s here)
    steady = ScriptedClock([])
    assert measure_rate(steady.run, 32, clock=steady).spread == pytest.approx(0.0, abs=1e-9)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="runs and units"):
        measure_rate(lambda: None, 0)
