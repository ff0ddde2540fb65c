"""DHT helpers for tests: a bootstrap peer of a swarm of the test's own, and records the project's own
code would never write."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from swarm.aio import LoopThread
from swarm.dht import SwarmDHT
from swarm.keys import SwarmKey


@contextlib.contextmanager
def bootstrap_peer(loop: LoopThread, swarm_key: SwarmKey | None = None) -> Iterator[list[str]]:
    """A DHT-only peer on 127.0.0.1 (of the private swarm of ``swarm_key``, if given), run on ``loop``;
    yields its multiaddrs and shuts it down after."""
    dht = loop.run(SwarmDHT.create(host="127.0.0.1", swarm_key=swarm_key))
    try:
        yield loop.run(dht.visible_maddrs())
    finally:
        loop.run(dht.shutdown())


async def store_raw(dht: SwarmDHT, key: str, value: object, expiration: float, subkey: str | None = None) -> bool:
    """Store an arbitrary value under ``key`` (hidden as announce hides it in a private swarm), e.g. a
    malformed or forged record, bypassing the schema that ``SwarmDHT.announce`` enforces."""
    return await dht.node.store(dht.dht_key(key), value, expiration, subkey=subkey)


async def store_many_raw(dht: SwarmDHT, key: str, values: dict[str, object], expiration: float,
                         batch: int = 200) -> None:
    """Store many subkeys under ``key`` as ``store_raw`` does, ``batch`` at a time (one store request
    holds a batch, and the p2p daemon refuses a request over 4 MiB)."""
    items = list(values.items())
    for lo in range(0, len(items), batch):
        part = items[lo:lo + batch]
        await dht.node.store_many([dht.dht_key(key)] * len(part), [v for _, v in part], expiration,
                                  subkeys=[s for s, _ in part])


async def push_cached_copy(dht: SwarmDHT, peer: SwarmDHT, key: str, records: dict[str, object],
                           expiration: float) -> list[bool] | None:
    """Push ``records`` (subkeys this peer owns, signed by it) into ``peer``'s cache as one dictionary,
    as hivemind's readers push what they found to a nearby peer: a copy that lacks other peers' records
    and expires later than anything ``peer`` stores."""
    from hivemind.dht.crypto import DHTRecord
    from hivemind.dht.routing import DHTID
    from hivemind.dht.storage import DictionaryDHTValue
    from hivemind.utils.serializer import MSGPackSerializer

    protocol, key_id = dht.node.protocol, DHTID.generate(source=dht.dht_key(key))
    copy = DictionaryDHTValue()
    for subkey, value in records.items():
        record = DHTRecord(key_id.to_bytes(), MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value),
                           expiration)
        copy.store(subkey, protocol.record_validator.sign_value(record), expiration)
    return await protocol.call_store(peer.node.peer_id, [key_id], [copy], [expiration], in_cache=True)
