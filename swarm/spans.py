"""Value types shared by nodes, clients and the DHT: half-open block spans and server descriptions."""
from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Blocks ``[start, end)`` of a model."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not (isinstance(self.start, int) and isinstance(self.end, int)) or isinstance(self.start, bool):
            raise TypeError(f"span bounds must be integers, got {self.start!r}:{self.end!r}")
        if not 0 <= self.start < self.end:
            raise ValueError(f"span {self.start}:{self.end} is empty or negative; expected 0 <= start < end")

    @classmethod
    def parse(cls, text: str) -> "Span":
        """Parse ``"A:B"`` (half-open), as given to ``node serve --blocks``."""
        parts = text.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"blocks must look like START:END (half-open, e.g. 0:12), got {text!r}")
        return cls(int(parts[0]), int(parts[1]))

    def __len__(self) -> int:
        return self.end - self.start

    def __contains__(self, block: object) -> bool:
        return isinstance(block, int) and self.start <= block < self.end

    def covers(self, other: "Span") -> bool:
        return self.start <= other.start and other.end <= self.end

    def __str__(self) -> str:
        return f"{self.start}:{self.end}"


class NodeState(str, enum.Enum):
    """Lifecycle announced in the DHT; clients route only through ONLINE nodes."""

    JOINING = "JOINING"
    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"


@dataclass(frozen=True)
class ServerInfo:
    """One node as announced in the DHT."""

    node_id: str  # peer id + owner public key marker: subkey of its records, signed by the node
    address: str  # gRPC address as host:port
    span: Span  # blocks the node hosts
    state: NodeState  # JOINING / ONLINE / OFFLINE
    throughput: float  # measured tokens per second through one block
    version: str  # swarmlm version of the node
    dtype: str  # compute dtype of the node's blocks
    adapters: tuple[str, ...] = ()  # names of LoRA adapters the node hosts (node serve --adapters)
    tls: bool = False  # the node serves gRPC over TLS (node serve --tls-cert): dial it with a secure channel
    weights: str = ""  # digest of the span's tensor hashes (swarm.identity.span_digest); "": not announced
    files: str = ""  # digest of the span's file hashes (swarm.identity, kind FILES); "": not announced
    wire: tuple[str, ...] = ()  # activation formats accepted besides float32 (bfloat16, float16, blockwise8)
    quantization: str = "none"  # how its frozen weights are stored: none, int8 or nf4 (node serve --quantize)
    chain: bool = False  # the node takes chained inference steps (pushes outputs to the next node: issue 16)
