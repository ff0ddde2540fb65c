"""RPC authentication in a private swarm: a grpc.aio server interceptor that checks the swarm key proof.

Every call must carry ``swarmlm-auth`` metadata (see swarm.keys): an HMAC with the swarm's RPC key
over the method, this node's address, a timestamp, a nonce, this node process's epoch and the SHA-256
of the request bytes (streams: of the stream's first message), that hash travelling in the proof. The
proof is checked from the metadata alone, before any request byte is read or hashed: a call with a
missing, wrong, stale (outside ``window`` seconds), replayed or other-epoch proof gets UNAUTHENTICATED
and its body is never hashed or parsed. A caller's first message is waited for only by a bounded number
of refusals at once (so its status reaches gRPC clients as UNAUTHENTICATED, not as a failed write);
beyond that, refusals are immediate. Accepted calls then have their body (a stream: its first message)
checked against the hash in the proof, and only then parsed.

The epoch is random per process and named in the refusal of a proof made for another one, so callers
learn it with one refused call, and a proof captured before a restart is refused after it (the nonces
the node remembered are gone, but the epoch it covers is too).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import OrderedDict
from typing import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from swarm.keys import (AUTH_HEADER, EPOCH_MARK, NO_EPOCH, Proof, SwarmKey, body_digest, mac_matches,
                        new_epoch, parse_proof)

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 60.0  # seconds a proof's timestamp may differ from the node's clock
DEFAULT_MAX_NONCES = 1 << 16  # nonces remembered at once (replay protection)
DEFAULT_MAX_DRAINING = 8  # refused calls at once that wait for the caller's first message before answering
FIRST_MESSAGE_TIMEOUT = 60.0  # seconds an authenticated stream may take to send its first message
HINT = "this node belongs to a private swarm; use the swarm's key (--swarm-key FILE, or swarm_key= in the client)"


class AuthError(Exception):
    """Why a proof was refused (the message goes to the caller)."""


class NonceCache:
    """Nonces seen within the replay window, bounded. Entries leave in arrival order."""

    def __init__(self, keep_seconds: float, max_entries: int):
        if keep_seconds <= 0 or max_entries < 1:
            raise ValueError("keep_seconds must be > 0 and max_entries >= 1")
        self.keep_seconds, self.max_entries = keep_seconds, max_entries
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten

    def add(self, nonce: str, now: float) -> None:
        """Remember ``nonce``; AuthError if it was seen before or the cache is full of live nonces."""
        while self._seen and next(iter(self._seen.values())) <= now:
            self._seen.popitem(last=False)
        if nonce in self._seen:
            raise AuthError("replayed proof: this nonce was already used; every call needs a fresh proof")
        if len(self._seen) >= self.max_entries:
            raise AuthError("too many calls in the replay window; try again shortly")
        self._seen[nonce] = now + self.keep_seconds

    def __len__(self) -> int:
        return len(self._seen)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid proof of ``key``. ``audience`` is the address clients dial."""

    def __init__(self, key: SwarmKey, audience: str = "", window: float = DEFAULT_WINDOW,
                 max_nonces: int = DEFAULT_MAX_NONCES, clock: Callable[[], float] = time.time,
                 max_draining: int = DEFAULT_MAX_DRAINING):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.key, self.audience, self.window, self.clock = key, audience, window, clock
        # a proof stays acceptable up to `window` after its timestamp, which may be `window` ahead of us
        self.nonces = NonceCache(2 * window, max_nonces)
        self.epoch = new_epoch()  # this process's: proofs made for another run of the node are refused
        self.max_draining = max_draining
        self.draining = 0  # refused calls waiting for their first message now
        self.accepted = 0  # calls whose proof matched
        self.refused = 0  # calls answered UNAUTHENTICATED
        self.hashed = 0  # request bodies (stream first messages) hashed: only of calls whose proof matched

    def check(self, metadata, method: str) -> Proof:
        """The proof in ``metadata`` if it proves the key for this call (from the metadata alone: the body
        is checked against the proof's hash later), recording its nonce; else AuthError."""
        values = [v for k, v in (metadata or ()) if k == AUTH_HEADER]
        if not values:
            raise AuthError(f"no swarm key proof: {HINT}")
        if len(values) > 1:
            raise AuthError("more than one swarm key proof in the metadata")
        try:
            proof = parse_proof(values[0])
        except ValueError as e:
            raise AuthError(f"swarm key proof is {e}") from None
        now = self.clock()
        skew = proof.timestamp - now
        if abs(skew) > self.window:
            raise AuthError(f"stale swarm key proof: its time is {skew:+.0f}s from this node's clock "
                            f"(allowed: +-{self.window:g}s; check the clocks)")
        if not mac_matches(self.key, proof, method, self.audience):
            raise AuthError(f"swarm key proof does not match (wrong key, or a proof made for another call "
                            f"or node than {self.audience or 'this one'}): {HINT}")
        if proof.epoch != self.epoch:
            why = "made before the caller knew" if proof.epoch == NO_EPOCH else "made for an earlier run of"
            raise AuthError(f"swarm key proof {why} this node process; make a new one ({EPOCH_MARK}{self.epoch})")
        self.nonces.add(proof.nonce, now)
        return proof

    def _refuse(self, method: str, reason: AuthError) -> None:
        self.refused += 1
        log.info("refused %s: %s", method, reason)

    def _body_matches(self, proof: Proof, raw: bytes) -> bool:
        self.hashed += 1
        return hmac.compare_digest(body_digest(raw).hex(), proof.digest)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        try:
            proof = self.check(details.invocation_metadata, method)
        except AuthError as e:
            self._refuse(method, e)
            return self._refusing(handler, str(e))
        self.accepted += 1
        if handler.unary_unary is not None:
            return self._checked_unary(handler, method, proof)
        if handler.stream_stream is not None:
            return self._checked_stream(handler, method, proof)
        return self._refusing(handler, f"{method}: this call shape cannot be authenticated")

    def _checked_unary(self, handler: grpc.RpcMethodHandler, method: str, proof: Proof) -> grpc.RpcMethodHandler:
        """A handler that receives the raw request bytes, checks them against the proof's hash, then parses."""
        behavior, parse = handler.unary_unary, handler.request_deserializer

        async def checked(raw: bytes, context: grpc.aio.ServicerContext):
            if not self._body_matches(proof, raw):
                self._refuse(method, AuthError("body does not match its proof"))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the request is not the one its swarm key "
                                    "proof was made for (its SHA-256 differs)")
            try:
                request = parse(raw) if parse is not None else raw
            except (DecodeError, ValueError) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}")
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, response_serializer=handler.response_serializer)

    def _checked_stream(self, handler: grpc.RpcMethodHandler, method: str, proof: Proof) -> grpc.RpcMethodHandler:
        """A handler that checks the stream's first raw message against the proof's hash, then parses every
        message for the servicer (a message that does not parse raises DecodeError there, as gRPC's would)."""
        behavior, parse = handler.stream_stream, handler.request_deserializer or (lambda raw: raw)

        async def parsed(first: bytes, raw_requests) -> AsyncIterator:
            yield parse(first)
            async for raw in raw_requests:
                yield parse(raw)

        async def checked(raw_requests, context: grpc.aio.ServicerContext):
            try:
                first = await asyncio.wait_for(anext(aiter(raw_requests)), FIRST_MESSAGE_TIMEOUT)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no first stream message in time")
            if not self._body_matches(proof, first):
                self._refuse(method, AuthError("first message does not match its proof"))
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the stream's first message is not the one "
                                    "its swarm key proof was made for (its SHA-256 differs)")
            async with contextlib.aclosing(behavior(parsed(first, raw_requests), context)) as responses:
                async for response in responses:
                    yield response

        return grpc.stream_stream_rpc_method_handler(checked, response_serializer=handler.response_serializer)

    def _refusing(self, handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
        """A handler that answers UNAUTHENTICATED without hashing or parsing anything. It takes every call as a
        request stream, so gRPC does not read a unary body first. A bounded number at once wait (5 s at
        most) for the caller's first message before answering: a status sent while the client is still
        writing reaches it as a local INTERNAL error instead of this reason."""

        async def refuse(request, context: grpc.aio.ServicerContext) -> None:
            if self.draining < self.max_draining:
                self.draining += 1
                try:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(anext(aiter(request)), 5.0)
                finally:
                    self.draining -= 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        make = grpc.stream_stream_rpc_method_handler if handler.response_streaming else \
            grpc.stream_unary_rpc_method_handler
        return make(refuse, response_serializer=handler.response_serializer)
