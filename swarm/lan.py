"""Zero-configuration discovery on a LAN: peers multicast their DHT multiaddrs, newcomers listen.

Opt-in only (``--lan`` on the CLIs, ``ClientConfig(lan=True)``): multicast leaves the machine, so
nothing here sends or joins a group unless asked. `swarm bootstrap --lan` and `node serve --lan` run
a ``LanAnnouncer``; nodes and clients started with ``--lan`` and no ``--initial-peers`` ``listen``
for a bounded time and join the DHT through what they heard.

One UDP datagram of at most MAX_PACKET bytes to GROUP:PORT, multicast TTL 1 (never routed):
    MAGIC (4 bytes) | kind (1: b"o" open swarm, b"p" private swarm) | body
    open:    body = JSON {"v", "role", "model", "ts", "n", "peers"}
    private: body = 12-byte nonce | AES-256-GCM(SwarmKey.lan, the same JSON, associated data MAGIC+kind)
A private swarm's announcements can be read and made only with its key; an open swarm's name the
model key, so listeners of other models ignore them. Listeners refuse the other kind, packets that
do not authenticate, other models (open), timestamps more than MAX_AGE seconds from their clock,
nonces seen before, malformed multiaddrs and oversized packets, and look at no more than MAX_RATE
datagrams a second. IPv4 only.
"""
from __future__ import annotations

import argparse
import json
import logging
import secrets
import select
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from swarm.keys import SwarmKey, SwarmKeyError, load_optional

log = logging.getLogger(__name__)

GROUP = "239.255.71.71"  # administratively scoped (RFC 2365 local scope): routers do not forward it
PORT = 31339  # UDP port announcements go to
MAGIC = b"SWL1"  # first bytes of every announcement
OPEN, PRIVATE = b"o", b"p"  # kind byte: an open swarm's plain JSON, a private swarm's sealed JSON
VERSION = 1  # "v" of the JSON body
MAX_PACKET = 1200  # bytes of one announcement: one Ethernet frame, never fragmented
MAX_PEERS = 8  # multiaddrs one announcement carries
MAX_MADDR = 256  # characters of one multiaddr
MAX_MODEL = 256  # characters of the model key
MAX_AGE = 30.0  # seconds an announcement's timestamp may differ from the listener's clock
INTERVAL = 2.0  # seconds between an announcer's datagrams
MIN_INTERVAL = 0.5  # the fastest an announcer may send
TIMEOUT = 5.0  # seconds a listener waits for a first announcement
SETTLE = 0.5  # seconds a listener keeps collecting after the first one
MAX_RATE = 50  # datagrams a listener examines per second; the rest are dropped unread
ROLES = ("bootstrap", "node")  # who announces; bootstrap peers are listed first
_NONCE = 12
_TAG = 16
_FIELDS = {"v", "role", "model", "ts", "n", "peers"}
_B58 = set("123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz")


class LanError(RuntimeError):
    """LAN discovery could not run (no multicast-capable interface) or found no peer."""


@dataclass(frozen=True)
class Announcement:
    """One accepted announcement."""

    peers: tuple[str, ...]  # DHT multiaddrs of the announcing peer
    role: str  # "bootstrap" or "node"
    model: str | None  # model key of the announcing node (an open swarm's scope); None for a bootstrap peer
    timestamp: float  # seconds since the epoch, by the announcer's clock
    nonce: str  # random hex, unique per datagram


def _ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(p.isdigit() and len(p) <= 3 and int(p) < 256 for p in parts)


def valid_maddr(maddr: object) -> bool:
    """``/ip4/A.B.C.D/tcp/PORT/p2p/PEER`` (or ``/ip6/...``) and nothing else."""
    if not isinstance(maddr, str) or len(maddr) > MAX_MADDR:
        return False
    parts = maddr.split("/")
    if len(parts) != 7 or parts[0] or parts[3] != "tcp" or parts[5] != "p2p":
        return False
    proto, host, port, peer = parts[1], parts[2], parts[4], parts[6]
    host_ok = _ipv4(host) if proto == "ip4" else proto == "ip6" and 2 <= len(host) <= 45 and all(
        c in "0123456789abcdefABCDEF:." for c in host)
    return (host_ok and port.isdigit() and 0 < int(port) < 65536 and 32 <= len(peer) <= 128
            and set(peer) <= _B58)


def lan_maddrs(maddrs: Iterable[str]) -> list[str]:
    """The multiaddrs worth announcing on a LAN: well formed, not loopback or unspecified, no repeats."""
    local = ("/ip4/127.", "/ip4/0.0.0.0/", "/ip6/::1/", "/ip6/::/")
    return list(dict.fromkeys(m for m in maddrs if valid_maddr(m) and not m.startswith(local)))


def encode(peers: Sequence[str], key: SwarmKey | None, model: str | None = None, role: str = "node", *,
           now: float | None = None, nonce: str | None = None) -> bytes:
    """One announcement datagram; peers that do not fit in MAX_PACKET are left out (ValueError if none fits)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if key is None and not model:
        raise ValueError("an open swarm's LAN announcements must name the model key (so other swarms ignore them)")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_MODEL):
        raise ValueError(f"model key must be a string of at most {MAX_MODEL} characters")
    bad = [p for p in peers if not valid_maddr(p)]
    if bad or not peers:
        raise ValueError(f"announce needs /ip4|ip6/HOST/tcp/PORT/p2p/PEER multiaddrs, got {list(peers)!r}")
    peers = list(peers)[:MAX_PEERS]
    body = {"v": VERSION, "role": role, "model": model, "ts": round(time.time() if now is None else now, 3),
            "n": nonce or secrets.token_hex(8)}
    while peers:
        text = json.dumps({**body, "peers": peers}, separators=(",", ":")).encode()
        packet = _seal(text, key)
        if len(packet) <= MAX_PACKET:
            return packet
        peers.pop()
    raise ValueError(f"an announcement of one multiaddr does not fit in {MAX_PACKET} bytes")


def _seal(body: bytes, key: SwarmKey | None) -> bytes:
    if key is None:
        return MAGIC + OPEN + body
    nonce = secrets.token_bytes(_NONCE)
    return MAGIC + PRIVATE + nonce + AESGCM(key.lan).encrypt(nonce, body, MAGIC + PRIVATE)


def decode(packet: bytes, key: SwarmKey | None, model: str | None = None) -> Announcement:
    """Parse and authenticate one datagram; ValueError says why it is refused. A private swarm's
    listener (``key``) takes only announcements sealed with its key; an open swarm's only those
    naming ``model``. Freshness and replays are ReplayGuard's job."""
    if len(packet) > MAX_PACKET:
        raise ValueError(f"oversized ({len(packet)} bytes)")
    if packet[:4] != MAGIC or len(packet) < 6:
        raise ValueError("not a swarmlm announcement")
    kind = packet[4:5]
    if key is None:
        if kind != OPEN:
            raise ValueError("a private swarm's announcement (we have no swarm key)")
        body = packet[5:]
    else:
        if kind != PRIVATE:
            raise ValueError("an open swarm's announcement (we are in a private swarm)")
        if len(packet) < 5 + _NONCE + _TAG:
            raise ValueError("truncated")
        try:
            body = AESGCM(key.lan).decrypt(packet[5:5 + _NONCE], packet[5 + _NONCE:], MAGIC + PRIVATE)
        except InvalidTag:
            raise ValueError("does not authenticate with our swarm key") from None
    try:
        fields = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("malformed JSON body") from None
    if not isinstance(fields, dict) or set(fields) != _FIELDS or fields["v"] != VERSION:
        raise ValueError("unexpected fields or version")
    role, ann_model, ts, nonce, peers = (fields[k] for k in ("role", "model", "ts", "n", "peers"))
    if role not in ROLES or not (ann_model is None or isinstance(ann_model, str) and len(ann_model) <= MAX_MODEL):
        raise ValueError("bad role or model")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not isinstance(nonce, str) \
            or not 8 <= len(nonce) <= 64:
        raise ValueError("bad timestamp or nonce")
    if not isinstance(peers, list) or not 0 < len(peers) <= MAX_PEERS or not all(map(valid_maddr, peers)):
        raise ValueError("bad peer list")
    if key is None and ann_model != model:
        raise ValueError(f"another model ({str(ann_model)[:60]!r})")
    return Announcement(tuple(peers), role, ann_model, float(ts), nonce)


class ReplayGuard:
    """Refuses stale or future announcements (MAX_AGE window) and any nonce seen within the window."""

    def __init__(self, max_age: float = MAX_AGE, capacity: int = 4096):
        if max_age <= 0 or capacity < 1:
            raise ValueError("max_age must be > 0 and capacity >= 1")
        self.max_age, self.capacity = max_age, capacity
        self._seen: OrderedDict[str, float] = OrderedDict()  # nonce -> when it may be forgotten

    def check(self, ann: Announcement, now: float | None = None) -> None:
        """ValueError if ``ann`` is stale, from the future or a replay; otherwise remember it."""
        now = time.time() if now is None else now
        if abs(now - ann.timestamp) > self.max_age:
            raise ValueError(f"timestamp {now - ann.timestamp:+.0f}s away from our clock (stale or replayed)")
        while self._seen and (next(iter(self._seen.values())) < now or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if ann.nonce in self._seen:
            raise ValueError("replayed (nonce seen before)")
        self._seen[ann.nonce] = ann.timestamp + self.max_age


class LanAnnouncer:
    """Multicasts this peer's LAN-reachable DHT multiaddrs every ``interval`` seconds (a daemon
    thread), with TTL 1, out of each interface whose address it announces."""

    def __init__(self, maddrs: Iterable[str], key: SwarmKey | None, model: str | None = None, role: str = "node",
                 *, interval: float = INTERVAL, group: str = GROUP, port: int = PORT):
        if interval < MIN_INTERVAL:
            raise ValueError(f"interval must be at least {MIN_INTERVAL}s, got {interval}")
        self.peers = lan_maddrs(maddrs)
        if not self.peers:
            raise ValueError("nothing to announce on the LAN: the DHT listens on loopback only "
                             "(use --host 0.0.0.0 or the machine's LAN address)")
        self.key, self.model, self.role = key, model, role
        self.interval, self.group, self.port = interval, group, port
        encode(self.peers, key, model, role)  # a mistake is an error now, not a silent thread
        self.interfaces = sorted({m.split("/")[2] for m in self.peers if m.startswith("/ip4/")})
        self.sent = 0  # datagrams sent so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> "LanAnnouncer":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)  # never past the first router
        self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)  # peers on this machine hear it too
        self._thread = threading.Thread(target=self._run, name="swarmlm-lan-announcer", daemon=True)
        self._thread.start()
        log.info("announcing %s on the LAN (%s:%d via %s)", ", ".join(self.peers), self.group, self.port,
                 ", ".join(self.interfaces) or "the default interface")
        return self

    def send_once(self) -> int:
        """Send one fresh announcement out of every interface; returns how many sends succeeded."""
        ok = 0
        for interface in self.interfaces or [None]:
            try:
                if interface is not None:
                    self._sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface))
                self._sock.sendto(encode(self.peers, self.key, self.model, self.role), (self.group, self.port))
                ok += 1
            except OSError as e:
                log.debug("LAN announcement via %s failed: %s", interface or "default", e)
        self.sent += ok
        return ok

    def _run(self) -> None:
        warned = False
        while not self._stop.is_set():
            if not self.send_once() and not warned:
                log.warning("could not send LAN announcements to %s:%d (no multicast route?)", self.group, self.port)
                warned = True
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._sock is not None:
            self._sock.close()


def _listener_socket(group: str, port: int) -> socket.socket:
    """A UDP socket bound to ``group:port``, member of the group on every non-loopback interface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):  # several listeners on one machine (a node and a client)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((group, port))  # only this group's datagrams reach us
        joined = 0
        for index, name in socket.if_nameindex():
            if name == "lo":
                continue
            mreqn = struct.pack("=4s4si", socket.inet_aton(group), socket.inet_aton("0.0.0.0"), index)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreqn)
                joined += 1
            except OSError:
                pass  # down or not multicast-capable
        if not joined:  # the interface the routing table picks
            mreq = struct.pack("=4s4s", socket.inet_aton(group), socket.inet_aton("0.0.0.0"))
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError as e:
        sock.close()
        raise LanError(f"LAN discovery cannot listen on {group}:{port}: {e}") from None
    return sock


def listen(key: SwarmKey | None, model: str | None = None, *, timeout: float = TIMEOUT, settle: float = SETTLE,
           group: str = GROUP, port: int = PORT, max_rate: int = MAX_RATE) -> list[str]:
    """Multiaddrs announced on the LAN for this swarm (bootstrap peers first), collected for at most
    ``timeout`` seconds and ``settle`` seconds after the first accepted announcement."""
    if key is None and not model:
        raise ValueError("listening for an open swarm needs the model key (announcements are scoped by it)")
    if timeout <= 0 or settle < 0 or max_rate < 1:
        raise ValueError("timeout must be > 0, settle >= 0 and max_rate >= 1")
    found: dict[str, str] = {}  # multiaddr -> role
    guard = ReplayGuard()
    sock = _listener_socket(group, port)
    try:
        deadline = time.monotonic() + timeout
        window, examined = time.monotonic(), 0
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, source = sock.recvfrom(MAX_PACKET + 1)
            if time.monotonic() - window >= 1.0:
                window, examined = time.monotonic(), 0
            examined += 1
            if examined > max_rate:
                continue
            try:
                ann = decode(data, key, model)
                guard.check(ann)
            except ValueError as e:
                log.debug("ignored a LAN announcement from %s: %s", source[0], e)
                continue
            if not found:
                deadline = min(deadline, time.monotonic() + settle)
            for maddr in ann.peers:
                found.setdefault(maddr, ann.role)
    finally:
        sock.close()
    return sorted(found, key=lambda m: found[m] != "bootstrap")


def nothing_found(key: SwarmKey | None, timeout: float) -> str:
    """The message when a listener heard nothing."""
    who = f"with swarm key {key.fingerprint}" if key is not None else "for this model (open swarm)"
    return (f"no swarm peers announced on the LAN {who} within {timeout:g}s: is `swarm bootstrap --lan` "
            "(or `node serve --lan`) running on this network with the same key? Or give --initial-peers")


def initial_peers(given: Sequence[str], lan: bool, key: SwarmKey | None, model: str | None,
                  timeout: float = TIMEOUT) -> tuple[str, ...]:
    """``given`` when there are any; else, with ``lan``, the peers heard on the LAN (LanError if none)."""
    if given or not lan:
        return tuple(given)
    peers = listen(key, model, timeout=timeout)
    if not peers:
        raise LanError(nothing_found(key, timeout))
    return tuple(peers)


def main(argv: list[str] | None = None) -> int:
    """``python -m swarm.lan listen|announce``: see what is announced on this LAN, or announce by hand."""
    parser = argparse.ArgumentParser(prog="python -m swarm.lan", description=main.__doc__)
    parser.add_argument("action", choices=("listen", "announce"))
    parser.add_argument("--swarm-key", default=None, help="key file of a private swarm")
    parser.add_argument("--model-key", default=None, help="model key (an open swarm's scope)")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, help="listen: seconds to wait")
    parser.add_argument("--peer", action="append", default=[], help="announce: a multiaddr (repeatable)")
    parser.add_argument("--role", choices=ROLES, default="node", help="announce: who we are")
    parser.add_argument("--interval", type=float, default=INTERVAL, help="announce: seconds between datagrams")
    parser.add_argument("--count", type=int, default=0, help="announce: stop after N rounds (0: until killed)")
    parser.add_argument("--port", type=int, default=PORT, help=f"UDP port (default {PORT})")
    args = parser.parse_args(argv)
    try:
        key = load_optional(args.swarm_key)
        if args.action == "listen":
            peers = listen(key, args.model_key, timeout=args.timeout, port=args.port)
            print("\n".join(peers), flush=True)
            return 0 if peers else 1
        announcer = LanAnnouncer(args.peer, key, args.model_key, args.role, interval=args.interval, port=args.port)
        announcer.start()
        print("announcing", flush=True)
        try:
            rounds = 0
            while not args.count or rounds < args.count:
                time.sleep(args.interval)
                rounds += 1
        finally:
            announcer.stop()
        return 0
    except (LanError, SwarmKeyError, ValueError) as e:
        print(f"swarm.lan: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
