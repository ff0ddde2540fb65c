"""A node's own throughput measurement: a cold start and stalls (another process taking the CPU) do not
decide the figure."""
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


def test_warm_up_and_a_high_quantile_ignore_a_cold_start_and_stalls():
    # two cold calls (1 s each: allocation, thread pools), then 10 ms calls, every third one stalled 10x
    clock = ScriptedClock([1.0, 1.0] + [0.01, 0.01, 0.1] * 40)
    measured = measure_rate(clock.run, 32, min_calls=10, min_seconds=0.3, warmup_seconds=0.1, clock=clock)
    assert measured.rate == pytest.approx(3200.0)  # 32 units per undisturbed 10 ms call
    # (the old measurement, the best of two calls without warm-up, said 32 units/s here)
    steady = ScriptedClock([])
    assert measure_rate(steady.run, 32, clock=steady).spread == pytest.approx(0.0, abs=1e-9)
    most = ScriptedClock([0.01, 0.01] + [0.01, 0.02, 0.02] * 40)  # most calls disturbed: the median is slower
    assert measure_rate(most.run, 32, clock=most, warmup_seconds=0).spread == pytest.approx(0.5)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="min_calls and units"):
        measure_rate(lambda: None, 0)
