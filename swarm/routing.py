"""Route choice as pure functions over made-up or real ServerInfo lists.

A route is a chain of hops ``(server, span)`` whose spans tile the requested blocks exactly. A node
can run any sub-span of what it hosts, so overlapping and differently sized spans all combine.
"""
from __future__ import annotations

import bisect
import heapq
import math
import random
from dataclasses import dataclass
from typing import Iterable, Mapping

from swarm.spans import NodeState, ServerInfo, Span

DEFAULT_HOP_SECONDS = 0.005  # assumed round trip to a node whose latency was never measured
CLAIM_CAP = 2.0  # a node not yet observed is believed at most this many times its measured (or typical) peers


class NoRouteError(RuntimeError):
    """Some blocks have no ONLINE node; ``missing`` lists them."""

    def __init__(self, missing: list[int], hint: str = ""):
        self.missing, self.hint = missing, hint  # hint: why, when known (swarm.directory.explain_missing)
        super().__init__(f"no ONLINE node serves block(s) {format_blocks(missing)}" + (f"; {hint}" if hint else ""))


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


def _median_low(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def believed_throughput(servers: Iterable[ServerInfo], observed: Mapping[str, float]) -> dict[str, float]:
    """What a client believes each ONLINE server's throughput is (announced units: tokens/s per block), given
    ``observed``: node id -> the work per second (tokens x blocks / s of wall time) it saw that node do.

    A claim is believed only up to a bound: a node the client has used counts at what it was seen to do,
    scaled into announced units so that the typical observed node (lower median) is worth the typical claim
    (lower median of all claims); a node not used yet counts at its claim, but at most ``CLAIM_CAP`` times
    the best observed node (or the typical claim, before any observation). So one absurd claim attracts a
    few calls at most, and after them its measured speed is what counts. (Medians, so that a minority of
    liars, in either direction, cannot move the scale.)"""
    online = [s for s in servers if s.state is NodeState.ONLINE]
    if not online:
        return {}
    typical = _median_low([s.throughput for s in online])
    seen = {s.node_id: observed[s.node_id] for s in online if observed.get(s.node_id, 0.0) > 0}
    belief: dict[str, float] = {}
    if seen:
        scale = typical / _median_low(list(seen.values()))
        belief = {node: speed * scale for node, speed in seen.items()}
    bound = CLAIM_CAP * (max(belief.values()) if belief else typical)
    for s in online:
        if s.node_id not in belief:
            belief[s.node_id] = min(s.throughput, bound)
    return belief


def choose_route(
    servers: Iterable[ServerInfo],
    span: Span,
    *,
    rtt: Mapping[str, float] | None = None,
    tokens: int = 1,
    exclude: frozenset[str] = frozenset(),
    throughput: Mapping[str, float] | None = None,
) -> list[Hop]:
    """The cheapest chain of ONLINE servers covering ``span``.

    Cost of a hop = its round trip (measured ``rtt[node_id]`` or a default) plus
    ``tokens * blocks / throughput`` (``throughput[node_id]``, e.g. from believed_throughput, or else the
    announced figure). Fewer hops win ties. ``exclude`` holds banned node ids.
    """
    online = usable_servers(servers, span, exclude)
    rtt = rtt or {}
    throughput = throughput or {}
    # useful break points: where some server's span starts or ends, plus the target bounds
    points = sorted({span.start, span.end} | {p for s in online for p in (s.span.start, s.span.end)
                                              if span.start < p < span.end})
    last = len(points) - 1
    # covering[i]: (round trip, seconds per block, index of the last point reachable, server) of every
    # server hosting block points[i], in the stable order of ``online`` (ties go to the first)
    covering: list[list[tuple[float, float, int, ServerInfo]]] = [[] for _ in points]
    for s in online:
        lo, hi = max(s.span.start, span.start), min(s.span.end, span.end)
        if lo >= hi:
            continue
        entry = (rtt.get(s.node_id, DEFAULT_HOP_SECONDS), tokens / max(throughput.get(s.node_id, s.throughput), 1e-9),
                 bisect.bisect_left(points, hi), s)
        for i in range(bisect.bisect_left(points, lo), entry[2]):
            covering[i].append(entry)
    best: list[tuple[float, int]] = [(0.0, 0)] + [(math.inf, 0)] * last
    came_from: list[tuple[int, ServerInfo] | None] = [None] * len(points)
    queue: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    while queue:
        cost, hops, i = heapq.heappop(queue)
        if i == last:
            break
        if (cost, hops) > best[i]:
            continue
        pos = points[i]
        for seconds, per_block, reach, server in covering[i]:
            base = cost + seconds
            for j in range(i + 1, reach + 1):
                cand = (base + (points[j] - pos) * per_block, hops + 1)
                if cand < best[j]:
                    best[j] = cand
                    came_from[j] = (i, server)
                    heapq.heappush(queue, (cand[0], cand[1], j))
    route: list[Hop] = []
    j = last
    while j != 0:
        i, server = came_from[j]
        route.append(Hop(server, Span(points[i], points[j])))
        j = i
    return route[::-1]


def sample_route(
    servers: Iterable[ServerInfo],
    span: Span,
    rng: random.Random,
    *,
    exclude: frozenset[str] = frozenset(),
    throughput: Mapping[str, float] | None = None,
) -> list[Hop]:
    """A route for training and batch forward that spreads load over replicas: at each position, a
    server covering it is drawn with probability proportional to its throughput (``throughput[node_id]``,
    e.g. from believed_throughput, or else the announced figure), and runs as far as it can."""
    online = usable_servers(servers, span, exclude)
    throughput = throughput or {}
    route, pos = [], span.start
    while pos < span.end:
        here = [s for s in online if s.span.start <= pos < s.span.end]
        pick = rng.choices(here, weights=[max(throughput.get(s.node_id, s.throughput), 1e-9) for s in here])[0]
        end = min(pick.span.end, span.end)
        route.append(Hop(pick, Span(pos, end)))
        pos = end
    return route
