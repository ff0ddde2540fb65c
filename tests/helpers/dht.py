"""DHT helpers for tests: plant records the project's own code would never write."""
from __future__ import annotations

from swarm.dht import SwarmDHT


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
