"""The DHT check of a push target (node.relay.RelayLinks.next_node): only a node announced as serving the
block the push continues from, with chained steps; inside an overlapping span too."""
import asyncio

import pytest

from node.relay import RelayLinks, RelayRefused
from swarm.spans import NodeState, ServerInfo, Span


def server(address: str, span: Span, chain: bool = True) -> ServerInfo:
    return ServerInfo(f"id-{address}", address, span, NodeState.ONLINE, 10.0, "0.1.0", "float32", chain=chain)


def test_a_push_target_must_serve_the_next_block_with_chained_steps():
    records = [server("127.0.0.1:1", Span(3, 8)), server("127.0.0.1:2", Span(5, 8), chain=False)]

    async def fetch():
        return records

    async def check():
        links = RelayLinks(fetch)
        assert (await links.next_node("127.0.0.1:1", 5)).address == "127.0.0.1:1"  # used from inside 3:8
        assert (await links.next_node("127.0.0.1:1", 3)).address == "127.0.0.1:1"
        for address, start in (("127.0.0.1:1", 8), ("127.0.0.1:1", 2), ("127.0.0.1:2", 5), ("127.0.0.1:9", 5)):
            with pytest.raises(RelayRefused):  # past its span, before it, no chained steps, not announced
                await links.next_node(address, start)
        await links.close()

    asyncio.run(check())
