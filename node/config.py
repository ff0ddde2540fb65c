"""Node configuration: one flat dataclass; `node serve` flags map onto it one to one."""
from __future__ import annotations

import os
from dataclasses import dataclass

from swarm.spans import Span
from swarm.validator import MAX_RECORD_LIFETIME

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class NodeConfig:
    model: str  # local Hugging Face checkpoint directory, or a hub id when the hub is reachable
    blocks: Span | None = None  # blocks to host, half-open [start, end); None: choose with num_blocks
    num_blocks: int | None = None  # host this many blocks where the swarm is weakest (instead of blocks)
    initial_peers: tuple[str, ...] = ()  # multiaddrs of DHT peers to join; empty starts a new swarm
    host: str = "127.0.0.1"  # interface the gRPC server and the DHT peer listen on
    port: int = 0  # gRPC port; 0 picks a free one
    announce_host: str | None = None  # "host" or "host:port" clients should dial, if not host:port (e.g. 0.0.0.0)
    dht_port: int = 0  # DHT (libp2p) port; 0 picks a free one
    dtype: str = "float32"  # compute dtype of the blocks: float32 or bfloat16
    model_name: str | None = None  # name in the DHT model key; default: checkpoint dir name or hub id
    max_batch_tokens: int = 8192  # largest batch * sequence length accepted in one request
    ttl: float = 15.0  # seconds a DHT record lives unless the heartbeat (every ttl/3) refreshes it
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
    compute_threads: int = 1  # requests computed at once (torch uses its own intra-op threads too)
    cache_tokens: int | None = None  # inference cache slots (batch x max_length); None: half of free memory
    alloc_timeout: float = 10.0  # seconds a new session waits for cache room before RESOURCE_EXHAUSTED
    step_timeout: float = 60.0  # seconds an inference session may idle between steps before it is freed
    max_chunk_tokens: int = 1024  # batch x positions computed at once when prefilling a long prompt
    activation_cache_mb: int = 1024  # forward activations kept for the following backward (0: always recompute)
    adapters: str | None = None  # folder of PEFT LoRA adapter folders to serve by name (their span's weights only)
    throughput: float | None = None  # tokens/s to announce; None measures it at start
    rebalance_period: float | None = None  # with num_blocks: seconds between checks whether moving clearly helps
    nat_port_map: bool = False  # UPnP/NAT-PMP port mapping on the LAN gateway: explicit opt-in only
    swarm_key: str | None = None  # path of the swarm key file (`swarm keygen`): a private swarm; None: open

    def __post_init__(self) -> None:
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (e.g. 0:12) or num_blocks (automatic placement)")
        if self.blocks is not None and not isinstance(self.blocks, Span):
            raise TypeError(f"blocks must be a Span, got {type(self.blocks).__name__}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        for name in ("port", "dht_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if self.ttl <= 0 or self.shutdown_grace < 0 or self.compute_threads < 1:
            raise ValueError("ttl must be > 0, shutdown_grace >= 0 and compute_threads >= 1")
        if self.ttl > MAX_RECORD_LIFETIME:
            raise ValueError(f"ttl must be at most {MAX_RECORD_LIFETIME:g}s (the DHT's maximum record lifetime)")
        if self.swarm_key is not None and not isinstance(self.swarm_key, (str, os.PathLike)):
            raise TypeError(f"swarm_key must be a path string, got {type(self.swarm_key).__name__}")
        if self.cache_tokens is not None and self.cache_tokens < 1:
            raise ValueError(f"cache_tokens must be positive, got {self.cache_tokens}")
        if self.rebalance_period is not None and (self.num_blocks is None or self.rebalance_period <= 0):
            raise ValueError("rebalance_period needs num_blocks (automatic placement) and must be positive")
        if self.throughput is not None and not self.throughput > 0:
            raise ValueError(f"throughput must be positive, got {self.throughput}")
        if self.alloc_timeout < 0 or self.step_timeout <= 0 or self.max_chunk_tokens < 1:
            raise ValueError("alloc_timeout must be >= 0, step_timeout > 0 and max_chunk_tokens >= 1")
