"""Automatic block placement as pure functions: where should a node serve its ``num_blocks`` blocks?

Two layers. The vector functions (``weakest_window``, ``choose_move``) work on per-block lists (total
announced throughput, number of ONLINE nodes) so a simulation of a thousand nodes can keep those lists
up to date and call them cheaply; ``choose_blocks`` and ``should_move`` build the lists from the
ServerInfo records a node reads from the DHT and call the vector functions (what node/server.py uses).

The rebalancing rule (``choose_move``): a node leaves its span for the weakest window of the swarm
without it only if (1) every block it leaves keeps an ONLINE node, and (2) the weakest block it would
leave, without it, is still more than ``min_gain`` times stronger than the weakest block it would
enter (without it), i.e. it moves from a clearly stronger place to a clearly weaker one. Blocks it
enters rise, blocks it leaves stay above the weakest entered one, the rest do not change: every move
raises the swarm's sorted per-block throughputs (lexicographically, from the weakest up), so in a swarm
that stops changing, moves stop. The rule compares places, not the effect of one node on the global
minimum: with hundreds of nodes one node changes a block by a percent, and a rule asking one move
to raise the weakest block 1.5x (as before) never moves, even to refill a region a failure emptied.
A moving node announces its new span as JOINING with its throughput (node/server.py) so the nodes that
check next see the weak place filling up and do not all rush to it.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

from swarm.spans import NodeState, ServerInfo, Span

DEFAULT_MIN_GAIN = 1.2  # a node moves only to a place this many times weaker than the one it leaves


def block_throughput(servers: Iterable[ServerInfo], total_blocks: int, exclude: str | None = None) -> list[float]:
    """Total announced throughput of ONLINE/JOINING nodes per block (JOINING counts: it is coming)."""
    per_block = [0.0] * total_blocks
    for s in servers:
        if s.state is NodeState.OFFLINE or s.node_id == exclude:
            continue
        for b in range(s.span.start, min(s.span.end, total_blocks)):
            per_block[b] += s.throughput
    return per_block


def online_count(servers: Iterable[ServerInfo], total_blocks: int, exclude: str | None = None) -> list[int]:
    """How many ONLINE nodes serve each block: what keeps a block usable right now (JOINING does not)."""
    count = [0] * total_blocks
    for s in servers:
        if s.state is NodeState.ONLINE and s.node_id != exclude:
            for b in range(s.span.start, min(s.span.end, total_blocks)):
                count[b] += 1
    return count


def weakest_window(per_block: Sequence[float], num_blocks: int, prefer: int | None = None) -> int:
    """Start of the window of ``num_blocks`` blocks where ``per_block`` is weakest: the lowest weakest
    block first (so holes get filled), then the lowest total; ties go to ``prefer`` (a node's current
    start: staying is free), then to the earliest window."""
    total_blocks = len(per_block)
    if not 0 < num_blocks <= total_blocks:
        raise ValueError(f"num_blocks must be in 1..{total_blocks}, got {num_blocks}")
    best_key, best = None, 0
    for start in range(total_blocks - num_blocks + 1):
        window = per_block[start:start + num_blocks]
        key = (min(window), math.fsum(window), start != prefer)  # fsum: equal windows tie exactly
        if best_key is None or key < best_key:
            best_key, best = key, start
    return best


def choose_blocks(servers: Iterable[ServerInfo], total_blocks: int, num_blocks: int,
                  exclude: str | None = None) -> Span:
    """The window of ``num_blocks`` blocks where the swarm is weakest (see ``weakest_window``)."""
    if not 0 < num_blocks <= total_blocks:
        raise ValueError(f"num_blocks must be in 1..{total_blocks}, got {num_blocks}")
    start = weakest_window(block_throughput(servers, total_blocks, exclude), num_blocks)
    return Span(start, start + num_blocks)


def choose_move(others: Sequence[float], others_online: Sequence[int], span: Span, throughput: float,
                *, min_gain: float = DEFAULT_MIN_GAIN) -> Span | None:
    """Where a node serving ``span`` at ``throughput`` should move, or None to stay.

    ``others``: per-block throughput of every other ONLINE/JOINING node; ``others_online``: how many
    other ONLINE nodes serve each block. See the module docstring for the rule."""
    if min_gain < 1.0:
        raise ValueError(f"min_gain must be >= 1 (a move has to help), got {min_gain}")
    if span.end > len(others) or len(others_online) != len(others):
        raise ValueError(f"span {span} and per-block lists of {len(others)}/{len(others_online)} blocks disagree")
    if any(others_online[b] == 0 for b in range(span.start, span.end)):
        return None  # we are the only ONLINE node of some block: leaving would uncover it
    start = weakest_window(others, len(span), prefer=span.start)
    if start == span.start:
        return None
    target = Span(start, start + len(span))
    leave = min((others[b] for b in range(span.start, span.end) if b not in target), default=math.inf)
    enter = min(others[b] for b in range(target.start, target.end) if b not in span)
    if leave > min_gain * enter or (enter == 0.0 and leave > 0.0):
        return target
    return None


def should_move(servers: list[ServerInfo], me: ServerInfo, total_blocks: int, *,
                min_gain: float = DEFAULT_MIN_GAIN) -> Span | None:
    """A better span for ``me``, or None: ``choose_move`` over the swarm as read from the DHT."""
    others = block_throughput(servers, total_blocks, exclude=me.node_id)
    return choose_move(others, online_count(servers, total_blocks, exclude=me.node_id), me.span, me.throughput,
                       min_gain=min_gain)
