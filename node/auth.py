"""RPC authentication in a private swarm: a grpc.aio server interceptor that checks the swarm key proof.

Every call must carry ``swarmlm-auth`` metadata (see swarm.keys): an HMAC with the swarm's RPC key
over the method, this node's address, a timestamp, a nonce and the SHA-256 of the request bytes
(streams: the stream is authenticated when it opens). A call with a missing, wrong, stale (outside
``window`` seconds) or replayed proof gets UNAUTHENTICATED before anything is parsed or computed.
Unary requests reach the servicer only after their bytes were hashed and matched; they are parsed
after that, never before.
"""
from __future__ import annotations

import asyncio
import contextlib

import logging
import time
from collections import OrderedDict
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from swarm.keys import AUTH_HEADER, STREAM_BODY, SwarmKey, body_digest, mac_matches, parse_proof

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 60.0  # seconds a proof's timestamp may differ from the node's clock
DEFAULT_MAX_NONCES = 1 << 16  # nonces remembered at once (replay protection)
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
                 max_nonces: int = DEFAULT_MAX_NONCES, clock: Callable[[], float] = time.time):
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        self.key, self.audience, self.window, self.clock = key, audience, window, clock
        # a proof stays acceptable up to `window` after its timestamp, which may be `window` ahead of us
        self.nonces = NonceCache(2 * window, max_nonces)
        self.accepted = 0  # calls let through
        self.refused = 0  # calls answered UNAUTHENTICATED

    def check(self, metadata, method: str, digest: bytes) -> None:
        """AuthError unless ``metadata`` proves the key for this call; records the nonce if it does."""
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
        if not mac_matches(self.key, proof, method, self.audience, digest):
            raise AuthError(f"swarm key proof does not match (wrong key, or a proof made for another call "
                            f"or node than {self.audience or 'this one'}): {HINT}")
        self.nonces.add(proof.nonce, now)

    def _refuse(self, method: str, reason: AuthError) -> None:
        self.refused += 1
        log.info("refused %s: %s", method, reason)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        if handler.unary_unary is not None:
            return self._checked_unary(handler, method, details.invocation_metadata)
        try:  # streams (and any other shape): authenticate the call when it opens
            self.check(details.invocation_metadata, method, STREAM_BODY)
        except AuthError as e:
            self._refuse(method, e)
            return _refusing(handler, str(e))
        self.accepted += 1
        return handler

    def _checked_unary(self, handler: grpc.RpcMethodHandler, method: str, metadata) -> grpc.RpcMethodHandler:
        """A handler that receives the raw request bytes, checks the proof over them, then parses."""
        behavior, parse = handler.unary_unary, handler.request_deserializer

        async def checked(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                self.check(metadata, method, body_digest(raw))
            except AuthError as e:
                self._refuse(method, e)
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(e))
            self.accepted += 1
            try:
                request = parse(raw) if parse is not None else raw
            except (DecodeError, ValueError) as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}")
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(checked, response_serializer=handler.response_serializer)


def _refusing(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED and reads nothing."""

    async def refuse(request, context: grpc.aio.ServicerContext) -> None:
        if handler.request_streaming:  # let the client's first write land (bounded): a status sent while it is
            with contextlib.suppress(Exception):  # still writing reaches it as a local INTERNAL error instead
                await asyncio.wait_for(anext(aiter(request)), 5.0)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(refuse, response_serializer=handler.response_serializer)

