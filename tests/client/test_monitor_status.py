"""The monitor's view of a node and of a model's blocks (client/monitor/status.py): the pure functions, and
one look at a real private swarm (in-process node, real DHT)."""
from __future__ import annotations

from client.monitor.app import STATIC
from client.monitor.cli import watched_models
from client.monitor.status import FAILED, Heartbeats, Probe, SwarmWatcher, coverage, node_view, shown_state
from client.transport import Connections
from node.config import NodeConfig
from node.server import NodeThread
from swarm.dht import SwarmDHT
from swarm.keys import generate_key_text, load_key
from swarm.commands import render_status
from swarm.spans import NodeState, ServerInfo, Span

KEY = "tiny/0123456789abcdef"


def info(start: int = 0, end: int = 4, state: NodeState = NodeState.ONLINE, node_id: str = "a",
         quantization: str = "none") -> ServerInfo:
    return ServerInfo(node_id=node_id, address="127.0.0.1:1", span=Span(start, end), state=state, throughput=10.0,
                      version="0.1.0", dtype="float32", adapters=(), tls=False, quantization=quantization)


def answer(state: str = "ONLINE", model: str = KEY, span: tuple[int, int] = (0, 4)) -> Probe:
    return Probe(1.5, None, state, model, span, 100, 60)


def test_what_was_measured_wins_over_what_the_record_claims():
    assert shown_state(info(), answer(), KEY) == ("ONLINE", None)
    assert shown_state(info(), Probe(None, "UNAVAILABLE: connection refused"), KEY) == (FAILED,
                                                                                        "UNAVAILABLE: connection refused")
    state, why = shown_state(info(), answer(model="other/0000"), KEY)
    assert state == FAILED and "other/0000" in why
    state, why = shown_state(info(), answer(span=(0, 2)), KEY)
    assert state == FAILED and "0:2" in why
    assert shown_state(info(), answer(state="OFFLINE"), KEY)[0] == "OFFLINE"  # draining, its record not yet updated
    assert shown_state(info(state=NodeState.OFFLINE), Probe(None, "gone"), KEY)[0] == "OFFLINE"


def test_monitor_and_status_show_a_nodes_quantization():
    """Only clients asking for a quantization use such nodes: both views say which nodes are quantized."""
    assert node_view(info(quantization="int8"), answer(), KEY, 1.0, 10.0)["quantization"] == "int8"
    assert node_view(info(), answer(), KEY, 1.0, 10.0)["quantization"] == "none"
    assert 'n.quantization === "none"' in (STATIC / "monitor.js").read_text()  # the page's column
    text = render_status([info(0, 2, quantization="int8"), info(0, 2, node_id="b")], 2).splitlines()
    assert text[1].endswith("127.0.0.1:1 int8 ONLINE 10, 127.0.0.1:1 ONLINE 10"), text


def test_coverage_marks_gaps_and_joining_blocks():
    nodes = [{"ref": "a", "start": 0, "end": 2, "state": "ONLINE"}, {"ref": "b", "start": 2, "end": 4, "state": FAILED},
             {"ref": "c", "start": 3, "end": 5, "state": "JOINING"}]
    assert [b["state"] for b in coverage(6, nodes)] == ["ok", "ok", "gap", "joining", "joining", "gap"]
    assert coverage(6, nodes)[3]["nodes"] == ["b", "c"]


def test_a_heartbeat_is_when_the_record_was_seen_refreshed():
    beats = Heartbeats()
    assert beats.update([(info(), 100.0)], now=1.0) == {"a": 1.0}
    assert beats.update([(info(), 100.0)], now=2.0) == {"a": 1.0}  # same expiration: no new heartbeat
    assert beats.update([(info(), 105.0), (info(node_id="b"), 90.0)], now=3.0) == {"a": 3.0, "b": 3.0}
    assert beats.update([(info(node_id="b"), 90.0)], now=4.0) == {"b": 3.0}  # a departed: forgotten


def test_the_page_inserts_peer_strings_as_text_only():
    script = (STATIC / "monitor.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script


def test_a_private_swarm_is_watched_with_its_key(tiny_path, dht_loop, tmp_path):
    """The monitor's Info calls carry the swarm key's proof; without it the node refuses them: FAILED."""
    key_file = tmp_path / "lab.key"
    key_file.write_text(generate_key_text())
    key = load_key(key_file)
    boot = dht_loop.run(SwarmDHT.create(host="127.0.0.1", swarm_key=key))
    peers = dht_loop.run(boot.visible_maddrs())
    node = NodeThread(NodeConfig(model=str(tiny_path), blocks=Span(0, 6), cache_tokens=512, initial_peers=tuple(peers),
                                 swarm_key=str(key_file)))
    node.start()

    async def look() -> list[list[dict]]:
        dht = await SwarmDHT.create(peers, client_mode=True, swarm_key=key)
        views = []
        for conns in (Connections(key), Connections(None)):
            watcher = SwarmWatcher(dht, watched_models([str(tiny_path)]), conns)
            views.append((await watcher.refresh())["models"][0]["nodes"])
            await conns.close()
        await dht.shutdown()
        return views

    try:
        with_key, without_key = dht_loop.run(look(), timeout=60)
    finally:
        node.stop(0.5)
        dht_loop.run(boot.shutdown())
    assert [(n["address"], n["state"]) for n in with_key] == [(node.address, "ONLINE")]
    assert with_key[0]["rtt_ms"] > 0 and with_key[0]["cache_tokens"] == 512
    assert without_key[0]["state"] == FAILED and "UNAUTHENTICATED" in without_key[0]["error"], without_key[0]
