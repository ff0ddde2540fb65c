"""The client's one routing object: the swarm view, the failure policy (client.policy: bans that grow on
repeat, backoff, retries) and a bounded wait for blocks that have no live node. Route choice itself is
the pure functions in swarm.routing.

A node that fails TLS authentication (TLSHandshakeError) is not a dead node: it is never used again
by this client, and when only such nodes serve some blocks, ``route`` raises that error at once
(naming the node and the reason) instead of waiting ``max_wait`` for a node and raising NoRouteError.

What a record claims is not what routes are chosen by: the Router times every exchange with every node
(work per second, see ``observe``) and ranks nodes by what it believes (swarm.routing.believed_throughput:
observations over claims, claims capped relative to peers). Before a node is used for the first time it is
probed (an Info call with a short deadline, all of a route's new nodes at once): one that refuses the
connection or does not answer is banned at once and another route is chosen, without using up the call's
retries. So records pointing at dead addresses with huge throughputs cost a few quick probes, not the call."""
from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import deque

import grpc

from client.config import ClientConfig
from client.metrics import ClientMetrics
from client.policy import Attempts, FailurePolicy, PolicyConfig
from client.transport import Connections, RemoteCallError, TLSHandshakeError, plaintext_refused
from proto import swarmlm_pb2 as pb
from swarm.dht import SwarmDHT
from swarm.directory import explain_missing
from swarm.identity import WeightsCheck
from swarm.routing import Hop, NoRouteError, believed_throughput, choose_route, sample_route
from swarm.spans import NodeState, ServerInfo, Span

log = logging.getLogger(__name__)

PROBE_SECONDS = 2.0  # deadline of the Info call that checks a node is alive before its first use
MAX_PROBE_ROUNDS = 16  # routes re-chosen per call after probes failed, before giving up on probing
SPEED_SAMPLES = 8  # a node's speed is the median of this many latest exchanges
PROBE_BATCH = 16  # nodes probed at once (a route's new nodes and the likeliest replacements)


class Router:
    def __init__(self, dht: SwarmDHT, model: str, num_blocks: int, config: ClientConfig,
                 connections: Connections | None = None, weights: WeightsCheck | None = None):
        self.dht, self.model, self.num_blocks, self.config = dht, model, num_blocks, config
        self.weights = weights  # None: no identity check
        self.other_weights: list[ServerInfo] = []  # nodes of the last read announcing other weights: never used
        self.connections = connections  # told which nodes speak TLS whenever the swarm is read
        self.metrics = ClientMetrics()  # served over HTTP with config.metrics_port (see RemoteChain)
        self.policy = FailurePolicy(PolicyConfig(config.max_retries, config.ban_seconds, config.max_wait),
                                    on_ban=self.metrics.banned, on_retry=self.metrics.retried)
        self._untrusted = self.policy.untrusted  # node id -> why TLS authentication failed
        self._servers: list[ServerInfo] = []
        self._fetched_at = float("-inf")
        self.rtt: dict[str, float] = {}  # node id -> smoothed seconds per exchange, measured by sessions
        self._speeds: dict[str, deque[float]] = {}  # node id -> tokens x blocks per second of its latest exchanges
        self._alive: set[str] = set()  # node ids that answered a probe or a call (not probed again)
        self._rng = random.Random()

    async def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """The swarm as last read from the DHT (re-read when stale or asked to)."""
        if refresh or time.monotonic() - self._fetched_at > self.config.refresh_seconds:
            servers = await self.dht.fetch_servers(self.model, self.num_blocks)
            if self.weights is not None:  # a node serving other weights under this name is never used
                servers, self.other_weights = self.weights.split(servers)
                for s in self.other_weights:
                    self.weights.warn_once(s)
            if self.config.adapter:  # only nodes that host the chosen adapter can serve us
                servers = [s for s in servers if self.config.adapter in s.adapters]
            if self.config.quantization != "any":  # unquantized nodes only, unless asked for others
                servers = [s for s in servers if s.quantization == self.config.quantization]
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
        for memory in (self.rtt, self._speeds):
            for node in [n for n in memory if n not in present]:
                del memory[node]
        self._alive &= present

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
                return await self._probed_route(servers, span, spread, exclude)
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

    def _pick(self, servers: list[ServerInfo], span: Span, spread: bool, exclude: frozenset[str]) -> list[Hop]:
        excluded = self.banned() | exclude
        believed = None if self.config.believe_claims else self.believed([s for s in servers if s.node_id not in excluded])
        if spread:
            return sample_route(servers, span, self._rng, exclude=excluded, throughput=believed)
        return choose_route(servers, span, rtt=self.rtt, exclude=excluded, throughput=believed)

    async def _probed_route(self, servers: list[ServerInfo], span: Span, spread: bool,
                            exclude: frozenset[str]) -> list[Hop]:
        """A route whose nodes all answered this client before (or a probe now); nodes that fail their probe
        are banned and the route chosen again (NoRouteError when that leaves blocks bare)."""
        for _ in range(MAX_PROBE_ROUNDS):
            route = self._pick(servers, span, spread, exclude)
            new = [hop for hop in route if hop.server.node_id not in self._alive]
            if self.connections is None or not new:
                return route
            failures = await asyncio.gather(*(self._probe(s) for s in self._probe_batch(servers, new, exclude)))
            if not any(failures):
                return route
        return self._pick(servers, span, spread, exclude)

    def _probe_batch(self, servers: list[ServerInfo], new: list[Hop], exclude: frozenset[str]) -> list[ServerInfo]:
        """The new hops' nodes, plus other nodes never probed that could replace them (highest claims first,
        PROBE_BATCH in all): a flood of dead records costs a few rounds of parallel probes, not one each."""
        skip = self.banned() | exclude | self._alive | {hop.server.node_id for hop in new}
        others = [s for s in servers if s.state is NodeState.ONLINE and s.node_id not in skip
                  and any(s.span.start < hop.span.end and hop.span.start < s.span.end for hop in new)]
        others.sort(key=lambda s: -s.throughput)
        return [hop.server for hop in new] + others[:max(0, PROBE_BATCH - len(new))]

    async def _probe(self, server: ServerInfo) -> bool:
        """Call Info on a node not used yet; ban it if it fails. Returns whether it failed."""
        hop = Hop(server, server.span)
        try:
            await self.connections.stub(server.address).Info(pb.InfoRequest(), timeout=PROBE_SECONDS)
        except grpc.aio.AioRpcError as e:
            self.ban(hop, self.connections.error(server.address, e.code(), e.details() or ""))
            return True
        except RemoteCallError as e:  # e.g. TLS required and the node speaks none
            self.ban(hop, e)
            return True
        self._alive.add(server.node_id)  # (its round trip is not a step's: rtt is left to real exchanges)
        return False

    def believed(self, servers: list[ServerInfo]) -> dict[str, float]:
        """Node id -> the throughput this client believes (see swarm.routing.believed_throughput)."""
        observed = {node: statistics.median(speeds) for node, speeds in self._speeds.items() if speeds}
        return believed_throughput(servers, observed)

    def observe(self, hop: Hop, tokens: int, seconds: float) -> None:
        """A successful exchange moved ``tokens`` (batch x positions) through ``hop``'s blocks in ``seconds``
        of wall time (round trip included): what this client believes of the node's speed is the median of
        its latest SPEED_SAMPLES such figures (one stall does not condemn a node, one lucky call does not
        crown it). The first exchange with a node does not count: it pays the node's cold start."""
        node = hop.server.node_id
        self._alive.add(node)
        if node not in self._speeds:
            self._speeds[node] = deque(maxlen=SPEED_SAMPLES)
            return
        self._speeds[node].append(tokens * len(hop.span) / max(seconds, 1e-6))

    def ban(self, hop: Hop, error: Exception, forever: bool = False) -> None:
        """Avoid a node (see FailurePolicy.ban)."""
        self.policy.ban(hop, error, forever)

    def succeeded(self, hop: Hop, seconds: float, tokens: int = 0) -> None:
        """Record a good exchange (of ``tokens``, batch x positions): forgive past strikes, update the node's
        latency and speed estimates."""
        node = hop.server.node_id
        self.policy.forgive(hop)
        self._alive.add(node)
        self.rtt[node] = seconds if node not in self.rtt else 0.8 * self.rtt[node] + 0.2 * seconds
        if tokens:
            self.observe(hop, tokens, seconds)

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
