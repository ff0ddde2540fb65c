"""A node's lifecycle: load its span, serve gRPC, announce JOINING -> ONLINE -> OFFLINE in the DHT."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from node.blocks import SpanBlocks, forward_span, load_span
from node.config import NodeConfig
from node.families import LAYER_PREFIX, get_family
from node.handler import NodeServicer, SessionPolicy
from node.loading import CheckpointError, load_config, resolve_checkpoint
from node.requests import Limits, max_message_bytes
from node.sessions import CacheBudget, cache_bytes_per_token, default_cache_tokens
from proto import swarmlm_pb2_grpc as pb_grpc
from swarm import __version__
from swarm.aio import LoopThread
from swarm.dht import Announcer, SwarmDHT
from swarm.records import default_model_name, model_key
from swarm.spans import NodeState, ServerInfo, Span

log = logging.getLogger(__name__)

# Clients ping every second or so to notice a blackholed node quickly; permit that instead of
# answering GOAWAY(too_many_pings).
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]


def measure_throughput(blocks: SpanBlocks, tokens: int = 32, repeats: int = 2) -> float:
    """Tokens per second through one block, timed on a dummy batch."""
    block = Span(blocks.span.start, blocks.span.start + 1)
    x = torch.zeros(1, tokens, blocks.config.hidden_size)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward_span(blocks, block, x)
            best = min(best, time.perf_counter() - t0)
    return tokens / max(best, 1e-9)


class Node:
    """One running node. ``await start()``, then ``await stop()``; or use NodeThread from sync code."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.address: str | None = None
        self.model_key: str | None = None
        self.dht = None
        self._announcer: Announcer | None = None
        self._server: grpc.aio.Server | None = None
        self.servicer: NodeServicer | None = None
        self._pool = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="swarmlm-compute")

    async def start(self) -> str:
        """Load weights, start serving, announce ONLINE; returns the gRPC address ``host:port``."""
        cfg, loop = self.config, asyncio.get_running_loop()
        wanted = tuple(f"{LAYER_PREFIX}{i}." for i in range(cfg.blocks.start, cfg.blocks.end))
        folder = resolve_checkpoint(cfg.model, need_weights=lambda name: name.startswith(wanted))
        model_config = load_config(folder)
        get_family(model_config)
        if cfg.blocks.end > model_config.num_hidden_layers:
            raise CheckpointError(f"--blocks {cfg.blocks} is outside the model's {model_config.num_hidden_layers} "
                                  f"blocks (valid: 0:{model_config.num_hidden_layers})")
        self.model_key = model_key(cfg.model_name or default_model_name(cfg.model), model_config)
        self.dht = await SwarmDHT.create(cfg.initial_peers, host=cfg.host, port=cfg.dht_port,
                                         nat_port_map=cfg.nat_port_map)

        dtype = getattr(torch, cfg.dtype)
        blocks = await loop.run_in_executor(self._pool, load_span, folder, model_config, cfg.blocks, dtype)
        limits = Limits(
            model=self.model_key, hosted=cfg.blocks, hidden_size=model_config.hidden_size,
            max_batch_tokens=cfg.max_batch_tokens,
            max_position=max(getattr(model_config, "max_position_embeddings", 0) or 0, cfg.max_batch_tokens),
        )
        msg_limit = max_message_bytes(limits)
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", msg_limit),
            ("grpc.max_send_message_length", msg_limit),
            *SERVER_KEEPALIVE_OPTIONS,
        ])
        per_token = cache_bytes_per_token(model_config, len(cfg.blocks), dtype)
        budget = CacheBudget(cfg.cache_tokens or default_cache_tokens(per_token))
        policy = SessionPolicy(max_length=limits.max_position, alloc_timeout=cfg.alloc_timeout,
                               step_timeout=cfg.step_timeout, max_chunk_tokens=cfg.max_chunk_tokens)
        servicer = NodeServicer(blocks, limits, self._pool, budget, policy)
        self.servicer = servicer
        pb_grpc.add_NodeServicer_to_server(servicer, self._server)
        port = self._server.add_insecure_port(f"{cfg.host}:{cfg.port}")
        if port == 0:
            raise OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        self.address = f"{cfg.announce_host or cfg.host}:{port}"

        info = ServerInfo(node_id=self.dht.peer_id, address=self.address, span=cfg.blocks,
                          state=NodeState.JOINING, throughput=0.0, version=__version__, dtype=cfg.dtype)
        self._announcer = Announcer(self.dht, self.model_key, info, cfg.ttl)
        await self._announcer.start()
        servicer.throughput = await loop.run_in_executor(self._pool, measure_throughput, blocks)
        await self._server.start()
        await self._announcer.set_state(NodeState.ONLINE, throughput=servicer.throughput)
        log.info("serving blocks %s of %s at %s", cfg.blocks, self.model_key, self.address)
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, announce OFFLINE, let in-flight calls finish within the grace period."""
        grace = self.config.shutdown_grace if grace is None else grace
        waits = []
        if self._server is not None:
            waits.append(self._server.stop(grace))
        if self._announcer is not None:
            waits.append(self._announcer.stop())
        await asyncio.gather(*waits, return_exceptions=True)
        if self.dht is not None:
            await self.dht.shutdown()
        self._pool.shutdown(wait=False, cancel_futures=True)


class NodeThread:
    """Runs a Node on its own event loop thread, for tests and embedding in sync programs."""

    def __init__(self, config: NodeConfig):
        self.node = Node(config)
        self._loop: LoopThread | None = None

    def start(self, timeout: float = 120) -> "NodeThread":
        self._loop = LoopThread("swarmlm-node")
        self._loop.run(self.node.start(), timeout)
        return self

    @property
    def address(self) -> str:
        if self.node.address is None:
            raise RuntimeError("the node has not started")
        return self.node.address

    def stop(self, grace: float = 1.0) -> None:
        if self._loop is not None:
            try:
                self._loop.run(self.node.stop(grace), 60)
            finally:
                self._loop.close()
                self._loop = None
