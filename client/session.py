"""Inference sessions: one bidirectional stream per hop, holding that hop's key/value cache.

``InferenceSession.step`` is the sync bridge; the streams live on the client's event loop. Each hop
remembers the inputs it was sent, so when a node dies mid-generation its blocks are re-routed and
the replacement's cache is rebuilt by replaying that history: nothing is lost.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
import torch

from client.adapters import ClientAdapter
from client.chain import SwarmLink
from client.chained import ChainedStep, chainable, new_token
from client.policy import Attempts
from client.prompts import RemotePrefix
from client.transport import RemoteCallError, call_forward, decode_tensor, forward_request, wire_format
from proto import swarmlm_pb2 as pb
from proto.tensors import encode, serialize
from swarm.routing import Hop
from swarm.spans import ServerInfo, Span

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Stream:
    """An open Inference stream to one node for one hop, and everything sent through it."""

    hop: Hop
    call: grpc.aio.StreamStreamCall | None  # None until opened
    sent: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    lora: pb.LoraAdapter | None = None  # the client-held adapter the session opened with, if any
    reorder: torch.Tensor | None = None  # beam search rows the node's cache must take before the next step
    drop: int = 0  # latest positions the node's cache must forget before the next step (assisted decoding)
    token: bytes = b""  # chained steps (client.chained): the secret its session takes pushes with (b"": none)
    linked: bool = False  # chained steps: its inputs come pushed by the previous hop's node, not from us
    _answers: asyncio.Queue | None = None  # what the node sent, read ahead by _read (or the error that ended it)
    _reader: asyncio.Task | None = None
    _unread: list = field(default_factory=list)

    def history(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Everything sent through this hop so far as one step: (hidden, mask, positions)."""
        hidden, mask, positions = (torch.cat(parts, dim=1) for parts in zip(*self.sent))
        return hidden, mask, positions

    def drop_last(self, count: int) -> None:
        """Forget the latest ``count`` positions: from the history now, from the node's cache with the next step."""
        hidden, mask, positions = self.history()
        keep = hidden.shape[1] - count
        self.sent = [(hidden[:, :keep], mask[:, :keep], positions[:, :keep])] if keep else []
        self.drop += count

    def reorder_rows(self, rows: torch.Tensor) -> None:
        """Row i continues from old row ``rows[i]``: the history now (a replay rebuilds the reordered
        cache), the node's cache with the next step."""
        self.sent = [tuple(t.index_select(0, rows) for t in part) for part in self.sent]
        self.reorder = rows if self.reorder is None else self.reorder.index_select(0, rows)

    def start(self, call: grpc.aio.StreamStreamCall) -> None:
        """Use ``call``, reading its answers as they come (a chained step waits on several streams at once)."""
        self.call, self._answers = call, asyncio.Queue()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        address = self.hop.server.address
        try:
            while True:
                response = await self.call.read()
                if response is grpc.aio.EOF:
                    error = RemoteCallError(address, await self.call.code(), await self.call.details() or "stream ended")
                    break
                self._answers.put_nowait(response)
        except grpc.aio.AioRpcError as e:
            error = RemoteCallError(address, e.code(), e.details() or "")
        except asyncio.InvalidStateError:
            error = RemoteCallError(address, await self.call.code(), await self.call.details() or "stream ended")
        self._answers.put_nowait(error)

    async def receive(self, timeout: float) -> pb.InferenceResponse:
        """The node's next message; RemoteCallError if the stream ended (again on every later call) or nothing
        came in ``timeout`` seconds (then the stream is cancelled)."""
        try:
            item = await asyncio.wait_for(self.next_item(), timeout)
        except asyncio.TimeoutError:
            self.call.cancel()
            raise RemoteCallError(self.hop.server.address, grpc.StatusCode.DEADLINE_EXCEEDED,
                                  f"no answer in {timeout:g}s") from None
        if isinstance(item, RemoteCallError):
            self.unread(item)
            raise item
        return item

    async def next_item(self) -> pb.InferenceResponse | RemoteCallError:
        """The next message or error, as queued (``unread`` ones first); nothing is lost if this is cancelled."""
        if self._unread:
            return self._unread.pop()
        return await self._answers.get()

    def unread(self, item: pb.InferenceResponse | RemoteCallError) -> None:
        """Put back what ``next_item`` gave: the next call returns it again."""
        self._unread.append(item)

    async def write(self, request: pb.InferenceRequest) -> None:
        address = self.hop.server.address
        try:
            await self.call.write(request)
        except grpc.aio.AioRpcError as e:
            raise RemoteCallError(address, e.code(), e.details() or "") from None
        except asyncio.InvalidStateError:  # the stream had already ended (e.g. the node died between steps)
            raise RemoteCallError(address, await self.call.code(), await self.call.details() or "stream ended") from None

    async def exchange(self, request: pb.InferenceRequest, timeout: float) -> pb.InferenceResponse:
        """Send ``request``, return its answer (notices of earlier chained steps are skipped)."""
        await self.write(request)
        while True:
            response = await self.receive(timeout)
            if response.HasField("hidden_states") or not response.chain_error:
                return response

    def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()


class _OpenFailed(Exception):
    """Opening ``stream`` failed with ``error``."""

    def __init__(self, stream: _Stream, error: RemoteCallError):
        super().__init__(str(error))
        self.stream, self.error = stream, error


class InferenceSession:
    """Server-side caches along a route, for generation. Use as a context manager."""

    def __init__(self, link: SwarmLink, max_length: int, lora: ClientAdapter | None = None,
                 prefix: RemotePrefix | None = None):
        """``link``: the chain's connection to the swarm (``RemoteChain.link``). ``max_length`` counts every
        position, a prefix-tuning ``prefix``'s virtual ones included."""
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.link, self.max_length, self.lora, self.prefix = link, max_length, lora, prefix
        self.batch_size: int | None = None
        self._position_bytes = 0  # hidden size x element size, known with the first step
        # leading positions that are no tokens: prefix-tuning keys/values every node's cache starts with,
        # or prompt-tuning virtual tokens (set by the PEFT wrapper when it prepends them)
        self.virtual = prefix.num_virtual_tokens if prefix is not None else 0
        self.position = self.virtual  # positions already in every node's cache
        self.token_ids: torch.Tensor | None = None  # tokens of the conversation so far (for generate)
        self.attention_mask: torch.Tensor | None = None  # their mask
        self._prefix_kv: torch.Tensor | None = None  # [blocks, 2, batch, kv_heads, virtual, head_dim], once known
        self._streams: list[_Stream] = []
        self.closed = False
        self.chain_steps = 0  # chained steps sent so far (client.chained numbers them)

    # ---- the sync bridge -------------------------------------------------------------------
    def step(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
             position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Send the hidden states of NEW positions through every block; returns their outputs."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        batch, new = hidden.shape[:2]
        if self.batch_size is None:
            self.batch_size = batch
            self._position_bytes = hidden.shape[-1] * 4  # bytes of one position's outputs (float32 at most)
        if batch != self.batch_size:
            raise ValueError(f"this session runs batch size {self.batch_size}, got {batch}")
        if self.position + new > self.max_length:
            raise ValueError(f"session max_length {self.max_length} exceeded: {self.position} + {new} positions")
        mask = attention_mask if attention_mask is not None else torch.ones(batch, new, dtype=torch.int64)
        positions = position_ids if position_ids is not None else \
            torch.arange(self.position, self.position + new).unsqueeze(0)
        positions = positions.to(torch.int64).expand(batch, new)  # one shape for every step, so replays concatenate
        out = self.link.run(self._step(hidden.detach(), mask.to(torch.int64), positions))
        self.position += new
        return out

    def reorder(self, rows: torch.Tensor) -> None:
        """Beam search: row i of every cache continues from old row ``rows[i]`` (sent with the next step)."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten().cpu()
        if self.batch_size is None:
            return  # nothing cached yet
        if rows.numel() != self.batch_size or not ((0 <= rows) & (rows < self.batch_size)).all():
            raise ValueError(f"reorder needs {self.batch_size} row numbers in [0, {self.batch_size}), "
                             f"got {rows.tolist()}")
        if torch.equal(rows, torch.arange(self.batch_size)):
            return
        for stream in self._streams:
            stream.reorder_rows(rows)

    def crop(self, count: int) -> None:
        """Forget the latest ``count`` token positions of every cache (draft tokens that assisted decoding
        rejected); the nodes drop them with the next step."""
        if self.closed:
            raise RuntimeError("this inference session is closed")
        tokens = self.position - self.virtual if self.prefix is not None else self.position
        if not 0 <= count <= tokens:
            raise ValueError(f"cannot crop {count} positions: the session holds {tokens}")
        if count == 0:
            return
        for stream in self._streams:
            stream.drop_last(count)
        self.position -= count

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for stream in self._streams:
                self.link.call_soon(stream.close)
            self._streams = []

    def __enter__(self) -> "InferenceSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- async internals -------------------------------------------------------------------
    async def _step(self, hidden, mask, positions) -> torch.Tensor:
        if not self._streams:
            self._streams = await self._open(Span(0, self.link.num_blocks))
        if chainable(self._streams, hidden, self.link):  # each node passes its outputs straight to the next
            return await ChainedStep(self, hidden, mask, positions).run()
        index = 0
        tries: dict[int, Attempts] = {}  # the hops of this step that failed, by position in the chain
        while index < len(self._streams):
            stream = self._streams[index]
            try:
                out = await self._send(stream, hidden, mask, positions)
            except RemoteCallError as e:
                attempts = tries.setdefault(index, self.link.router.attempts())
                stream.close()
                await attempts.failed(stream.hop, e)  # gives up by raising; else bans / backs off / notes
                self._streams[index:index + 1] = await self._replace(stream, attempts)
                continue  # retry this position of the chain with the replacement(s)
            if index in tries:
                tries.pop(index).succeeded(stream.hop)
            done = 1
            if hidden.shape[1] and self.link.verifier.wanted():
                out, outvoted = await self._verify(stream, out, hidden.shape[1])
                if outvoted:  # its cache is suspect too: move its blocks elsewhere, replaying the history
                    stream.close()  # the verifier banned its node
                    replacements = await self._replace(stream, self.link.router.attempts())
                    self._streams[index:index + 1] = replacements
                    done = len(replacements)  # they already hold this step (it was replayed)
            hidden, index = out, index + done
        return hidden

    async def _verify(self, stream: _Stream, out: torch.Tensor, new: int) -> tuple[torch.Tensor, bool]:
        """Check a step: another node serving the hop's blocks runs the hop's whole input history as one
        stateless Forward; its last ``new`` positions must match. Returns the trusted outputs and
        whether the hop's node was outvoted (see client.verify)."""
        link = self.link
        hidden, mask, positions = stream.history()

        prefix = self._prefix_keys_values() if self.prefix is not None else None
        if prefix is not None:  # a stateless Forward's mask covers the prefix positions too
            mask = torch.cat([mask.new_ones(mask.shape[0], self.virtual), mask], dim=1)

        async def rerun(server: ServerInfo) -> torch.Tensor:
            req = forward_request(link.model, stream.hop.span, hidden, mask, positions, stream.lora, link.adapter, prefix,
                                  wire_format(server, link.wire_dtype))
            full, _ = await call_forward(link.connections, server.address, req, hidden, link.request_timeout)
            return full[:, -new:]

        return await link.verifier.check(stream.hop, out, rerun, mask)

    def _prefix_keys_values(self) -> torch.Tensor:
        """The prefix keys/values of every block for this session's batch, as they were when it opened."""
        if self._prefix_kv is None:
            with torch.no_grad():
                self._prefix_kv = self.prefix.key_values(self.batch_size).detach().contiguous()
        return self._prefix_kv

    async def _open(self, span: Span, attempts: Attempts | None = None) -> list[_Stream]:
        """Open streams along a route over ``span``; after failures (``attempts``), along a fresh one that
        avoids what failed. A node without room for us is alive and honest: tried elsewhere, never banned."""
        router = self.link.router
        attempts = attempts or router.attempts()
        route = await (router.reroute(attempts, span) if attempts.number else router.route(span))
        while True:
            streams, failure = await self._open_route(route)
            if failure is None:
                return streams
            await attempts.failed(*failure)
            route = await router.reroute(attempts, span)

    async def _open_route(self, route: list[Hop]) -> tuple[list[_Stream], tuple[Hop, RemoteCallError] | None]:
        """One stream per hop of ``route``; on a failure, none (those opened are closed) and what failed."""
        link, streams = self.link, []
        for hop in route:
            try:
                stream = await self._open_stream(hop)
            except _OpenFailed as failed:
                for s in [*streams, failed.stream]:
                    s.close()
                return [], (hop, link.connections.classify(failed.error))  # a failed TLS handshake is no dead node
            streams.append(stream)
        return streams, None

    async def _open_stream(self, hop: Hop) -> _Stream:
        """An open stream to ``hop``; once more if the node refused our proof for naming an older run of it
        (a private swarm's node that restarted). _OpenFailed otherwise."""
        link = self.link
        link.connections.stub(hop.server.address)  # a node this client must not dial raises here, as before
        for retry in (True, False):
            stream = _Stream(hop, None)
            if self.link.chained_steps and hop.server.chain:  # its node may take pushes from the previous hop's
                stream.token, stream.linked = new_token(), True
            first = pb.InferenceRequest(open=self._session_options(hop, stream))
            try:
                # an answer holds the outputs of one step message: at most max(step tokens, batch) positions
                expected = max(link.max_step_tokens, self.batch_size) * self._position_bytes
                stream.start(await link.connections.inference(hop.server.address, first, link.request_timeout,
                                                              expected=expected))
                answer = await stream.exchange(first, link.request_timeout)
                link.connections.bytes_sent += first.ByteSize()  # counted as every step is (benchmarks read these)
                link.connections.bytes_received += answer.ByteSize()
                return stream
            except RemoteCallError as error:
                if not (retry and link.connections.learn_epoch(error)):
                    raise _OpenFailed(stream, error) from None
                stream.close()
        raise AssertionError("unreachable")

    def _session_options(self, hop: Hop, stream: _Stream) -> pb.SessionOptions:
        opts = pb.SessionOptions(model=self.link.model, start=hop.span.start, end=hop.span.end,
                                 batch_size=self.batch_size, max_length=self.max_length,
                                 adapter_name=self.link.adapter or "")
        opts.chain_token = stream.token
        if self.prefix is not None:  # the node's cache starts with this hop's prefix keys/values
            opts.prefix.CopyFrom(serialize(self._prefix_keys_values()[hop.span.start:hop.span.end]))
        if self.lora is not None:  # the session applies the adapter as it is when the session opens
            opts.lora.CopyFrom(self.lora.message(hop.span, with_weights=True))
            opts.lora.dropout = 0.0
            stream.lora = opts.lora
        return opts

    async def _replace(self, failed: _Stream, attempts: Attempts) -> list[_Stream]:
        """New streams for a failed hop's blocks, their caches rebuilt by replaying its history."""
        while True:
            streams = await self._open(failed.hop.span, attempts)
            current = streams[0]
            try:
                if failed.sent:
                    hidden, mask, positions = failed.history()
                    for current in streams:
                        hidden = await self._send(current, hidden, mask, positions)
                    self.link.router.metrics.replay_positions.inc(positions.shape[1])
                self.link.router.metrics.failovers.inc()
                return streams
            except RemoteCallError as e:
                for s in streams:
                    s.close()
                log.warning("replaying history on a replacement failed: %s", e)
                await attempts.failed(current.hop, e)

    async def _send(self, stream: _Stream, hidden, mask, positions) -> torch.Tensor:
        """One step through one hop, split so no message exceeds the client's step size."""
        batch = hidden.shape[0]
        size = max(1, self.link.max_step_tokens // batch)
        outputs, parts = [], []
        wire = wire_format(stream.hop.server, self.link.wire_dtype)
        for lo in range(0, hidden.shape[1], size):
            part = (hidden[:, lo:lo + size], mask[:, lo:lo + size], positions[:, lo:lo + size])
            request = pb.InferenceRequest(hidden_states=encode(part[0], wire), attention_mask=serialize(part[1]),
                                          position_ids=serialize(part[2]))
            if lo == 0:  # what the node's cache must forget or reorder first
                request.drop = stream.drop
                if stream.reorder is not None:
                    request.reorder.extend(stream.reorder.tolist())
            started = time.monotonic()
            response = await stream.exchange(request, self.link.request_timeout)
            seconds = time.monotonic() - started
            self.link.router.succeeded(stream.hop, seconds, part[0].shape[0] * part[0].shape[1])
            self.link.router.metrics.exchange("inference", stream.hop.server.address, seconds)
            stream.reorder, stream.drop = None, 0  # the node has applied them
            self.link.connections.bytes_sent += request.ByteSize()  # (benchmarks read these)
            self.link.connections.bytes_received += response.ByteSize()
            outputs.append(decode_tensor(stream.hop.server.address, response.hidden_states, part[0]))
            parts.append(part)
        stream.sent.extend(parts)  # only whole steps: a replay must not repeat half of one
        return torch.cat(outputs, dim=1)
