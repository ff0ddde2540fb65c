"""The client's one routing object: the swarm view, bans that grow on repeat, backoff, and a bounded
wait for blocks that have no live node. Route choice itself is the pure functions in swarm.routing.

A node that fails TLS authentication (TLSHandshakeError) is not a dead node: it is never used again
by this client, and when only such nodes serve some blocks, ``route`` raises that error at once
(naming the node and the reason) instead of waiting ``max_wait`` for a node and raising NoRouteError."""
from __future__ import annotations

import asyncio
import logging
import math
import random
import time

from client.config import ClientConfig
from client.transport import Connections, RemoteCallError, TLSHandshakeError, plaintext_refused
from swarm.dht import SwarmDHT
from swarm.routing import Hop, NoRouteError, choose_route, sample_route
from swarm.spans import NodeState, ServerInfo, Span

log = logging.getLogger(__name__)
MAX_REMEMBERED = 4096  # banned / untrusted node ids kept at most (the oldest are forgotten first)


class Router:
    def __init__(self, dht: SwarmDHT, model: str, num_blocks: int, config: ClientConfig,
                 connections: Connections | None = None):
        self.dht, self.model, self.num_blocks, self.config = dht, model, num_blocks, config
        self.connections = connections  # told which nodes speak TLS whenever the swarm is read
        self._untrusted: dict[str, TLSHandshakeError] = {}  # node id -> why TLS authentication failed
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
            if self.config.tls_ca is not None:  # TLS required: plaintext nodes are never dialed
                for s in servers:
                    if not s.tls:
                        self._untrusted.setdefault(s.node_id, plaintext_refused(s.address, self.config.tls_ca))
            if self.connections is not None:
                self.connections.learn(servers)
            self._forget_gone(servers)
            self._servers = servers
            self._fetched_at = time.monotonic()
        return self._servers

    def _forget_gone(self, servers: list[ServerInfo]) -> None:
        """Keep per-node memory bounded in a churning swarm: strikes, latencies and expired bans of
        nodes that are no longer announced are dropped; bans for good and TLS refusals are kept
        (a node may come back under the same id), the oldest beyond MAX_REMEMBERED."""
        present, now = {s.node_id for s in servers}, time.monotonic()
        for node in [n for n, until in self._banned_until.items() if until <= now and n not in present]:
            del self._banned_until[node]
        for memory in (self._strikes, self.rtt):
            for node in [n for n in memory if n not in present and n not in self._banned_until]:
                del memory[node]
        for memory in (self._banned_until, self._untrusted):
            while len(memory) > MAX_REMEMBERED:
                memory.pop(next(iter(memory)))

    def banned(self) -> frozenset[str]:
        now = time.monotonic()
        return frozenset(n for n, until in self._banned_until.items() if until > now) | frozenset(self._untrusted)

    async def route(self, span: Span, *, refresh: bool = False, spread: bool = False,
                    exclude: frozenset[str] = frozenset(), wait: bool = True) -> list[Hop]:
        """A route over ``span``: lowest expected latency, or (``spread``) replicas drawn by throughput
        to share load, avoiding banned nodes and ``exclude`` (node ids). Waits up to
        ``config.max_wait`` seconds (``wait``) for missing blocks to reappear, then raises NoRouteError
        naming them."""
        deadline = time.monotonic() + (self.config.max_wait if wait else 0.0)
        attempt = 0
        while True:
            servers = await self.servers(refresh or attempt > 0)
            try:
                if spread:
                    return sample_route(servers, span, self._rng, exclude=self.banned() | exclude)
                return choose_route(servers, span, rtt=self.rtt, exclude=self.banned() | exclude)
            except NoRouteError as e:
                untrusted = self._untrusted_cause(servers, e.missing)
                if untrusted is not None:
                    raise untrusted from e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                if attempt == 0:
                    log.warning("%s; waiting up to %.0fs for a node to appear", e, self.config.max_wait)
                await asyncio.sleep(min(left, self.backoff(attempt)))
                attempt += 1

    def ban(self, hop: Hop, error: Exception, forever: bool = False) -> None:
        """Avoid a node that failed; each repeat doubles the time (capped at 16x ``ban_seconds``).
        ``forever``: for this client's lifetime (a node caught computing wrong results)."""
        node = hop.server.node_id
        if isinstance(error, TLSHandshakeError):
            self._untrusted[node] = error
            log.warning("not using node %s: %s", hop.server.address, error)
            return
        if self._banned_until.get(node) == math.inf:
            return
        strikes = self._strikes[node] = self._strikes.get(node, 0) + 1
        seconds = math.inf if forever else self.config.ban_seconds * min(2 ** (strikes - 1), 16)
        self._banned_until[node] = time.monotonic() + seconds
        log.warning("avoiding node %s %s: %s", hop.server.address, "for good" if forever else f"for {seconds:.0f}s",
                    error)

    def succeeded(self, hop: Hop, seconds: float) -> None:
        """Record a good exchange: forgive past strikes and update the node's latency estimate."""
        node = hop.server.node_id
        self._strikes.pop(node, None)
        self.rtt[node] = seconds if node not in self.rtt else 0.8 * self.rtt[node] + 0.2 * seconds

    def should_retry(self, error: RemoteCallError, attempt: int) -> bool:
        """Retry elsewhere only when the node (not the request) failed, a bounded number of times; after
        a failed TLS authentication always (``route`` raises it if no trusted node is left)."""
        if isinstance(error, TLSHandshakeError):
            return True
        return not error.client_fault and attempt < self.config.max_retries

    def _untrusted_cause(self, servers: list[ServerInfo], missing: list[int]) -> TLSHandshakeError | None:
        """When every missing block is served (ONLINE) by nodes that failed TLS authentication only: why."""
        causes: dict[int, TLSHandshakeError] = {}
        for s in servers:
            if s.node_id in self._untrusted and s.state is NodeState.ONLINE:
                for block in missing:
                    if block in s.span:
                        causes.setdefault(block, self._untrusted[s.node_id])
        if not missing or any(block not in causes for block in missing):
            return None
        first = causes[missing[0]]
        return TLSHandshakeError(first.address, first.reason)  # a fresh one each time it is raised

    @staticmethod
    def backoff(attempt: int) -> float:
        return min(0.1 * 2 ** attempt, 2.0)
