"""Automatic block placement as pure functions: where should a new node serve `num_blocks` blocks?"""
from __future__ import annotations

from typing import Iterable

from swarm.spans import NodeState, ServerInfo, Span


def block_throughput(servers: Iterable[ServerInfo], total_blocks: int, exclude: str | None = None) -> list[float]:
    """Total announced throughput of ONLINE/JOINING nodes per block (JOINING counts: it is coming)."""
    per_block = [0.0] * total_blocks
    for s in servers:
        if s.state is NodeState.OFFLINE or s.node_id == exclude:
            continue
        for b in range(s.span.start, min(s.span.end, total_blocks)):
            per_block[b] += s.throughput
    return per_block


def choose_blocks(servers: Iterable[ServerInfo], total_blocks: int, num_blocks: int,
                  exclude: str | None = None) -> Span:
    """The window of ``num_blocks`` blocks where the swarm is weakest: the lowest weakest-block
    throughput first (so holes get filled), then the lowest total; ties go to the earliest window."""
    if not 0 < num_blocks <= total_blocks:
        raise ValueError(f"num_blocks must be in 1..{total_blocks}, got {num_blocks}")
    per_block = block_throughput(servers, total_blocks, exclude)
    best = min(range(total_blocks - num_blocks + 1),
               key=lambda s: (min(per_block[s:s + num_blocks]), sum(per_block[s:s + num_blocks]), s))
    return Span(best, best + num_blocks)


def should_move(servers: list[ServerInfo], me: ServerInfo, total_blocks: int, *, min_gain: float = 1.5) -> Span | None:
    """A better span for ``me``, or None. Moving must never leave a block uncovered, and must raise
    the swarm's weakest block by at least ``min_gain`` times (a clear improvement, not churn)."""
    others = block_throughput(servers, total_blocks, exclude=me.node_id)
    current = block_throughput(servers, total_blocks)
    if any(t == 0.0 for b, t in enumerate(others) if b in me.span):
        return None  # we are the only node of some block: leaving would uncover it
    target = choose_blocks(servers, total_blocks, len(me.span), exclude=me.node_id)
    if target == me.span:
        return None
    after = list(others)
    for b in range(target.start, target.end):
        after[b] += me.throughput
    if min(after) >= min_gain * min(current) or (min(current) == 0.0 and min(after) > 0.0):
        return target
    return None
