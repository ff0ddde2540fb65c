"""Records in a real hivemind DHT on 127.0.0.1."""
import asyncio

from hivemind.utils import get_dht_time

from swarm.dht import Announcer, SwarmDHT
from swarm.records import make_record, servers_key
from swarm.spans import NodeState, ServerInfo, Span
from tests.helpers.dht import push_cached_copy, store_raw

MODEL = "tiny/0123456789abcdef"


def info(node_id, start, end, state=NodeState.ONLINE):
    return ServerInfo(node_id, "127.0.0.1:7000", Span(start, end), state, 50.0, "0.1.0", "float32")


async def ids(dht, model, num_blocks):
    return [s.node_id for s in await dht.fetch_servers(model, num_blocks)]


def test_announce_fetch_and_expiry():
    async def scenario():
        # a swarm of its own: in the shared one, peers of earlier tests that are still leaving can take
        # a stored copy with them (real nodes re-announce every ttl/3; this test announces once)
        boot = await SwarmDHT.create(host="127.0.0.1")
        peers = await boot.visible_maddrs()
        peer = await SwarmDHT.create(peers)
        reader = await SwarmDHT.create(peers, client_mode=True)
        try:
            n1, n2 = peer.owned("n1"), peer.owned("n2")  # subkeys carrying the peer's owner key
            assert await peer.announce(MODEL, info(n1, 0, 3), ttl=6.0)  # long enough to be read under load
            assert await peer.announce(MODEL, info(n2, 2, 4), ttl=60.0)
            found = {s.node_id: s for s in await reader.fetch_servers(MODEL, num_blocks=4)}
            assert found == {n1: info(n1, 0, 3), n2: info(n2, 2, 4)}
            assert await reader.fetch_servers("tiny/ffffffffffffffff", num_blocks=4) == []  # other fingerprint
            for _ in range(100):  # n1's record expires after its TTL
                if await ids(reader, MODEL, 4) == [n2]:
                    break
                await asyncio.sleep(0.2)
            assert await ids(reader, MODEL, 4) == [n2]
        finally:
            await reader.shutdown()
            await peer.shutdown()
            await boot.shutdown()

    asyncio.run(scenario())


def test_a_cached_copy_pushed_by_a_peer_never_hides_stored_records():
    """hivemind answers a lookup from a peer's cache instead of its storage when the cached copy expires
    later, and any peer may push a copy into another's cache: a copy holding only the pusher's record
    must not hide the records the peers store (swarm.storage keeps no cache)."""
    async def scenario():
        boot = await SwarmDHT.create(host="127.0.0.1")
        peers = await boot.visible_maddrs()
        honest = await SwarmDHT.create(peers)
        pusher = await SwarmDHT.create(peers, client_mode=True)  # stores nothing itself
        reader = await SwarmDHT.create(peers, client_mode=True)
        try:
            mine = honest.owned("n")
            assert await honest.announce(MODEL, info(mine, 0, 4), ttl=60.0)
            theirs = pusher.owned("p")
            copy = {theirs: make_record(info(theirs, 0, 4))}
            for peer in (boot, honest):  # every peer that stores the honest record
                assert await push_cached_copy(pusher, peer, servers_key(MODEL), copy, get_dht_time() + 120) is not None
            assert await ids(reader, MODEL, 4) == [mine]
        finally:
            for dht in (reader, pusher, honest, boot):
                await dht.shutdown()

    asyncio.run(scenario())


def test_malformed_records_do_not_break_reading(bootstrap):
    async def scenario():
        peer = await SwarmDHT.create(bootstrap)
        model = MODEL + "x"
        try:
            exp = get_dht_time() + 30
            await store_raw(peer, servers_key(model), {"address": 5}, exp, subkey=peer.owned("evil"))
            await store_raw(peer, servers_key(model), "not a dict", exp, subkey=peer.owned("evil2"))
            await store_raw(peer, servers_key(model), make_record(info("x", 0, 3)), exp, subkey=peer.owned("big"))  # 3 > 2 blocks
            await store_raw(peer, servers_key(model + "p"), 7, exp)  # a plain value, not a dictionary of subkeys
            await peer.announce(model, info(peer.owned("good"), 0, 2), ttl=30)
            assert await ids(peer, model, 2) == [peer.owned("good")]
            assert await ids(peer, model + "p", 2) == []
        finally:
            await peer.shutdown()

    asyncio.run(scenario())


def test_heartbeat_keeps_records_alive_and_stop_announces_offline(bootstrap):
    async def scenario():
        peer = await SwarmDHT.create(bootstrap)
        model = MODEL + "hb"
        try:
            announcer = Announcer(peer, model, info(peer.node_id, 0, 2, NodeState.JOINING), ttl=1.5)
            await announcer.start()
            await announcer.set_state(NodeState.ONLINE, throughput=99.0)
            await asyncio.sleep(3.5)  # more than two TTLs: only the heartbeat keeps the record
            (live,) = await peer.fetch_servers(model, 2)
            assert live.state is NodeState.ONLINE and live.throughput == 99.0
            await announcer.stop()
            (gone,) = await peer.fetch_servers(model, 2)
            assert gone.state is NodeState.OFFLINE
        finally:
            await peer.shutdown()

    asyncio.run(scenario())
