"""The hivemind DHT as swarmlm uses it: start a peer, announce a node, read the swarm, heartbeat."""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import Sequence

import hivemind
from hivemind.utils import get_dht_time

from swarm.records import block_key, make_record, parse_record
from swarm.spans import NodeState, ServerInfo

log = logging.getLogger(__name__)


class DHTStartError(RuntimeError):
    """The DHT peer could not start (bad multiaddr, unreachable initial peers, port in use)."""


def host_maddr(host: str, port: int) -> str:
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


def start_dht(
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    client_mode: bool = False,
    nat_port_map: bool = False,
) -> hivemind.DHT:
    """Start a DHT peer. UPnP/NAT-PMP port mapping stays off unless the caller opts in:
    it sends packets to the LAN gateway and multicast groups."""
    try:
        return hivemind.DHT(
            initial_peers=list(initial_peers),
            host_maddrs=[host_maddr(host, port)],
            client_mode=client_mode,
            nat_port_map=nat_port_map,
            start=True,
        )
    except Exception as e:  # hivemind raises P2PDaemonError / ValueError with multi-line texts
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DHTStartError(f"could not start a DHT peer (initial peers {list(initial_peers)}): {first}") from e


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(m) for m in dht.get_visible_maddrs()]


def announce(dht: hivemind.DHT, model: str, info: ServerInfo, ttl: float, timeout: float = 10.0) -> bool:
    """Store ``info`` under every block of its span; expires after ``ttl`` seconds unless refreshed."""
    expiration = get_dht_time() + ttl
    value = make_record(info)
    futures = [
        dht.store(block_key(model, b), value, expiration, subkey=info.node_id, return_future=True)
        for b in range(info.span.start, info.span.end)
    ]
    return all(bool(f.result(timeout=timeout)) for f in futures)


def fetch_servers(dht: hivemind.DHT, model: str, num_blocks: int, timeout: float = 10.0) -> list[ServerInfo]:
    """Every node announced for ``model`` (any state), one entry per node: its freshest valid record."""
    futures = [dht.get(block_key(model, b), latest=True, return_future=True) for b in range(num_blocks)]
    best: dict[str, tuple[float, ServerInfo]] = {}
    for block, future in enumerate(futures):
        found = future.result(timeout=timeout)
        if found is None or not isinstance(found.value, dict):
            continue
        for node_id, item in found.value.items():
            value = getattr(item, "value", None)
            expiration = getattr(item, "expiration_time", None)
            info = parse_record(node_id, value, block=block, num_blocks=num_blocks)
            if info is None or not isinstance(expiration, (int, float)):
                log.debug("ignoring malformed record under block %d from %r", block, node_id)
                continue
            if node_id not in best or expiration > best[node_id][0]:
                best[node_id] = (float(expiration), info)
    return sorted((info for _, info in best.values()), key=lambda i: (i.span.start, i.node_id))


class Announcer:
    """Keeps a node's records alive: re-announces every ``ttl / 3`` seconds and on state changes."""

    def __init__(self, dht: hivemind.DHT, model: str, info: ServerInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht, self.model, self.ttl = dht, model, ttl
        self._info = info
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmlm-announcer", daemon=True)

    @property
    def info(self) -> ServerInfo:
        return self._info

    def start(self) -> None:
        self._announce()
        self._thread.start()

    def set_state(self, state: NodeState, *, throughput: float | None = None) -> None:
        """Change the announced state and publish it at once."""
        with self._lock:
            changes = {"state": state} if throughput is None else {"state": state, "throughput": throughput}
            self._info = replace(self._info, **changes)
        self._announce()

    def stop(self, final_state: NodeState | None = NodeState.OFFLINE) -> None:
        """Stop heartbeats; announce ``final_state`` (OFFLINE) one last time so clients stop routing here."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if final_state is not None:
            with self._lock:
                self._info = replace(self._info, state=final_state)
            self._announce()

    def _announce(self) -> None:
        try:
            if not announce(self.dht, self.model, self._info, self.ttl):
                log.warning("DHT did not accept the announcement of %s", self._info.address)
        except Exception as e:  # a flaky DHT must not kill the node; the next heartbeat retries
            log.warning("announcing to the DHT failed: %s", e)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.ttl / 3)
            self._wake.clear()
            if not self._stop.is_set():
                self._announce()
