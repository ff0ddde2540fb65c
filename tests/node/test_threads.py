"""Torch thread counts per step size: measured at start (or given by flags), reported in the metrics and
used for the steps they are meant for."""
from __future__ import annotations

import queue
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from node.threads import candidates, fastest, measuring_alone, time_counts
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize

HIDDEN = 64  # the tiny checkpoint's hidden size (tests/conftest.py)


class ThreadClock:
    """A clock that a run advances by the time scripted for the torch thread count it runs on."""

    def __init__(self, seconds_by_threads: dict[int, float]):
        self.now, self.seconds, self.seen = 0.0, seconds_by_threads, []

    def __call__(self) -> float:
        return self.now

    def run(self) -> None:
        n = torch.get_num_threads()
        self.seen.append(n)
        self.now += self.seconds[n]


def test_each_count_is_timed_on_its_threads_and_the_fastest_wins():
    clock = ThreadClock({1: 0.0025, 2: 0.001})
    medians = time_counts(clock.run, [1, 2], budget=0.05, clock=clock)
    assert medians == pytest.approx({1: 0.0025, 2: 0.001})
    assert fastest(medians) == 2
    assert set(clock.seen) == {1, 2} and clock.seen[:2] == [1, 2]  # warm-ups, then interleaved rounds
    assert 3 <= clock.seen.count(1) - 1 <= 15  # MIN_ROUNDS..MAX_ROUNDS timed calls each
    slow_threads = ThreadClock({1: 0.001, 2: 0.0015})
    assert fastest(time_counts(slow_threads.run, [1, 2], budget=0.05, clock=slow_threads)) == 1
    assert fastest({1: 0.00102, 2: 0.001}) == 1  # within 5%: the fewer threads
    loser = ThreadClock({1: 0.001, 2: 0.01})  # over 3x slower in its warm-up: not timed again
    assert time_counts(loser.run, [1, 2], budget=0.05, clock=loser) == pytest.approx({1: 0.001, 2: 0.01})
    assert loser.seen.count(2) == 1 and loser.seen.count(1) > 3
    assert candidates(1) == [1] and candidates(2) == [1, 2] and candidates(12) == [1, 2, 4, 8, 12]


def test_nodes_of_one_machine_measure_one_at_a_time(tmp_path):
    """Two measurements at once share the cores and both pick too few threads: the lock file runs them in
    turn, and one stuck holder delays the other only by the wait given."""
    path, spans, errors = str(tmp_path / "threads.lock"), [], []

    def measure() -> None:
        try:
            with measuring_alone(path, wait=10) as held:
                began = time.monotonic()
                time.sleep(0.2)
                spans.append((began, time.monotonic(), held))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=measure) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors and len(spans) == 3 and all(held for _, _, held in spans)
    spans.sort()
    assert all(spans[i][1] <= spans[i + 1][0] for i in range(2)), spans  # no two overlap
    with measuring_alone(path) as held:
        began = time.monotonic()
        with measuring_alone(path, wait=0.3) as other:
            assert not other and 0.3 <= time.monotonic() - began < 5  # ran anyway after the wait
        assert held


def scrape_threads(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {s.labels["steps"]: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "swarmlm_node_torch_threads"}


def threads_seen(node, model: str) -> dict[str, list[int]]:
    """Torch's thread count inside the first block during a decode step, a 20-position prefill and a
    Forward call, sent over raw gRPC."""
    seen: list[int] = []
    hook = node.node.servicer.blocks.layers[0].register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    channel = grpc.insecure_channel(node.address)
    stub = pb_grpc.NodeStub(channel)
    found = {}
    try:
        requests: queue.Queue = queue.Queue()
        requests.put(pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=3, batch_size=1,
                                                                max_length=32)))
        responses = stub.Inference(iter(requests.get, None))
        next(responses)
        for name, positions in (("prefill", 20), ("decode", 1)):
            seen.clear()
            requests.put(pb.InferenceRequest(hidden_states=serialize(torch.randn(1, positions, HIDDEN))))
            next(responses)
            found[name] = list(seen)
        requests.put(None)
        seen.clear()
        stub.Forward(pb.ForwardRequest(model=model, start=0, end=3, hidden_states=serialize(torch.randn(1, 4, HIDDEN))))
        found["forward"] = list(seen)
    finally:
        hook.remove()
        channel.close()
    return found


def test_given_counts_are_reported_and_used(start_nodes):
    (node,) = start_nodes("0:3", metrics_port=0, small_step_threads=1, large_step_threads=2, cache_tokens=256)
    assert (node.node.threads.small, node.node.threads.large, node.node.threads.source) == (1, 2, "flags")
    assert scrape_threads(node.node.metrics.server.url) == {"small": 1.0, "large": 2.0}
    model = node.node.servicer.limits.model
    assert threads_seen(node, model) == {"prefill": [2], "decode": [1], "forward": [2]}


def test_measured_counts_are_reported_and_used(start_nodes):
    (node,) = start_nodes("0:3", metrics_port=0, cache_tokens=256, small_step_threads=None, large_step_threads=None)
    choice = node.node.threads
    assert choice.source == "measured" and choice.seconds > 0
    assert set(choice.small_ms) == set(choice.large_ms) == set(candidates(max(choice.small_ms)))
    assert choice.small == fastest(choice.small_ms) and choice.large == fastest(choice.large_ms)
    assert scrape_threads(node.node.metrics.server.url) == {"small": choice.small, "large": choice.large}
    model = node.node.servicer.limits.model
    assert threads_seen(node, model) == {"prefill": [choice.large], "decode": [choice.small],
                                         "forward": [choice.large]}


def test_other_load_leaves_out_this_process():
    from node.threads import other_load

    assert other_load((10.0, 1.0, 100.0), (12.0, 2.0, 101.0), cores=2) == pytest.approx(0.5)  # 2 s busy, 1 ours
    assert other_load((10.0, 1.0, 100.0), (11.0, 2.0, 101.0), cores=2) == 0.0  # all of it ours
    assert other_load(None, (11.0, 2.0, 101.0), cores=2) == 0.0  # no /proc/stat: no check


def test_a_measurement_beside_busy_processes_is_taken_again(tiny_path, caplog):
    """Other processes kept every CPU busy during the first measurement (scripted readings): the node
    measures again and keeps the quiet one; busy every time, it keeps the last after TRIES measurements."""
    import os

    from node.blocks import load_span
    from node.threads import TRIES, choose_threads
    from swarm.checkpoint import load_config
    from swarm.spans import Span

    blocks = load_span(tiny_path, load_config(tiny_path), Span(0, 2), torch.float32)
    cores = os.cpu_count() or 1
    busy_then_quiet = iter([(0.0, 0.0, 0.0), (float(cores), 0.0, 1.0), (5.0, 0.0, 5.0), (5.0, 0.0, 6.0)])
    choice = choose_threads(blocks, budget=0.01, alone=False, readings=lambda: next(busy_then_quiet))
    assert next(busy_then_quiet, None) is None  # two measurements: four readings
    assert choice.source == "measured" and choice.small_ms and choice.large_ms
    assert "used 100% of the CPUs while measuring thread counts (try 1 of 3); measuring again" in caplog.text
    caplog.clear()
    ticks = iter(range(1000))

    def always_busy():  # each reading one second later, every CPU busy with others meanwhile
        t = float(next(ticks))
        return cores * t, 0.0, t

    choice = choose_threads(blocks, budget=0.01, alone=False, readings=always_busy)
    assert caplog.text.count("while measuring thread counts") == TRIES and "keeping these" in caplog.text
    assert choice.small in choice.small_ms and choice.large in choice.large_ms


def test_a_starting_node_holds_the_measuring_lock():
    """A node loading its weights holds the lock another node's measuring waits for (node.server)."""
    import asyncio

    from node.threads import starting_alone

    async def main():
        async with starting_alone(False) as held:
            assert not held
            with measuring_alone(wait=1.0) as other:
                assert other  # nothing held: free at once
        async with starting_alone(True) as held:
            assert held
            with measuring_alone(wait=0.3) as other:
                assert not other  # waited the 0.3 s, then went on without it

    asyncio.run(main())
