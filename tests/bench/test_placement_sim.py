"""The churn simulation of bench/placement_sim.py, small and seeded: the rebalancing rule nodes run
keeps the swarm near the best placement and never uncovers a block."""
import itertools

import pytest

from bench.placement_sim import SimConfig, placement_bound, simulate


def test_bound_of_known_cases():
    assert placement_bound([(2.0, 3), (2.0, 3)], 6) == pytest.approx(2.0)  # two tiles
    assert placement_bound([(1.0, 7), (1.0, 7)], 8) == pytest.approx(1.0)  # edges get half
    assert placement_bound([(5.0, 2)], 4) == pytest.approx(2.5)  # relaxed: one node split over two windows
    assert placement_bound([], 4) == 0.0


def test_bound_is_above_every_integral_placement():
    nodes = [(3.0, 2), (1.0, 3), (2.0, 1), (1.5, 2), (0.5, 4)]
    blocks = 4
    best = 0.0
    for starts in itertools.product(*(range(blocks - k + 1) for _, k in nodes)):
        served = [0.0] * blocks
        for (t, k), s in zip(nodes, starts):
            for b in range(s, s + k):
                served[b] += t
        best = max(best, min(served))
    assert best <= placement_bound(nodes, blocks) + 1e-9


def test_churn_with_a_regional_failure():
    """100 nodes, 24 blocks, 4 simulated hours, the 20% of nodes serving the first blocks fail at
    hour 2. The rule that placement before this change used (and no rebalancing) fall below 0.8x."""
    cfg = SimConfig(nodes=100, blocks=24, hours=4.0, flash_hour=2.0, seed=0)
    result = simulate(cfg)
    assert result.joins > 200 and result.departures > 100  # the swarm did churn
    assert result.uncovered_by_moves == 0
    assert min(s.quality for s in result.counted()) >= 0.8
    assert result.recovery_seconds() is not None and result.recovery_seconds() <= 15 * 60
    assert max(result.moves_per_hour()) <= cfg.nodes  # bounded: under one move per node per hour
    legacy = simulate(SimConfig(nodes=100, blocks=24, hours=4.0, flash_hour=2.0, seed=0, rule="legacy",
                                moving_announces="offline"))
    assert min(s.quality for s in legacy.counted()) < 0.8
