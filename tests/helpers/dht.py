"""DHT helpers for tests: plant records the project's own code would never write."""
from __future__ import annotations

from swarm.dht import SwarmDHT


async def store_raw(dht: SwarmDHT, key: str, value: object, expiration: float, subkey: str | None = None) -> bool:
    """Store an arbitrary value under ``key`` (hidden as announce hides it in a private swarm), e.g. a
    malformed or forged record, bypassing the schema that ``SwarmDHT.announce`` enforces."""
    return await dht.node.store(dht.dht_key(key), value, expiration, subkey=subkey)
