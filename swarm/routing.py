"""Route choice as pure functions over made-up or real ServerInfo lists.

A route is a chain of hops ``(server, span)`` whose spans tile the requested blocks exactly. A node
can run any sub-span of what it hosts, so overlapping and differently sized spans all combine.
"""
from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from typing import Iterable, Mapping

from swarm.spans import NodeState, ServerInfo, Span

DEFAULT_HOP_SECONDS = 0.005  # assumed round trip to a node whose latency was never measured


class NoRouteError(RuntimeError):
    """Some blocks have no ONLINE node; ``missing`` lists them."""

    def __init__(self, missing: list[int]):
        self.missing = missing
        super().__init__(f"no ONLINE node serves block(s) {format_blocks(missing)}")


@dataclass(frozen=True)
class Hop:
    server: ServerInfo
    span: Span


def format_blocks(blocks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0:3, 5:6"`` (half-open ranges)."""
    ranges: list[str] = []
    for b in sorted(blocks):
        if ranges and int(ranges[-1].split(":")[1]) == b:
            ranges[-1] = f"{ranges[-1].split(':')[0]}:{b + 1}"
        else:
            ranges.append(f"{b}:{b + 1}")
    return ", ".join(ranges)


def uncovered_blocks(servers: Iterable[ServerInfo], span: Span) -> list[int]:
    """Blocks of ``span`` that no ONLINE server hosts."""
    covered = set()
    for s in servers:
        if s.state is NodeState.ONLINE:
            covered.update(range(max(s.span.start, span.start), min(s.span.end, span.end)))
    return [b for b in range(span.start, span.end) if b not in covered]


def usable_servers(servers: Iterable[ServerInfo], span: Span, exclude: frozenset[str]) -> list[ServerInfo]:
    """ONLINE, not excluded servers in a stable order; NoRouteError if they leave blocks of ``span`` bare."""
    online = sorted((s for s in servers if s.state is NodeState.ONLINE and s.node_id not in exclude),
                    key=lambda s: s.node_id)
    missing = uncovered_blocks(online, span)
    if missing:
        raise NoRouteError(missing)
    return online


def choose_route(
    servers: Iterable[ServerInfo],
    span: Span,
    *,
    rtt: Mapping[str, float] | None = None,
    tokens: int = 1,
    exclude: frozenset[str] = frozenset(),
) -> list[Hop]:
    """The cheapest chain of ONLINE servers covering ``span``.

    Cost of a hop = its round trip (measured ``rtt[node_id]`` or a default) plus
    ``tokens * blocks / throughput``. Fewer hops win ties. ``exclude`` holds banned node ids.
    """
    online = usable_servers(servers, span, exclude)
    rtt = rtt or {}
    # useful break points: where some server's span starts or ends, plus the target bounds
    points = sorted({span.start, span.end} | {p for s in online for p in (s.span.start, s.span.end)
                                              if span.start < p < span.end})
    best: dict[int, tuple[float, int]] = {span.start: (0.0, 0)}
    came_from: dict[int, Hop] = {}
    queue: list[tuple[float, int, int]] = [(0.0, 0, span.start)]
    while queue:
        cost, hops, pos = heapq.heappop(queue)
        if pos == span.end:
            break
        if (cost, hops) > best.get(pos, (float("inf"), 0)):
            continue
        for s in online:
            if not s.span.start <= pos < s.span.end:
                continue
            for nxt in points:
                if pos < nxt <= min(s.span.end, span.end):
                    step = rtt.get(s.node_id, DEFAULT_HOP_SECONDS) + tokens * (nxt - pos) / max(s.throughput, 1e-9)
                    cand = (cost + step, hops + 1)
                    if cand < best.get(nxt, (float("inf"), 0)):
                        best[nxt] = cand
                        came_from[nxt] = Hop(s, Span(pos, nxt))
                        heapq.heappush(queue, (cand[0], cand[1], nxt))
    route: list[Hop] = []
    pos = span.end
    while pos != span.start:
        hop = came_from[pos]
        route.append(hop)
        pos = hop.span.start
    return route[::-1]


def sample_route(
    servers: Iterable[ServerInfo],
    span: Span,
    rng: random.Random,
    *,
    exclude: frozenset[str] = frozenset(),
) -> list[Hop]:
    """A route for training and batch forward that spreads load over replicas: at each position, a
    server covering it is drawn with probability proportional to its throughput, and runs as far as
    it can."""
    online = usable_servers(servers, span, exclude)
    route, pos = [], span.start
    while pos < span.end:
        here = [s for s in online if s.span.start <= pos < s.span.end]
        pick = rng.choices(here, weights=[max(s.throughput, 1e-9) for s in here])[0]
        end = min(pick.span.end, span.end)
        route.append(Hop(pick, Span(pos, end)))
        pos = end
    return route
