"""Inference sessions on a node: cache admission (a token budget) and per-session state."""
from __future__ import annotations

import asyncio
import ipaddress
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


class CacheBudget:
    """Cache slots counted in tokens (batch x max_length). A session waits for room up to a timeout."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"cache capacity must be positive, got {capacity}")
        self.capacity, self.used = capacity, 0
        self._changed = asyncio.Condition()

    @property
    def free(self) -> int:
        return self.capacity - self.used

    async def reserve(self, tokens: int, timeout: float) -> None:
        if tokens > self.capacity:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"a session of {tokens} cache tokens (batch x max_length) can never fit: "
                               f"this node's cache holds {self.capacity}", reason="cache_too_small")
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= tokens), timeout)
            except asyncio.TimeoutError:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"no room for {tokens} cache tokens after waiting {timeout:g}s "
                                   f"({self.free} of {self.capacity} free); try later or another node",
                                   reason="cache_full") from None
            self.used += tokens

    async def release(self, tokens: int) -> None:
        async with self._changed:
            self.used -= tokens
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

    def __init__(self, max_per_client: int):
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be positive, got {max_per_client}")
        self.max_per_client = max_per_client
        self._open: dict[str, int] = {}

    def acquire(self, client: str) -> None:
        """Count one more stream of ``client``, or RESOURCE_EXHAUSTED if it has its maximum open."""
        if self._open.get(client, 0) >= self.max_per_client:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"client {client} already has {self.max_per_client} inference sessions open on "
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
