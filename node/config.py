"""Node configuration: one flat dataclass; `node serve` flags map onto it one to one."""
from __future__ import annotations

import os
from dataclasses import dataclass

from swarm.spans import Span
from swarm.records import MAX_RECORD_LIFETIME  # not swarm.validator: that imports hivemind (seconds)

COMPUTE_DTYPES = ("float32", "bfloat16")
QUANTIZATIONS = ("none", "int8", "nf4")  # --quantize choices (node.quantize); records announce all but "none"


@dataclass(frozen=True)
class NodeConfig:
    model: str  # local Hugging Face checkpoint directory, or a hub id when the hub is reachable
    revision: str | None = None  # with a hub id: branch, tag or commit to download (None: the default branch)
    blocks: Span | None = None  # blocks to host, half-open START:END (e.g. 0:12); or num_blocks instead
    num_blocks: int | None = None  # instead of blocks: host this many where the swarm is weakest (least throughput)
    initial_peers: tuple[str, ...] = ()  # multiaddrs of DHT peers to join (spaces or commas); none: a new swarm
    host: str = "127.0.0.1"  # interface the gRPC server and the DHT peer listen on
    port: int = 0  # gRPC port; 0 picks a free one
    announce_host: str | None = None  # "host" or "host:port" clients should dial, when not where we listen (0.0.0.0)
    dht_port: int = 0  # DHT (libp2p) port; 0 picks a free one
    dtype: str = "float32"  # compute dtype of the blocks: float32 or bfloat16
    quantize: str = "none"  # frozen block weights: none, int8 (torchao weight-only) or nf4 (bitsandbytes; its Linears on a CUDA GPU)
    model_name: str | None = None  # name in the DHT model key; None: the checkpoint directory's name or the hub id
    max_batch_tokens: int = 8192  # largest batch * sequence length accepted in one request
    ttl: float = 15.0  # seconds a DHT record lives unless the heartbeat (every ttl/3) refreshes it
    shutdown_grace: float = 10.0  # seconds in-flight requests get to finish on SIGINT/SIGTERM
    compute_threads: int = 1  # requests computed at once (torch uses its own intra-op threads too)
    cache_tokens: int | None = None  # inference cache slots (batch x max_length); None: half of free memory
    alloc_timeout: float = 10.0  # seconds a new session waits for cache room before RESOURCE_EXHAUSTED
    step_timeout: float = 60.0  # seconds an inference session may idle between steps before it is freed
    max_sessions_per_client: int = 32  # inference sessions open at once per client IP address (IPv6: per /64)
    client_cache_share: float = 0.5  # most of the inference cache one client IP holds while others use or wait for it
    reclaim_idle: float = 2.0  # seconds idle after which a session gives its cache room to one waiting for room
    max_message_mb: int | None = None  # largest gRPC message in or out, MiB; None: 2 activations of max_batch_tokens
    lora_cache_mb: int = 1024  # MiB of client LoRA weights kept between requests (least recently used evicted)
    max_chunk_tokens: int = 1024  # batch x positions computed at once when prefilling a long prompt
    activation_cache_mb: int = 1024  # MiB of forward activations kept for the next backward (0: always recompute)
    small_step_threads: int | None = None  # torch threads for decode-sized inference steps (<= 16 batch x positions);
    # None: the fastest count measured at start (node.threads); 0: as many as large_step_threads
    large_step_threads: int | None = None  # torch threads for all other work (prefills, forward, backward);
    # None: the fastest count measured at start; 0: all the process may use (OMP_NUM_THREADS or its CPUs)
    decode_batch: int = 16  # most rows (sessions x batch) of different sessions' decode steps run as one call; 1: off
    decode_batch_wait_ms: float = 5.0  # ms a decode step waits for other decoding sessions' steps to batch with
    decode_in_pool: bool = False  # hand a lone decode-sized step (<= 16 batch x positions) to the compute pool's thread
    # and back, as before; off: computed on the event-loop thread (~1 ms/token less over 2 hops, tiny model)
    adapters: str | None = None  # folder of PEFT LoRA adapter folders to serve by name (their span's weights only)
    throughput: float | None = None  # tokens/s to announce; None measures it at start
    rebalance_period: float | None = None  # with num_blocks: seconds between checks whether moving helps the swarm
    nat_port_map: bool = False  # UPnP/NAT-PMP port mapping by the LAN gateway (opt-in: it sends packets off this machine)
    lan: bool = False  # LAN discovery (multicast, opt-in): announce our DHT peer; with no initial_peers, join what is
    # announced there first (or start a new swarm after lan_timeout); needs a host the LAN reaches (0.0.0.0)
    lan_timeout: float = 5.0  # seconds to listen for LAN announcements before starting a new swarm
    swarm_key: str | None = None  # swarm key file (`swarm keygen`): a private swarm, calls without its proof refused
    tls_cert: str | None = None  # PEM certificate (chain) naming the announced host (`swarm tls-cert`): serve TLS
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_ca: str | None = None  # the swarm's CA certificate (PEM): chained steps push only to TLS nodes it signed;
    # None: TLS nodes are verified against the system's roots
    metrics_port: int | None = None  # port of the Prometheus metrics endpoint (HTTP /metrics); None: off; 0 picks one
    metrics_host: str = "127.0.0.1"  # interface the metrics endpoint listens on (0.0.0.0: any; it is unauthenticated)

    def __post_init__(self) -> None:
        if (self.blocks is None) == (self.num_blocks is None):
            raise ValueError("give exactly one of blocks (e.g. 0:12) or num_blocks (automatic placement)")
        if self.blocks is not None and not isinstance(self.blocks, Span):
            raise TypeError(f"blocks must be a Span, got {type(self.blocks).__name__}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {self.num_blocks}")
        if self.dtype not in COMPUTE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.dtype!r}")
        if self.quantize not in QUANTIZATIONS:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        for name in ("port", "dht_port", "metrics_port"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")
        if self.lan_timeout <= 0:
            raise ValueError(f"lan_timeout must be positive, got {self.lan_timeout}")
        if self.lan and (self.host.startswith("127.") or self.host in ("localhost", "::1")):
            raise ValueError("lan needs a host the LAN can reach (--host 0.0.0.0 or this machine's LAN address), "
                             f"not {self.host}")
        if self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be positive, got {self.max_batch_tokens}")
        if self.ttl <= 0 or self.shutdown_grace < 0 or self.compute_threads < 1:
            raise ValueError("ttl must be > 0, shutdown_grace >= 0 and compute_threads >= 1")
        if self.ttl > MAX_RECORD_LIFETIME:
            raise ValueError(f"ttl must be at most {MAX_RECORD_LIFETIME:g}s (the DHT's maximum record lifetime)")
        if self.swarm_key is not None and not isinstance(self.swarm_key, (str, os.PathLike)):
            raise TypeError(f"swarm_key must be a path string, got {type(self.swarm_key).__name__}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both tls_cert and tls_key (--tls-cert FILE --tls-key FILE), or neither")
        if self.cache_tokens is not None and self.cache_tokens < 1:
            raise ValueError(f"cache_tokens must be positive, got {self.cache_tokens}")
        if self.rebalance_period is not None and (self.num_blocks is None or self.rebalance_period <= 0):
            raise ValueError("rebalance_period needs num_blocks (automatic placement) and must be positive")
        if self.throughput is not None and not self.throughput > 0:
            raise ValueError(f"throughput must be positive, got {self.throughput}")
        for name in ("small_step_threads", "large_step_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.decode_batch < 1 or not 0 <= self.decode_batch_wait_ms <= 1000:
            raise ValueError(f"decode_batch must be >= 1 and decode_batch_wait_ms in 0..1000, got "
                             f"{self.decode_batch}, {self.decode_batch_wait_ms}")
        if self.lora_cache_mb < 0:
            raise ValueError(f"lora_cache_mb must be >= 0, got {self.lora_cache_mb}")
        if self.max_sessions_per_client < 1:
            raise ValueError(f"max_sessions_per_client must be positive, got {self.max_sessions_per_client}")
        if self.max_message_mb is not None and not 1 <= self.max_message_mb < 2048:
            raise ValueError(f"max_message_mb must be in 1..2047 (gRPC's limit is 2 GiB), got {self.max_message_mb}")
        if self.alloc_timeout < 0 or self.step_timeout <= 0 or self.max_chunk_tokens < 1:
            raise ValueError("alloc_timeout must be >= 0, step_timeout > 0 and max_chunk_tokens >= 1")
