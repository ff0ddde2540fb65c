"""Forward passes kept for a following Backward: bounded by bytes and time, single use.

Purely an optimisation: a Backward whose token is unknown (evicted, expired, or sent to another
node after a failover) recomputes from the inputs it carries, or, when it carries none (the Forward
answered ``backward_by_token``), is answered ``inputs_needed`` and sent again with them; so nothing
depends on this cache. Sizes are the bytes each pass really keeps (measured in
node.blocks.forward_for_backward), and expired passes are dropped by a timer on the event loop, not
only when the cache is next used.

Any client may be hostile, so a pass is bound to who kept it: its token is 128 random bits (only the
Forward's answer carries it), and it is found only for the client that kept it (node.sessions.client_of
of the caller). Another client naming it finds nothing and removes nothing: it can neither read
gradients of someone else's activations nor make them be recomputed.
"""
from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from node.blocks import SavedPass


@dataclass(frozen=True)
class Kept:
    """One kept pass: whose it is, until when, and the dtype its inputs came in (answers use it)."""

    expires: float  # time.monotonic() deadline
    owner: str  # the client that kept it (node.sessions.client_of)
    saved: SavedPass
    dtype: torch.dtype  # of the Forward's hidden states as received


class ActivationCache:
    def __init__(self, max_bytes: int, ttl: float):
        self.max_bytes, self.ttl = max_bytes, ttl
        self._items: OrderedDict[str, Kept] = OrderedDict()
        self.used = 0
        self.hits = 0  # backward tokens found (metrics)
        self.misses = 0  # backward tokens not found (evicted, expired, or kept by another node): recomputed

    def put(self, saved: SavedPass, owner: str = "", dtype: torch.dtype = torch.float32) -> str | None:
        """Keep ``saved`` for ``owner``; returns its token, or None when it alone exceeds the budget."""
        if saved.nbytes > self.max_bytes:
            return None
        self._expire()
        while self._items and self.used + saved.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.used -= old.saved.nbytes
        token = secrets.token_hex(16)
        self._items[token] = Kept(time.monotonic() + self.ttl, owner, saved, dtype)
        self.used += saved.nbytes
        self._schedule_expiry()
        return token

    def _schedule_expiry(self) -> None:
        """Drop this entry when its time is up even if nothing else touches the cache (one timer per entry,
        on the running loop; without one, expiry happens at the next put/pop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        loop.call_later(self.ttl + 0.01, self._expire)

    def __len__(self) -> int:
        return len(self._items)

    def pop(self, token: str, owner: str = "") -> Kept | None:
        """The pass ``token`` names, taken out of the cache, if ``owner`` kept it (else None, and a pass
        kept by another client stays where it is)."""
        self._expire()
        item = self._items.get(token)
        if item is None or not secrets.compare_digest(item.owner, owner):
            self.misses += 1
            return None
        del self._items[token]
        self.hits += 1
        self.used -= item.saved.nbytes
        return item

    def clear(self) -> None:
        """Drop every kept pass (their Backwards then need their inputs)."""
        self._items.clear()
        self.used = 0

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values())).expires < now:
            _, old = self._items.popitem(last=False)
            self.used -= old.saved.nbytes
