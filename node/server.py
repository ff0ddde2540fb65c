"""A node's lifecycle: load its span, serve gRPC, announce JOINING -> ONLINE -> OFFLINE in the DHT."""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Callable

import grpc
import torch

from node.auth import AuthInterceptor
from node.blocks import SpanBlocks, forward_span, load_span
from node.config import NodeConfig
from swarm.arch import LAYER_PREFIXES, get_family
from node.handler import NodeServicer, SessionPolicy
from swarm.checkpoint import CheckpointError, load_config, resolve_checkpoint
from node.lora import load_adapter_dir
from node.metrics import NodeMetrics
from node.relay import RelayLinks
from node.progress import LoadProgress
from node.quantize import check_available as check_quantization
from swarm.arch import linear_shapes
from node.requests import Limits, max_message_bytes
from node.throughput import measure_rate
from node.threads import ThreadChoice, choose_threads, set_pool_threads, starting_alone
from node.sessions import CacheBudget, cache_bytes_per_token, default_cache_tokens
from proto import swarmlm_pb2_grpc as pb_grpc
from swarm import __version__, lan
from swarm.aio import LoopThread
from swarm.dht import Announcer, DHTStartError, SwarmDHT
from swarm.identity import WeightsCheck, span_digests, weights_check
from swarm.keys import load_optional
from swarm.ports import PortInUseError, check_free, in_use_message
from swarm.placement import choose_blocks, should_move
from swarm.records import WIRE_NAMES, default_model_name, model_key
from swarm.spans import NodeState, ServerInfo, Span
from swarm.tls import cert_problems, host_of, load_cert, read_pem, server_credentials

log = logging.getLogger(__name__)

# Clients ping every second or so to notice a blackholed node quickly; permit that instead of
# answering GOAWAY(too_many_pings).
SERVER_KEEPALIVE_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
]


MAX_CONNECTIONS = 4096  # gRPC connections open at once (each costs a file descriptor); more are refused
CONNECTION_IDLE = 300.0  # seconds a connection without calls stays open (clients reconnect when needed)
MAX_STREAMS = 256  # calls at once on one connection


def connection_options(max_connections: int = MAX_CONNECTIONS, idle: float = CONNECTION_IDLE) -> list[tuple[str, int]]:
    """gRPC server options bounding connections: idle ones are closed, at most ``max_connections`` at once
    (not per address: gRPC has no such limit; past the cap new connections are refused, the node's file
    descriptors, its DHT daemon's included, are not exhausted), ``MAX_STREAMS`` calls on each."""
    return [("grpc.max_connection_idle_ms", int(idle * 1000)), ("grpc.max_allowed_incoming_connections", max_connections),
            ("grpc.max_concurrent_streams", MAX_STREAMS)]


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (20,000 idle connections made a node
    unreachable at the usual 1,024); returns the limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open files limit from %d to %d: %s", soft, hard, e)
        return soft
    return hard


def measure_throughput(blocks: SpanBlocks, tokens: int = 32) -> float:
    """Tokens per second through one block, on a dummy batch (see node.throughput)."""
    block = Span(blocks.span.start, blocks.span.start + 1)
    x = torch.zeros(1, tokens, blocks.config.hidden_size)
    with torch.no_grad():
        measured = measure_rate(lambda: forward_span(blocks, block, x), tokens)
    log.info("measured throughput: %.0f tokens/s per block (the median call was %.0f%% slower: machine load)",
             measured.rate, 100 * measured.spread)
    return measured.rate


def check_ports(config: NodeConfig) -> None:
    """PortInUseError naming the port (and its holder) if ``--port`` or ``--dht-port`` is taken."""
    check_free(config.host, config.port, "--port (gRPC)")
    check_free(config.host, config.dht_port, "--dht-port (DHT)")


def weights_digests(folder: Path, model_config, span: Span) -> tuple[str, str]:
    """The digests of ``span``'s weights this node announces (swarm.identity: over tensor hashes, from the
    checkpoint's manifest or hashed once now; over file hashes, a hub model's as the hub published them)."""
    return span_digests(folder, span, get_family(model_config).layer_prefix)


def announced_address(announce: str | None, host: str, port: int) -> str:
    """What clients dial: ``announce`` as "host:port", or "host" plus our port, or where we listen."""
    if announce is None:
        return f"{host}:{port}"
    name, sep, given = announce.rpartition(":")
    if sep and given.isdigit() and "]" not in given:
        return announce
    return f"{announce}:{port}"


class Node:
    """One running node. ``await start()``, then ``await stop()``; or use NodeThread from sync code."""

    def __init__(self, config: NodeConfig, *,
                 wrap_servicer: Callable[[NodeServicer], pb_grpc.NodeServicer] | None = None):
        """``wrap_servicer``: what serves gRPC instead of the honest servicer (tests wrap it to inject faults)."""
        self.config = config
        self._wrap_servicer = wrap_servicer
        self.address: str | None = None
        self.model_key: str | None = None
        self.dht = None
        self._announcer: Announcer | None = None
        self._server: grpc.aio.Server | None = None
        self.servicer: NodeServicer | None = None
        self._pool = ThreadPoolExecutor(config.compute_threads, thread_name_prefix="swarmlm-compute")
        self.span: Span | None = config.blocks
        self._rebalancer: asyncio.Task | None = None
        self.auth: AuthInterceptor | None = None  # checks swarm key proofs in a private swarm
        self._lan: lan.LanAnnouncer | None = None  # multicasts our DHT peer on the LAN (config.lan)
        self.metrics = NodeMetrics() if config.metrics_port is not None else None  # --metrics-port
        self._weights_check: WeightsCheck | bool | None = None  # our model's block hashes (False: not all known)
        self.threads: ThreadChoice | None = None  # torch threads per step size, measured (or given) at start

    async def start(self) -> str:
        """Load weights, start serving, announce ONLINE; returns the gRPC address ``host:port``."""
        cfg = self.config
        check_ports(cfg)  # before anything is loaded: a busy port is refused at once
        check_quantization(cfg.quantize)  # nf4 on a machine without CUDA + bitsandbytes: refused at once
        swarm_key = load_optional(cfg.swarm_key)
        tls = server_credentials(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert else None  # bad files fail right here
        folder, model_config = self._checkpoint()
        if self.metrics is not None:  # first: a port in use fails before anything heavy
            log.info("metrics at %s", self.metrics.serve(cfg.metrics_host, cfg.metrics_port).url)
        await self._join(swarm_key)
        self.span = await self._placement(folder, model_config)
        dtype = getattr(torch, cfg.dtype)
        # loading beside another node's measuring of thread counts misleads it: one at a time (node.threads)
        async with starting_alone(cfg.small_step_threads is None or cfg.large_step_threads is None):
            progress = LoadProgress(self.span)
            try:
                blocks = await asyncio.get_running_loop().run_in_executor(
                    self._pool, load_span, folder, model_config, self.span, dtype, progress, cfg.quantize)
            finally:
                progress.close()
            weights = await asyncio.get_running_loop().run_in_executor(
                self._pool, weights_digests, folder, model_config, self.span)
            await self._choose_threads(blocks)
        self.servicer = self._servicer(blocks, model_config, dtype)
        self.servicer.relay_links = self._relay_links(swarm_key, model_config.num_hidden_layers)
        if self.metrics is not None:
            self.metrics.watch(self.servicer, self.threads)
        self._listen(swarm_key, tls)
        await self._go_online(tls is not None, weights)
        if cfg.rebalance_period:
            self._rebalancer = asyncio.create_task(self._rebalance(folder, model_config, dtype,
                                                                   model_config.num_hidden_layers))
        return self.address

    async def _choose_threads(self, blocks: SpanBlocks) -> None:
        """Torch threads per step size (node.threads): measured on ``blocks`` unless the flags give them;
        every compute thread then runs on the larger steps' count (decode-sized steps switch to theirs)."""
        cfg, loop = self.config, asyncio.get_running_loop()
        self.threads = await loop.run_in_executor(self._pool, partial(
            choose_threads, blocks, cfg.small_step_threads, cfg.large_step_threads, alone=False))
        await loop.run_in_executor(None, set_pool_threads, self._pool, cfg.compute_threads, self.threads.large)
        log.info("%s", self.threads.describe())

    def _checkpoint(self):
        """The checkpoint folder (only the span's shards fetched) and its config, checked against the flags;
        sets the model key."""
        cfg, span = self.config, self.config.blocks
        wanted = tuple(f"{prefix}{i}." for prefix in LAYER_PREFIXES for i in range(span.start, span.end)) if span \
            else LAYER_PREFIXES  # the family is not known before the config is fetched
        folder = resolve_checkpoint(cfg.model, need_weights=lambda name: name.startswith(wanted), revision=cfg.revision)
        model_config = load_config(folder)
        get_family(model_config)
        total = model_config.num_hidden_layers
        if span is not None and span.end > total:
            raise CheckpointError(f"--blocks {span} is outside the model's {total} blocks (valid: 0:{total})")
        if cfg.num_blocks is not None and cfg.num_blocks > total:
            raise CheckpointError(f"--num-blocks {cfg.num_blocks} is more than the model's {total} blocks")
        self.model_key = model_key(cfg.model_name or default_model_name(cfg.model), model_config)
        return folder, model_config

    async def _join(self, swarm_key) -> None:
        """Start our DHT peer: through the initial peers, or those announced on the LAN (``--lan``)."""
        cfg, peers = self.config, self.config.initial_peers
        if cfg.lan and not peers:
            try:
                peers = tuple(await asyncio.get_running_loop().run_in_executor(None, partial(
                    lan.listen, swarm_key, self.model_key, timeout=cfg.lan_timeout)))
            except lan.LanError as e:
                raise DHTStartError(str(e)) from None
            if not peers:
                log.warning("%s; starting a new swarm", lan.nothing_found(swarm_key, cfg.lan_timeout))
        self.dht = await SwarmDHT.create(peers, host=cfg.host, port=cfg.dht_port,
                                         nat_port_map=cfg.nat_port_map, swarm_key=swarm_key)
        log.info("joined the DHT as %s (%s)", self.dht.peer_id,
                 f"{len(peers)} initial peers" if peers else "a new swarm")
        if not peers:  # nobody to join: say so, and how others reach this one
            log.warning("no --initial-peers: this node starts a new swarm; others join it with --initial-peers %s",
                        " ".join(await self.dht.visible_maddrs()))
        if cfg.lan:
            self._lan = lan.LanAnnouncer(await self.dht.visible_maddrs(), swarm_key, self.model_key, "node").start()

    async def _placement(self, folder: Path, model_config) -> Span:
        """``--blocks``, or with ``--num-blocks`` where the swarm is weakest now."""
        if self.config.blocks is not None:
            return self.config.blocks
        total = model_config.num_hidden_layers
        span = choose_blocks(await self._same_weights(folder, model_config), total, self.config.num_blocks)
        log.info("automatic placement: serving blocks %s, where the swarm is weakest", span)
        return span

    async def _same_weights(self, folder: Path, model_config) -> list[ServerInfo]:
        """The nodes announced for our model that serve our weights (swarm.identity) quantized as ours, for
        placement: nodes with other weights do not cover a block for anyone, and nodes quantized otherwise
        not for the clients that use us (a client routes through one quantization, "none" by default; only
        ``quantization="any"`` mixes them), so an int8 replica never counts as covering float32 demand nor
        the other way round. All nodes (of our quantization) when our checkpoint holds only part of the
        blocks (their hashes are hashed once, then kept in the checkpoint's manifest)."""
        total = model_config.num_hidden_layers
        servers = [s for s in await self.dht.fetch_servers(self.model_key, total)
                   if s.quantization == self.config.quantize]
        if self._weights_check is None:
            check = await asyncio.get_running_loop().run_in_executor(
                self._pool, weights_check, folder, Span(0, total), get_family(model_config).layer_prefix)
            self._weights_check = check if check is not None else False
        return self._weights_check.split(servers)[0] if self._weights_check else servers

    def _servicer(self, blocks: SpanBlocks, model_config, dtype: torch.dtype) -> NodeServicer:
        """The gRPC servicer over ``blocks`` with this node's limits, cache budget and hosted adapters."""
        cfg, span = self.config, self.span
        limits = Limits(
            model=self.model_key, hosted=span, hidden_size=model_config.hidden_size,
            max_batch_tokens=cfg.max_batch_tokens,
            max_position=max(getattr(model_config, "max_position_embeddings", 0) or 0, cfg.max_batch_tokens),
            kv_heads=getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads,
            head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads,
        )
        per_token = cache_bytes_per_token(model_config, len(span), dtype)
        budget = CacheBudget(cfg.cache_tokens or default_cache_tokens(per_token), cfg.client_cache_share,
                             cfg.reclaim_idle)
        policy = SessionPolicy(max_length=limits.max_position, alloc_timeout=cfg.alloc_timeout,
                               step_timeout=cfg.step_timeout, max_chunk_tokens=cfg.max_chunk_tokens,
                               activation_bytes=cfg.activation_cache_mb << 20, small_step_threads=self.threads.small,
                               max_sessions_per_client=cfg.max_sessions_per_client,
                               lora_cache_bytes=cfg.lora_cache_mb << 20, decode_batch_rows=cfg.decode_batch,
                               decode_batch_wait=cfg.decode_batch_wait_ms / 1000,
                               inline_small_steps=not cfg.decode_in_pool)
        hosted = load_adapter_dir(Path(cfg.adapters), span.start, span.end, linear_shapes(blocks.layers[0])) \
            if cfg.adapters else {}
        return NodeServicer(blocks, limits, self._pool, budget, policy, hosted=hosted)

    def _relay_links(self, swarm_key, num_blocks: int) -> RelayLinks:
        """Channels to the next nodes of clients' routes (chained steps), checked against our DHT view."""
        cfg = self.config
        roots = read_pem(cfg.tls_ca, "CA certificate") if cfg.tls_ca is not None else None
        return RelayLinks(partial(self.dht.fetch_servers, self.model_key, num_blocks), swarm_key, roots, cfg.tls_ca,
                          timeout=cfg.alloc_timeout + 5.0)

    def _listen(self, swarm_key, tls) -> None:
        """The gRPC server (not started yet), on our port, with the swarm key check and message limits."""
        cfg, limits = self.config, self.servicer.limits
        msg_limit = cfg.max_message_mb << 20 if cfg.max_message_mb else max_message_bytes(limits)
        self.auth = AuthInterceptor(swarm_key) if swarm_key is not None else None
        # metrics first: calls the swarm key check refuses are counted too
        interceptors = [i for i in (self.metrics and self.metrics.interceptor, self.auth) if i is not None]
        self._server = grpc.aio.server(interceptors=interceptors or None, options=[
            ("grpc.so_reuseport", 0),  # a second process on our port must fail to bind, not share it (swarm.ports)
            ("grpc.max_receive_message_length", msg_limit),
            ("grpc.max_send_message_length", msg_limit),
            *SERVER_KEEPALIVE_OPTIONS,
            *connection_options(min(MAX_CONNECTIONS, max(64, raise_open_files_limit() // 2))),
        ])
        served = self._wrap_servicer(self.servicer) if self._wrap_servicer else self.servicer
        pb_grpc.add_NodeServicer_to_server(served, self._server)
        listen = f"{cfg.host}:{cfg.port}"
        check_free(cfg.host, cfg.port, "--port (gRPC)")  # again: it may have been taken while we loaded
        try:
            port = self._server.add_secure_port(listen, tls) if tls else self._server.add_insecure_port(listen)
        except RuntimeError:  # grpcio raises when the bind fails
            port = 0
        if port == 0:
            raise PortInUseError(in_use_message(cfg.host, cfg.port, "--port (gRPC)")) if cfg.port else \
                OSError(f"cannot listen on {cfg.host}:{cfg.port}")
        self.address = announced_address(cfg.announce_host, cfg.host, port)
        if tls is not None:  # a certificate clients will refuse is the operator's mistake: say so now
            for problem in cert_problems(load_cert(cfg.tls_cert), host_of(self.address)):
                log.warning("clients will refuse the TLS certificate %s: %s", cfg.tls_cert, problem)
        if self.auth is not None:
            self.auth.audience = self.address  # proofs name the address clients dial

    async def _go_online(self, tls: bool, weights: tuple[str, str]) -> None:
        """Announce JOINING, measure throughput, start serving, announce ONLINE."""
        cfg, servicer = self.config, self.servicer
        info = ServerInfo(node_id=self.dht.node_id, address=self.address, span=self.span,
                          state=NodeState.JOINING, throughput=0.0, version=__version__, dtype=cfg.dtype,
                          adapters=tuple(sorted(servicer.adapters.hosted)), tls=tls, weights=weights[0],
                          files=weights[1], wire=WIRE_NAMES, quantization=cfg.quantize, chain=True)
        self._announcer = Announcer(self.dht, self.model_key, info, cfg.ttl)
        await self._announcer.start()
        servicer.throughput = cfg.throughput or await asyncio.get_running_loop().run_in_executor(
            self._pool, measure_throughput, servicer.blocks)
        await self._server.start()
        servicer.state = NodeState.ONLINE
        await self._announcer.set_state(NodeState.ONLINE, throughput=servicer.throughput)
        log.info("ONLINE: serving blocks %s of %s at %s", self.span, self.model_key, self.address)

    async def _rebalance(self, folder, model_config, dtype, total: int) -> None:
        """Every rebalance_period: move to a clearly weaker part of the swarm, if that never uncovers a
        block. Moving: announce the new span JOINING (keep serving stragglers for a TTL), load, swap,
        announce ONLINE."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.config.rebalance_period)
            try:
                servers = await self._same_weights(folder, model_config)
                target = should_move(servers, self._announcer.info, total)
                if target is None or self.servicer.busy:
                    continue
                log.info("rebalancing: moving from blocks %s to %s", self.span, target)
                # JOINING at the new span (clients stop routing here; other nodes see the weak place filling
                # up and do not all move to it, see swarm.placement)
                weights, files = await loop.run_in_executor(self._pool, weights_digests, folder, model_config, target)
                await self._announcer.move(target, NodeState.JOINING, weights, files)
                await asyncio.sleep(min(self.config.ttl, self.config.rebalance_period))
                blocks = await loop.run_in_executor(self._pool, load_span, folder, model_config, target, dtype,
                                                    None, self.config.quantize)
                if self.config.adapters:
                    self.servicer.adapters.hosted = load_adapter_dir(
                        Path(self.config.adapters), target.start, target.end, linear_shapes(blocks.layers[0]))
                self.servicer.blocks = blocks
                self.servicer.limits = replace(self.servicer.limits, hosted=target)
                self.span = target
                await self._announcer.move(target, NodeState.ONLINE)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed check must not kill a serving node
                log.warning("rebalance check failed: %s", e)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report and announce OFFLINE at once (new sessions are refused, so clients move on),
        let open sessions and in-flight calls finish until the grace period ends, then stop."""
        grace = self.config.shutdown_grace if grace is None else grace
        started = time.monotonic()
        deadline = started + grace
        if self._rebalancer is not None:
            self._rebalancer.cancel()
        if self.servicer is not None:
            self.servicer.state = NodeState.OFFLINE
        dht_timeout = 5.0
        if self._announcer is not None:  # bounded: a dead p2p daemon must not keep the node from exiting
            try:
                await asyncio.wait_for(self._announcer.stop(), max(1.0, min(5.0, grace)))
                log.info("draining: OFFLINE announced; %s", self._in_flight())
            except asyncio.TimeoutError:
                dht_timeout = 1.0  # the daemon is gone or stuck: do not wait for it again
                log.warning("draining: could not announce OFFLINE (the p2p daemon is not answering); clients "
                            "will see the records expire within %gs; %s", self.config.ttl, self._in_flight())
        while self.servicer is not None and self.servicer.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._server is not None:
            await self._server.stop(max(0.0, deadline - time.monotonic()))
        if self._lan is not None:
            self._lan.stop()
        if self.dht is not None:
            await self.dht.shutdown(dht_timeout)
        if self.servicer is not None and self.servicer.relay_links is not None:
            await self.servicer.relay_links.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.close()
        if self._announcer is not None:
            log.info("OFFLINE: stopped in %.1f s", time.monotonic() - started)

    def _in_flight(self) -> str:
        s = self.servicer
        if s is None or not s.busy:
            return "nothing in flight"
        return f"waiting for {s.open_sessions} open sessions and {s.in_flight} calls (grace {self.config.shutdown_grace:g}s)"


class NodeThread:
    """Runs a Node on its own event loop thread, for tests and embedding in sync programs."""

    def __init__(self, config: NodeConfig, *,
                 wrap_servicer: Callable[[NodeServicer], pb_grpc.NodeServicer] | None = None):
        self.node = Node(config, wrap_servicer=wrap_servicer)
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
