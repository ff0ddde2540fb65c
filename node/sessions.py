"""Inference sessions on a node: cache admission (a token budget) and per-session state."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch

from node.requests import RequestError
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
                               f"this node's cache holds {self.capacity}")
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.free >= tokens), timeout)
            except asyncio.TimeoutError:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"no room for {tokens} cache tokens after waiting {timeout:g}s "
                                   f"({self.free} of {self.capacity} free); try later or another node") from None
            self.used += tokens

    async def release(self, tokens: int) -> None:
        async with self._changed:
            self.used -= tokens
            self._changed.notify_all()


@dataclass
class Session:
    span: Span  # blocks this session runs
    batch_size: int  # rows of every step
    max_length: int  # positions it may hold
    cache: Any  # transformers Cache with this session's keys/values
    mask: torch.Tensor = field(default_factory=lambda: torch.ones(0, 0, dtype=torch.int64))  # [batch, length]
    lora: Any = None  # the client's LoRA adapter applied at every step, if any

    @property
    def length(self) -> int:
        return self.mask.shape[1]
