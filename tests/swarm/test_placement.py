import pytest

from swarm.placement import choose_blocks, should_move
from swarm.spans import NodeState, ServerInfo, Span


def node(name, start, end, throughput=100.0, state=NodeState.ONLINE):
    return ServerInfo(name, "127.0.0.1:1", Span(start, end), state, throughput, "0.1.0", "float32")


def test_empty_swarm_starts_at_zero():
    assert choose_blocks([], 12, 4) == Span(0, 4)


def test_fills_the_hole_first():
    servers = [node("a", 0, 4), node("b", 8, 12)]
    assert choose_blocks(servers, 12, 4) == Span(4, 8)


def test_weakest_region_by_throughput():
    servers = [node("a", 0, 6, 500.0), node("b", 6, 12, 50.0)]
    assert choose_blocks(servers, 12, 3) == Span(6, 9)


def test_offline_nodes_do_not_count_and_bad_sizes_refused():
    assert choose_blocks([node("a", 0, 4, state=NodeState.OFFLINE), node("b", 4, 8)], 8, 4) == Span(0, 4)
    with pytest.raises(ValueError):
        choose_blocks([], 8, 9)


def test_move_only_when_clearly_better_and_never_uncovering():
    a, b, c = node("a", 0, 4), node("b", 0, 4), node("c", 4, 8, 10.0)
    assert should_move([a, b, c], b, 8) == Span(4, 8)  # b's blocks stay covered by a; 4:8 is weak
    assert should_move([a, c], a, 8) is None  # a alone serves 0:4: moving would uncover it
    even = [node("a", 0, 4), node("b", 0, 4), node("c", 4, 8), node("d", 4, 8)]
    assert should_move(even, even[1], 8) is None  # no clear gain
