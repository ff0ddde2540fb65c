"""The remote chain: hidden states through every remote block, with re-routing around failed nodes.

``RemoteChain.forward`` / ``RemoteChain.backward`` are the client's one sync -> async bridge: they
hand a coroutine to the client's event loop thread and wait. Everything below them is async.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import grpc
import torch

from client.adapters import ClientAdapter

from client.config import ClientConfig
from client.pipeline import all_of, cat_or_none, piece, row_slices, sum_grads, with_seed
from client.routing import Router
from client.transport import (NOTHING_KEPT, Connections, Kept, RemoteCallError, by_token_request, call_backward,
                              call_forward, forward_request, wire_format)
from client.verify import Verifier
from swarm.aio import LoopThread
from swarm import lan
from swarm.dht import DHTStartError, SwarmDHT
from swarm.identity import WeightsCheck
from swarm.keys import load_optional
from swarm.tls import read_pem
from swarm.routing import Hop
from swarm.spans import ServerInfo, Span

log = logging.getLogger(__name__)
T = TypeVar("T")
# (blocks, their input hidden states, what their node kept, that node)
Trace = list[tuple[Span, torch.Tensor, Kept, ServerInfo]]
LoraGrads = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Extras:
    """What a forward/backward pair sends besides hidden states, and the gradients it collects."""

    lora: "LoraUse | None"
    prefix: torch.Tensor | None  # [blocks, 2, batch, kv_heads, virtual, head_dim]
    lora_grads: LoraGrads = field(default_factory=dict)
    grad_prefix: torch.Tensor | None = None


@dataclass(frozen=True)
class SwarmLink:
    """Everything an inference session needs to talk to the swarm, handed to it by the chain (so a session
    reaches into nothing else)."""

    model: str  # model key every request names
    num_blocks: int  # blocks of the model
    router: Router  # routes, and the failure policy (retries, bans, backoff)
    connections: Connections  # channels to nodes
    verifier: Verifier  # re-runs a fraction of hops elsewhere (verify_fraction)
    request_timeout: float  # seconds one step through one hop may take
    max_step_tokens: int  # batch x positions per inference message
    adapter: str | None  # node-hosted adapter every request names, if any
    run: Callable[[Awaitable[T]], T]  # the sync -> async bridge onto the client's event loop
    call_soon: Callable[[Callable[[], object]], None]  # schedule a callable on that loop without waiting
    wire_dtype: str | None = None  # format of inference activations (ClientConfig.wire_dtype; None: as computed)
    chained_steps: bool = False  # sessions chain their steps when every node of the route can (client.chained)


@dataclass(frozen=True)
class Pass:
    """What a forward pass through the chain leaves for its backward: per micro-batch (one, unless
    ClientConfig.micro_batches), its rows of the batch, its adapter use (own dropout seed) and its hops."""

    rows: list[slice]
    loras: list["LoraUse | None"]
    traces: list[Trace]


@dataclass(frozen=True)
class LoraUse:
    """The client's adapter as one forward/backward pair uses it (same dropout masks in both)."""

    adapter: ClientAdapter
    dropout_seed: int
    version: int  # the adapter's version when the forward pass started


class RemoteChain:
    """Routes over the nodes announced for one model; bans nodes that fail and retries elsewhere."""

    def __init__(self, config: ClientConfig, model: str, num_blocks: int, weights: WeightsCheck | None = None):
        """``weights``: the model's block hashes (swarm.identity); only nodes announcing a matching digest
        are used. None: every node announced under ``model`` is."""
        self.config, self.model, self.num_blocks = config, model, num_blocks
        if not config.initial_peers and not config.lan:
            raise ValueError("initial_peers is empty: give at least one multiaddr of a swarm peer (or lan=True)")
        self.closed = False
        swarm_key = load_optional(config.swarm_key)  # a private swarm: DHT records and calls need it
        if config.tls_ca is not None:
            read_pem(config.tls_ca, "CA certificate")  # a missing or malformed CA file fails here, before joining
        try:  # with config.lan and no initial peers: listen for the swarm's LAN announcements first
            peers = lan.initial_peers(config.initial_peers, config.lan, swarm_key, model, config.lan_timeout)
        except lan.LanError as e:
            raise DHTStartError(str(e)) from None
        self._loop = LoopThread("swarmlm-client")
        try:
            self.dht = self._loop.run(SwarmDHT.create(
                peers, client_mode=True, nat_port_map=config.nat_port_map, swarm_key=swarm_key))
        except BaseException:
            self._loop.close()
            raise
        self.connections = Connections(swarm_key, config.tls_ca, max_message_mb=config.max_message_mb)  # loop thread only
        self.router = Router(self.dht, model, num_blocks, config, self.connections, weights)
        if config.metrics_port is not None:
            try:
                log.info("client metrics at %s", self.router.metrics.serve(config.metrics_host, config.metrics_port).url)
            except BaseException:
                self._loop.run(self.dht.shutdown())
                self._loop.close()
                raise
        self.verifier = Verifier(self.router, config)  # re-runs a fraction of hops elsewhere (verify_fraction)
        self.link = SwarmLink(model, num_blocks, self.router, self.connections, self.verifier, config.request_timeout,
                              config.max_step_tokens, config.adapter, self.run, self.call_soon, config.wire_dtype,
                              chained_steps=config.chained_steps and config.verify_fraction == 0)
        self.last_route: list[Hop] = []  # hops of the latest forward pass, for inspection
        self._lora_sent: dict[tuple[str, str], int] = {}  # (address, adapter id) -> version it holds
        # (address, adapter id) -> (version, done) of a call carrying those weights there now (loop thread only)
        self._lora_pending: dict[tuple[str, str], tuple[int, asyncio.Future]] = {}

    # ---- the sync bridge -------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
                lora: LoraUse | None = None, prefix: torch.Tensor | None = None,
                for_backward: bool = False) -> tuple[torch.Tensor, "Pass"]:
        """All blocks over ``hidden``; ``prefix`` holds prefix-tuning keys/values for every block.
        ``for_backward`` asks nodes to keep activations so the backward pass need not recompute.
        With ClientConfig.micro_batches > 1 the rows go through as a pipeline of micro-batches (client.pipeline)."""
        return self.run(self._forward_pass(hidden, mask, positions, lora, prefix, for_backward))

    def backward(self, passed: "Pass", mask: torch.Tensor | None, positions: torch.Tensor | None,
                 grad: torch.Tensor, prefix: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, LoraGrads, torch.Tensor | None]:
        """d loss / d the forward's ``hidden``, its adapter's weights and ``prefix``, given d loss / d its output."""
        return self.run(self._backward_pass(passed, mask, positions, grad, prefix))

    def run(self, coro: Awaitable[T]) -> T:
        """Run a coroutine on the client's loop and wait (the bridge used by sessions too)."""
        if self.closed:
            if hasattr(coro, "close"):
                coro.close()  # never awaited: say so quietly instead of a 'never awaited' warning
            raise RuntimeError("this model has left the swarm (close() was called): load it again to use it")
        return self._loop.run(coro)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Schedule a plain callable on the client's loop without waiting."""
        self._loop.loop.call_soon_threadsafe(fn)

    def servers(self, refresh: bool = False) -> list[ServerInfo]:
        """The swarm as last read from the DHT (re-read when stale or asked to)."""
        return self.run(self.router.servers(refresh))

    def close(self) -> None:
        """Leave the swarm: close connections, the DHT peer and the loop. Closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        self.router.metrics.close()
        try:
            self._loop.run(self.connections.close())
            self._loop.run(self.dht.shutdown())
        finally:
            self._loop.close()

    # ---- async internals -------------------------------------------------------------------
    async def _forward_pass(self, hidden: torch.Tensor, mask, positions, lora: LoraUse | None,
                            prefix: torch.Tensor | None, for_backward: bool) -> tuple[torch.Tensor, "Pass"]:
        """Every micro-batch through every block, concurrently; their outputs joined."""
        batch = hidden.shape[0]
        rows = row_slices(batch, self.config.micro_batches)
        loras = [with_seed(lora, i) for i in range(len(rows))]
        pieces = [piece(r, batch, hidden, mask, positions, prefix) for r in rows]
        results = await all_of(self._forward(Span(0, self.num_blocks), p.hidden, p.mask, p.positions, use, p.prefix,
                                             for_backward) for p, use in zip(pieces, loras))
        return cat_or_none([out for out, _ in results], 0), Pass(rows, loras, [trace for _, trace in results])

    async def _backward_pass(self, passed: "Pass", mask, positions, grad: torch.Tensor, prefix: torch.Tensor | None
                             ) -> tuple[torch.Tensor, LoraGrads, torch.Tensor | None]:
        """Every micro-batch back through its hops, concurrently: input gradients joined, the others added."""
        batch, extras, runs = grad.shape[0], [], []
        for rows, lora, trace in zip(passed.rows, passed.loras, passed.traces):
            p = piece(rows, batch, grad, mask, positions, prefix)
            extras.append(Extras(lora, p.prefix))
            runs.append(self._backward(trace, p.mask, p.positions, p.hidden, extras[-1]))
        grads = await all_of(runs)
        return (cat_or_none(grads, 0), sum_grads([e.lora_grads for e in extras]),
                cat_or_none([e.grad_prefix for e in extras], 2))

    def _lora_message(self, address: str, span: Span, lora: LoraUse | None, resend: bool):
        """The adapter for a hop: weights only when this node may not hold the current version."""
        if lora is None:
            return None
        known = self._lora_sent.get((address, lora.adapter.id)) == lora.version
        return lora.adapter.message(span, with_weights=resend or not known, dropout_seed=lora.dropout_seed,
                                    version=lora.version)

    def _lora_delivered(self, address: str, lora: LoraUse | None, message) -> None:
        if lora is not None and message is not None and message.modules:
            self._lora_sent[(address, lora.adapter.id)] = message.version

    async def _lora_wait(self, address: str, lora: LoraUse | None) -> None:
        """If another call (a concurrent micro-batch's) is carrying this adapter version's weights to
        ``address`` right now, wait for it to end, so the weights travel once, not once per micro-batch."""
        if lora is None or self._lora_sent.get((address, lora.adapter.id)) == lora.version:
            return
        pending = self._lora_pending.get((address, lora.adapter.id))
        if pending is not None and pending[0] == lora.version:
            await asyncio.shield(pending[1])

    @contextlib.contextmanager
    def _lora_carrying(self, address: str, lora: LoraUse | None, message):
        """Marks the weights in ``message`` as on their way to ``address`` (see _lora_wait) while the call runs."""
        if lora is None or message is None or not message.modules:
            yield
            return
        key, done = (address, lora.adapter.id), asyncio.get_running_loop().create_future()
        self._lora_pending[key] = (message.version, done)
        try:
            yield
        finally:
            done.set_result(None)
            if self._lora_pending.get(key) == (message.version, done):
                del self._lora_pending[key]

    async def _call(self, hop: Hop, lora: LoraUse | None, send, tokens: int, kind: str = "forward"):
        """``send(lora_message)`` (a ``kind`` call: forward or backward) to a hop; re-send the adapter's weights
        once if the node lost them. The exchange of ``tokens`` (batch x positions; backward counts double) is
        timed for the router."""
        for resend in (False, True):
            if not resend:
                await self._lora_wait(hop.server.address, lora)
            message = self._lora_message(hop.server.address, hop.span, lora, resend)
            started = time.monotonic()
            try:
                with self._lora_carrying(hop.server.address, lora, message):
                    result = await send(message)
                    self._lora_delivered(hop.server.address, lora, message)
            except RemoteCallError as e:
                if e.code == grpc.StatusCode.FAILED_PRECONDITION and message is not None and not message.modules:
                    continue
                raise
            self.router.observe(hop, tokens, time.monotonic() - started)
            self.router.metrics.exchange(kind, hop.server.address, time.monotonic() - started)
            return result
        raise AssertionError("unreachable")

    async def _forward(self, span: Span, hidden: torch.Tensor, mask, positions, lora: LoraUse | None = None,
                       prefix: torch.Tensor | None = None, for_backward: bool = False) -> tuple[torch.Tensor, Trace]:
        trace: Trace = []
        used: list[Hop] = []
        position = span.start
        attempts = self.router.attempts()
        route = await self.router.route(span, spread=True)
        while route:
            hop = route.pop(0)
            try:
                out, kept = await self._forward_hop(hop, hidden, mask, positions, lora, prefix, for_backward)
            except RemoteCallError as e:
                await attempts.failed(hop, e)  # gives up by raising; else bans / backs off / notes a busy node
                route = await self.router.reroute(attempts, Span(position, span.end), spread=True)
                continue
            attempts.succeeded(hop)
            if self.verifier.wanted():  # re-run on another node; use what a majority agrees on
                async def rerun(server: ServerInfo) -> torch.Tensor:  # (in the same wire format)
                    return (await self._forward_hop(Hop(server, hop.span), hidden, mask, positions, lora, prefix,
                                                    training=for_backward))[0]

                out, outvoted = await self.verifier.check(hop, out, rerun, mask)
                kept = NOTHING_KEPT if outvoted else kept  # nothing kept by a banned node is used
            trace.append((hop.span, hidden, kept, hop.server))
            used.append(hop)
            hidden, position = out, hop.span.end
        self.last_route = used
        return hidden, trace

    async def _forward_hop(self, hop: Hop, hidden: torch.Tensor, mask, positions, lora: LoraUse | None,
                           prefix: torch.Tensor | None, for_backward: bool = False, training: bool | None = None
                           ) -> tuple[torch.Tensor, Kept]:
        """One Forward call: the hop's outputs and what it kept for the backward (or NOTHING_KEPT).
        ``training`` (default: ``for_backward``): a backward follows, so activations travel as train_wire."""
        wire = wire_format(hop.server, self.config.wire(for_backward if training is None else training))

        async def send(message):
            req = forward_request(self.model, hop.span, hidden, mask, positions, message, self.config.adapter, prefix,
                                  wire)
            req.keep_for_backward = for_backward
            return await call_forward(self.connections, hop.server.address, req, hidden, self.config.request_timeout)

        return await self._call(hop, lora, send, hidden.shape[0] * hidden.shape[1])

    async def _backward(self, trace: Trace, mask, positions, grad: torch.Tensor, extra: Extras) -> torch.Tensor:
        for span, hidden, kept, server in reversed(trace):
            grad = await self._backward_span(span, hidden, mask, positions, grad, extra, kept, server)
        return grad

    async def _backward_span(self, span: Span, hidden, mask, positions, grad: torch.Tensor,
                             extra: Extras, kept: Kept = NOTHING_KEPT, kept_at: ServerInfo | None = None
                             ) -> torch.Tensor:
        """Backward through ``span``: at ``kept_at``, the node that ``kept`` the forward pass, while it is not
        banned; else (or after it fails) over a new route; if no single live node covers ``span`` any more,
        recompute the intermediate inputs with a forward pass over a new route and go backward hop by hop."""
        attempts = self.router.attempts()
        if kept and kept_at is not None and kept_at.node_id not in self.router.banned():
            route = [Hop(kept_at, span)]
        else:
            kept = NOTHING_KEPT
            route = await self.router.route(span, spread=True)
        while True:
            if len(route) > 1:
                _, sub_trace = await self._forward(span, hidden, mask, positions, extra.lora, extra.prefix, True)
                return await self._backward(sub_trace, mask, positions, grad, extra)
            hop = route[0]
            try:
                result = await self._backward_hop(hop, hidden, mask, positions, grad, extra, kept)
            except RemoteCallError as e:
                await attempts.failed(hop, e)
                route = await self.router.reroute(attempts, span, spread=True)
                kept = NOTHING_KEPT  # activations kept by the failed node are not on the next one
                continue
            attempts.succeeded(hop)
            if self.verifier.wanted():  # re-run on another node (recomputing there); use what a majority agrees on
                async def rerun(server: ServerInfo, hop=hop):
                    return await self._backward_hop(Hop(server, hop.span), hidden, mask, positions, grad, extra)

                result, _ = await self.verifier.check(hop, result, rerun, mask)
            grad_in, grads, grad_prefix = result
            extra.lora_grads.update(grads)
            if grad_prefix is not None:
                if extra.grad_prefix is None:
                    extra.grad_prefix = torch.zeros_like(extra.prefix)
                extra.grad_prefix[span.start:span.end] = grad_prefix
            return grad_in

    async def _backward_hop(self, hop: Hop, hidden: torch.Tensor, mask, positions, grad: torch.Tensor,
                            extra: Extras, kept: Kept = NOTHING_KEPT
                            ) -> tuple[torch.Tensor, LoraGrads, torch.Tensor | None]:
        """One Backward call: the gradients w.r.t. the hop's inputs, its LoRA weights and its prefix. When the
        hop's node kept the forward pass and redeems its token alone, only the token and the output gradients
        travel; if the node has lost the pass meanwhile, the call is sent again with the inputs."""
        like = extra.lora.adapter.shapes(hop.span) if extra.lora is not None else None
        prefix_like = extra.prefix[hop.span.start:hop.span.end] if extra.prefix is not None else None
        wire = wire_format(hop.server, self.config.wire(training=True))
        tokens = 2 * hidden.shape[0] * hidden.shape[1]
        address, timeout = hop.server.address, self.config.request_timeout

        by_token = kept.by_token and self.config.backward_by_token
        if by_token:  # the node has the inputs, the adapter and the prefix: name them
            async def naming(_):
                return await call_backward(self.connections, address, by_token_request(self.model, hop.span), grad,
                                           timeout, like, prefix_like, kept.token, wire=wire)

            result = await self._call(hop, None, naming, tokens, "backward")
            if result is not None:
                return result
            self.router.metrics.inputs_resent.inc()

        async def send(message):
            req = forward_request(self.model, hop.span, hidden, mask, positions, message, self.config.adapter,
                                  extra.prefix, wire)
            return await call_backward(self.connections, address, req, grad, timeout, like, prefix_like,
                                       "" if by_token else kept.token, wire=wire)

        return await self._call(hop, extra.lora, send, tokens, "backward")
