"""Why a client finds no node: the DHT's model directory and an outsider's look at it.

Every node also keeps a small record ``{"model": <model key>}`` under one well-known, plain DHT key
(``DIRECTORY_KEY``), owned and signed like its server record and, in a private swarm, sealed with the swarm
key like every record. When a model key has no record at all, ``explain_missing`` says what the user most
likely got wrong instead of leaving an empty swarm:
  - the directory names the same model (same config fingerprint) under another name: "did you mean
    --model-name X?", or it lists the models this swarm serves;
  - the directory holds records this peer cannot read: it looks with a throw-away client-mode peer whose
    validator opens nothing and only tells sealed values from plain ones: sealed -> another swarm key (or
    none given); plain -> an open swarm (no --swarm-key needed).
The key name is plain even in a private swarm: outsiders learn only that swarmlm records exist there.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

from hivemind.dht.node import DHTNode
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.records import MAX_STRING
from swarm.validator import MAX_VALUE_BYTES, looks_sealed

if TYPE_CHECKING:
    from swarm.dht import SwarmDHT
    from swarm.keys import SwarmKey

log = logging.getLogger(__name__)
DIRECTORY_KEY = "swarmlm:models"
MAX_LISTED = 5  # model keys named in one hint


async def announce_model(dht: "SwarmDHT", model: str, ttl: float) -> bool:
    """List ``model`` in the directory for ``ttl`` seconds (the node's announcer refreshes it)."""
    return await dht.node.store(DIRECTORY_KEY, {"model": model}, get_dht_time() + ttl, subkey=dht.node_id)


async def listed_models(dht: "SwarmDHT") -> list[str]:
    """The model keys the directory lists (readable with this peer's key), sorted, without repeats."""
    found = await dht.node.get(DIRECTORY_KEY, latest=True)
    if found is None or not isinstance(found.value, dict):
        return []
    models = set()
    for item in found.value.values():
        value = getattr(item, "value", None)
        model = value.get("model") if isinstance(value, dict) else None
        if isinstance(model, str) and 0 < len(model) <= MAX_STRING:
            models.add(model)
    return sorted(models)


class _OutsiderView(RecordValidatorBase):
    """Accepts any bounded value and reads each as one flag: sealed with a swarm key or not."""

    def validate(self, record: DHTRecord) -> bool:
        return len(record.value) <= MAX_VALUE_BYTES

    def strip_value(self, record: DHTRecord) -> bytes:
        return MSGPackSerializer.dumps(looks_sealed(record.value))

    def sign_value(self, record: DHTRecord) -> bytes:
        return record.value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


async def outsider_view(initial_peers: Sequence[str]) -> tuple[int, int]:
    """(sealed, plain) directory records, as a peer holding no key sees them."""
    node = await DHTNode.create(initial_peers=list(initial_peers), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                                client_mode=True, nat_port_map=False, record_validator=_OutsiderView(),
                                cache_locally=False, cache_nearest=0)  # pushes no copies (swarm.storage)
    try:
        found = await node.get(DIRECTORY_KEY, latest=True)
    finally:
        await node.shutdown()
    flags = [getattr(v, "value", None) for v in found.value.values()] if found and isinstance(found.value, dict) else []
    return sum(f is True for f in flags), sum(f is False for f in flags)


async def explain_missing(dht: "SwarmDHT", model: str, initial_peers: Sequence[str]) -> str:
    """A hint for a model key without records ('' if there is nothing to say). Never raises."""
    try:
        listed = await listed_models(dht)
        if listed:
            return _other_names(model, listed)
        sealed, plain = await outsider_view(initial_peers)
    except Exception as e:  # a hint must never turn into the error
        log.debug("could not look at the model directory: %s", e)
        return ""
    return _unreadable(dht.swarm_key, sealed, plain)


def _other_names(model: str, listed: list[str]) -> str:
    name, _, fingerprint = model.rpartition("/")
    same = [m.rpartition("/")[0] for m in listed if m.rpartition("/")[2] == fingerprint and m != model]
    if same:
        return f"did you mean --model-name {same[0]}? (this swarm serves the same model under that name)"
    return f"this swarm serves other models: {', '.join(listed[:MAX_LISTED])}"


def _unreadable(key: "SwarmKey | None", sealed: int, plain: int) -> str:
    if sealed and key is not None:
        return (f"records present but not readable with this swarm key (fingerprint {key.fingerprint}): "
                "is it the swarm's --swarm-key?")
    if sealed:
        return "records present but sealed with a swarm key: this is a private swarm, give its --swarm-key"
    if plain and key is not None:
        return "records present but not sealed: this swarm is open, leave out --swarm-key"
    return ""
