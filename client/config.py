"""Client configuration: one flat dataclass, every field commented."""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]  # multiaddrs of DHT peers of the swarm
    model_name: str | None = None  # name in the DHT model key; default: checkpoint dir name or hub id
    request_timeout: float = 60.0  # seconds one Forward/Backward call may take
    max_retries: int = 3  # failed hops re-routed per call before giving up
    ban_seconds: float = 15.0  # a node that failed is avoided this long (doubling on repeats, up to 16x)
    max_wait: float = 30.0  # seconds to wait for blocks with no live node before raising NoRouteError
    refresh_seconds: float = 5.0  # the swarm view from the DHT is re-read when older than this
    adapter: str | None = None  # name of a node-hosted LoRA adapter to use; routes only use nodes hosting it
    max_step_tokens: int = 2048  # batch x positions per inference message; longer prompts go in pieces
    nat_port_map: bool = False  # UPnP/NAT-PMP port mapping on the LAN gateway: explicit opt-in only
    swarm_key: str | None = None  # path of the swarm key file of a private swarm (`swarm keygen`); None: open

    def __post_init__(self) -> None:
        if isinstance(self.initial_peers, str) or not all(isinstance(p, str) for p in self.initial_peers):
            raise TypeError("initial_peers must be a sequence of multiaddr strings")
        if not self.initial_peers:
            raise ValueError("initial_peers is empty: give at least one multiaddr of a swarm peer")
        if self.request_timeout <= 0 or self.max_retries < 0 or self.ban_seconds < 0 or self.max_step_tokens < 1 or self.max_wait < 0:
            raise ValueError("request_timeout and max_step_tokens must be > 0; max_retries, ban_seconds, max_wait >= 0")
        if self.swarm_key is not None and not isinstance(self.swarm_key, (str, os.PathLike)):
            raise TypeError(f"swarm_key must be the path of a key file, got {type(self.swarm_key).__name__}")
