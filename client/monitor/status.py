"""What the monitor shows: the swarm as its DHT records announce it, checked from here.

Every refresh reads each watched model's records (one DHT lookup per model) and calls every announced
node's Info RPC. A node's state on the page is what was measured where the two disagree: a record that
says ONLINE for a node that does not answer is FAILED; the round trip is the Info call's, timed here;
cache use is what the node answered. "Last heartbeat" is when this monitor saw the node's record
refreshed (its expiration moved forward), not a time the node claims.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Sequence

import grpc

from client.transport import Connections, RemoteCallError
from proto import swarmlm_pb2 as pb
from swarm.dht import SwarmDHT
from swarm.spans import NodeState, ServerInfo

log = logging.getLogger(__name__)

MAX_PROBES_AT_ONCE = 32  # Info calls in flight at once, over all models
MAX_NODES_PER_MODEL = 4096  # records beyond this are counted, not shown (a key holds about 4,000; README limits)
FAILED = "FAILED"  # announced but not answering (or answering for another model) when the monitor called


@dataclass(frozen=True)
class WatchedModel:
    """A model the monitor shows: its DHT model key, the name it was given and its number of blocks."""

    key: str
    name: str
    num_blocks: int


@dataclass(frozen=True)
class Probe:
    """One Info call to a node, as measured from the monitor."""

    rtt_ms: float | None  # round trip of the Info call; None when it failed
    error: str | None = None
    state: str | None = None  # the state the node itself reports
    model: str | None = None
    span: tuple[int, int] | None = None
    cache_tokens: int | None = None
    cache_tokens_free: int | None = None


async def probe_node(conns: Connections, address: str, tls: bool, timeout: float) -> Probe:
    """Call the Info RPC of the node at ``address`` once and time it."""
    start = time.perf_counter()
    try:
        reply = await conns.stub(address, tls).Info(pb.InfoRequest(), timeout=timeout)
    except grpc.aio.AioRpcError as e:
        return Probe(None, str(conns.error(address, e.code(), e.details() or "", tls)))
    except RemoteCallError as e:  # e.g. a plaintext node while the monitor requires TLS (--tls-ca)
        return Probe(None, str(e))
    rtt = (time.perf_counter() - start) * 1000
    return Probe(rtt, None, reply.state, reply.model, (reply.start, reply.end), reply.cache_tokens,
                 reply.cache_tokens_free)


def shown_state(info: ServerInfo, probe: Probe, model_key: str) -> tuple[str, str | None]:
    """The node's state on the page and why, believing what was measured over what the record claims."""
    if info.state is NodeState.OFFLINE:
        return NodeState.OFFLINE.value, None
    if probe.rtt_ms is None:
        return FAILED, probe.error
    if probe.model != model_key:
        return FAILED, f"answers for model {probe.model!r}, not {model_key!r}"
    if probe.span != (info.span.start, info.span.end):
        return FAILED, f"serves blocks {probe.span[0]}:{probe.span[1]}, announced {info.span}"
    if probe.state in NodeState.__members__:
        return probe.state, None
    return info.state.value, None


def node_ref(node_id: str) -> str:
    """A short stable name of a node id (a node id carries a whole RSA public key)."""
    return hashlib.sha256(node_id.encode()).hexdigest()[:12]


class Heartbeats:
    """When each node's record was last seen refreshed: its expiration time moved forward."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[float, float]] = {}  # node id -> (expiration, wall time seen)

    def update(self, records: Sequence[tuple[ServerInfo, float]], now: float) -> dict[str, float]:
        current = {}
        for info, expiration in records:
            previous = self._seen.get(info.node_id)
            if previous is None or expiration > previous[0]:
                previous = (expiration, now)
            current[info.node_id] = previous
        self._seen = current  # forget departed nodes
        return {node_id: seen for node_id, (_, seen) in current.items()}


def coverage(num_blocks: int, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per block: the nodes serving it and the block's state (ok: an ONLINE node; joining: only JOINING
    ones; gap: nothing usable)."""
    blocks = []
    for block in range(num_blocks):
        here = [n for n in nodes if n["start"] <= block < n["end"]]
        states = {n["state"] for n in here}
        state = "ok" if NodeState.ONLINE.value in states else "joining" if NodeState.JOINING.value in states else "gap"
        blocks.append({"block": block, "state": state, "nodes": [n["ref"] for n in here]})
    return blocks


def node_view(info: ServerInfo, probe: Probe, model_key: str, seen: float, expires_in: float) -> dict[str, Any]:
    state, reason = shown_state(info, probe, model_key)
    return {
        "ref": node_ref(info.node_id), "peer_id": info.node_id.split("[", 1)[0], "address": info.address,
        "start": info.span.start, "end": info.span.end, "state": state, "announced_state": info.state.value,
        "error": reason, "throughput": info.throughput, "rtt_ms": probe.rtt_ms, "cache_tokens": probe.cache_tokens,
        "cache_tokens_free": probe.cache_tokens_free, "version": info.version, "dtype": info.dtype,
        "quantization": info.quantization, "tls": info.tls,
        "adapters": list(info.adapters), "last_heartbeat": seen, "expires_in": round(expires_in, 1),
    }


class SwarmWatcher:
    """Keeps ``snapshot`` (the /api/status document) fresh: every ``period`` seconds, all models' records
    and a probe of every node. Page loads only read the snapshot, so they never cost the swarm anything."""

    def __init__(self, dht: SwarmDHT, models: Sequence[WatchedModel], conns: Connections, *,
                 period: float = 2.0, probe_timeout: float = 3.0) -> None:
        if period <= 0 or probe_timeout <= 0:
            raise ValueError("period and probe_timeout must be positive")
        self.dht, self.models, self.conns = dht, list(models), conns
        self.period, self.probe_timeout = period, probe_timeout
        self._heartbeats = {m.key: Heartbeats() for m in self.models}
        self._limit = asyncio.Semaphore(MAX_PROBES_AT_ONCE)
        self.snapshot: dict[str, Any] = {"time": None, "refresh_seconds": period, "models": [], "error": None}

    async def _probe(self, info: ServerInfo) -> Probe:
        async with self._limit:
            return await probe_node(self.conns, info.address, info.tls, self.probe_timeout)

    async def model_view(self, model: WatchedModel) -> dict[str, Any]:
        from hivemind.utils import get_dht_time

        records = await self.dht.fetch_records(model.key, model.num_blocks)
        hidden = max(0, len(records) - MAX_NODES_PER_MODEL)
        records = records[:MAX_NODES_PER_MODEL]
        seen = self._heartbeats[model.key].update(records, time.time())
        probes = await asyncio.gather(*(self._probe(info) for info, _ in records))
        now = get_dht_time()
        nodes = [node_view(info, probe, model.key, seen[info.node_id], expiration - now)
                 for (info, expiration), probe in zip(records, probes)]
        blocks = coverage(model.num_blocks, nodes)
        return {"key": model.key, "name": model.name, "num_blocks": model.num_blocks, "nodes": nodes,
                "coverage": blocks, "gaps": [b["block"] for b in blocks if b["state"] == "gap"],
                "nodes_not_shown": hidden}

    async def refresh(self) -> dict[str, Any]:
        views = await asyncio.gather(*(self.model_view(m) for m in self.models))
        await self.conns.keep_only({(n["address"], n["tls"]) for view in views for n in view["nodes"]})
        return {"time": time.time(), "refresh_seconds": self.period, "models": list(views), "error": None}

    async def run(self) -> None:
        """Refresh forever (until cancelled); a failed refresh keeps the last view and says why."""
        while True:
            try:
                self.snapshot = await self.refresh()
            except Exception as e:  # a flaky DHT must not stop the page; the next refresh retries
                log.warning("monitor refresh failed: %s", e)
                self.snapshot = {**self.snapshot, "error": f"refresh failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"}
            await asyncio.sleep(self.period)
