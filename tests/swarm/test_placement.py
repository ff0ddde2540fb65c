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


def per_block(servers, total):
    from swarm.placement import block_throughput

    return block_throughput(servers, total)


def test_one_of_two_weak_regions_gets_a_node():
    """0:4 and 8:12 are equally weak: a move fixes one of them (the weakest block overall stays where it
    was, so a rule on the global minimum never moved)."""
    a, e = node("a", 0, 4), node("e", 8, 12)
    b, c, d = node("b", 4, 8), node("c", 4, 8), node("d", 4, 8)
    assert should_move([a, b, c, d, e], b, 12) == Span(0, 4)


def test_a_small_node_leaves_a_strong_region_for_a_weak_one():
    """Hundreds of nodes: one node changes a block by a few percent, but moving from a region that
    a failure left strong to one it emptied is still right."""
    strong = [node(f"s{i}", 0, 4, 10.0) for i in range(30)]
    weak = [node(f"w{i}", 4, 8, 10.0) for i in range(10)]
    assert should_move(strong + weak, strong[0], 8) == Span(4, 8)
    assert should_move(strong + weak, weak[0], 8) is None  # never from the weak place to the strong one


def test_a_joining_node_does_not_keep_a_block_covered():
    """b is still loading 0:4 (JOINING, announcing its throughput): a must not leave 0:4 to it."""
    a, b = node("a", 0, 4), node("b", 0, 4, 500.0, state=NodeState.JOINING)
    c = node("c", 4, 8, 1.0)
    assert should_move([a, b, c], a, 8) is None


def test_staying_wins_ties():
    from swarm.placement import weakest_window

    assert weakest_window([1.0, 1.0, 1.0, 1.0], 2) == 0
    assert weakest_window([1.0, 1.0, 1.0, 1.0], 2, prefer=2) == 2
    assert weakest_window([1.0, 1.0, 0.5, 1.0], 2, prefer=0) == 1  # a weaker window beats staying


def test_choose_move_refuses_bad_input():
    from swarm.placement import choose_move

    with pytest.raises(ValueError):
        choose_move([1.0] * 4, [1] * 4, Span(0, 2), 1.0, min_gain=0.9)
    with pytest.raises(ValueError):
        choose_move([1.0] * 4, [1] * 3, Span(0, 2), 1.0)


def random_swarm(rng, total, count):
    servers = []
    for i in range(count):
        k = rng.randint(1, total // 2)
        start = rng.randint(0, total - k)
        state = rng.choice([NodeState.ONLINE] * 4 + [NodeState.JOINING, NodeState.OFFLINE])
        servers.append(node(f"n{i}", start, start + k, round(rng.uniform(1, 100), 1), state))
    return servers


def test_moves_never_uncover_and_always_raise_the_sorted_block_throughputs():
    """Random swarms: a move keeps every block it leaves served by another ONLINE node, and makes the
    per-block throughputs, sorted, lexicographically larger (so moves stop in a swarm that stops changing)."""
    import random
    from dataclasses import replace

    from swarm.placement import online_count

    rng = random.Random(0)
    moves = 0
    for _ in range(300):
        total = rng.randint(4, 16)
        servers = random_swarm(rng, total, rng.randint(2, 12))
        for me in [s for s in servers if s.state is NodeState.ONLINE]:
            target = should_move(servers, me, total)
            if target is None:
                continue
            moves += 1
            assert len(target) == len(me.span) and target != me.span
            others = online_count(servers, total, exclude=me.node_id)
            assert all(others[b] > 0 for b in range(me.span.start, me.span.end))
            after = [replace(s, span=target) if s is me else s for s in servers]
            assert sorted(per_block(after, total)) > sorted(per_block(servers, total))
    assert moves > 20  # the property was exercised


def test_a_static_swarm_settles():
    import random
    from dataclasses import replace

    rng = random.Random(1)
    for _ in range(20):
        total = 12
        servers = [s for s in random_swarm(rng, total, 10) if s.state is NodeState.ONLINE]
        for step in range(500):
            moved = False
            for i, me in enumerate(servers):
                target = should_move(servers, me, total)
                if target is not None:
                    servers[i], moved = replace(me, span=target), True
            if not moved:
                break
        assert not moved, "moves kept going in a swarm that did not change"
