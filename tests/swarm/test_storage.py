"""What one DHT peer keeps under one key is bounded per owner, in count and in bytes (swarm.storage)."""
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DictionaryDHTValue
from hivemind.utils import get_dht_time

from swarm.storage import BoundedStorage, owner_of

KEY = DHTID.generate(source="swarmlm/m/servers")


def sub(name, owner):
    return f"{name}[owner:ssh-rsa {owner}]"


def test_one_owner_cannot_flood_a_key_and_refreshes_always_fit():
    storage = BoundedStorage(max_per_owner=3)
    later = get_dht_time() + 60
    assert storage.store_subkey(KEY, sub("honest", "H"), b"v", later)
    assert all(storage.store_subkey(KEY, sub(f"f{i}", "F"), b"x" * 3000, later) for i in range(3))
    assert not any(storage.store_subkey(KEY, sub(f"f{i}", "F"), b"x" * 3000, later) for i in range(3, 500))
    assert storage.store_subkey(KEY, sub("honest", "H"), b"v2", later + 1)  # a refresh of a record held
    assert storage.store_subkey(KEY, sub("other", "O"), b"v", later)  # other owners still have room
    assert len(storage.get(KEY).value) == 5


def test_a_key_is_bounded_in_records_and_bytes_whoever_stores():
    later = get_dht_time() + 60
    storage = BoundedStorage(max_records=10, max_bytes=10 ** 9)
    stored = [storage.store_subkey(KEY, sub(f"n{i}", f"K{i}"), b"v", later) for i in range(50)]
    assert sum(stored) == 10 and all(stored[:10])
    storage = BoundedStorage(max_bytes=20_000)
    for i in range(50):  # ~4 KB each: 4 fit in 20,000 bytes
        storage.store_subkey(KEY, sub(f"n{i}", f"K{i}"), b"x" * 4000, later)
    assert len(storage.get(KEY).value) == 4


def test_a_whole_dictionary_is_kept_only_within_the_bounds():
    later = get_dht_time() + 60
    flood = DictionaryDHTValue()
    for i in range(100):
        flood.store(sub(f"f{i}", "F"), b"x", later)
    flood.store(sub("honest", "H"), b"v", later)
    storage = BoundedStorage(max_per_owner=8)
    storage.store(KEY, flood, later)  # as hivemind caches what it found
    kept = storage.get(KEY).value
    assert len(kept) == 9 and sub("honest", "H") in kept.data
    assert owner_of("plain") == "plain" and owner_of(sub("a", "K")) == "[owner:ssh-rsa K]"
