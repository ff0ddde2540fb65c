"""The client's one failure policy: what a failed call means, and what to do next.

Every loop that talks to nodes (batch forward, backward, session open, inference step, history replay)
asks the same ``FailurePolicy`` through a per-call ``Attempts``: it decides whether to give up, ban the
node and back off, or just try another replica (a busy node), and it owns the ban table. The Router
owns the policy; route choice itself is the pure functions in swarm.routing.

A node's claim that a request was bad (INVALID_ARGUMENT and the other "your fault" statuses) is not
believed on its word: the client knows its requests are well formed, so the same request goes to another
node serving those blocks first. Only when a second node refuses it too is it the caller's mistake; when
the second node accepts it, the first one lied and is banned.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc

from client.transport import RemoteCallError, TLSHandshakeError
from swarm.routing import Hop

log = logging.getLogger(__name__)

MAX_BAN_FACTOR = 16  # a node's ban doubles on each repeat failure, up to this many times ban_seconds
MAX_REMEMBERED = 4096  # bans for good and TLS refusals kept at most (oldest forgotten first)
BUSY = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED})  # alive and honest, only without room for us now


class Verdict(enum.Enum):
    RAISE = "raise"  # give the error to the caller: the request's fault, or attempts used up
    BAN = "ban"  # the node failed: avoid it for a while, back off, try another route
    ELSEWHERE = "elsewhere"  # the node is busy or disputes the request: try another node, no ban (yet)


@dataclass(frozen=True)
class PolicyConfig:
    """What the policy needs from ClientConfig."""

    max_retries: int  # failed hops re-routed per call before giving up
    ban_seconds: float  # first ban; doubles on each repeat, up to MAX_BAN_FACTOR times
    max_wait: float  # seconds to wait for blocks with no live node


class FailurePolicy:
    """Decisions about failures, and the bans they lead to (node id -> until when)."""

    def __init__(self, config: PolicyConfig, clock=time.monotonic,
                 on_ban: Callable[[bool], None] | None = None, on_retry: Callable[[str], None] | None = None):
        """``on_ban(forever)`` and ``on_retry(verdict value)``: told of each ban and each retry (metrics)."""
        self.config, self._clock = config, clock
        self.on_ban, self.on_retry = on_ban, on_retry
        self._banned_until: dict[str, float] = {}
        self._strikes: dict[str, int] = {}
        self.untrusted: dict[str, TLSHandshakeError] = {}  # node id -> why TLS authentication failed

    # ---- decisions ---------------------------------------------------------------------------
    def verdict(self, error: RemoteCallError, attempt: int, disputed: bool) -> Verdict:
        """What ``error`` on the ``attempt``-th try (0-based) of a call means. ``disputed``: a node has
        already called this request bad (this answer decides whether it was)."""
        if isinstance(error, TLSHandshakeError):
            return Verdict.BAN  # unusable to us; route() raises it when no trusted node is left
        if attempt >= self.config.max_retries:
            return Verdict.RAISE
        if error.client_fault:
            if error.code in BUSY:
                return Verdict.ELSEWHERE
            return Verdict.RAISE if disputed else Verdict.ELSEWHERE
        return Verdict.BAN

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds to wait before the next try after a node failed (0.1 s doubling, at most 2 s)."""
        return min(0.1 * 2 ** attempt, 2.0)

    # ---- bans --------------------------------------------------------------------------------
    def ban(self, hop: Hop, error: Exception, forever: bool = False) -> None:
        """Avoid a node that failed; each repeat doubles the time (capped). ``forever``: for this client's
        lifetime (a node caught computing wrong results or lying about requests)."""
        node = hop.server.node_id
        if isinstance(error, TLSHandshakeError):
            self.untrusted[node] = error
            log.warning("not using node %s: %s", hop.server.address, error)
            return
        if self._banned_until.get(node) == math.inf:
            return
        strikes = self._strikes[node] = self._strikes.get(node, 0) + 1
        seconds = math.inf if forever else self.config.ban_seconds * min(2 ** (strikes - 1), MAX_BAN_FACTOR)
        self._banned_until[node] = self._clock() + seconds
        if self.on_ban is not None:
            self.on_ban(forever)
        log.warning("avoiding node %s %s: %s", hop.server.address, "for good" if forever else f"for {seconds:.0f}s",
                    error)

    def forgive(self, hop: Hop) -> None:
        """A good exchange: past strikes no longer lengthen the next ban."""
        self._strikes.pop(hop.server.node_id, None)

    def banned(self) -> frozenset[str]:
        """Node ids not to use now (banned, or failed TLS authentication). Expired bans are dropped, so the
        table holds only nodes still banned (plus the strikes of nodes that failed and never succeeded)."""
        now = self._clock()
        for node in [n for n, until in self._banned_until.items() if until <= now]:
            del self._banned_until[node]
        return frozenset(self._banned_until) | frozenset(self.untrusted)

    def forget_gone(self, present: set[str]) -> None:
        """Keep per-node memory bounded in a churning swarm: strikes and expired bans of nodes no longer
        announced are dropped; bans for good and TLS refusals are kept (a node may come back under the same
        id), the oldest beyond MAX_REMEMBERED."""
        now = self._clock()
        for node in [n for n, until in self._banned_until.items() if until <= now and n not in present]:
            del self._banned_until[node]
        for node in [n for n in self._strikes if n not in present and n not in self._banned_until]:
            del self._strikes[node]
        for memory in (self._banned_until, self.untrusted):
            while len(memory) > MAX_REMEMBERED:
                memory.pop(next(iter(memory)))

    def attempts(self) -> "Attempts":
        """A fresh attempt counter for one call."""
        return Attempts(self)


@dataclass
class Attempts:
    """The tries of one call. After a failure, ``await failed(hop, error)`` applies the policy: it raises
    ``error`` when the call should give up, else bans and backs off (a failed node) or only notes the
    node to avoid (``avoid``: busy, or disputing the request). After a success, ``succeeded(hop)``."""

    policy: FailurePolicy
    number: int = 0
    avoid: frozenset[str] = frozenset()  # busy or disputing node ids not to retry with in this call (not banned)
    refusal: RemoteCallError | None = None  # the latest busy / dispute answer: raised if nobody else can serve
    disputed_by: list[tuple[Hop, RemoteCallError]] = field(default_factory=list)  # said "your request is bad"

    async def failed(self, hop: Hop, error: RemoteCallError) -> Verdict:
        # a refusal corroborates an earlier one only from another machine (one attacker's many node ids at
        # one address cannot outvote the request)
        host = _host(hop.server.address)
        disputed = any(_host(other.server.address) != host for other, _ in self.disputed_by)
        verdict = self.policy.verdict(error, self.number, disputed=disputed)
        if verdict is Verdict.RAISE:
            raise error
        self.number += 1
        if self.policy.on_retry is not None:
            self.policy.on_retry(verdict.value)
        if verdict is Verdict.ELSEWHERE:
            self.avoid |= {hop.server.node_id}
            self.refusal = error
            if error.code not in BUSY:
                self.disputed_by.append((hop, error))
                log.info("node %s refused a request (%s); asking another node", hop.server.address, error.code.name)
            return verdict
        self.policy.ban(hop, error)
        await asyncio.sleep(self.policy.backoff(self.number - 1))
        return verdict

    def succeeded(self, hop: Hop) -> None:
        """The request went through at ``hop``: whoever called it bad was wrong (a request means the same to
        every node serving those blocks). INVALID_ARGUMENT is about the request alone, so its sender lied and
        is banned for good; other refusals (a span a node no longer hosts, a limit of its own) get a plain ban."""
        self.policy.forgive(hop)
        for other, error in self.disputed_by:
            if other.server.node_id != hop.server.node_id:
                lied = error.code == grpc.StatusCode.INVALID_ARGUMENT
                self.policy.ban(other, RemoteCallError(other.server.address, error.code,
                                                       f"refused a request another node served ({error.message})"),
                                forever=lied)
        self.disputed_by.clear()


def _host(address: str) -> str:
    return address.rpartition(":")[0]
