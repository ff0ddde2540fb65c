"""The client's one routing object: the swarm view, the failure policy (client.policy: bans that grow on
repeat, backoff, retries) and a bounded wait for blocks that have no live node. Route choice itself is
the pure functions in swarm.routing.

A node that fails TLS authentication (TLSHandshakeError) is not a dead node: it is never used again
by this client, and when only such nodes serve some blocks, ``route`` raises that error at once
(naming the node and the reason) instead of waiting ``max_wait`` for a node and raising NoRouteError."""
from __future__ import annotations

import asyncio
import logging
import random
import time

from client.config import ClientConfig
from client.policy import Attempts, FailurePolicy, PolicyConfig
from client.transport import Connections, TLSHandshakeError, plaintext_refused
from swarm.dht import SwarmDHT
from swarm.directory import explain_missing
from swarm.routing import Hop, NoRouteError, choose_route, sample_route
from swarm.spans import NodeState, ServerInfo, Span

log = logging.getLogger(__name__)


class Router:
    def __init__(self, dht: SwarmDHT, model: str, num_blocks: int, config: ClientConfig,
                 connections: Connections | None = None):
        self.dht, self.model, self.num_blocks, self.config = dht, model, num_blocks, config
        self.connections = connections  # told which nodes speak TLS whenever the swarm is read
        self.policy = FailurePolicy(PolicyConfig(config.max_retries, config.ban_seconds, config.max_wait))
        self._untrusted = self.policy.untrusted  # node id -> why TLS authentication failed
        self._servers: list[ServerInfo] = []
        self._fetched_at = float("-inf")
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
        """Keep per-node memory bounded in a churning swarm (see FailurePolicy.forget_gone); latencies of
        nodes no longer announced are dropped too."""
        present = {s.node_id for s in servers}
        self.policy.forget_gone(present)
        for node in [n for n in self.rtt if n not in present]:
            del self.rtt[node]

    def banned(self) -> frozenset[str]:
        return self.policy.banned()

    def attempts(self) -> Attempts:
        """The attempt counter of one call (see client.policy)."""
        return self.policy.attempts()

    async def reroute(self, attempts: Attempts, span: Span, *, spread: bool = False) -> list[Hop]:
        """A fresh route over ``span`` after a failure, avoiding the call's busy or disputing nodes. When
        only those serve some blocks, their answer is the result (no waiting: they are alive)."""
        try:
            return await self.route(span, refresh=True, spread=spread, exclude=attempts.avoid,
                                    wait=not attempts.avoid)
        except NoRouteError:
            if attempts.refusal is not None:
                raise attempts.refusal from None
            raise

    async def route(self, span: Span, *, refresh: bool = False, spread: bool = False,
                    exclude: frozenset[str] = frozenset(), wait: bool = True) -> list[Hop]:
        """A route over ``span``: lowest expected latency, or (``spread``) replicas drawn by throughput
        to share load, avoiding banned nodes and ``exclude`` (node ids). Waits up to
        ``config.max_wait`` seconds (``wait``) for missing blocks to reappear, then raises NoRouteError
        naming them."""
        deadline = time.monotonic() + (self.config.max_wait if wait else 0.0)
        attempt, hint = 0, ""
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
                if attempt == 0 and not servers:  # nothing at all under our key: say why, if the DHT tells
                    hint = await explain_missing(self.dht, self.model, self.config.initial_peers)
                if deadline - time.monotonic() <= 0:
                    raise NoRouteError(e.missing, hint) from None
                if attempt == 0:
                    log.warning("%s; waiting up to %.0fs for a node to appear", NoRouteError(e.missing, hint),
                                self.config.max_wait)
                left = deadline - time.monotonic()
                await asyncio.sleep(min(left, self.policy.backoff(attempt)))
                attempt += 1

    def ban(self, hop: Hop, error: Exception, forever: bool = False) -> None:
        """Avoid a node (see FailurePolicy.ban)."""
        self.policy.ban(hop, error, forever)

    def succeeded(self, hop: Hop, seconds: float) -> None:
        """Record a good exchange: forgive past strikes and update the node's latency estimate."""
        node = hop.server.node_id
        self.policy.forgive(hop)
        self.rtt[node] = seconds if node not in self.rtt else 0.8 * self.rtt[node] + 0.2 * seconds

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
