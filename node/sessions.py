"""Inference sessions on a node: cache admission (a token budget) and per-session state."""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from node.blocks import SpanBlocks, inference_step
from node.lora import active
from node.requests import RequestError, Step
from swarm.spans import Span


def cache_bytes_per_token(config: Any, num_blocks: int, dtype: torch.dtype) -> int:
    """Key + value bytes one position of one sequence costs across ``num_blocks`` blocks."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size() * num_blocks


def default_cache_tokens(bytes_per_token: int, fraction: float = 0.5) -> int:
    """Token slots that fit in ``fraction`` of the memory available right now."""
    available = 8 << 30
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return max(1, int(available * fraction) // max(1, bytes_per_token))


@dataclass(eq=False)
class Holding:
    """One session's reservation: whose it is, how big, and whether the budget wants it back."""

    client: str  # see client_of
    tokens: int  # batch x max_length
    last_active: float = field(default_factory=time.monotonic)  # when its last message arrived
    busy: bool = False  # computing a step (never reclaimed then)
    reclaimed: asyncio.Event = field(default_factory=asyncio.Event)  # set: the session must end now

    def touch(self) -> None:
        self.last_active = time.monotonic()


class CacheBudget:
    """Cache slots counted in tokens (batch x max_length). A session waits for room up to a timeout.

    While a session waits, other clients' sessions in the way are reclaimed (told to end, so their
    clients retry elsewhere or replay): first those of clients holding more than ``client_share`` of the
    cache, even active ones between steps, then any idle for ``reclaim_idle`` seconds. One client alone may use the
    whole cache; while others hold or wait for room, its new sessions may not take it past its share.
    So a client that reserved everything cannot keep a normal session out by stepping now and then."""

    def __init__(self, capacity: int, client_share: float = 0.5, reclaim_idle: float = 2.0):
        if capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        if not 0 < client_share <= 1 or reclaim_idle <= 0:
            raise ValueError(f"client_share must be in (0, 1] and reclaim_idle > 0, got {client_share}, {reclaim_idle}")
        self.capacity, self.used = capacity, 0
        self.share = max(1, int(capacity * client_share))  # tokens one client may hold while others need room
        self.reclaim_idle = reclaim_idle
        self.holdings: list[Holding] = []
        self._waiting: dict[str, int] = {}  # client -> sessions waiting for room
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def held(self, client: str) -> int:
        return sum(h.tokens for h in self.holdings if h.client == client)

    def _others(self, client: str) -> bool:
        return any(h.client != client for h in self.holdings) or any(c != client for c in self._waiting)

    async def reserve(self, tokens: int, timeout: float, client: str = "") -> Holding:
        if tokens > self.capacity:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a session of {tokens} cache tokens (batch x max_length) can never fit: "
                               f"this node's cache holds {self.capacity}", reason="cache_too_small")
        async with self._changed:
            if self._others(client) and self.held(client) + tokens > self.share:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"client {client} holds {self.held(client)} of this node's {self.capacity} cache "
                                   f"tokens; while others use it one client may hold {self.share}; try another node",
                                   reason="client_share")
            self._waiting[client] = self._waiting.get(client, 0) + 1
            try:
                await self._wait_for_room(tokens, timeout, client)
            finally:
                self._waiting[client] -= 1
                if not self._waiting[client]:
                    del self._waiting[client]
            holding = Holding(client, tokens)
            self.holdings.append(holding)
            self.used += tokens
            return holding

    async def _wait_for_room(self, tokens: int, timeout: float, client: str) -> None:
        """Until ``tokens`` are free (reclaiming sessions in the way), or RESOURCE_EXHAUSTED after ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.free < tokens:
            self._reclaim(tokens - self.free, client)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"no room for {tokens} cache tokens after waiting {timeout:g}s "
                                   f"({self.free} of {self.capacity} free); try later or another node",
                                   reason="cache_full")
            with contextlib.suppress(asyncio.TimeoutError):  # wake up now and then: sessions become idle
                await asyncio.wait_for(self._changed.wait(), min(left, 0.25))

    def _reclaim(self, need: int, waiter: str) -> None:
        """Tell sessions of other clients to end until ``need`` tokens will be free for ``waiter``: those of
        clients over their share first, then idle ones. (A client's own sessions never give way to each other.)"""
        need -= sum(h.tokens for h in self.holdings if h.reclaimed.is_set())  # already on their way out
        now = time.monotonic()
        over = {h.client for h in self.holdings if self.held(h.client) > self.share}
        candidates = [h for h in self.holdings if h.client != waiter and not h.busy and not h.reclaimed.is_set()
                      and (h.client in over or now - h.last_active >= self.reclaim_idle)]
        for h in sorted(candidates, key=lambda h: (h.client not in over, h.last_active)):
            if need <= 0:
                return
            h.reclaimed.set()
            need -= h.tokens

    async def release(self, holding: Holding) -> None:
        async with self._changed:
            self.holdings.remove(holding)
            self.used -= holding.tokens
            self._changed.notify_all()


def client_of(peer: str) -> str:
    """Who a call comes from, for per-client limits: the host of grpc's ``context.peer()``.

    "ipv4:10.0.0.5:51234" -> "10.0.0.5"; an IPv6 host counts as its /64 network ("ipv6:[2001:db8::7]:5"
    -> "2001:db8::/64"), since one machine can pick any address in its /64. Not the swarm key: every
    member of a private swarm holds the same key, so it cannot tell clients apart. Clients behind one
    NAT share a limit. Anything unparsable (e.g. "unix:...") is its own client, verbatim.
    """
    kind, _, rest = peer.partition(":")
    host = rest.rpartition(":")[0].strip("[]") if kind in ("ipv4", "ipv6") else ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return peer
    if address.version == 6 and not address.is_loopback:
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class ClientSessions:
    """Inference streams open at once per client (see ``client_of``), counted from the moment a stream
    starts, before its open message: waiting for cache room or for the open message counts too. So
    one client cannot squat the cache or the node's stream slots with many sessions; its sessions are
    also reclaimed when idle (the step timeout)."""

    def __init__(self, max_per_client: int, what: str = "inference sessions"):
        """``what``: what is counted, as refusals name it."""
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be positive, got {max_per_client}")
        self.max_per_client, self.what = max_per_client, what
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        """Count one more stream of ``client``, or RESOURCE_EXHAUSTED if it has its maximum open."""
        if self._open.get(client, 0) >= self.max_per_client:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"client {client} already has {self.max_per_client} {self.what} open on "
                               f"this node (its limit per client); close one first", reason="client_limit")
        self._open[client] = self._open.get(client, 0) + 1

    def release(self, client: str) -> None:
        left = self._open.get(client, 0) - 1
        if left > 0:
            self._open[client] = left
        else:
            self._open.pop(client, None)

    def count(self, client: str) -> int:
        return self._open.get(client, 0)

    def __len__(self) -> int:
        """Clients with a stream open."""
        return len(self._open)


@dataclass
class Session:
    span: Span  # blocks this session runs
    batch_size: int  # rows of every step
    max_length: int  # positions it may hold
    cache: Any  # transformers Cache with this session's keys/values
    mask: torch.Tensor = field(default_factory=lambda: torch.ones(0, 0, dtype=torch.int64))  # [batch, length]
    lora: Any = None  # the client's LoRA adapter applied at every step, if any
    computed: int = 0  # positions computed so far, dropped draft positions included

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def run_step(blocks: SpanBlocks, session: Session, step: Step, max_chunk_tokens: int) -> torch.Tensor:
    """One parsed step of ``session``: drop rejected drafts, reorder rows for beams, then append the new
    positions to the cache (with the session's LoRA adapter applied) and return their outputs."""
    if step.drop:  # assisted decoding: forget the rejected draft positions
        session.cache.crop(-step.drop)
        session.mask = session.mask[:, :-step.drop]
    if step.reorder is not None:  # beam search: every row continues from the beam it was chosen from
        session.cache.reorder_cache(step.reorder)
        session.mask = session.mask[step.reorder]
    full_mask = torch.cat([session.mask, step.mask], dim=1)
    with active(session.lora):
        out = inference_step(blocks, session.span, session.cache, step.hidden, full_mask, step.positions,
                             max_chunk_tokens)
    session.mask = full_mask
    return out.to(step.hidden.dtype)
