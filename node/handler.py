"""The gRPC servicer: protobuf <-> tensors only. Block math lives in node.blocks."""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator

import grpc
import torch
from google.protobuf.message import DecodeError

from node.activations import ActivationCache
from node.batching import StepBatcher, run_together
from node.blocks import (SpanBlocks, backward_saved, backward_span, forward_for_backward, forward_span,
                         new_cache, prefixed_cache, torch_threads)
from node.lora import LoraCache, active
from swarm.arch import linear_shapes
from node.requests import (Adapters, Limits, RequestError, by_token, capped, Step, parse_backward,
                           parse_backward_by_token, parse_forward, parse_open, parse_step)
from node.chain import Chains, ChainFlow, Event, SessionEvents, check_push, first_push, until
from node.relay import Pusher, RelayLinks, parse_target
from node.sessions import CacheBudget, ClientSessions, Holding, Session, client_of, run_step
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import MODULE_FIELDS, serialize, serialize_like
from swarm import __version__
from swarm.spans import NodeState

log = logging.getLogger(__name__)
TOKEN_KINDS = ("prefill", "decode", "forward", "backward")  # what swarmlm_node_tokens_total counts, by kind


@dataclass
class ServedCounts:
    """What the node computed and refused since it started (read by node.metrics on each scrape)."""

    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOKEN_KINDS, 0))  # batch x positions
    refused: dict[str, int] = field(default_factory=dict)  # sessions refused, by RequestError.reason

    def refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1

RELAYS_PER_SESSION_SLOT = 4  # relay streams open at once per peer (node.chain): this x max_sessions_per_client
REFUSAL_WAIT = 1.0  # seconds a refused stream's first message is awaited before the refusal is sent anyway

@dataclass(frozen=True)
class SessionPolicy:
    max_length: int  # longest session accepted (positions)
    alloc_timeout: float  # seconds a session waits for cache room before RESOURCE_EXHAUSTED
    step_timeout: float  # seconds a session may sit idle between messages before it is closed
    max_chunk_tokens: int  # batch x positions computed at once in a long prefill
    activation_bytes: int = 1 << 30  # forward activations kept for a following Backward (0: always recompute)
    activation_ttl: float = 60.0  # seconds kept activations wait for their Backward
    max_sessions_per_client: int = 32  # inference streams open at once from one client (node.sessions.client_of)
    lora_cache_bytes: int = 1 << 30  # client LoRA weights kept between requests, so they need not be re-sent
    small_step_tokens: int = 16  # inference steps of at most this many batch x positions run on small_step_threads
    small_step_threads: int = 1  # torch threads for those (0: as many as for everything else)
    decode_batch_rows: int = 16  # most rows (sessions x batch) of decode steps computed as one call (1: no batching)
    decode_batch_wait: float = 0.005  # seconds a decode step waits for other sessions' (node.batching)
    inline_small_steps: bool = True  # small steps of one session run on the event-loop thread, not in the pool


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, blocks: SpanBlocks, limits: Limits, pool: ThreadPoolExecutor, budget: CacheBudget,
                 policy: SessionPolicy, throughput: float = 0.0, hosted: dict | None = None):
        self.blocks, self.limits, self.pool = blocks, limits, pool
        self.adapters = Adapters(linear_shapes(blocks.layers[0]), LoraCache(max_bytes=policy.lora_cache_bytes),
                                 hosted or {})
        self.activations = ActivationCache(policy.activation_bytes, policy.activation_ttl)
        self.budget, self.policy = budget, policy
        self.clients = ClientSessions(policy.max_sessions_per_client)
        # chained steps (node.chain, node.relay): sessions by chain token, and relay streams open per peer
        self.chains = Chains()
        self.relay_peers = ClientSessions(RELAYS_PER_SESSION_SLOT * policy.max_sessions_per_client, "relay streams")
        self.relay_links: RelayLinks | None = None  # set by node.server: pushes to the next nodes (None: no pushes)
        self.throughput = throughput
        self.open_sessions = 0
        self.in_flight = 0  # unary calls being computed
        self.state = NodeState.JOINING  # Info reports it; OFFLINE once the node starts shutting down
        self.counts = ServedCounts()
        inline_rows = policy.small_step_tokens if policy.inline_small_steps else 0
        self.batcher = StepBatcher(blocks, policy.decode_batch_rows, policy.decode_batch_wait, pool, self._step,
                                   self._together, inline_rows) if policy.decode_batch_rows > 1 else None

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            model=self.limits.model, start=self.limits.hosted.start, end=self.limits.hosted.end,
            dtype=str(self.blocks.dtype).removeprefix("torch."), version=__version__,
            hidden_size=self.limits.hidden_size, max_batch_tokens=self.limits.max_batch_tokens,
            throughput=self.throughput, cache_tokens=self.budget.capacity, cache_tokens_free=self.budget.free,
            state=self.state.value,
        )

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        try:
            x = parse_forward(request, self.limits, self.adapters)
        except RequestError as e:
            await context.abort(e.code, str(e))
        if request.keep_for_backward and self.policy.activation_bytes > 0:
            saved = await self._compute(context, forward_for_backward, self.blocks, x.span, x.hidden,
                                        x.attention_mask, x.position_ids, x.lora, x.prefix)
            token = self.activations.put(saved, client_of(context.peer()), x.hidden.dtype)
            self._count("forward", x.hidden)
            return pb.ForwardResponse(hidden_states=serialize_like(saved.out.detach().to(x.hidden.dtype),
                                                                   request.hidden_states), backward_token=token or "",
                                      backward_by_token=token is not None)
        out = await self._compute(context, self._forward, x)
        self._count("forward", x.hidden)
        return pb.ForwardResponse(hidden_states=serialize_like(out, request.hidden_states))

    async def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        if by_token(request):
            return await self._backward_by_token(request, context)
        try:
            x, grad = parse_backward(request, self.limits, self.adapters)
        except RequestError as e:
            await context.abort(e.code, str(e))
        kept = self.activations.pop(request.backward_token, client_of(context.peer())) if request.backward_token \
            else None
        if kept is not None and kept.saved.span == x.span and kept.saved.leaves[0].shape == x.hidden.shape:
            out, lora_grads, grad_prefix = await self._compute(context, backward_saved, kept.saved, grad)
        else:  # stateless: recompute the forward pass from the inputs the client sent again
            out, lora_grads, grad_prefix = await self._compute(context, self._backward, x, grad)
        self._count("backward", x.hidden)
        return self._backward_response(request, out.to(x.hidden.dtype), lora_grads, grad_prefix,
                                       x.lora.method if x.lora is not None else None,
                                       x.prefix.dtype if x.prefix is not None else None)

    async def _backward_by_token(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        """A Backward naming its kept pass instead of carrying its inputs; ``inputs_needed`` when this client
        has no pass kept under that token (the client then sends its inputs)."""
        try:
            span, grad = parse_backward_by_token(request, self.limits)
        except RequestError as e:
            await context.abort(e.code, str(e))
        kept = self.activations.pop(request.backward_token, client_of(context.peer()))
        if kept is None:
            return pb.BackwardResponse(inputs_needed=True)
        saved = kept.saved
        if saved.span != span or saved.leaves[0].shape != grad.shape:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"backward_token names a pass over blocks {saved.span} of shape "
                                f"{list(saved.leaves[0].shape)}, not blocks {span} with grad_outputs {list(grad.shape)}")
        out, lora_grads, grad_prefix = await self._compute(context, backward_saved, saved, grad)
        self._count("backward", grad)
        return self._backward_response(request, out.to(kept.dtype), lora_grads, grad_prefix,
                                       saved.lora.method if saved.lora is not None else None,
                                       saved.leaves[-1].dtype if saved.has_prefix else None)

    @staticmethod
    def _backward_response(request: pb.BackwardRequest, grad_in: torch.Tensor, lora_grads, grad_prefix,
                           method: str | None, prefix_dtype: torch.dtype | None) -> pb.BackwardResponse:
        fields = MODULE_FIELDS[method] if method is not None else ()
        response = pb.BackwardResponse(grad_inputs=serialize_like(grad_in, request.grad_outputs), lora_grads=[
            pb.LoraModule(block=block, module=name, **{f: serialize(g) for f, g in zip(fields, grads)})
            for (block, name), grads in lora_grads.items()])
        if grad_prefix is not None:
            response.grad_prefix.CopyFrom(serialize(grad_prefix.to(prefix_dtype)))
        return response

    async def Inference(self, requests, context) -> AsyncIterator[pb.InferenceResponse]:
        """A session, counted against its client's limit from the stream's first moment."""
        async for response in self._counted(self.clients, requests, context, self._session, count=True):
            yield response

    async def _counted(self, limit: ClientSessions, messages, context, serve, count: bool = False) -> AsyncIterator:
        """``serve(messages, context)``'s answers, the stream counted against its peer's ``limit`` from its first
        moment; over the limit, refused (``count``: in the refusal metrics too)."""
        peer = client_of(context.peer())
        try:
            limit.acquire(peer)
        except RequestError as e:
            if count:
                self.counts.refuse(e.reason)
            # refuse after the first message: a status sent while the client is still writing it reaches
            # gRPC clients as a local INTERNAL write failure (looks like a broken node), not as this reason;
            # but wait for it only briefly, so a client that sends nothing yet still hears why at once
            with contextlib.suppress(Exception):
                await asyncio.wait_for(messages.__anext__(), min(REFUSAL_WAIT, self.policy.step_timeout))
            await context.abort(e.code, str(e))
        try:
            async with contextlib.aclosing(serve(messages, context)) as answers:
                async for answer in answers:
                    yield answer
        finally:
            limit.release(peer)

    async def _session(self, requests, context) -> AsyncIterator[pb.InferenceResponse]:  # long: one session's whole lifecycle (reserve, loop, release) reads best in one place
        """Reserve cache room, then answer each step with the new positions' outputs.
        The cache is freed when the client closes the stream, disappears, or idles too long."""
        first = await self._next(requests, context)
        if first is None:
            return
        try:
            if self.state is NodeState.OFFLINE:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "this node is shutting down; use another",
                                   reason="shutting_down")
            span, batch, max_length, lora, prefix = parse_open(first, self.limits, self.policy.max_length,
                                                               self.adapters)
            holding = await self.budget.reserve(batch * max_length, self.policy.alloc_timeout, client_of(context.peer()))
        except RequestError as e:
            self.counts.refuse(e.reason)
            await context.abort(e.code, str(e))
        self.open_sessions += 1
        session = None
        token = first.open.chain_token
        events = SessionEvents(requests, batch, holding.reclaimed)
        flow = ChainFlow(Pusher(self.relay_links, events.notice) if self.relay_links is not None else None)
        try:
            if token:
                try:
                    self.chains.register(token, events)
                except RequestError as e:
                    await context.abort(e.code, str(e))
            virtual = prefix.shape[4] if prefix is not None else 0  # prefix-tuning positions the cache starts with
            cache = prefixed_cache(self.blocks, span, prefix) if prefix is not None else new_cache(self.blocks)
            session = Session(span, batch, max_length, cache, torch.ones(batch, virtual, dtype=torch.int64), lora)
            if first.HasField("hidden_states"):
                try:
                    request = flow.ready(Event("message", _without_open(first)), bool(token))
                except RequestError as e:
                    await context.abort(e.code, str(e))
            else:
                request = None
                yield pb.InferenceResponse(cache_length=session.length)  # the open acknowledgement
            while True:
                if request is None:
                    event = await self._event(events, context, holding)
                    if event.kind == "end":
                        return
                    if event.kind == "notice":
                        yield event.value
                        continue
                    try:
                        request = flow.ready(event, bool(token))
                    except RequestError as e:
                        await context.abort(e.code, str(e))
                    if request is None:
                        continue
                yield await self._answer(context, session, request, holding, flow, fixed=virtual,
                                         plain=lora is None and prefix is None)
                request = None
        finally:
            self.open_sessions -= 1
            events.close()
            flow.close()
            if token:
                self.chains.unregister(token)
            if self.batcher is not None and session is not None:
                self.batcher.leave(session)
            await self.budget.release(holding)

    async def _answer(self, context, session: Session, request: pb.InferenceRequest, holding: Holding,
                      flow: "ChainFlow", fixed: int, plain: bool) -> pb.InferenceResponse:
        """Compute one step message; push its outputs on if it is a chained step naming the next node."""
        try:
            step = parse_step(request, self.limits, session.batch_size, session.length, session.max_length,
                              fixed=fixed, computed=session.computed)
            target = parse_target(request.chain_push) if request.HasField("chain_push") else None
        except RequestError as e:
            await context.abort(e.code, str(e))
        session.computed += step.hidden.shape[1]
        holding.busy = True
        try:
            out = await self._run_step(context, session, step, plain)
        finally:
            holding.busy = False
        self._count("decode" if step.hidden.shape[1] == 1 else "prefill", step.hidden)
        flow.computed(request.chain_step)
        if target is not None and flow.pusher is not None:  # the next node gets it first: it is on the critical path
            flow.pusher.push(target, session.span.end, request.chain_step, target.encode(out))
        return pb.InferenceResponse(hidden_states=serialize(out), cache_length=session.length,
                                    chain_step=request.chain_step)

    async def _event(self, events: SessionEvents, context, holding: Holding) -> Event:
        """The session's next event; ends the call when the client idles past the step timeout, sends a
        malformed message, or the budget reclaims the session's cache room."""
        try:
            event = await events.next(self.policy.step_timeout)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"session idle for more than {self.policy.step_timeout:g}s; closed")
        if event.kind == "bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, capped(f"malformed stream message: {event.value}"))
        if event.kind == "reclaimed" or holding.reclaimed.is_set():
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "session reclaimed: its cache room was "
                                "needed by another session (idle sessions, and clients over their share, "
                                "give way); open a new session")
        if event.kind == "message":
            holding.touch()
        return event

    async def _next(self, requests, context) -> pb.InferenceRequest | None:
        """A stream's first message; None when the client closed the stream first."""
        try:
            return await asyncio.wait_for(requests.__anext__(), self.policy.step_timeout)
        except StopAsyncIteration:
            return None
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                                f"session idle for more than {self.policy.step_timeout:g}s; closed")
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, capped(f"malformed stream message: {e}"))

    async def Relay(self, pushes, context) -> AsyncIterator[pb.ChainAck]:
        """Chained steps: the node before this one on a client's route pushes a session's inputs (node.chain)."""
        async for ack in self._counted(self.relay_peers, pushes, context, self._relay):
            yield ack

    async def _relay(self, pushes, context) -> AsyncIterator[pb.ChainAck]:
        try:
            first = await first_push(pushes, self.policy.step_timeout)
            if first is None:
                return
            if first.step or first.HasField("hidden_states"):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a relay stream's first message carries only "
                                   "the token of the session it feeds")
            events, ended = self.chains.attach(first.token)
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no first relay message in time")
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, capped(f"malformed relay message: {e}"))
        except RequestError as e:
            self.counts.refuse("relay_" + e.reason)
            await context.abort(e.code, str(e))
        try:
            yield pb.ChainAck(step=0)
            async for push in until(pushes, ended):
                check_push(push, self.limits, events.batch)
                events.push(push.step, push.hidden_states)
                yield pb.ChainAck(step=push.step)
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, capped(f"malformed relay message: {e}"))
        except RequestError as e:
            await context.abort(e.code, str(e))
        finally:
            self.chains.detach(first.token, ended)

    async def _run_step(self, context, session: Session, step: Step, plain: bool) -> torch.Tensor:
        """One step: batched with other sessions' when node.batching may, else alone."""
        if self.batcher is None or not self.batcher.accepts(session, step, plain):
            if self.batcher is not None:
                self.batcher.leave(session)
            inline = self.policy.inline_small_steps and \
                step.hidden.shape[0] * step.hidden.shape[1] <= self.policy.small_step_tokens
            return await self._compute(context, self._step, session, step, inline=inline)
        self.in_flight += 1
        try:
            return await self.batcher.step(session, step)
        except Exception as e:  # as in _compute: this session's failure, reported to it alone
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, capped(f"{type(e).__name__}: {e}"))
        finally:
            self.in_flight -= 1

    def _together(self, sessions: list[Session], steps: list[Step]) -> list[torch.Tensor]:
        small = sum(st.hidden.shape[0] for st in steps) <= self.policy.small_step_tokens
        with torch_threads(self.policy.small_step_threads if small else 0):
            return run_together(self.blocks, sessions[0].span, sessions, steps)

    def _step(self, session: Session, step: Step) -> torch.Tensor:
        small = step.hidden.shape[0] * step.hidden.shape[1] <= self.policy.small_step_tokens
        with torch_threads(self.policy.small_step_threads if small else 0):
            return run_step(self.blocks, session, step, self.policy.max_chunk_tokens)

    def _forward(self, x) -> torch.Tensor:
        with torch.no_grad(), active(x.lora):
            cache = prefixed_cache(self.blocks, x.span, x.prefix) if x.prefix is not None else None
            out = forward_span(self.blocks, x.span, x.hidden, x.attention_mask, x.position_ids, cache)
        return out.to(x.hidden.dtype)

    def _backward(self, x, grad):
        out, lora_grads, grad_prefix = backward_span(self.blocks, x.span, x.hidden, grad, x.attention_mask,
                                                     x.position_ids, x.lora, x.prefix)
        return out.to(x.hidden.dtype), lora_grads, grad_prefix

    def _count(self, kind: str, hidden: torch.Tensor) -> None:
        """Tokens computed (batch x positions); prefill: inference steps of more than one new position
        (prompts, replayed histories, assisted-decoding drafts), decode: steps of one."""
        self.counts.tokens[kind] += hidden.shape[0] * hidden.shape[1]

    @property
    def busy(self) -> bool:
        return self.open_sessions > 0 or self.in_flight > 0

    async def _compute(self, context, fn, *args, inline: bool = False):
        """``fn(*args)`` in the compute pool; ``inline``: on this (the event loop's) thread, for steps so small
        that the hand-off to a pool thread and back (two thread wake-ups) costs a large part of the step."""
        self.in_flight += 1
        try:
            if inline:
                return fn(*args)
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except Exception as e:  # a bug or an OOM in one request must not take the node down
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, capped(f"{type(e).__name__}: {e}"))
        finally:
            self.in_flight -= 1


def _without_open(request: pb.InferenceRequest) -> pb.InferenceRequest:
    """The step part of a first message that opens the session and carries a step at once."""
    step = pb.InferenceRequest()
    step.CopyFrom(request)
    step.ClearField("open")
    return step
