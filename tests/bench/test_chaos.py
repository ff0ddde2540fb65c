"""The chaos soak's short run (bench/chaos.py): real node and client processes, a nemesis killing,
stopping, blackholing, terminating, restarting and adding nodes, every result checked against local."""
from bench.chaos import SoakConfig, run_soak
from bench.chaos_report import FAULTS
from tests.conftest import NUM_LAYERS


def test_short_chaos_soak_every_result_equals_local(tiny_path):
    config = SoakConfig(seconds=45, nodes=5, clients=2, seed=1, fault_gap=(2.0, 4.0), pause_seconds=5.0,
                        extra_nodes=1, hang_bound=90)
    result = run_soak(tiny_path, NUM_LAYERS, config)
    done = {kind for _, kind in result.events}
    assert set(FAULTS) <= done, f"the nemesis only did {sorted(done)}"
    assert {r["kind"] for r in result.results} == {"greedy", "sample", "session", "beam", "lora"}
    assert result.recoveries(), "no fault struck a running generation"
    assert result.problems() == []
