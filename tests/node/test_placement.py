"""Automatic placement and rebalancing with real nodes and a real DHT."""
import asyncio

import torch

from swarm.dht import SwarmDHT
from tests.helpers.launch import wait_for
from swarm.spans import NodeState, Span


def spans_in_dht(bootstrap, model_key):
    async def read():
        dht = await SwarmDHT.create(bootstrap, client_mode=True)
        try:
            return {s.address: (s.span, s.state) for s in await dht.fetch_servers(model_key, 6)}
        finally:
            await dht.shutdown()

    return asyncio.run(read())


def test_num_blocks_fills_the_hole(start_nodes, bootstrap):
    (a,) = start_nodes("0:4", throughput=100.0)
    (b,) = start_nodes(num_blocks=2, throughput=100.0)
    assert b.node.span == Span(4, 6)
    assert wait_for(lambda: spans_in_dht(bootstrap, a.node.model_key).get(b.address)  # its ONLINE record
                    == (Span(4, 6), NodeState.ONLINE), timeout=10)  # follows the JOINING one


def test_rebalance_moves_to_where_the_swarm_is_weak(start_nodes, open_client, tiny_path, local_model, bootstrap):
    own = {"model_name": "rebalance"}  # a key of its own: no other test's nodes (or their records) in view
    (a,) = start_nodes("0:6", throughput=100.0, **own)
    (mover,) = start_nodes(num_blocks=3, rebalance_period=0.5, ttl=1.0, throughput=100.0, **own)
    assert mover.node.span == Span(0, 3)  # all windows equal: the first
    start_nodes("0:3", throughput=100.0, **own)  # now 0:3 has three nodes and 3:6 only one
    assert wait_for(lambda: mover.node.span == Span(3, 6), timeout=20)
    assert wait_for(lambda: spans_in_dht(bootstrap, a.node.model_key).get(mover.address)
                    == (Span(3, 6), NodeState.ONLINE), timeout=10)
    model = open_client(tiny_path, model_name="rebalance")
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)


def test_placement_counts_only_nodes_quantized_alike(start_nodes):
    """Clients route through one quantization ("none" by default): an int8 node does not cover a block for
    float32 clients, so a float32 node placing itself ignores it (and an int8 node sees only int8 ones)."""
    own = {"model_name": "placement-quantized", "throughput": 100.0}
    start_nodes("0:3", quantize="int8", **own)
    (plain,) = start_nodes(num_blocks=3, **own)
    assert plain.node.span == Span(0, 3)  # no float32 node anywhere: all windows equal, the first (not 3:6)
    (int8,) = start_nodes(num_blocks=3, quantize="int8", **own)
    assert int8.node.span == Span(3, 6)  # where no int8 node serves
