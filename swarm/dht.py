"""The hivemind DHT as swarmlm uses it: a DHTNode on the caller's asyncio loop.

We deliberately do not use ``hivemind.DHT``: it forks a child process, and forking a process whose
gRPC and torch threads are running can deadlock the child. A ``DHTNode`` runs on our own loop (its
p2p daemon is still a separate, exec'd binary).
"""
from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import replace
from typing import Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.records import block_key, make_record, parse_record
from swarm.spans import NodeState, ServerInfo, Span

log = logging.getLogger(__name__)


class DHTStartError(RuntimeError):
    """The DHT peer could not start (bad multiaddr, unreachable initial peers, port in use)."""


def host_maddr(host: str, port: int) -> str:
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


class SwarmDHT:
    """One DHT peer. Create with ``await SwarmDHT.create(...)``; all methods run on that loop."""

    def __init__(self, node: DHTNode):
        self.node = node
        self.peer_id = node.peer_id.to_base58()

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
        nat_port_map: bool = False,
    ) -> "SwarmDHT":
        """Start a DHT peer. UPnP/NAT-PMP port mapping stays off unless the caller opts in: it sends
        packets to the LAN gateway and multicast groups."""
        try:
            node = await DHTNode.create(
                initial_peers=list(initial_peers),
                host_maddrs=[host_maddr(host, port)],
                client_mode=client_mode,
                nat_port_map=nat_port_map,
            )
        except Exception as e:  # hivemind raises P2PDaemonError / ValueError with multi-line texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DHTStartError(f"could not start a DHT peer (initial peers {list(initial_peers)}): {first}") from e
        return cls(node)

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.node.p2p.get_visible_maddrs()]

    async def announce(self, model: str, info: ServerInfo, ttl: float) -> bool:
        """Store ``info`` under every block of its span; it expires after ``ttl`` seconds unless refreshed."""
        blocks = range(info.span.start, info.span.end)
        keys = [block_key(model, b) for b in blocks]
        value = make_record(info)
        ok = await self.node.store_many(
            keys, [value] * len(keys), get_dht_time() + ttl, subkeys=[info.node_id] * len(keys))
        return all(ok.values())

    async def fetch_servers(self, model: str, num_blocks: int) -> list[ServerInfo]:
        """Every node announced for ``model`` (any state), one entry per node: its freshest valid record."""
        keys = [block_key(model, b) for b in range(num_blocks)]
        found = await self.node.get_many(keys, sufficient_expiration_time=math.inf)
        best: dict[str, tuple[float, ServerInfo]] = {}
        for block, key in enumerate(keys):
            entry = found.get(key)
            if entry is None or not isinstance(entry.value, dict):
                continue
            for node_id, item in entry.value.items():
                value, expiration = getattr(item, "value", None), getattr(item, "expiration_time", None)
                info = parse_record(node_id, value, block=block, num_blocks=num_blocks)
                if info is None or not isinstance(expiration, (int, float)):
                    log.debug("ignoring malformed record under block %d from %r", block, node_id)
                    continue
                if node_id not in best or expiration > best[node_id][0]:
                    best[node_id] = (float(expiration), info)
        return sorted((info for _, info in best.values()), key=lambda i: (i.span.start, i.node_id))

    async def store_raw(self, key: str, value: object, expiration: float, subkey: str | None = None) -> bool:
        """Store an arbitrary value (tests use it to plant malformed records)."""
        return await self.node.store(key, value, expiration, subkey=subkey)

    async def shutdown(self) -> None:
        await self.node.shutdown()


class Announcer:
    """Keeps a node's records alive: re-announces every ``ttl / 3`` seconds and on state changes."""

    def __init__(self, dht: SwarmDHT, model: str, info: ServerInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht, self.model, self.ttl, self.info = dht, model, ttl, info
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._announce()
        self._task = asyncio.create_task(self._heartbeat())

    async def set_state(self, state: NodeState, *, throughput: float | None = None) -> None:
        """Change the announced state and publish it at once."""
        changes = {"state": state} if throughput is None else {"state": state, "throughput": throughput}
        self.info = replace(self.info, **changes)
        await self._announce()

    async def move(self, span: Span, state: NodeState) -> None:
        """Serve a new span: old blocks' records were announced OFFLINE before; publish the new ones."""
        self.info = replace(self.info, span=span, state=state)
        await self._announce()

    async def stop(self, final_state: NodeState | None = NodeState.OFFLINE) -> None:
        """Stop heartbeats; announce ``final_state`` once more so clients stop routing here at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if final_state is not None:
            await self.set_state(final_state)

    async def _announce(self) -> None:
        try:
            if not await self.dht.announce(self.model, self.info, self.ttl):
                log.warning("DHT did not accept the announcement of %s", self.info.address)
        except Exception as e:  # a flaky DHT must not kill the node; the next heartbeat retries
            log.warning("announcing to the DHT failed: %s", e)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self._announce()
