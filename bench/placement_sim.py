"""A thousand simulated nodes: automatic placement and rebalancing under churn.

Nodes with heterogeneous throughput and ``num_blocks`` join (Poisson arrivals), leave (exponential
lifetimes, plus one correlated failure of a fraction of the swarm), and every ``check_seconds`` each
ONLINE node asks the rebalancing rule whether to move. A joining node picks its span with
``swarm.placement.weakest_window`` over the announced throughput (what ``choose_blocks`` computes from
the DHT) and announces throughput 0 while it loads (as node/server.py does: JOINING, 0.0), so nodes
that join at the same time do not see each other. A moving node is OFFLINE while it drains and loads
its new span (``drain_seconds`` + ``load_seconds_per_block`` x blocks), as node/server.py does.

Rules compared (same churn, same seed):
  * ``ours``: ``swarm.placement.choose_move`` (what ``should_move`` calls), the code nodes run;
  * ``legacy``: the rule before this change (move only if the swarm's weakest block rises 1.5x);
  * ``anchor``: the anchor system's rule as described in its source (Petals 2.2, block_selection):
    a node removes itself, takes its best window, simulates every other node greedily re-choosing its
    window until nobody moves, and moves if the swarm's weakest block now is below 0.75 of that;
  * ``none``: placement at join only.

Quality = the weakest block's throughput over ONLINE nodes / an upper bound of the best placement of
the nodes that are up (ONLINE or moving): the LP relaxation of "maximize the weakest block's total
throughput, each node serving one window of its num_blocks blocks" (``placement_bound``), which no
integral placement can beat. Uncovered-by-a-move counts blocks left with no ONLINE node at the moment a
node left them to move (must be 0); departures that uncover a block are counted apart.
"""
from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from swarm.placement import DEFAULT_MIN_GAIN, choose_move, weakest_window
from swarm.spans import Span

RULES = ("ours", "legacy", "anchor", "none")
ANCHOR_QUALITY = 0.75  # the anchor system's default balance_quality


@dataclass(frozen=True)
class SimConfig:
    nodes: int = 1000  # steady-state population (the initial swarm joins during ramp_minutes)
    blocks: int = 80  # blocks of the model
    hours: float = 6.0  # simulated time
    lifetime_hours: float = 2.0  # mean time a node stays (exponential); arrivals keep the population
    ramp_minutes: float = 10.0  # the initial population joins uniformly over this time
    check_seconds: float = 120.0  # each node's rebalance period (--rebalance-period), jittered +-20%
    drain_seconds: float = 30.0  # a moving node is OFFLINE this long before it loads (node/server.py)
    load_seconds_per_block: float = 3.0  # loading one block (joining and moving)
    flash_hour: float | None = 3.0  # when a correlated failure takes flash_fraction of the nodes at once:
    flash_fraction: float = 0.2  # those serving the lowest blocks (one site hosting the model's first part)
    sample_seconds: float = 300.0  # how often quality is measured
    warmup_minutes: float = 30.0  # samples before this are not counted in the summary
    recovery_minutes: float = 15.0  # nor those this soon after the correlated failure (time to recover is)
    moving_announces: str = "joining"  # a moving node's record: "joining" (its new span, with its
    # throughput: node/server.py since this change) or "offline" (before: nothing until it is ONLINE again)
    rule: str = "ours"
    min_gain: float = DEFAULT_MIN_GAIN  # ours: a move must make the weakest affected block this much stronger
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.moving_announces not in ("joining", "offline"):
            raise ValueError("moving_announces must be 'joining' or 'offline'")
        if self.nodes < 1 or self.blocks < 2 or self.hours <= 0:
            raise ValueError("nodes >= 1, blocks >= 2 and hours > 0 are needed")


@dataclass
class SimNode:
    id: int
    throughput: float
    num_blocks: int
    span: Span
    state: str = "loading"  # loading (joining, announced 0) | online | moving (OFFLINE) | gone
    epoch: int = 0  # bumped on every state change, so stale events are ignored


@dataclass
class Sample:
    t: float  # seconds
    weakest: float  # the weakest block's ONLINE throughput
    bound: float  # upper bound of the best placement's weakest block (nodes that are up)
    uncovered: int  # blocks with no ONLINE node
    up: int  # nodes ONLINE or moving

    @property
    def quality(self) -> float:
        return self.weakest / self.bound if self.bound > 0 else 1.0


@dataclass
class SimResult:
    config: SimConfig
    samples: list[Sample] = field(default_factory=list)
    moves: list[float] = field(default_factory=list)  # times of moves
    joins: int = 0
    departures: int = 0
    uncovered_by_moves: int = 0  # blocks a move left without an ONLINE node (must be 0)
    uncovered_by_departures: int = 0
    checks: int = 0

    def counted(self) -> list[Sample]:
        """Samples after the warm-up, outside the recovery window after the correlated failure."""
        cfg = self.config
        flash = math.inf if cfg.flash_hour is None else cfg.flash_hour * 3600
        return [s for s in self.samples if s.t >= cfg.warmup_minutes * 60
                and not flash <= s.t < flash + cfg.recovery_minutes * 60]

    def recovery_seconds(self, quality: float = 0.8) -> float | None:
        """Time from the correlated failure until quality is back at ``quality`` (None: no failure or never)."""
        if self.config.flash_hour is None:
            return None
        flash = self.config.flash_hour * 3600
        return next((s.t - flash for s in self.samples if s.t > flash and s.quality >= quality), None)

    def moves_per_hour(self) -> list[int]:
        hours = math.ceil(self.config.hours)
        per = [0] * hours
        for t in self.moves:
            per[min(int(t // 3600), hours - 1)] += 1
        return per


def placement_bound(nodes: list[tuple[float, int]], blocks: int) -> float:
    """An upper bound of max over placements of min over blocks of the served throughput, each node
    ``(throughput, num_blocks)`` serving one window of ``num_blocks`` consecutive blocks: the LP
    relaxation (a node's throughput may be split over windows). Nodes of equal num_blocks are
    interchangeable in it, so one variable per (num_blocks, start) and an equality per num_blocks."""
    from scipy.optimize import linprog

    mass: dict[int, float] = {}
    for throughput, k in nodes:
        if not 0 < k <= blocks:
            raise ValueError(f"num_blocks {k} outside 1..{blocks}")
        mass[k] = mass.get(k, 0.0) + throughput
    if not mass:
        return 0.0
    columns = [(k, s) for k in sorted(mass) for s in range(blocks - k + 1)]
    n = len(columns) + 1  # the last variable is z, the weakest block
    cover = np.zeros((blocks, n))
    for j, (k, s) in enumerate(columns):
        cover[s:s + k, j] = 1.0
    a_ub = np.hstack([-cover[:, :-1], np.ones((blocks, 1))])  # z - sum(covering) <= 0 for every block
    a_eq = np.zeros((len(mass), n))
    for i, k in enumerate(sorted(mass)):
        a_eq[i, [j for j, (kk, _) in enumerate(columns) if kk == k]] = 1.0
    c = np.zeros(n)
    c[-1] = -1.0
    scale = max(mass.values())  # keep the LP well conditioned
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(blocks), A_eq=a_eq, b_eq=[mass[k] / scale for k in sorted(mass)],
                  bounds=[(0, None)] * n, method="highs")
    if not res.success:
        raise RuntimeError(f"placement bound LP failed: {res.message}")
    return float(res.x[-1]) * scale


class Swarm:
    """The simulated swarm's per-block vectors, kept up to date as nodes change state."""

    def __init__(self, blocks: int):
        self.online_tp = [0.0] * blocks  # throughput actually served (ONLINE nodes)
        self.online_cnt = [0] * blocks
        self.joining_tp = [0.0] * blocks  # announced by moving nodes at their new span (JOINING)
        self.joining_cnt = [0] * blocks
        self.nodes: dict[int, SimNode] = {}

    @property
    def announced(self) -> list[float]:
        """What block_throughput reads from the DHT: ONLINE + JOINING throughput."""
        return [a + b for a, b in zip(self.online_tp, self.joining_tp)]

    @staticmethod
    def _add(tp: list[float], cnt: list[int], span: Span, throughput: float, sign: int) -> None:
        for b in range(span.start, span.end):
            cnt[b] += sign
            tp[b] = tp[b] + sign * throughput if cnt[b] else 0.0  # nobody left: exactly 0 (no float drift)

    def go_online(self, node: SimNode) -> None:
        self._add(self.online_tp, self.online_cnt, node.span, node.throughput, 1)

    def go_offline(self, node: SimNode) -> int:
        """Remove an ONLINE node; returns how many of its blocks are left with no ONLINE node."""
        self._add(self.online_tp, self.online_cnt, node.span, node.throughput, -1)
        return sum(1 for b in range(node.span.start, node.span.end) if self.online_cnt[b] == 0)

    def announce_joining(self, node: SimNode, sign: int) -> None:
        self._add(self.joining_tp, self.joining_cnt, node.span, node.throughput, sign)

    def others(self, node: SimNode) -> tuple[list[float], list[int]]:
        """Per-block announced throughput and ONLINE count of every node but ``node`` (an ONLINE one)."""
        others, count = self.announced, list(self.online_cnt)
        for b in range(node.span.start, node.span.end):
            count[b] -= 1
            others[b] = max(others[b] - node.throughput, 0.0) if count[b] or self.joining_cnt[b] else 0.0
        return others, count


# ---- rebalancing rules: (swarm, node, config, rng) -> new span or None ------------------------------
def rule_ours(swarm: Swarm, node: SimNode, cfg: SimConfig, rng: random.Random) -> Span | None:
    others, count = swarm.others(node)
    return choose_move(others, count, node.span, node.throughput, min_gain=cfg.min_gain)


def rule_legacy(swarm: Swarm, node: SimNode, cfg: SimConfig, rng: random.Random) -> Span | None:
    """The rule before this change: the global weakest block must rise 1.5x; coverage judged by throughput."""
    others, _ = swarm.others(node)
    current = swarm.announced
    if any(others[b] == 0.0 for b in range(node.span.start, node.span.end)):
        return None
    start = weakest_window(others, node.num_blocks)
    if start == node.span.start:
        return None
    target = Span(start, start + node.num_blocks)
    after = list(others)
    for b in range(target.start, target.end):
        after[b] += node.throughput
    if min(after) >= 1.5 * min(current) or (min(current) == 0.0 and min(after) > 0.0):
        return target
    return None


def _best_start_sorted(tp: np.ndarray, k: int) -> int:
    """The anchor system's window choice: the lexicographically smallest sorted window."""
    windows = np.sort(np.lib.stride_tricks.sliding_window_view(tp, k), axis=1)
    order = np.lexsort(windows.T[::-1])
    return int(order[0])


def rule_anchor(swarm: Swarm, node: SimNode, cfg: SimConfig, rng: random.Random) -> Span | None:
    """Our reading of the anchor system's rule (its behaviour, not its code): see the module docstring."""
    eps = 1e-3
    up = [n for n in swarm.nodes.values() if n.state == "online"]
    starts = {n.id: n.span.start for n in up}
    tp = np.array(swarm.announced)
    initial = tp.min()
    k, t = node.num_blocks, node.throughput
    tp[node.span.start:node.span.end] -= t * (1 + eps)
    if initial > eps and tp.min() <= 0:
        return None  # leaving would make the swarm disjoint
    new_start = _best_start_sorted(tp, k)
    if new_start == node.span.start:
        return None
    tp[node.span.start:node.span.end] += t * eps
    starts[node.id] = new_start
    tp[new_start:new_start + k] += t
    moved, passes = True, 0
    while moved and passes < 20:  # the anchor system loops until stable; bounded here for run time
        moved, passes = False, passes + 1
        order = list(up)
        rng.shuffle(order)
        for other in order:
            s, ko, to = starts[other.id], other.num_blocks, other.throughput
            tp[s:s + ko] -= to * (1 + eps)
            best = _best_start_sorted(tp, ko)
            tp[s:s + ko] += to * eps
            if best != s:
                starts[other.id], moved = best, True
            tp[starts[other.id]:starts[other.id] + ko] += to
    new_min = tp.min()
    if new_min < initial or new_min < eps:
        return None
    if initial / new_min < ANCHOR_QUALITY - eps:
        return Span(new_start, new_start + k)
    return None


RULE_FUNCS: dict[str, Callable[..., Span | None]] = {
    "ours": rule_ours, "legacy": rule_legacy, "anchor": rule_anchor, "none": lambda *a: None}


# ---- the event loop ----------------------------------------------------------------------------------
def new_node(rng: random.Random, ident: int, blocks: int) -> tuple[float, int]:
    """Heterogeneous hardware: throughput log-normal around 100 (x/÷ 2.2); num_blocks log-normal
    around blocks/5, larger on faster machines (more memory), within 2..blocks/2."""
    z = rng.gauss(0.0, 1.0)
    throughput = 100.0 * math.exp(0.8 * z)
    k = round(blocks / 5 * math.exp(0.3 * z + 0.35 * rng.gauss(0.0, 1.0)))
    return throughput, max(2, min(blocks // 2, k))


def simulate(cfg: SimConfig, progress: Callable[[str], None] | None = None) -> SimResult:
    rng = random.Random(cfg.seed)  # churn and hardware: identical for every rule with the same seed
    rule_rng = random.Random(cfg.seed + 1)
    churn_rng = random.Random(cfg.seed + 2)
    decide = RULE_FUNCS[cfg.rule]
    swarm, result = Swarm(cfg.blocks), SimResult(cfg)
    end = cfg.hours * 3600
    events: list[tuple[float, int, str, int, int]] = []  # (time, seq, kind, node id, epoch)
    seq = 0

    def push(t: float, kind: str, ident: int = -1, epoch: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, ident, epoch))

    arrival_rate = cfg.nodes / (cfg.lifetime_hours * 3600)  # keeps the population at cfg.nodes
    for i in range(cfg.nodes):
        push(rng.uniform(0, cfg.ramp_minutes * 60), "arrive")
    t = cfg.ramp_minutes * 60
    while t < end:
        t += rng.expovariate(arrival_rate)
        push(t, "arrive")
    if cfg.flash_hour is not None and cfg.flash_hour * 3600 < end:
        push(cfg.flash_hour * 3600, "flash")
    for s in range(int(end // cfg.sample_seconds) + 1):
        push(s * cfg.sample_seconds, "sample")
    next_id = 0

    def load_time(node: SimNode) -> float:
        return cfg.load_seconds_per_block * node.num_blocks

    def depart(node: SimNode) -> None:
        if node.state == "online":
            result.uncovered_by_departures += swarm.go_offline(node)
        elif node.state == "moving" and cfg.moving_announces == "joining":
            swarm.announce_joining(node, -1)
        node.state, node.epoch = "gone", node.epoch + 1
        result.departures += 1

    while events:
        now, _, kind, ident, epoch = heapq.heappop(events)
        if now > end:
            break
        node = swarm.nodes.get(ident)
        if kind == "arrive":
            throughput, k = new_node(rng, next_id, cfg.blocks)
            start = weakest_window(swarm.announced, k)
            node = SimNode(next_id, throughput, k, Span(start, start + k))
            swarm.nodes[next_id] = node
            next_id += 1
            result.joins += 1
            push(now + load_time(node) + 5.0, "ready", node.id, node.epoch)
            push(now + rng.expovariate(1 / (cfg.lifetime_hours * 3600)), "leave", node.id, -1)
        elif kind == "flash":
            alive = sorted((n for n in swarm.nodes.values() if n.state != "gone"), key=lambda n: (n.span.start, n.id))
            for victim in alive[:int(len(alive) * cfg.flash_fraction)]:
                depart(victim)
        elif kind == "sample":
            up = [(n.throughput, n.num_blocks) for n in swarm.nodes.values() if n.state in ("online", "moving")]
            result.samples.append(Sample(now, min(swarm.online_tp), placement_bound(up, cfg.blocks) if up else 0.0,
                                         sum(1 for c in swarm.online_cnt if c == 0), len(up)))
            if progress and len(result.samples) % 12 == 0:
                s = result.samples[-1]
                progress(f"{cfg.rule}: {now / 3600:.1f} h, {s.up} up, quality {s.quality:.2f}, "
                         f"{len(result.moves)} moves")
        elif node is None or node.state == "gone":
            continue
        elif kind == "leave":
            depart(node)
        elif kind == "ready" and epoch == node.epoch:  # joined or finished moving
            if node.state == "moving" and cfg.moving_announces == "joining":
                swarm.announce_joining(node, -1)  # now counted as ONLINE
            node.state, node.epoch = "online", node.epoch + 1
            swarm.go_online(node)
            push(now + cfg.check_seconds * rule_rng.uniform(0.2, 1.2), "check", node.id, node.epoch)
        elif kind == "check" and epoch == node.epoch and node.state == "online":
            result.checks += 1
            target = decide(swarm, node, cfg, rule_rng)
            if target is None:
                push(now + cfg.check_seconds * rule_rng.uniform(0.8, 1.2), "check", node.id, node.epoch)
                continue
            result.uncovered_by_moves += swarm.go_offline(node)
            node.span, node.state, node.epoch = target, "moving", node.epoch + 1
            if cfg.moving_announces == "joining":
                swarm.announce_joining(node, 1)
            result.moves.append(now)
            push(now + cfg.drain_seconds + load_time(node), "ready", node.id, node.epoch)
    return result
