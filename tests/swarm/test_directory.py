"""A wrong --model-name or --swarm-key says so instead of looking like an empty swarm (issue 20, item 6):
real hivemind DHT peers on 127.0.0.1, private (sealed records) and open."""
import pytest

from swarm.dht import SwarmDHT
from swarm.directory import announce_model, explain_missing, listed_models
from swarm.keys import generate_key_text, parse_key

SERVED = "tiny-llama/abc123"


@pytest.fixture(scope="module")
def swarms(dht_loop):
    """An open and a private swarm (one announcing peer each, listing SERVED), and a key for each."""
    key, other = parse_key(generate_key_text()), parse_key(generate_key_text())
    peers = []

    def peer(initial=(), swarm_key=None, client_mode=False):
        dht = dht_loop.run(SwarmDHT.create(initial, host="127.0.0.1", client_mode=client_mode, swarm_key=swarm_key))
        peers.append(dht)
        return dht

    try:
        open_host, private_host = peer(), peer(swarm_key=key)
        for host in (open_host, private_host):
            assert dht_loop.run(announce_model(host, SERVED, 60))
        maddrs = {name: dht_loop.run(h.visible_maddrs()) for name, h in (("open", open_host), ("private", private_host))}
        yield peer, maddrs, key, other
    finally:
        for dht in reversed(peers):
            dht_loop.run(dht.shutdown())


@pytest.mark.parametrize("swarm, client_key, model, expected", [
    ("private", "key", "tiny/abc123", "did you mean --model-name tiny-llama?"),
    ("open", None, "tiny/abc123", "did you mean --model-name tiny-llama?"),
    ("private", "key", "other/fff000", "this swarm serves other models: tiny-llama/abc123"),
    ("private", "other", SERVED, "records present but not readable with this swarm key"),
    ("private", None, SERVED, "this is a private swarm, give its --swarm-key"),
    ("open", "key", SERVED, "this swarm is open, leave out --swarm-key"),
])
def test_missing_model_is_explained(swarms, dht_loop, swarm, client_key, model, expected):
    peer, maddrs, key, other = swarms
    client = peer(maddrs[swarm], {"key": key, "other": other, None: None}[client_key], client_mode=True)
    assert expected in dht_loop.run(explain_missing(client, model, maddrs[swarm]))


def test_a_swarm_without_records_has_nothing_to_explain(swarms, dht_loop):
    peer, _, key, _ = swarms
    lone = peer(swarm_key=key)
    assert dht_loop.run(listed_models(lone)) == []
    assert dht_loop.run(explain_missing(lone, SERVED, dht_loop.run(lone.visible_maddrs()))) == ""
