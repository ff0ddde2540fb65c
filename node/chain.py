"""Chained inference steps on the receiving side (issue 16): a session's events, and pushes into it.

In a chained step the client sends its hidden states to the first node of its route only; every other
node gets the step's mask, positions and cache edits from the client (``chain_await``) and its hidden
states as a push from the node before it (node.relay, the ``Relay`` RPC). So a session waits for three
kinds of things at once: the client's next message, a push, and a notice that its own push failed
(which it forwards to the client). ``SessionEvents`` queues them for the session loop in
node.handler; ``Chains`` finds a session by the secret token its client gave the node before it.

Nothing here lets a push do more than a client's step could: a push is only used as the input of a
step the client announced (same chain step number), at most ``MAX_EARLY`` pushes wait unconsumed per
session, each is checked against the node's limits and the session's batch before it is queued, and a
push whose token no open session holds is refused (PERMISSION_DENIED).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from node.requests import Limits, RequestError, check_activations_shape
from proto import swarmlm_pb2 as pb

log = logging.getLogger(__name__)

MIN_TOKEN, MAX_TOKEN = 16, 64  # bytes of a chain token (the client draws 16: 128 bits)
MAX_EARLY = 2  # pushes queued per session that no step has consumed yet (an honest node sends at most one ahead)


@dataclass(frozen=True)
class Event:
    """One thing a session loop acts on. kind: "message" (value: an InferenceRequest), "end" (the client closed
    the stream), "bad" (value: the DecodeError of a malformed message), "push" (step, value: its hidden states
    as a pb.Tensor), "notice" (value: an InferenceResponse for the client), "reclaimed" (the cache budget wants
    the session's room)."""

    kind: str
    value: object = None
    step: int = 0


class SessionEvents:
    """The events of one inference session, in arrival order. The client's stream is read one message
    ahead at most (the next is read only once the loop took this one), so gRPC flow control still bounds
    what a client can send; pushes are bounded by MAX_EARLY, notices by the steps pushed."""

    def __init__(self, requests, batch: int, reclaimed: asyncio.Event | None = None):
        self.batch = batch
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._taken = asyncio.Event()  # the loop took the client message last queued
        self._pushes = 0  # pushes queued, not yet taken
        self._tasks = [asyncio.ensure_future(self._read(requests))]
        if reclaimed is not None:
            self._tasks.append(asyncio.ensure_future(self._watch(reclaimed)))

    async def _read(self, requests) -> None:
        try:
            async for request in requests:
                self._taken.clear()
                self._queue.put_nowait(Event("message", request))
                await self._taken.wait()
            self._queue.put_nowait(Event("end"))
        except DecodeError as e:
            self._queue.put_nowait(Event("bad", e))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the call ended under us (cancelled by the client): the loop sees it as an end
            log.debug("session stream ended: %s", e)
            self._queue.put_nowait(Event("end"))

    async def _watch(self, reclaimed: asyncio.Event) -> None:
        await reclaimed.wait()
        self._queue.put_nowait(Event("reclaimed"))

    async def next(self, timeout: float) -> Event:
        """The next event; asyncio.TimeoutError after ``timeout`` seconds without one."""
        event = await asyncio.wait_for(self._queue.get(), timeout)
        if event.kind == "message":
            self._taken.set()
        elif event.kind == "push":
            self._pushes -= 1
        return event

    def push(self, step: int, hidden: pb.Tensor) -> None:
        """Queue a push's hidden states as the input of chain step ``step``; RESOURCE_EXHAUSTED when too many wait."""
        if self._pushes >= MAX_EARLY:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"{MAX_EARLY} pushes already wait for steps the client has not sent; slow down")
        self._pushes += 1
        self._queue.put_nowait(Event("push", hidden, step))

    def notice(self, step: int, message: str) -> None:
        """Tell the client (between answers) that this node's push of ``step``'s outputs failed."""
        self._queue.put_nowait(Event("notice", pb.InferenceResponse(chain_step=step, chain_error=message[:1000])))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()


class Chains:
    """Open sessions that accept pushes, by chain token (a secret only their client and the node before
    them know). At most one Relay stream feeds a session: a newer one replaces an older."""

    def __init__(self) -> None:
        self._sessions: dict[bytes, SessionEvents] = {}
        self._relays: dict[bytes, asyncio.Event] = {}  # token -> set to end the relay stream feeding it now

    def register(self, token: bytes, events: SessionEvents) -> None:
        if not MIN_TOKEN <= len(token) <= MAX_TOKEN:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"chain_token must be {MIN_TOKEN}..{MAX_TOKEN} bytes, got {len(token)}")
        if token in self._sessions:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "chain_token already names another open session; "
                               "draw a fresh random one")
        self._sessions[token] = events

    def unregister(self, token: bytes) -> None:
        self._sessions.pop(token, None)
        ended = self._relays.pop(token, None)
        if ended is not None:
            ended.set()

    def attach(self, token: bytes) -> tuple[SessionEvents, asyncio.Event]:
        """The session a relay stream with ``token`` feeds, and the event that ends that stream;
        PERMISSION_DENIED when no open session holds the token."""
        events = self._sessions.get(token)
        if events is None:
            raise RequestError(grpc.StatusCode.PERMISSION_DENIED,
                               "no inference session on this node holds that chain token (a wrong token, or the "
                               "session has ended); pushes are accepted only for a session whose client named you")
        older = self._relays.get(token)
        if older is not None:
            older.set()
        self._relays[token] = ended = asyncio.Event()
        return events, ended

    def detach(self, token: bytes, ended: asyncio.Event) -> None:
        if self._relays.get(token) is ended:
            del self._relays[token]

    def __len__(self) -> int:
        return len(self._sessions)


def check_push(push: pb.ChainPush, limits: Limits, batch: int) -> None:
    """A push's step number and tensor header against the node's limits and the session's batch (the tensor
    is parsed in full, like a client's step, when the step is computed)."""
    if push.token or push.step < 1 or not push.HasField("hidden_states"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "a push after the first message carries a step number >= 1 and hidden_states (no token)")
    check_activations_shape(push.hidden_states, limits, "pushed hidden_states")
    if push.hidden_states.shape[0] != batch:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"pushed batch {push.hidden_states.shape[0]} != the session's batch_size {batch}")
    if push.hidden_states.encoding:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "inference activations travel unencoded (plain dtypes)")


async def first_push(pushes, timeout: float) -> pb.ChainPush | None:
    """A relay stream's first message (its token), or None when it ends first; TimeoutError after ``timeout``."""
    with contextlib.suppress(StopAsyncIteration):
        return await asyncio.wait_for(anext(aiter(pushes)), timeout)
    return None


async def until(pushes, ended: asyncio.Event):
    """The messages of a relay stream until it ends or ``ended`` is set (its session ended, or a newer
    relay stream replaced it)."""
    stop = asyncio.ensure_future(ended.wait())
    try:
        while not ended.is_set():
            message = asyncio.ensure_future(anext(aiter(pushes)))
            done, _ = await asyncio.wait({message, stop}, return_when=asyncio.FIRST_COMPLETED)
            if message not in done:
                message.cancel()
                return
            try:
                yield message.result()
            except StopAsyncIteration:
                return
    finally:
        stop.cancel()


class ChainFlow:
    """Which step message of a session is ready to compute, as its events arrive: a plain step at once; a
    chained step awaiting its input (``chain_await``) once the push for it (or the client's supply) came.
    Keeps the step numbers increasing and every step computed once."""

    def __init__(self, pusher=None):
        self.pusher = pusher  # node.relay.Pusher of this session (None: this node pushes nothing)
        self.done = 0  # the latest chain step computed
        self.pending: pb.InferenceRequest | None = None  # a chained step waiting for its input
        self.early: dict[int, pb.Tensor] = {}  # pushes that came before their step's message

    def ready(self, event: Event, accepts_pushes: bool) -> pb.InferenceRequest | None:
        """The step message to compute now (its hidden states filled in), or None; RequestError for a message
        that breaks the protocol."""
        bad = grpc.StatusCode.INVALID_ARGUMENT
        if event.kind == "push":
            if event.step <= self.done:
                return None  # stale: the client supplied that step's input itself
            if self.pending is not None and event.step == self.pending.chain_step:
                return self._fill(event.value)
            self.early[event.step] = event.value
            while len(self.early) > MAX_EARLY:
                del self.early[min(self.early)]
            return None
        request: pb.InferenceRequest = event.value
        if request.HasField("open"):
            raise RequestError(bad, "this session is already open")
        step = request.chain_step
        if self.pending is not None:
            if step == self.pending.chain_step and _is_supply(request):
                return self._fill(request.hidden_states)
            raise RequestError(bad, f"chain step {self.pending.chain_step} awaits its input (a push, or a message with "
                                    f"only chain_step {self.pending.chain_step} and hidden_states); got another message")
        if step and step <= self.done:
            if _is_supply(request):
                return None  # the push came first: that step is computed and answered already
            raise RequestError(bad, f"chain_step {step} is not after the latest chained step {self.done}")
        if not request.chain_await:
            return request
        if not step or request.HasField("hidden_states"):
            raise RequestError(bad, "a chain_await step carries a chain_step and no hidden_states")
        if not accepts_pushes:
            raise RequestError(bad, "chain_await in a session opened without a chain_token: nothing could feed it")
        self.pending = request
        early = self.early.pop(step, None)
        return self._fill(early) if early is not None else None

    def _fill(self, hidden: pb.Tensor) -> pb.InferenceRequest:
        request = pb.InferenceRequest()
        request.CopyFrom(self.pending)
        request.chain_await = False
        request.hidden_states.CopyFrom(hidden)
        self.pending = None
        return request

    def computed(self, step: int) -> None:
        if step:
            self.done = step
            self.early = {k: v for k, v in self.early.items() if k > step}

    def close(self) -> None:
        if self.pusher is not None:
            self.pusher.close()


def _is_supply(request: pb.InferenceRequest) -> bool:
    """A message giving an awaited step's input: chain_step and hidden_states, nothing else."""
    return (request.HasField("hidden_states") and not request.chain_await and not request.HasField("chain_push")
            and not request.HasField("attention_mask") and not request.HasField("position_ids")
            and not request.drop and not len(request.reorder))
