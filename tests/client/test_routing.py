"""The client's Router over a real DHT: what it remembers per node stays bounded in a churning swarm."""
import asyncio
import time

from client.config import ClientConfig
from client.routing import Router
from client.transport import RemoteCallError
from swarm.dht import SwarmDHT
from swarm.routing import Hop
from swarm.spans import NodeState, ServerInfo, Span

MODEL = "tiny/00000000000000aa"


def info(node_id, address="127.0.0.1:7400"):
    return ServerInfo(node_id, address, Span(0, 2), NodeState.ONLINE, 50.0, "0.1.0", "float32")


def test_strikes_latencies_and_expired_bans_of_departed_nodes_are_forgotten():
    async def scenario():
        # a DHT of its own: on the suite's shared bootstrap a full run's reads missed this record for 30 s
        peer = await SwarmDHT.create(host="127.0.0.1")
        peers = await peer.visible_maddrs()
        reader = await SwarmDHT.create(peers, client_mode=True)
        try:
            stays = info(peer.owned("stays"))
            assert await peer.announce(MODEL, stays, ttl=60)
            router = Router(reader, MODEL, 2, ClientConfig(initial_peers=tuple(peers), ban_seconds=0.01))
            await router.servers(refresh=True)
            error = RemoteCallError("127.0.0.1:1", None, "down")
            for i in range(300):  # nodes that failed once, then left the swarm (churn)
                gone = Hop(info(f"gone{i}"), Span(0, 2))
                router.ban(gone, error)
                router.succeeded(gone, 0.01)
            router.ban(Hop(info("cheater"), Span(0, 2)), error, forever=True)
            deadline = time.monotonic() + 30
            while True:  # a refresh that missed "stays" (a loaded machine's DHT timeout) rightly forgets it
                router.ban(Hop(stays, Span(0, 2)), error)  # too: so ban it again and read again
                await asyncio.sleep(0.05)  # every short ban has expired
                if stays.node_id in {s.node_id for s in await router.servers(refresh=True)}:
                    break
                assert time.monotonic() < deadline, "the DHT did not return the live node's record for 30 s"
                await asyncio.sleep(0.5)
            assert set(router.policy._banned_until) == {"cheater", stays.node_id}  # for good: kept; present: kept
            assert set(router.policy._strikes) == {stays.node_id, "cheater"} and set(router.rtt) <= {stays.node_id}
            assert "cheater" in router.banned()
        finally:
            await reader.shutdown()
            await peer.shutdown()

    asyncio.run(scenario())
