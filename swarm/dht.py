"""The hivemind DHT as swarmlm uses it: a DHTNode on the caller's asyncio loop.

We deliberately do not use ``hivemind.DHT``: it forks a child process, and forking a process whose
gRPC and torch threads are running can deadlock the child. A ``DHTNode`` runs on our own loop (its
p2p daemon is still a separate, exec'd binary).
"""
from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import os
from dataclasses import replace
from typing import Sequence

from hivemind.dht.node import DHTNode
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.directory import announce_model
from swarm.keys import SwarmKey
from swarm.records import make_record, parse_record, servers_key
from swarm.spans import NodeState, ServerInfo, Span
from swarm.storage import MAX_RECORDS_PER_KEY, MAX_RECORDS_PER_OWNER, install, owner_of
from swarm.validator import MAX_RECORD_LIFETIME, MAX_VALUE_BYTES, make_validator

log = logging.getLogger(__name__)


class DHTStartError(RuntimeError):
    """The DHT peer could not start (bad multiaddr, unreachable initial peers, port in use)."""


def host_maddr(host: str, port: int) -> str:
    return f"/ip6/{host}/tcp/{port}" if ":" in host else f"/ip4/{host}/tcp/{port}"


RECORD_OVERHEAD = 512  # bytes an owner signature and encryption add to a record value
DAEMON_PROGRAM = "p2pd"  # the name of hivemind's p2p daemon binary
_OWN_GROUP = contextvars.ContextVar("swarmlm_daemon_own_group", default=False)  # set while a server peer starts


def spawn_daemons_in_own_group() -> None:
    """Start the p2p daemon of every DHT peer that announces (nodes, bootstrap peers; not clients) in a
    process group of its own.

    A signal sent to the whole process group of a node (Ctrl-C in a terminal, ``kill -TERM -PGID``, a
    supervisor stopping a process group) would otherwise reach the daemon at the same instant as the
    node: the daemon closes its control socket at once, and the draining node can no longer announce
    OFFLINE nor shut the DHT peer down (it used to wait for timeouts, ~10 s, and print hivemind's
    ConnectionResetError tracebacks). Those peers handle SIGINT/SIGTERM and stop their daemon themselves;
    a client keeps the old behaviour (a Ctrl-C'd script takes its daemon with it). hivemind offers no
    hook for the daemon's process attributes, so its one spawn call (asyncio's create_subprocess_exec)
    gets ``process_group=0`` for the daemon binary, while ``SwarmDHT.create`` starts a server peer
    (a context variable says so); everything else is passed through unchanged."""
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "swarmlm_own_group", False):
        return

    async def spawn(program, *args, **kwargs):
        if _OWN_GROUP.get() and os.path.basename(str(program)) == DAEMON_PROGRAM:
            kwargs.setdefault("process_group", 0)
        return await original(program, *args, **kwargs)

    spawn.swarmlm_own_group = True
    asyncio.subprocess.create_subprocess_exec = spawn


class SwarmDHT:
    """One DHT peer. Create with ``await SwarmDHT.create(...)``; all methods run on that loop.

    Records are signed by this peer's own RSA key (its ``node_id`` names the key), so nobody else can
    overwrite them; with a swarm key they are also encrypted and their key names hidden (see
    swarm.validator), and only peers holding the key can read or write them.
    """

    def __init__(self, node: DHTNode, swarm_key: SwarmKey | None = None, owner_marker: str = ""):
        self.node = node
        self.peer_id = node.peer_id.to_base58()
        self.swarm_key = swarm_key
        self.owner_marker = owner_marker  # "[owner:<RSA public key>]": subkeys with it are ours alone
        self.node_id = self.owned(self.peer_id)  # subkey of this peer's records

    @classmethod
    async def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
        nat_port_map: bool = False,
        swarm_key: SwarmKey | None = None,
    ) -> "SwarmDHT":
        """Start a DHT peer (of the private swarm of ``swarm_key``, if given). UPnP/NAT-PMP port
        mapping stays off unless the caller opts in: it sends packets to the LAN gateway and
        multicast groups. Peers that announce get their own RSA key; client-mode peers share one."""
        if client_mode:
            owner = RSAPrivateKey.process_wide()
        else:
            owner = await asyncio.get_running_loop().run_in_executor(None, RSAPrivateKey)
        validator, marker = make_validator(swarm_key, owner)
        spawn_daemons_in_own_group()
        own_group = _OWN_GROUP.set(not client_mode)
        try:
            node = await DHTNode.create(
                initial_peers=list(initial_peers),
                host_maddrs=[host_maddr(host, port)],
                client_mode=client_mode,
                nat_port_map=nat_port_map,
                record_validator=validator,
                cache_locally=False, cache_nearest=0, cache_on_store=False,  # no caches: see swarm.storage
            )
        except Exception as e:  # hivemind raises P2PDaemonError / ValueError with multi-line texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DHTStartError(f"could not start a DHT peer (initial peers {list(initial_peers)}): {first}") from e
        finally:
            _OWN_GROUP.reset(own_group)
        install(node.protocol)  # bounded records per key and per owner, no cache (swarm.storage)
        return cls(node, swarm_key, marker)

    def owned(self, name: str) -> str:
        """A subkey only this peer can write under: ``name`` followed by our owner marker."""
        return f"{name}{self.owner_marker}"

    def dht_key(self, name: str) -> str:
        """The DHT key a record name is stored under: hidden with the swarm key in a private swarm."""
        return name if self.swarm_key is None else self.swarm_key.hide_name(name)

    async def visible_maddrs(self) -> list[str]:
        return [str(m) for m in await self.node.p2p.get_visible_maddrs()]

    async def announce(self, model: str, info: ServerInfo, ttl: float) -> bool:
        """Store ``info`` under the model's key; it expires after ``ttl`` seconds unless refreshed."""
        value = self.check_announceable(info, ttl)
        return await self.node.store(self.dht_key(servers_key(model)), value, get_dht_time() + ttl,
                                     subkey=info.node_id)

    def check_announceable(self, info: ServerInfo, ttl: float) -> dict:
        """The record of ``info``; ValueError if the swarm's peers would refuse it."""
        if not self.owner_marker or not info.node_id.endswith(self.owner_marker):
            raise ValueError("announce: info.node_id must be a subkey this peer owns (SwarmDHT.node_id or owned())")
        if not 0 < ttl <= MAX_RECORD_LIFETIME:
            raise ValueError(f"ttl must be in (0, {MAX_RECORD_LIFETIME:g}] seconds (the DHT's maximum record lifetime)")
        value = make_record(info)
        size = len(MSGPackSerializer.dumps(value))
        if size > MAX_VALUE_BYTES - RECORD_OVERHEAD:
            raise ValueError(f"a DHT record of {size} bytes is over the limit of {MAX_VALUE_BYTES - RECORD_OVERHEAD} "
                             "(fewer or shorter adapter names?)")
        return value

    async def fetch_servers(self, model: str, num_blocks: int) -> list[ServerInfo]:
        """Every node announced for ``model`` (any state), one entry per node, sorted by span start.
        One DHT lookup, whatever the number of blocks and nodes (see swarm.records). What a reply holds is
        bounded as a peer's storage is (swarm.storage), whoever answered: at most MAX_RECORDS_PER_OWNER
        records of one owner key and MAX_RECORDS_PER_KEY in all."""
        return [info for info, _ in await self.fetch_records(model, num_blocks)]

    async def fetch_records(self, model: str, num_blocks: int) -> list[tuple[ServerInfo, float]]:
        """``fetch_servers`` with each record's expiration time (DHT time: ``get_dht_time()``); a record's
        expiration moves forward at each heartbeat of its node (the monitor reads these)."""
        found = await self.node.get(self.dht_key(servers_key(model)), latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        records, owners = [], {}
        for node_id, item in sorted(found.value.items(), key=lambda entry: str(entry[0]))[:MAX_RECORDS_PER_KEY * 2]:
            info = parse_record(node_id, getattr(item, "value", None), num_blocks=num_blocks)
            expiration = getattr(item, "expiration_time", None)
            if info is None or not isinstance(expiration, (int, float)) or not math.isfinite(expiration):
                log.debug("ignoring a malformed record from %r", node_id)
                continue
            owner = owner_of(node_id)
            if owners.get(owner, 0) >= MAX_RECORDS_PER_OWNER or len(records) >= MAX_RECORDS_PER_KEY:
                continue
            owners[owner] = owners.get(owner, 0) + 1
            records.append((info, float(expiration)))
        return sorted(records, key=lambda r: (r[0].span.start, r[0].node_id))

    async def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the DHT peer and its p2p daemon. A daemon that died or stopped answering must not hang
        the caller's exit: after ``timeout`` seconds the daemon is killed and we move on."""
        try:
            await asyncio.wait_for(self.node.shutdown(), timeout)
        except Exception as e:  # TimeoutError, or hivemind failing to talk to a dead daemon
            log.warning("DHT shutdown did not finish cleanly (%s); killing the p2p daemon", type(e).__name__)
            child = getattr(self.node.p2p, "_child", None)  # hivemind keeps the daemon process here
            if child is not None and child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()


class Announcer:
    """Keeps a node's records alive: re-announces every ``ttl / 3`` seconds and on state changes."""

    def __init__(self, dht: SwarmDHT, model: str, info: ServerInfo, ttl: float) -> None:
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, got {ttl}")
        self.dht, self.model, self.ttl, self.info = dht, model, ttl, info
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self.dht.check_announceable(self.info, self.ttl)  # a record peers would refuse is an error, not a warning
        await self._announce()
        self._task = asyncio.create_task(self._heartbeat())

    async def set_state(self, state: NodeState, *, throughput: float | None = None) -> None:
        """Change the announced state and publish it at once."""
        changes = {"state": state} if throughput is None else {"state": state, "throughput": throughput}
        self.info = replace(self.info, **changes)
        await self._announce()

    async def move(self, span: Span, state: NodeState, weights: str | None = None, files: str | None = None) -> None:
        """Serve a new span (whose weights digests are ``weights`` and ``files``, if given): publish it (it
        replaces this node's record of the old span)."""
        digests = {name: value for name, value in (("weights", weights), ("files", files)) if value is not None}
        self.info = replace(self.info, span=span, state=state, **digests)
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
            await announce_model(self.dht, self.model, self.ttl)  # the directory behind "did you mean ...?"
        except Exception as e:  # a flaky DHT must not kill the node; the next heartbeat retries
            log.warning("announcing to the DHT failed: %s", e)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.ttl / 3)
            await self._announce()
