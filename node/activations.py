"""Forward passes kept for a following Backward: bounded by bytes and time, single use.

Purely an optimisation: a Backward whose token is unknown (evicted, expired, or sent to another
node after a failover) recomputes from the inputs it carries, so nothing depends on this cache.
Sizes are the bytes each pass really keeps (measured in node.blocks.forward_for_backward), and
expired passes are dropped by a timer on the event loop, not only when the cache is next used.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict

from node.blocks import SavedPass


class ActivationCache:
    def __init__(self, max_bytes: int, ttl: float):
        self.max_bytes, self.ttl = max_bytes, ttl
        self._items: OrderedDict[str, tuple[float, SavedPass]] = OrderedDict()
        self.used = 0
        self.hits = 0  # backward tokens found (metrics)
        self.misses = 0  # backward tokens not found (evicted, expired, or kept by another node): recomputed

    def put(self, saved: SavedPass) -> str | None:
        """Keep ``saved``; returns its token, or None when it alone exceeds the budget."""
        if saved.nbytes > self.max_bytes:
            return None
        self._expire()
        while self._items and self.used + saved.nbytes > self.max_bytes:
            _, (_, old) = self._items.popitem(last=False)
            self.used -= old.nbytes
        token = uuid.uuid4().hex
        self._items[token] = (time.monotonic() + self.ttl, saved)
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

    def pop(self, token: str) -> SavedPass | None:
        self._expire()
        item = self._items.pop(token, None)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self.used -= item[1].nbytes
        return item[1]

    def _expire(self) -> None:
        now = time.monotonic()
        while self._items and next(iter(self._items.values()))[0] < now:
            _, (_, old) = self._items.popitem(last=False)
            self.used -= old.nbytes
