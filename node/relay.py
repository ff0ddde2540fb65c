"""Chained inference steps on the sending side (issue 16): pushing a session's step outputs to the next node.

A client running a chained step names, in each hop's step message, the next hop (``ChainTarget``: its
address and the secret token of its session there). The node computes the step, answers the client as
usual, and pushes the outputs over a ``Relay`` stream (one per session and target, opened at the first
push) to that node, which uses them as that step's input. When a push fails (the target refused it, the
link broke, the target is not what the DHT announces) the node tells the client on its stream (a notice:
``InferenceResponse.chain_error``), and the client gives the next node its input itself.

Not a free relay: a node pushes only its own outputs of a step its client sent, one push per step, only to
an address the DHT announces as serving this model's blocks from the session's end with chained steps. In
a private swarm its calls carry the swarm key proof like a client's (swarm.keys), and a TLS node is dialed
over TLS verified against ``--tls-ca`` (or the system's roots); with a CA a plaintext target is refused.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import grpc

from node.chain import MAX_TOKEN, MIN_TOKEN
from node.requests import RequestError
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import DTYPES, FLOAT_DTYPES, encode
from swarm.keys import AUTH_HEADER, NO_EPOCH, SwarmKey, body_digest, epoch_in, rpc_proof
from swarm.spans import ServerInfo

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["Node"].full_name
RELAY_METHOD, INFO_METHOD = f"/{SERVICE}/Relay", f"/{SERVICE}/Info"
PUSH_WIRES = ("", "float32", "bfloat16", "float16")  # ChainTarget.wire values (inference steps travel unencoded)
DIRECTORY_TTL = 5.0  # seconds the DHT view that checks targets is reused
MIN_REFRESH = 1.0  # seconds between re-reads for a target not in the view (a replacement that just joined)
CHANNEL_OPTIONS = [  # as a client's: a blackholed next node is noticed in seconds
    ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 1 << 20),
    ("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 2000), ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
]


class RelayRefused(Exception):
    """Why this node does not (or could not) push to a target."""


@dataclass(frozen=True)
class Target:
    address: str
    token: bytes
    dtype: str
    wire: str

    def encode(self, out) -> pb.Tensor:
        """The outputs as the next node receives them: exactly what the client would have sent it."""
        return encode(out.to(DTYPES[self.dtype]), self.wire or None)


def parse_target(msg: pb.ChainTarget) -> Target:
    bad = grpc.StatusCode.INVALID_ARGUMENT
    host, sep, port = msg.address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536 and len(msg.address) <= 256):
        raise RequestError(bad, f"chain_push.address must be host:port, got {msg.address[:80]!r}")
    if not MIN_TOKEN <= len(msg.token) <= MAX_TOKEN:
        raise RequestError(bad, f"chain_push.token must be {MIN_TOKEN}..{MAX_TOKEN} bytes")
    if msg.dtype not in FLOAT_DTYPES or msg.wire not in PUSH_WIRES:
        raise RequestError(bad, f"chain_push.dtype must be one of {sorted(FLOAT_DTYPES)} and wire one of "
                                f"{list(PUSH_WIRES)}, got {msg.dtype[:40]!r}, {msg.wire[:40]!r}")
    return Target(msg.address, msg.token, msg.dtype, msg.wire)


class RelayLinks:
    """This node's channels to the next nodes of its clients' routes, and the DHT check of every target."""

    def __init__(self, fetch: Callable[[], Awaitable[list[ServerInfo]]], swarm_key: SwarmKey | None = None,
                 tls_roots: bytes | None = None, tls_ca: str | None = None, timeout: float = 10.0):
        """``fetch``: the records of this node's model (SwarmDHT.fetch_servers); ``tls_roots``: the PEM of
        ``tls_ca`` (the swarm's CA; None: the system's roots, and plaintext targets are allowed)."""
        self.fetch, self.swarm_key, self.timeout = fetch, swarm_key, timeout
        self.tls_roots, self.tls_ca = tls_roots, tls_ca
        self._servers: list[ServerInfo] = []
        self._fetched = -1e9
        self._lock = asyncio.Lock()
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
        self.epochs: dict[str, str] = {}  # address -> the epoch of the node process there (private swarms)

    async def next_node(self, address: str, start: int) -> ServerInfo:
        """The record of the node at ``address`` serving block ``start`` with chained steps; RelayRefused
        when the DHT announces none."""
        async with self._lock:
            found = self._find(address, start)
            age = time.monotonic() - self._fetched
            if age > DIRECTORY_TTL or (found is None and age > MIN_REFRESH):
                try:
                    self._servers = await asyncio.wait_for(self.fetch(), self.timeout)
                    self._fetched = time.monotonic()
                except Exception as e:  # a DHT hiccup: the view we had stands
                    log.warning("reading the DHT to check a push target failed: %s", e)
                found = self._find(address, start)
        if found is None:
            raise RelayRefused(f"{address} is not announced in the DHT as serving this model's blocks from {start} "
                               "with chained steps; not pushing there")
        if self.tls_ca is not None and not found.tls:
            raise RelayRefused(f"{address} serves plaintext gRPC and this node requires TLS (--tls-ca {self.tls_ca})")
        return found

    def _find(self, address: str, start: int) -> ServerInfo | None:
        # the next hop may use a node from inside its span (overlapping spans: 0:5 then 3:8 used from block 5)
        return next((s for s in self._servers if s.address == address and s.span.start <= start < s.span.end
                     and s.chain), None)

    def _stub(self, server: ServerInfo) -> pb_grpc.NodeStub:
        key = (server.address, server.tls)
        if key not in self._channels:
            if server.tls:
                credentials = grpc.ssl_channel_credentials(root_certificates=self.tls_roots)
                self._channels[key] = grpc.aio.secure_channel(server.address, credentials, options=CHANNEL_OPTIONS)
            else:
                self._channels[key] = grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS)
        return pb_grpc.NodeStub(self._channels[key])

    async def open(self, server: ServerInfo, token: bytes) -> grpc.aio.StreamStreamCall:
        """A Relay stream to ``server`` whose first message (written here) names the session ``token``."""
        stub = self._stub(server)
        hello = pb.ChainPush(token=token)
        metadata = None
        if self.swarm_key is not None:
            if server.address not in self.epochs:
                await self._learn_epoch(stub, server.address)
            digest = body_digest(hello.SerializeToString())
            epoch = self.epochs.get(server.address, NO_EPOCH)
            metadata = ((AUTH_HEADER, rpc_proof(self.swarm_key, RELAY_METHOD, server.address, digest, epoch)),)
        call = stub.Relay(metadata=metadata)
        await call.write(hello)
        return call

    async def _learn_epoch(self, stub: pb_grpc.NodeStub, address: str) -> None:
        """The node's epoch, from its refusal of an Info call proved for none (proofs must name it)."""
        proof = rpc_proof(self.swarm_key, INFO_METHOD, address, body_digest(b""), NO_EPOCH)
        try:
            await stub.Info(pb.InfoRequest(), metadata=((AUTH_HEADER, proof),), timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            self.learn(address, e.code(), e.details() or "")

    def learn(self, address: str, code: grpc.StatusCode, details: str) -> None:
        fresh = epoch_in(details) if code == grpc.StatusCode.UNAUTHENTICATED else None
        if fresh is not None:
            self.epochs[address] = fresh

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


class Pusher:
    """Pushes one session's chained step outputs, in order, to the target its client names; a failure is
    reported once through ``notify(step, why)`` (the session forwards it to the client)."""

    def __init__(self, links: RelayLinks, notify: Callable[[int, str], None]):
        self.links, self.notify = links, notify
        self.target: Target | None = None
        self.latest = 0  # the latest step given to push
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def push(self, target: Target, start: int, step: int, hidden: pb.Tensor) -> None:
        """Queue ``hidden`` (step ``step``'s outputs) for the node at ``target`` serving blocks from ``start``."""
        self.latest = step
        if target != self.target or self._task is None or self._task.done():
            self.close()
            self.target, self._queue = target, asyncio.Queue()
            self._task = asyncio.ensure_future(self._run(target, start, self._queue))
        self._queue.put_nowait((step, hidden))

    async def _run(self, target: Target, start: int, queue: asyncio.Queue) -> None:
        call = None
        try:
            server = await self.links.next_node(target.address, start)
            call = await self.links.open(server, target.token)
            acks = asyncio.ensure_future(self._acks(call))
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, acks}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    acks.result()  # raises why the stream ended
                    raise RelayRefused("the next node ended the relay stream")
                step, hidden = get.result()
                await call.write(pb.ChainPush(step=step, hidden_states=hidden))
        except asyncio.CancelledError:
            raise
        except grpc.aio.AioRpcError as e:
            self.links.learn(target.address, e.code(), e.details() or "")
            self._failed(target, f"{e.code().name}: {e.details()}")
        except Exception as e:  # RelayRefused, a write on a call that ended, ...
            self._failed(target, str(e) or type(e).__name__)
        finally:
            if call is not None:
                call.cancel()

    @staticmethod
    async def _acks(call: grpc.aio.StreamStreamCall) -> None:
        """Read acknowledgements until the stream ends; RelayRefused with the status if it ends in an error."""
        while await call.read() is not grpc.aio.EOF:
            pass
        code = await call.code()
        if code != grpc.StatusCode.OK:
            raise RelayRefused(f"{code.name}: {await call.details()}")

    def _failed(self, target: Target, why: str) -> None:
        log.info("push of chain step %d to %s failed: %s", self.latest, target.address, why)
        self.notify(self.latest, f"this node's push to the next node {target.address} failed: {why}")

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
