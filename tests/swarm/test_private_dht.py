"""DHT records in private and open swarms, against real hivemind peers on 127.0.0.1: outsiders (peers
without the key, or hivemind peers running no validator at all) can neither read nor write a
private swarm's records; in an open swarm nobody can overwrite a node's signed record; far-future
expirations and oversized values are refused everywhere."""
import asyncio
import dataclasses

import pytest
from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.dht import SwarmDHT
from swarm.keys import SwarmKey, parse_key, generate_key_text
from swarm.records import make_record, parse_record, servers_key
from swarm.spans import NodeState, ServerInfo, Span
from swarm.validator import MAX_RECORD_LIFETIME, MAX_VALUE_BYTES, SwarmRecordValidator, make_validator
from tests.helpers.dht import store_raw

MODEL = "tiny/00000000000000aa"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


def new_key() -> SwarmKey:
    return parse_key(generate_key_text())


def info(node_id: str, address: str = "127.0.0.1:7001", start: int = 0, end: int = 2) -> ServerInfo:
    return ServerInfo(node_id, address, Span(start, end), NodeState.ONLINE, 10.0, "0.1.0", "float32")


async def raw_peer(initial_peers, record_validator=None) -> DHTNode:
    """A plain hivemind peer: what an outsider runs, with whatever validator (or none) it likes."""
    return await DHTNode.create(initial_peers=list(initial_peers), host_maddrs=LOOPBACK, nat_port_map=False,
                                record_validator=record_validator)


def stored_locally(dht: SwarmDHT, name: str) -> dict:
    """subkey -> raw value bytes a SwarmDHT peer holds in its own storage under record name ``name``."""
    entry = dht.node.protocol.storage.get(DHTID.generate(source=dht.dht_key(name)))
    if entry is None:
        return {}
    return {subkey: item.value for subkey, item in entry.value.items()}


async def members(key: SwarmKey | None, n: int = 2) -> list[SwarmDHT]:
    first = await SwarmDHT.create(swarm_key=key)
    peers = [first]
    for _ in range(n - 1):
        peers.append(await SwarmDHT.create(await first.visible_maddrs(), swarm_key=key))
    return peers


async def shutdown(*peers) -> None:
    for peer in peers:
        await peer.shutdown()


def test_private_records_are_ciphertext_to_outsiders():
    async def scenario():
        key = new_key()
        boot, node = await members(key)
        outsider_raw = await raw_peer(await boot.visible_maddrs())  # no validator: sees stored bytes
        outsider = await SwarmDHT.create(await boot.visible_maddrs(), client_mode=True)  # no key
        wrong = await SwarmDHT.create(await boot.visible_maddrs(), client_mode=True, swarm_key=new_key())
        try:
            secret_address = "10.1.2.3:31337"
            assert await node.announce(MODEL, info(node.node_id, secret_address), ttl=60)
            (seen,) = await boot.fetch_servers(MODEL, 2)  # a member reads it
            assert seen.address == secret_address and seen.node_id == node.node_id

            assert await outsider.fetch_servers(MODEL, 2) == []
            assert await wrong.fetch_servers(MODEL, 2) == []
            # even knowing the hidden key name, an outsider gets only ciphertext
            found = await outsider_raw.get(node.dht_key(servers_key(MODEL)), latest=True)
            assert found is not None and len(found.value) == 1
            (blob,) = [item.value for item in found.value.values()]
            assert isinstance(blob, bytes) and secret_address.encode() not in blob
            assert b"address" not in blob and b"ONLINE" not in blob
            # and the key name itself does not reveal the model
            assert MODEL not in node.dht_key(servers_key(MODEL))
        finally:
            await shutdown(outsider, wrong, boot, node)
            await outsider_raw.shutdown()

    asyncio.run(scenario())


def test_outsiders_cannot_inject_or_overwrite_private_records():
    async def scenario():
        key = new_key()
        boot, node = await members(key)
        outsider = await raw_peer(await boot.visible_maddrs())
        wrong = await SwarmDHT.create(await boot.visible_maddrs(), swarm_key=new_key())
        try:
            await node.announce(MODEL, info(node.node_id), ttl=60)  # `wrong` refuses it: the result may be False
            name = servers_key(MODEL)
            hidden, exp = node.dht_key(name), get_dht_time() + 60
            forged = make_record(info(node.node_id, "6.6.6.6:666"))
            # overwrite the member's record, and add a new one, as plaintext with a later expiration
            await outsider.store(hidden, forged, exp + 5, subkey=node.node_id)
            await outsider.store(hidden, forged, exp, subkey=f"intruder{node.owner_marker}")
            await outsider.store(hidden, forged, exp, subkey="intruder")
            # a peer with another key encrypts and signs properly, but under the wrong key
            await wrong.announce(MODEL, info(wrong.node_id, "6.6.6.6:667"), ttl=60)

            for member in (boot, node):
                assert list(stored_locally(member, name)) == [node.node_id]  # members refused every store
                (seen,) = await member.fetch_servers(MODEL, 2)
                assert seen.node_id == node.node_id and seen.address == "127.0.0.1:7001"
        finally:
            await shutdown(wrong, boot, node)
            await outsider.shutdown()

    asyncio.run(scenario())


def test_two_swarms_with_different_keys_do_not_see_each_other():
    async def scenario():
        swarm_a, swarm_b = await members(new_key()), await members(new_key())
        # a member of B that joins A's bootstrap peer (same machine, same DHT) still stays apart
        key_b = swarm_b[0].swarm_key
        stray = await SwarmDHT.create(await swarm_a[0].visible_maddrs(), swarm_key=key_b)
        try:
            # (the stray peer refuses A's records, so hivemind may report A's store as not accepted)
            await swarm_a[1].announce(MODEL, info(swarm_a[1].node_id, "127.0.0.1:7101"), ttl=60)
            assert await swarm_b[1].announce(MODEL, info(swarm_b[1].node_id, "127.0.0.1:7102"), ttl=60)
            await stray.announce(MODEL, info(stray.node_id, "127.0.0.1:7103"), ttl=60)
            assert [s.address for s in await swarm_a[0].fetch_servers(MODEL, 2)] == ["127.0.0.1:7101"]
            assert [s.address for s in await swarm_b[0].fetch_servers(MODEL, 2)] == ["127.0.0.1:7102"]
            assert "127.0.0.1:7101" not in [s.address for s in await stray.fetch_servers(MODEL, 2)]
        finally:
            await shutdown(stray, *swarm_a, *swarm_b)

    asyncio.run(scenario())


@pytest.mark.parametrize("private", [False, True], ids=["open", "private"])
def test_far_future_and_oversized_records_are_refused(private):
    async def scenario():
        key = new_key() if private else None
        boot, node = await members(key)
        # an outsider peer with a proper owner key, signing its own records (valid in an open swarm),
        # that does not check lifetime or size itself and pushes them to the members
        owner = RSAPrivateKey()
        signer, marker = make_validator(key, owner)
        pusher = await raw_peer(await boot.visible_maddrs(), _Permissive(signer))
        try:
            name = servers_key(MODEL)
            hidden = node.dht_key(name)
            good = make_record(info("x", "127.0.0.1:7201"))
            far = make_record(info("x", "127.0.0.1:7202"))
            big = {**make_record(info("x", "127.0.0.1:7203")), "version": "v" * (MAX_VALUE_BYTES + 100)}
            now = get_dht_time()
            await pusher.store(hidden, good, now + 60, subkey=f"good{marker}")
            await pusher.store(hidden, far, now + MAX_RECORD_LIFETIME + 3600, subkey=f"far{marker}")
            await pusher.store(hidden, big, now + 60, subkey=f"big{marker}")
            for member in (boot, node):
                assert sorted(stored_locally(member, name)) == [f"good{marker}"]
            # a member's own far-future or oversized record is refused by the members too
            await store_raw(node, name, far, now + MAX_RECORD_LIFETIME + 60, subkey=node.owned("far2"))
            await store_raw(node, name, big, now + 60, subkey=node.owned("big2"))
            with pytest.raises(ValueError, match="maximum record lifetime"):
                await node.announce(MODEL, info(node.node_id), ttl=MAX_RECORD_LIFETIME + 1)
            with pytest.raises(ValueError, match="over the limit"):
                await node.announce(MODEL, dataclasses.replace(info(node.node_id), adapters=("a" * 250,) * 20), ttl=60)
            for member in (boot, node):
                assert sorted(stored_locally(member, name)) == [f"good{marker}"]
        finally:
            await shutdown(boot, node)
            await pusher.shutdown()

    asyncio.run(scenario())


def test_open_swarm_records_cannot_be_overwritten_by_another_peer():
    async def scenario():
        boot, owner = await members(None)
        attacker = await SwarmDHT.create(await boot.visible_maddrs())  # a swarmlm peer with its own key
        raw = await raw_peer(await boot.visible_maddrs())  # a hivemind peer without validators
        try:
            assert await owner.announce(MODEL, info(owner.node_id, "127.0.0.1:7301"), ttl=60)
            name, exp = servers_key(MODEL), get_dht_time() + 90
            forged = make_record(info(owner.node_id, "6.6.6.6:666"))
            # the attacker cannot sign for the owner's key, so no member accepts its version
            await store_raw(attacker, name, forged, exp, subkey=owner.node_id)
            await raw.store(name, forged, exp, subkey=owner.node_id)  # unsigned: every member refuses it
            await raw.store(name, forged, exp, subkey="no-owner")  # unowned records are refused too
            for member in (boot, owner):
                assert list(stored_locally(member, name)) == [owner.node_id]
            # the attacker may announce itself (an open swarm), but only under its own identity
            assert await attacker.announce(MODEL, info(attacker.node_id, "127.0.0.1:7302"), ttl=60)
            found = {s.node_id: s.address for s in await boot.fetch_servers(MODEL, 2)}
            assert found == {owner.node_id: "127.0.0.1:7301", attacker.node_id: "127.0.0.1:7302"}
        finally:
            await shutdown(attacker, boot, owner)
            await raw.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("private", [False, True], ids=["open", "private"])
def test_a_signed_but_undecodable_record_does_not_stall_readers(private):
    """A peer may sign (and, in a private swarm, seal) bytes that are not msgpack; hivemind's reader
    would then never finish a lookup of that key. They are refused like any invalid record."""
    async def scenario():
        key = new_key() if private else None
        boot, node = await members(key)
        signer, marker = make_validator(key, RSAPrivateKey())
        signer.extend([_Garbage()])
        pusher = await raw_peer(await boot.visible_maddrs(), _Permissive(signer))
        reader = await SwarmDHT.create(await boot.visible_maddrs(), client_mode=True, swarm_key=key)
        try:
            await node.announce(MODEL, info(node.node_id), ttl=60)
            await pusher.store(node.dht_key(servers_key(MODEL)), make_record(info("x")), get_dht_time() + 60,
                               subkey=f"g{marker}")
            found = await asyncio.wait_for(reader.fetch_servers(MODEL, 2), 30)
            assert [s.node_id for s in found] == [node.node_id]
        finally:
            await shutdown(reader, boot, node)
            await pusher.shutdown()

    asyncio.run(scenario())


@pytest.mark.parametrize("private", [False, True], ids=["open", "private"])
def test_validator_binds_signature_to_key_subkey_value_and_expiration(private):
    key = new_key() if private else None
    validator, marker = make_validator(key, RSAPrivateKey())
    subkey = MSGPackSerializer.dumps(f"peer{marker}")
    value = MSGPackSerializer.dumps(make_record(info("peer")))
    plain = DHTRecord(DHTID.generate(source="k").to_bytes(), subkey, value, get_dht_time() + 30)
    signed = dataclasses.replace(plain, value=validator.sign_value(plain))
    assert validator.validate(signed)
    assert MSGPackSerializer.loads(validator.strip_value(signed)) == make_record(info("peer"))
    assert (value in signed.value) is not private  # in a private swarm the value is sealed
    tampered = [
        dataclasses.replace(signed, expiration_time=signed.expiration_time + 10),  # replayed with a new lifetime
        dataclasses.replace(signed, key=DHTID.generate(source="other").to_bytes()),  # moved to another key
        dataclasses.replace(signed, subkey=MSGPackSerializer.dumps(f"peer2{marker}")),  # another subkey
        dataclasses.replace(signed, value=signed.value[:-40] + bytes(40)),  # changed bytes
        plain,  # never signed
    ]
    for record in tampered:
        assert not validator.validate(record)
    other_swarm, _ = make_validator(new_key(), RSAPrivateKey())
    assert not other_swarm.validate(signed)


def test_validator_rejects_malformed_owner_markers():
    validator, marker = make_validator(None, RSAPrivateKey())
    for subkey in ("peer[owner:not a key]", "peer[owner:]", "peer", f"peer{marker[:-20]}]"):
        record = DHTRecord(b"k", MSGPackSerializer.dumps(subkey), b"\xc0[signature:AAAA]", get_dht_time() + 30)
        assert not validator.validate(record), subkey
    assert parse_record(f"p{marker}", make_record(info("p")), block=0, num_blocks=2) is not None
    assert SwarmRecordValidator(None).priority > 10  # runs before the RSA signature check


class _Permissive(SwarmRecordValidator):
    """An outsider's validator: signs like a member but checks nothing (so it will push anything)."""

    def __init__(self, inner):
        super().__init__(None)
        self.inner = inner

    def validate(self, record) -> bool:
        return True

    def sign_value(self, record) -> bytes:
        return self.inner.sign_value(record)

    def strip_value(self, record) -> bytes:
        return self.inner.strip_value(record)


class _Garbage(RecordValidatorBase):
    """Signs first (lowest priority): swaps the value for bytes that are not msgpack."""

    priority = 5

    def validate(self, record) -> bool:
        return True

    def sign_value(self, record) -> bytes:
        return b"\xc1\xc1 not msgpack"


def test_a_keyless_peer_sees_only_one_opaque_key_peer_ids_and_equal_sized_values():
    """What a peer without the key holds and can read of a private swarm's records: for each model one
    key (a hash of a keyed name), one subkey per node (its peer id and RSA public key), expirations, and
    values of one size whatever the node serves. (Value sizes used to differ with the span, address,
    state and adapters of the node.)"""
    async def scenario():
        key = new_key()
        boot, a, b = await members(key, n=3)
        outsider = await raw_peer(await boot.visible_maddrs())  # stores replicas, decrypts nothing
        try:
            long_record = dataclasses.replace(info(b.node_id, "node-with-a-long-host-name.example.org:65000", 3, 17),
                                              adapters=("adapter-one", "adapter-two", "adapter-three"),
                                              state=NodeState.JOINING, throughput=123456.789)
            assert await a.announce(MODEL, info(a.node_id, "1.2.3.4:5", 0, 1), ttl=60)
            assert await b.announce(MODEL, long_record, ttl=60)
            assert len(await boot.fetch_servers(MODEL, 20)) == 2  # members read both
            found = await outsider.get(a.dht_key(servers_key(MODEL)), latest=True)  # (given the hidden name)
            assert found is not None and set(found.value) == {a.node_id, b.node_id}
            sizes = {len(item.value) for item in found.value.values()}
            assert len(sizes) == 1, sizes  # nothing about the span, address, state or adapters
            stored = outsider.protocol.storage
            keys = [k for k, _ in stored.items()]
            assert len(keys) <= 1  # at most the one key of the model (if this peer holds a replica)
        finally:
            await shutdown(boot, a, b)
            await outsider.shutdown()

    asyncio.run(scenario())
