"""What one DHT peer keeps under one key: bounded, so nobody can flood a key into silence.

hivemind keeps every valid record stored under a key, and a reader gets all of a key's records in one
reply, which the p2p daemon refuses over 4 MiB: one key holding ~9,000 records of ~3 KB (valid and signed,
from one RSA key) made that key unreadable for everyone. Here a peer stores a new subkey only while the key
holds fewer than ``max_records`` records of at most ``max_bytes`` in all (so a reply stays well under the
daemon's limit), and at most ``max_per_owner`` of them from one owner (the ``[owner:...]`` key of the
subkey). Records already held are always refreshed, so nodes that were announced before a flood keep
their place; a flood from many keys can still fill a key's free room until its records expire.

A peer keeps no cache. hivemind answers a lookup with its cache *instead of* its storage whenever the
cached copy's latest expiration is later, and any peer may push a copy into another's cache: a copy that
lacks some records (read before they arrived, or trimmed on purpose by a hostile peer) then hides them for
as long as its expiration stays ahead (tests/swarm/test_dht.py shows it; it is the likely cause of readers
missing 2-4 of 30 fresh records for over 30 s late in full test runs). Every swarm read asks for the
latest value anyway (``latest=True``: all nearest peers are asked), so a cache saves nothing here.
"""
from __future__ import annotations

from typing import Optional, Union

from hivemind.dht.routing import DHTID, BinaryDHTValue, Subkey
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue
from hivemind.utils.timed_storage import DHTExpiration

MAX_RECORDS_PER_KEY = 4000  # records under one key (a model's nodes: see the README's limits)
MAX_KEY_BYTES = 7 << 19  # 3.5 MiB of one key's subkeys and values: a reply stays under the daemon's 4 MiB
MAX_RECORDS_PER_OWNER = 8  # records of one owner key under one key (an honest node has one)


def owner_of(subkey: object) -> str:
    """The ``[owner:...]`` marker of a subkey (the whole subkey when it names none)."""
    text = subkey if isinstance(subkey, str) else repr(subkey)
    start = text.find("[owner:")
    return text if start < 0 else text[start:]


def record_bytes(subkey: object, value: bytes) -> int:
    return len(subkey if isinstance(subkey, (str, bytes)) else repr(subkey)) + len(value)


class BoundedStorage(DHTLocalStorage):
    """A DHTLocalStorage whose dictionary values are bounded (see the module docstring)."""

    def __init__(self, maxsize: Optional[int] = None, *, max_records: int = MAX_RECORDS_PER_KEY,
                 max_bytes: int = MAX_KEY_BYTES, max_per_owner: int = MAX_RECORDS_PER_OWNER):
        super().__init__(maxsize)
        if max_records < 1 or max_bytes < 1 or max_per_owner < 1:
            raise ValueError("max_records, max_bytes and max_per_owner must be >= 1")
        self.max_records, self.max_bytes, self.max_per_owner = max_records, max_bytes, max_per_owner

    def has_room(self, records: DictionaryDHTValue, subkey: Subkey, value: bytes) -> bool:
        """Whether ``records`` may take a new ``subkey`` with ``value``."""
        if subkey in records.data:
            return True  # a refresh (or a stale copy the expiration check refuses)
        if len(records.data) >= self.max_records:
            return False
        owner, mine, size = owner_of(subkey), 0, record_bytes(subkey, value)
        for other, item in records.items():
            size += record_bytes(other, item.value)
            mine += owner_of(other) == owner
        return mine < self.max_per_owner and size <= self.max_bytes

    def store_subkey(self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration) -> bool:
        previous = self.get(key)
        if previous is not None and isinstance(previous.value, DictionaryDHTValue):
            if not self.has_room(previous.value, subkey, value):
                return False
        return super().store_subkey(key, subkey, value, expiration_time)

    def store(self, key: DHTID, value: Union[BinaryDHTValue, DictionaryDHTValue], expiration_time: DHTExpiration,
              subkey: Optional[Subkey] = None) -> bool:
        if subkey is None and isinstance(value, DictionaryDHTValue):  # a whole dictionary (hivemind's cache)
            value = self.bounded(value)
        return super().store(key, value, expiration_time, subkey)

    def bounded(self, records: DictionaryDHTValue) -> DictionaryDHTValue:
        """A copy of ``records`` within the bounds (the records that come first are kept)."""
        kept, size, owners = DictionaryDHTValue(), 0, {}
        for subkey, item in records.items():
            owner, grown = owner_of(subkey), size + record_bytes(subkey, item.value)
            if len(kept.data) < self.max_records and owners.get(owner, 0) < self.max_per_owner and grown <= self.max_bytes:
                kept.store(subkey, item.value, item.expiration_time)
                size, owners[owner] = grown, owners.get(owner, 0) + 1
        return kept


class NoCache(DHTLocalStorage):
    """A cache that keeps nothing: every store is refused, so a lookup is always answered from storage
    (see the module docstring)."""

    def store(self, key: DHTID, value: Union[BinaryDHTValue, DictionaryDHTValue], expiration_time: DHTExpiration,
              subkey: Optional[Subkey] = None) -> bool:
        return False

    def store_subkey(self, key: DHTID, subkey: Subkey, value: BinaryDHTValue, expiration_time: DHTExpiration) -> bool:
        return False


def install(protocol: object) -> None:
    """Make a hivemind DHTProtocol's storage bounded and its cache keep nothing (right after the DHTNode
    is created, while both are still empty)."""
    old = protocol.storage
    storage = BoundedStorage(None if old.maxsize == float("inf") else old.maxsize)
    for key, item in old.items():
        storage.store(key, item.value, item.expiration_time)
    protocol.storage, protocol.cache = storage, NoCache()
