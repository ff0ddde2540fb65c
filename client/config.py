"""Client configuration: one flat dataclass, every field commented."""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Sequence

QUANTIZATION_CHOICES = ("none", "int8", "nf4", "any")  # ClientConfig.quantization: which nodes routes may use


@dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...] = ()  # multiaddrs of DHT peers of the swarm (needed to join, unless lan)
    model_name: str | None = None  # name in the DHT model key; default: checkpoint dir name or hub id
    request_timeout: float = 60.0  # seconds one Forward/Backward call may take
    max_retries: int = 3  # failed hops re-routed per call before giving up
    ban_seconds: float = 15.0  # a node that failed is avoided this long (doubling on repeats, up to 16x)
    max_wait: float = 30.0  # seconds to wait for blocks with no live node before raising NoRouteError
    refresh_seconds: float = 5.0  # the swarm view from the DHT is re-read when older than this
    adapter: str | None = None  # name of a node-hosted LoRA adapter to use; routes only use nodes hosting it
    quantization: str = "none"  # nodes routed through: none (unquantized only), int8 or nf4 (only those), any
    max_step_tokens: int = 2048  # batch x positions per inference message; longer prompts go in pieces
    nat_port_map: bool = False  # UPnP/NAT-PMP port mapping on the LAN gateway: explicit opt-in only
    max_message_mb: int = 1024  # largest gRPC message sent to or accepted from a node, MiB
    lan: bool = False  # with no initial_peers: find them by listening for LAN multicast announcements (opt-in)
    lan_timeout: float = 5.0  # seconds to listen for LAN announcements before giving up
    swarm_key: str | None = None  # path of the swarm key file of a private swarm (`swarm keygen`); None: open
    tls_ca: str | None = None  # CA certificate (PEM, `swarm tls-cert`) of the swarm's nodes: only TLS nodes it signed are used
    verify_fraction: float = 0.0  # fraction of span computations re-run on another node serving them and compared
    verify_tolerance: float | None = None  # largest relative difference still agreeing; None: 1e-3, 0.05 with bfloat16 or int8 vs float (client.verify)
    believe_claims: bool = False  # rank nodes by the throughput they announce, as given (every member trusted); default: by what this client measured
    metrics_port: int | None = None  # port of this client's Prometheus metrics endpoint (HTTP); None: off; 0 picks one
    metrics_host: str = "127.0.0.1"  # interface the metrics endpoint listens on
    wire_dtype: str | None = None  # activations to and from nodes as float32, bfloat16 or float16; None: as computed
    # (16-bit when the client computes in 16-bit); a 16-bit wire from float32 rounds what nodes see (opt-in)
    chained_steps: bool = True  # inference steps travel node to node (client -> node 1 -> node 2 -> ... -> client:
    # hops + 1 one-way delays per token instead of 2 x hops) when every node of the route announces it; per hop
    # otherwise, and always with verify_fraction > 0 (client.chained)
    train_wire: str | None = None  # training traffic (activations of a forward that a backward follows, and its
    # gradients): "blockwise8" (int8, one absmax scale per 64 values) or a wire_dtype value; None: as wire_dtype
    backward_by_token: bool = True  # a Backward names the activations its node kept (when the node offers it)
    # instead of sending the hop's inputs again; False: always send them (the node still skips the recompute)
    micro_batches: int = 1  # a batch's rows go through the swarm in this many micro-batches, as a pipeline (hop 1
    # computes micro-batch i+1 while hop 2 computes i, backward too; batches of fewer rows: one row each); 1: whole

    def wire(self, training: bool) -> str | None:
        """The format activations should travel in (nodes that do not announce it get them as computed)."""
        return self.train_wire if training and self.train_wire is not None else self.wire_dtype

    def __post_init__(self) -> None:
        if isinstance(self.initial_peers, str) or not all(isinstance(p, str) for p in self.initial_peers):
            raise TypeError("initial_peers must be a sequence of multiaddr strings")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise ValueError(f"micro_batches must be a whole number >= 1 (1: no split), got {self.micro_batches!r}")
        if self.lan_timeout <= 0:
            raise ValueError(f"lan_timeout must be positive, got {self.lan_timeout}")
        if self.request_timeout <= 0 or self.max_retries < 0 or self.ban_seconds < 0 or self.max_step_tokens < 1 or self.max_wait < 0:
            raise ValueError("request_timeout and max_step_tokens must be > 0; max_retries, ban_seconds, max_wait >= 0")
        if self.swarm_key is not None and not isinstance(self.swarm_key, (str, os.PathLike)):
            raise TypeError(f"swarm_key must be the path of a key file, got {type(self.swarm_key).__name__}")
        if self.tls_ca is not None and not isinstance(self.tls_ca, (str, os.PathLike)):
            raise TypeError(f"tls_ca must be the path of a CA certificate file, got {type(self.tls_ca).__name__}")
        if not 1 <= self.max_message_mb < 2048:
            raise ValueError(f"max_message_mb must be in 1..2047 (gRPC's limit is 2 GiB), got {self.max_message_mb}")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r}")
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        if self.verify_tolerance is not None and not self.verify_tolerance >= 0:
            raise ValueError(f"verify_tolerance must be >= 0, got {self.verify_tolerance}")
        if self.wire_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(f"wire_dtype must be float32, bfloat16, float16 or None, got {self.wire_dtype!r}")
        if self.train_wire not in (None, "float32", "bfloat16", "float16", "blockwise8"):
            raise ValueError(f"train_wire must be blockwise8, float32, bfloat16, float16 or None, got {self.train_wire!r}")
        rounded = {self.wire_dtype, self.train_wire} - {None, "float32"}
        if self.verify_fraction > 0 and rounded and self.verify_tolerance is None:
            raise ValueError(f"verification compares nodes' answers with a tolerance meant for unrounded activations; "
                             f"with {' / '.join(sorted(rounded))} on the wire give verify_tolerance explicitly")


def merge_client_config(config: ClientConfig | None, *, initial_peers: Sequence[str] = (), model_name: str | None = None,
                        swarm_key: str | None = None, lan: bool = False, tls_ca: str | None = None) -> ClientConfig:
    """``config`` (or the defaults) with what ``from_pretrained`` was also given: a setting given in one place
    is used, the same value in both is fine, two different values are refused (ValueError naming both) rather
    than one silently winning. ``lan=True`` in either place turns LAN discovery on."""
    config = config if config is not None else ClientConfig()
    if isinstance(initial_peers, str):
        raise TypeError("initial_peers must be a sequence of multiaddr strings, not one string")
    changes: dict = {"lan": True} if lan else {}
    for name, value in (("initial_peers", tuple(initial_peers)), ("model_name", model_name),
                        ("swarm_key", swarm_key), ("tls_ca", tls_ca)):
        if not value:
            continue
        current = getattr(config, name)
        same = tuple(current) == value if name == "initial_peers" else os.fspath(current or "") == os.fspath(value)
        if current and not same:
            raise ValueError(f"{name}={value!r} conflicts with client_config.{name}={current!r}: give it in one place")
        changes[name] = value
    return replace(config, **changes)
