"""Chained inference steps (issue 16): a step travels client -> node 1 -> node 2 -> ... -> client.

Per hop, a decode step costs 2 x hops one-way delays (client -> node 1 -> client -> node 2 -> client). In a
chained step the client writes its hidden states to the first hop only; every other hop gets the step's mask,
positions and cache edits (``chain_await``), and its hidden states as a push from the node before it, which
the client's step message names (``chain_push``: the next hop's address and the secret token of its session
there, node.relay). The last hop's answer is the step's result: hops + 1 one-way delays.

Every node still answers the client with its outputs (off the critical path), so each hop's input history is
kept here as before and a failed hop is replaced by replaying only its history (InferenceSession._replace).
When a push does not come (a node says its push failed, or the next hop's answer is ``PATIENCE`` seconds late
after the previous hop's), the client sends that hop its input itself (a "supply"; a node computes a step once
whichever comes first) and feeds that hop itself from then on. When a hop fails the step is finished hop by
hop from there, the failed hop replaced, exactly as a per-hop step would be.

Per hop instead: steps larger than one message (max_step_tokens), routes with a node that does not announce
chained steps, ClientConfig(chained_steps=False), and verify_fraction > 0 (client.verify re-runs a hop's
outputs before they go on, so each hop's input must pass through the client).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING

import torch

from client.transport import RemoteCallError, decode_tensor, wire_format
from proto import swarmlm_pb2 as pb
from proto.tensors import encode, serialize

if TYPE_CHECKING:
    from client.chain import SwarmLink
    from client.session import InferenceSession, _Stream

log = logging.getLogger(__name__)

TOKEN_BYTES = 16  # 128-bit session tokens
PATIENCE = 2.0  # seconds a hop's answer may lag the previous hop's before the client gives it its input itself


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def chainable(streams: list["_Stream"], hidden: torch.Tensor, link: "SwarmLink") -> bool:
    """Whether this step can travel the chain: every hop takes pushes, and it fits in one message."""
    return (link.chained_steps and len(streams) > 1 and all(s.token for s in streams) and hidden.shape[1] > 0
            and hidden.shape[0] * hidden.shape[1] <= link.max_step_tokens)


class ChainedStep:
    """One chained step of a session: ``await run()`` returns the last hop's outputs."""

    def __init__(self, session: "InferenceSession", hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        self.session, self.link = session, session.link
        session.chain_steps += 1
        self.number = session.chain_steps
        self.hidden, self.mask, self.positions = hidden, mask, positions
        self.streams = list(session._streams)  # the hops this step was sent along
        self.inputs: dict[int, torch.Tensor] = {0: hidden}  # by position in self.streams
        self.outputs: dict[int, torch.Tensor] = {}
        self.written: set[int] = set()  # hops sent this step's message
        self.given: set[int] = set()  # hops sent this step's hidden states by us
        self.ended: set[int] = set()  # hops whose stream ended after they answered
        self.started = time.monotonic()
        self.known_at: dict[int, float] = {0: self.started}  # when each hop's input reached us

    async def run(self) -> torch.Tensor:
        try:
            await self._write(0, with_hidden=True)
            for j in range(1, len(self.streams)):
                if self.streams[j].linked:
                    await self._write(j, with_hidden=False)
            await self._gather()
        except RemoteCallError as e:  # a hop failed: the step is finished hop by hop, that hop replaced
            log.warning("chained step %d: %s; finishing the step hop by hop", self.number, e)
        return await self._finish()

    # ---- messages ---------------------------------------------------------------------------
    def _request(self, j: int) -> pb.InferenceRequest:
        """Hop ``j``'s step message without hidden states: mask, positions, cache edits, where to push."""
        stream, nxt = self.streams[j], self.streams[j + 1] if j + 1 < len(self.streams) else None
        request = pb.InferenceRequest(attention_mask=serialize(self.mask), position_ids=serialize(self.positions),
                                      chain_step=self.number, drop=stream.drop)
        if stream.reorder is not None:
            request.reorder.extend(stream.reorder.tolist())
        stream.reorder, stream.drop = None, 0  # sent (a replacement replays a history that has them applied)
        if nxt is not None and nxt.linked:
            request.chain_push.CopyFrom(pb.ChainTarget(
                address=nxt.hop.server.address, token=nxt.token, dtype=str(self.hidden.dtype).removeprefix("torch."),
                wire=wire_format(nxt.hop.server, self.link.wire_dtype) or ""))
        return request

    async def _write(self, j: int, with_hidden: bool) -> None:
        """Hop ``j``'s step message (awaiting a push unless ``with_hidden``), or its input alone if it has it."""
        stream = self.streams[j]
        if j in self.written:  # a supply: the input of the step it awaits
            request = pb.InferenceRequest(chain_step=self.number)
        else:
            request = self._request(j)
            request.chain_await = not with_hidden
        if with_hidden:
            request.hidden_states.CopyFrom(encode(self.inputs[j], wire_format(stream.hop.server, self.link.wire_dtype)))
            self.given.add(j)
        self.written.add(j)
        await stream.write(request)
        self.link.connections.bytes_sent += request.ByteSize()

    def _answer(self, j: int, response: pb.InferenceResponse) -> torch.Tensor:
        stream = self.streams[j]
        if response.chain_step != self.number:
            raise RemoteCallError(stream.hop.server.address, None,
                                  f"answered chain step {response.chain_step}, expected {self.number}")
        self.link.connections.bytes_received += response.ByteSize()
        out = decode_tensor(stream.hop.server.address, response.hidden_states, self.hidden)
        seconds = time.monotonic() - self.started
        self.link.router.succeeded(stream.hop, seconds)
        self.link.router.metrics.exchange("inference", stream.hop.server.address, seconds)
        return out

    # ---- the chained part -------------------------------------------------------------------
    async def _gather(self) -> None:
        """Every hop's answer, giving a hop its input ourselves where a push did not come; RemoteCallError
        when a hop fails (the rest is then _finish's)."""
        n = len(self.streams)
        reads: dict[int, asyncio.Future] = {}
        try:
            while len(self.outputs) < n:
                await self._supply_late()
                for j in range(n):
                    if j not in reads and j not in self.ended:
                        reads[j] = asyncio.ensure_future(self.streams[j].next_item())
                done, _ = await asyncio.wait(set(reads.values()), timeout=self._wake(),
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done and time.monotonic() - self.started > self.link.request_timeout:
                    late = min(set(range(n)) - set(self.outputs))
                    raise RemoteCallError(self.streams[late].hop.server.address, None,
                                          f"no answer to chained step {self.number} in {self.link.request_timeout:g}s")
                for j in [j for j, r in reads.items() if r in done]:
                    self._take(j, reads.pop(j).result())
        finally:
            for j, read in reads.items():
                if read.done():
                    self.streams[j].unread(read.result())
                else:
                    read.cancel()

    def _take(self, j: int, item) -> None:
        stream, n = self.streams[j], len(self.streams)
        if isinstance(item, RemoteCallError):
            stream.unread(item)  # it stays failed
            self.ended.add(j)
            if j not in self.outputs:
                raise item
            if j + 1 < n:  # it answered, but its push may never come
                self.streams[j + 1].linked = False
            return
        if item.HasField("hidden_states") and j not in self.outputs:
            self.outputs[j] = self._answer(j, item)
            if j + 1 < n:
                self.inputs[j + 1], self.known_at[j + 1] = self.outputs[j], time.monotonic()
        elif item.chain_error and item.chain_step == self.number and j + 1 < n:
            log.warning("chained step %d: hop %d (%s) could not push to hop %d: %s; sending hop %d its inputs "
                        "from now on", self.number, j, stream.hop.server.address, j + 1, item.chain_error, j + 1)
            self.streams[j + 1].linked = False
        # anything else is a notice about an earlier step, already handled

    async def _supply_late(self) -> None:
        """Give their input to hops whose push will not come (or is PATIENCE late)."""
        now = time.monotonic()
        for j, stream in enumerate(self.streams):
            if j in self.outputs or j in self.given or j not in self.inputs:
                continue
            if stream.linked and now - self.known_at[j] < PATIENCE:
                continue
            if stream.linked:
                log.warning("chained step %d: hop %d (%s) did not answer %.1fs after hop %d did; sending it its "
                            "inputs from now on", self.number, j, stream.hop.server.address, PATIENCE, j - 1)
                stream.linked = False
            await self._write(j, with_hidden=True)

    def _wake(self) -> float:
        """Seconds until a hop's patience runs out, or the step's timeout."""
        now = time.monotonic()
        due = [self.known_at[j] + PATIENCE for j in self.inputs if j not in self.outputs and j not in self.given]
        return max(0.0, min([*due, self.started + self.link.request_timeout]) - now) + 0.01

    # ---- hop by hop --------------------------------------------------------------------------
    async def _finish(self) -> torch.Tensor:
        """Walk the route in order: record each hop's history, finish the hops that have not answered, replace
        a failed hop (replaying its history, then this step through its replacements)."""
        session = self.session
        streams, index, x = session._streams, 0, self.hidden
        position = {id(s): j for j, s in enumerate(self.streams)}
        tries = {}
        while index < len(streams):
            stream = streams[index]
            j = position.get(id(stream))
            try:
                if j is None:  # a replacement: a plain step
                    out = await session._send(stream, x, self.mask, self.positions)
                else:
                    out = self.outputs[j] if j in self.outputs else await self._await(j, x)
            except RemoteCallError as e:
                attempts = tries.setdefault(index, self.link.router.attempts())
                stream.close()
                await attempts.failed(stream.hop, e)  # gives up by raising; else bans / backs off / notes
                streams[index:index + 1] = await session._replace(stream, attempts)
                continue
            if index in tries:
                tries.pop(index).succeeded(stream.hop)
            if j is not None:
                stream.sent.append((x, self.mask, self.positions))
            x, index = out, index + 1
        return x

    async def _await(self, j: int, x: torch.Tensor) -> torch.Tensor:
        """Hop ``j``'s answer, after giving it its input ``x`` unless it was given already."""
        self.inputs[j] = x
        if j not in self.given:
            await self._write(j, with_hidden=True)
        while True:
            response = await self.streams[j].receive(self.link.request_timeout)
            if response.HasField("hidden_states"):
                self.outputs[j] = out = self._answer(j, response)
                return out
