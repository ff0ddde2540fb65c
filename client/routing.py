"""The client's one routing object: the swarm view, bans that grow on repeat, backoff, and a bounded
wait for blocks that have no live node. Route choice itself is the pure functions in swarm.routing."""
from __future__ import annotations

import asyncio
import logging
import random
import time

from client.config import ClientConfig
from client.transport import RemoteCallError
from swarm.dht import SwarmDHT
from swarm.routing import Hop, NoRouteError, choose_route, sample_route
from swarm.spans import ServerInfo, Span

log = logging.getLogger(__name__)


class Router:
    def __init__(self, dht: SwarmDHT, model: str, num_blocks: int, config: ClientConfig):
        self.dht, self.model, self.num_blocks, self.config = dht, model, num_blocks, config
        self._servers: list[ServerInfo] = []
        self._fetched_at = float("-inf")
        self._banned_until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self.rtt: dict[str, float] = {}  # node id -> smoothed seconds per exchange, measured by sessions
        self._rng = random.Random()

    async def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """The swarm as last read from the DHT (re-read when stale or asked to)."""
        if refresh or time.monotonic() - self._fetched_at > self.config.refresh_seconds:
            servers = await self.dht.fetch_servers(self.model, self.num_blocks)
            if self.config.adapter:  # only nodes that host the chosen adapter can serve us
                servers = [s for s in servers if self.config.adapter in s.adapters]
            self._servers = servers
            self._fetched_at = time.monotonic()
        return self._servers

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(n for n, until in self._banned_until.items() if until > now)

    async def route(self, span: Span, *, refresh: bool = False, spread: bool = False) -> list[Hop]:
        """A route over ``span``: lowest expected latency, or (``spread``) replicas drawn by throughput
        to share load. Waits up to ``config.max_wait`` seconds for missing blocks to reappear, then
        raises NoRouteError naming them."""
        deadline = time.monotonic() + self.config.max_wait
        attempt = 0
        while True:
            servers = await self.servers(refresh or attempt > 0)
            try:
                if spread:
                    return sample_route(servers, span, self._rng, exclude=self.banned())
                return choose_route(servers, span, rtt=self.rtt, exclude=self.banned())
            except NoRouteError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if attempt == 0:
                    log.warning("%s; waiting up to %.0fs for a node to appear", e, self.config.max_wait)
                await asyncio.sleep(min(left, self.backoff(attempt)))
                attempt += 1

    def ban(self, hop: Hop, error: RemoteCallError) -> None:
        """Avoid a node that failed; each repeat doubles the time (capped at 16x ``ban_seconds``)."""
        node = hop.server.node_id
        strikes = self._strikes[node] = self._strikes.get(node, 0) + 1
        seconds = self.config.ban_seconds * min(2 ** (strikes - 1), 16)
        self._banned_until[node] = time.monotonic() + seconds
        log.warning("avoiding node %s for %.0fs: %s", hop.server.address, seconds, error)

    def succeeded(self, hop: Hop, seconds: float) -> None:
        """Record a good exchange: forgive past strikes and update the node's latency estimate."""
        node = hop.server.node_id
        self._strikes.pop(node, None)
        self.rtt[node] = seconds if node not in self.rtt else 0.8 * self.rtt[node] + 0.2 * seconds

    def should_retry(self, error: RemoteCallError, attempt: int) -> bool:
        """Retry elsewhere only when the node (not the request) failed, a bounded number of times."""
        return not error.client_fault and attempt < self.config.max_retries

    @staticmethod
    def backoff(attempt: int) -> float:
        return min(0.1 * 2 ** attempt, 2.0)
