"""An open swarm's DHT cannot be flooded into silence, and records that lie about where and how fast a
node is cost a client a few probes, not its calls (issue 21, item 4)."""
import asyncio
from collections.abc import Iterator

import pytest
import torch
from hivemind.utils import get_dht_time

from client import ClientConfig
from swarm.dht import SwarmDHT
from swarm.records import make_record, servers_key
from swarm.spans import NodeState, ServerInfo, Span
from swarm.storage import MAX_RECORDS_PER_OWNER
from tests.helpers.dht import bootstrap_peer, store_many_raw
from tests.helpers.launch import wait_for
from tests.helpers.network import free_port

GREEDY = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
ADAPTERS = tuple(f"adapter-with-a-long-name-to-fill-the-record-{i:03d}" for i in range(60))  # ~3 KB a record


# the planted records outlive the test (their TTL): under a model name of their own, other tests never see them
OWN = "flood"


@pytest.fixture(scope="module")
def own_swarm(dht_loop) -> Iterator[list[str]]:
    """A DHT of this module's own (its bootstrap peer's multiaddrs): late in a full run the shared one has
    met hundreds of peers that are gone, and these tests count records to the last one."""
    with bootstrap_peer(dht_loop) as peers:
        yield peers


def dead_record(node_id: str, *, padded: bool = False) -> dict:
    """A valid record of a node serving every block at 1e9 tokens/s, at an address where nothing listens."""
    return make_record(ServerInfo(node_id, f"127.0.0.1:{free_port()}", Span(0, 6), NodeState.ONLINE, 1e9, "0.1.0",
                                  "float32", ADAPTERS if padded else ()))


def test_a_flood_of_signed_records_from_one_key_leaves_honest_nodes_readable(
        start_nodes, dht_loop, own_swarm, open_client, tiny_path, local_model):
    """1,400 valid signed records of ~3.3 KB from one key (4.6 MB: over the p2p daemon's 4 MiB reply
    limit, so the key was unreadable): peers keep only MAX_RECORDS_PER_OWNER of them, the honest nodes
    stay readable and generation equals local."""
    honest = start_nodes("0:3", "3:6", model_name=OWN, initial_peers=tuple(own_swarm))
    model_key = honest[0].node.model_key
    flooder = dht_loop.run(SwarmDHT.create(own_swarm))
    try:
        record = dead_record("x", padded=True)
        flood = {flooder.owned(f"flood{i:04d}"): {**record, "address": f"127.0.0.1:{1 + i}"} for i in range(1400)}
        dht_loop.run(store_many_raw(flooder, servers_key(model_key), flood, get_dht_time() + 120))
        model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(own_swarm), max_wait=5.0,
                                                                   model_name=OWN))
        servers = model.chain.servers(refresh=True)
        assert {n.address for n in honest} <= {s.address for s in servers}
        assert sum(s.node_id.endswith(flooder.owner_marker) for s in servers) <= MAX_RECORDS_PER_OWNER
        ids = torch.randint(3, 256, (2, 5))
        assert torch.equal(model.generate(ids, **GREEDY), local_model.generate(ids, **GREEDY))
    finally:
        dht_loop.run(flooder.shutdown())


def test_thirty_dead_addresses_announcing_huge_throughputs_do_not_fail_calls(
        start_nodes, dht_loop, own_swarm, open_client, tiny_path, local_model):
    """30 records (from 4 owners) pointing at dead addresses with throughput 1e9: they are probed and
    banned before use; forward and generation equal local."""
    from node.server import weights_digests

    honest = start_nodes("0:3", "3:6", model_name=OWN, initial_peers=tuple(own_swarm))
    model_key = honest[0].node.model_key
    right, _ = weights_digests(tiny_path, local_model.config, Span(0, 6))  # a liar can announce the right weights

    async def plant() -> list[SwarmDHT]:
        liars = await asyncio.gather(*(SwarmDHT.create(own_swarm) for _ in range(4)))
        for n in range(30):
            liar = liars[n % 4]
            info = ServerInfo(liar.owned(f"dead{n}"), f"127.0.0.1:{free_port()}", Span(0, 6), NodeState.ONLINE,
                              1e9, "0.1.0", "float32", weights=right)
            assert await liar.announce(model_key, info, ttl=120)
        return liars

    liars = dht_loop.run(plant())
    try:
        model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(own_swarm), max_wait=5.0,
                                                                   model_name=OWN))
        planted_seen = []

        def all_planted_seen() -> bool:
            servers = model.chain.servers(refresh=True)
            planted_seen.append(sum(any(s.node_id.endswith(liar.owner_marker) for liar in liars) for s in servers))
            return planted_seen[-1] == 30

        assert wait_for(all_planted_seen, timeout=10, interval=0.5), planted_seen  # stores may still be arriving
        ids = torch.randint(3, 256, (2, 5))
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, local_model(ids).logits, atol=1e-4)
        assert torch.equal(model.generate(ids, **GREEDY), local_model.generate(ids, **GREEDY))
        assert {h.server.address for h in model.chain.last_route} <= {n.address for n in honest}
    finally:
        for liar in liars:
            dht_loop.run(liar.shutdown())
