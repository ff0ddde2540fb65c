import random
from collections import Counter

import pytest

from swarm.routing import (CLAIM_CAP, NoRouteError, believed_throughput, choose_route, format_blocks, sample_route,
                           uncovered_blocks)
from swarm.spans import NodeState, ServerInfo, Span


def server(name, start, end, throughput=100.0, state=NodeState.ONLINE):
    return ServerInfo(name, f"127.0.0.1:{1000 + len(name)}", Span(start, end), state, throughput, "0.1.0", "float32")


def spans(route):
    return [(h.server.node_id, h.span.start, h.span.end) for h in route]


def test_route_tiles_the_span_exactly_with_overlaps():
    route = choose_route([server("a", 0, 4), server("b", 3, 8)], Span(0, 8))
    assert spans(route) in ([("a", 0, 4), ("b", 4, 8)], [("a", 0, 3), ("b", 3, 8)])


def test_fewest_hops_when_equal_speed():
    servers = [server("a", 0, 2), server("b", 2, 4), server("c", 4, 6), server("whole", 0, 6)]
    assert spans(choose_route(servers, Span(0, 6))) == [("whole", 0, 6)]


def test_fast_replica_beats_slow_one():
    servers = [server("slow", 0, 4, throughput=10.0), server("fast", 0, 4, throughput=1000.0)]
    assert spans(choose_route(servers, Span(0, 4))) == [("fast", 0, 4)]


def test_sub_span_of_a_node():
    route = choose_route([server("a", 0, 8)], Span(2, 5))
    assert spans(route) == [("a", 2, 5)]


def test_only_online_and_not_excluded():
    servers = [server("j", 0, 4, state=NodeState.JOINING), server("o", 0, 4, state=NodeState.OFFLINE),
               server("ok", 0, 4), server("banned", 0, 4, throughput=1e6)]
    assert spans(choose_route(servers, Span(0, 4), exclude=frozenset({"banned"}))) == [("ok", 0, 4)]


def test_missing_blocks_are_named():
    with pytest.raises(NoRouteError, match="block\\(s\\) 2:4, 6:7") as err:
        choose_route([server("a", 0, 2), server("b", 4, 6), server("j", 2, 4, state=NodeState.JOINING)], Span(0, 7))
    assert err.value.missing == [2, 3, 6]


def test_measured_rtt_steers_the_choice():
    servers = [server("near", 0, 4), server("far", 0, 4)]
    assert spans(choose_route(servers, Span(0, 4), rtt={"near": 0.001, "far": 0.5})) == [("near", 0, 4)]
    assert spans(choose_route(servers, Span(0, 4), rtt={"near": 0.5, "far": 0.001})) == [("far", 0, 4)]


def test_helpers():
    assert format_blocks([0, 1, 2, 5, 7, 8]) == "0:3, 5:6, 7:9"
    assert uncovered_blocks([server("a", 1, 3)], Span(0, 4)) == [0, 3]


def test_spread_routes_share_load_by_throughput():
    servers = [server("big", 0, 4, throughput=300.0), server("small", 0, 4, throughput=100.0), server("tail", 4, 6)]
    rng = random.Random(0)
    firsts = Counter()
    for _ in range(2000):
        route = sample_route(servers, Span(0, 6), rng)
        assert [h.span for h in route] == [Span(0, 4), Span(4, 6)]
        firsts[route[0].server.node_id] += 1
    assert 0.7 < firsts["big"] / 2000 < 0.8  # 300 / (300 + 100)


def test_spread_routes_use_partial_spans_and_raise_on_holes():
    route = sample_route([server("a", 0, 3), server("b", 2, 6)], Span(1, 5), random.Random(1))
    assert route[0].span.start == 1 and route[-1].span.end == 5
    with pytest.raises(NoRouteError):
        sample_route([server("a", 0, 3)], Span(0, 5), random.Random(1))


def test_an_absurd_claim_is_capped_before_use_and_measured_after():
    honest, liar = server("honest", 0, 4, throughput=500.0), server("liar", 0, 4, throughput=1e6)
    # never used: the liar counts at most CLAIM_CAP times the typical (lower median) claim
    assert believed_throughput([honest, liar], {}) == {"honest": 500.0, "liar": CLAIM_CAP * 500.0}
    # used once, seen doing what the honest node does: the typical observation is worth the typical claim
    assert believed_throughput([honest, liar], {"liar": 80.0}) == {"liar": 500.0, "honest": 500.0}
    both = believed_throughput([honest, liar], {"honest": 80.0, "liar": 80.0})
    assert both == {"honest": 500.0, "liar": 500.0}
    # a node really seen twice as fast counts twice as much, whatever it claims
    assert believed_throughput([honest, liar], {"honest": 40.0, "liar": 80.0}) == {"honest": 500.0, "liar": 1000.0}
    # routes follow the belief: the liar no longer takes every spread route, nor the cheapest one
    rng = random.Random(0)
    picks = Counter(sample_route([honest, liar], Span(0, 4), rng, throughput=both)[0].server.node_id
                    for _ in range(400))
    assert 150 < picks["honest"] < 250
    assert spans(choose_route([honest, liar], Span(0, 4))) == [("liar", 0, 4)]  # the claim as given: captured
    slow_liar = believed_throughput([honest, liar], {"honest": 80.0, "liar": 8.0})
    assert spans(choose_route([honest, liar], Span(0, 4), tokens=64, throughput=slow_liar)) == [("honest", 0, 4)]


def test_beliefs_ignore_offline_nodes_and_a_minority_of_liars():
    nodes = [server(f"h{i}", 0, 4, throughput=500.0) for i in range(3)] + [
        server("low", 0, 4, throughput=1.0), server("high", 0, 4, throughput=1e9),
        server("gone", 0, 4, throughput=1e12, state=NodeState.OFFLINE)]
    belief = believed_throughput(nodes, {"low": 80.0, "high": 80.0, "h0": 80.0})
    assert "gone" not in belief
    assert belief["low"] == belief["high"] == belief["h0"] == 500.0  # the scale is set by the median
    assert belief["h1"] == 500.0 and believed_throughput([], {}) == {}
