"""LAN discovery (swarm.lan): packet format, authentication and replay window without a network;
then real multicast, only between network namespaces these tests create (ip netns + a veth pair),
never on the machine's own interfaces. Needs root and iproute2 (`ip`): without them the
namespace tests fail with a message saying so, they do not skip."""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

import pytest

from client.config import ClientConfig
from node.config import NodeConfig
from swarm.keys import generate_key_text, parse_key
from swarm.lan import (GROUP, MAGIC, MAX_AGE, MAX_PACKET, MAX_PEERS, OPEN, PORT, PRIVATE, LanAnnouncer, ReplayGuard,
                       decode, encode, lan_maddrs, valid_maddr)
from tests.helpers.launch import Proc, command
from swarm.spans import Span

PEER_ID = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
MODEL = "tiny-llama/00000000000000aa"


def maddr(host: str = "10.1.2.3", port: int = 4001) -> str:
    return f"/ip4/{host}/tcp/{port}/p2p/{PEER_ID}"


def new_key():
    return parse_key(generate_key_text())


# ---- pure parts: no network ----------------------------------------------------------------------

def test_private_announcement_round_trip_and_confidentiality():
    key = new_key()
    packet = encode([maddr()], key, MODEL, "bootstrap")
    ann = decode(packet, key)
    assert ann.peers == (maddr(),) and ann.role == "bootstrap" and ann.model == MODEL
    assert b"10.1.2.3" not in packet and PEER_ID.encode() not in packet and MODEL.encode() not in packet
    assert packet[:5] == MAGIC + PRIVATE and len(packet) <= MAX_PACKET


def test_open_announcement_is_scoped_by_model():
    packet = encode([maddr()], None, MODEL)
    assert packet[:5] == MAGIC + OPEN and decode(packet, None, MODEL).peers == (maddr(),)
    with pytest.raises(ValueError, match="another model"):
        decode(packet, None, "other/00000000000000bb")
    with pytest.raises(ValueError, match="must name the model"):
        encode([maddr()], None, None)


def test_outsiders_can_neither_read_nor_forge_private_announcements():
    key, other = new_key(), new_key()
    packet = encode([maddr()], key)
    for listener_key, message in [(other, "does not authenticate"), (None, "private swarm's")]:
        with pytest.raises(ValueError, match=message):
            decode(packet, listener_key, MODEL)
    with pytest.raises(ValueError, match="does not authenticate"):
        decode(encode([maddr("10.6.6.6")], other), key)  # forged with another key
    with pytest.raises(ValueError, match="open swarm's"):
        decode(encode([maddr("10.6.6.6")], None, MODEL), key)  # an open announcement never enters a private swarm
    for i in (5, 10, 17, len(packet) - 1):  # any flipped byte of nonce, ciphertext or tag
        tampered = bytearray(packet)
        tampered[i] ^= 1
        with pytest.raises(ValueError, match="does not authenticate"):
            decode(bytes(tampered), key)
    with pytest.raises(ValueError, match="truncated"):
        decode(packet[:20], key)


@pytest.mark.parametrize("packet, message", [
    (b"", "not a swarmlm"),
    (b"HTTP/1.1 200 OK", "not a swarmlm"),
    (MAGIC + OPEN + b"\xff\xfe", "malformed JSON"),
    (MAGIC + OPEN + b"[1, 2]", "unexpected fields"),
    (MAGIC + OPEN + b"x" * MAX_PACKET, "oversized"),
])
def test_junk_is_refused(packet, message):
    with pytest.raises(ValueError, match=message):
        decode(packet, None, MODEL)


def open_body(**changes) -> bytes:
    body = {"v": 1, "role": "node", "model": MODEL, "ts": time.time(), "n": "00" * 8, "peers": [maddr()]}
    return MAGIC + OPEN + json.dumps({**body, **changes}).encode()


@pytest.mark.parametrize("changes, message", [
    ({"v": 2}, "version"),
    ({"role": "admin"}, "bad role"),
    ({"ts": "now"}, "bad timestamp"),
    ({"ts": True}, "bad timestamp"),
    ({"n": "0"}, "nonce"),
    ({"peers": []}, "bad peer list"),
    ({"peers": [maddr()] * (MAX_PEERS + 1)}, "bad peer list"),
    ({"peers": ["/dns/evil.example/tcp/1/p2p/" + PEER_ID]}, "bad peer list"),
    ({"peers": [maddr("300.1.1.1")]}, "bad peer list"),
    ({"peers": [maddr() + "/extra"]}, "bad peer list"),
    ({"extra": 1}, "unexpected fields"),
])
def test_malformed_bodies_are_refused(changes, message):
    assert decode(open_body(), None, MODEL).peers == (maddr(),)
    with pytest.raises(ValueError, match=message):
        decode(open_body(**changes), None, MODEL)


def test_replay_window_and_nonces():
    key, guard, now = new_key(), ReplayGuard(), time.time()
    fresh = decode(encode([maddr()], key, now=now), key)
    guard.check(fresh, now)
    with pytest.raises(ValueError, match="replayed"):
        guard.check(fresh, now + 1)  # the same datagram again
    for ts in (now - MAX_AGE - 1, now + MAX_AGE + 1):  # stale, or from the future
        with pytest.raises(ValueError, match="stale or replayed"):
            guard.check(decode(encode([maddr()], key, now=ts), key), now)
    small = ReplayGuard(capacity=2)
    anns = [decode(encode([maddr()], key, now=now), key) for _ in range(3)]
    for ann in anns:
        small.check(ann, now)
    assert len(small._seen) <= 2  # bounded memory


def test_encode_limits_size_and_validates():
    many = [maddr(f"10.0.{i}.{j}", 40000 + j) for i in range(4) for j in range(8)]
    key = new_key()
    packet = encode(many, key)
    assert len(packet) <= MAX_PACKET and len(decode(packet, key).peers) == MAX_PEERS
    long = [f"/ip6/{'1:' * 7}1/tcp/40000/p2p/{'z' * 128}"] * MAX_PEERS  # too long together: some are left out
    assert 0 < len(decode(encode(long, key), key).peers) < MAX_PEERS
    with pytest.raises(ValueError, match="multiaddrs"):
        encode(["/ip4/10.0.0.1/tcp/1"], None, MODEL)
    with pytest.raises(ValueError, match="role"):
        encode([maddr()], None, MODEL, "king")


def test_only_lan_reachable_addresses_are_announced():
    given = [maddr("127.0.0.1"), maddr("0.0.0.0"), f"/ip6/::1/tcp/4001/p2p/{PEER_ID}", maddr(), maddr(), "junk"]
    assert lan_maddrs(given) == [maddr()]
    assert valid_maddr(f"/ip6/fe80::1/tcp/4001/p2p/{PEER_ID}") and not valid_maddr(None)
    with pytest.raises(ValueError, match="loopback only"):
        LanAnnouncer([maddr("127.0.0.1")], None, MODEL)
    with pytest.raises(ValueError, match="interval"):
        LanAnnouncer([maddr()], None, MODEL, interval=0.01)


def test_lan_is_opt_in_in_configs():
    assert ClientConfig(initial_peers=(maddr(),)).lan is False and NodeConfig(model="m", blocks=Span(0, 1)).lan is False
    assert ClientConfig(initial_peers=(), lan=True).lan  # peers may then come from the LAN
    assert ClientConfig().initial_peers == ()  # joining without peers nor lan is refused (tests/client/test_close_and_config.py)
    with pytest.raises(ValueError, match="lan needs a host"):
        NodeConfig(model="m", blocks=Span(0, 1), lan=True)  # on 127.0.0.1 there is nothing to announce


def test_cli_asks_for_peers_or_lan(capsys):
    from client.cli import main

    assert main(["status", "--model", "x"]) == 2
    assert "--initial-peers" in capsys.readouterr().err


# ---- real multicast between network namespaces ----------------------------------------------------

IP = shutil.which("ip") or "/usr/sbin/ip"


def ip(*args: str) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=20)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


@dataclass
class Namespaces:
    """Two namespaces joined by a veth pair: a at .1, b at .2 of a /24; processes started in them."""

    a: str
    b: str
    addr_a: str
    addr_b: str
    procs: list = field(default_factory=list)

    def argv(self, ns: str, *argv: str) -> list[str]:
        return [IP, "netns", "exec", ns, *argv]

    def run(self, ns: str, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(ns, *argv), capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)

    def popen(self, ns: str, *argv: str) -> subprocess.Popen:
        proc = subprocess.Popen(self.argv(ns, *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    def start(self, ns: str, *argv: str) -> Proc:
        """A long-running process (stdout read line by line), stopped at teardown."""
        proc = Proc(self.argv(ns, *argv))
        self.procs.append(proc.popen)
        return proc


@pytest.fixture
def netns():
    """Fresh namespaces with unique names per test; always deleted, with their processes, at teardown."""
    if os.geteuid() != 0 or not os.path.exists(IP):
        pytest.fail(f"the LAN discovery tests need root and iproute2's `ip` (looked for {IP}) to create "
                    "network namespaces; they never multicast on the machine's own interfaces")
    tag = f"swl{os.getpid() % 10000}{secrets.token_hex(2)}"
    subnet = f"10.{200 + secrets.randbelow(50)}.{secrets.randbelow(250)}"
    ns = Namespaces(f"{tag}a", f"{tag}b", f"{subnet}.1", f"{subnet}.2")
    created = []
    try:
        for name in (ns.a, ns.b):
            try:
                ip("netns", "add", name)
            except RuntimeError as e:
                pytest.fail(f"cannot create a network namespace (`ip netns` unavailable?): {e}")
            created.append(name)
        ip("link", "add", f"{tag}A", "netns", ns.a, "type", "veth", "peer", "name", f"{tag}B", "netns", ns.b)
        for name, dev, addr in ((ns.a, f"{tag}A", ns.addr_a), (ns.b, f"{tag}B", ns.addr_b)):
            ip("-n", name, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield ns
    finally:
        for proc in ns.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for name in created:  # anything still running inside (e.g. a p2pd whose parent was killed)
            pids = subprocess.run([IP, "netns", "pids", name], capture_output=True, text=True, timeout=20).stdout
            for pid in map(int, pids.split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run([IP, "netns", "del", name], capture_output=True, timeout=20)


LAN = [sys.executable, "-m", "swarm.lan"]


def test_announcements_cross_namespaces_only_to_the_same_swarm(netns, tmp_path):
    key, other = tmp_path / "lab.key", tmp_path / "other.key"
    key.write_text(generate_key_text())
    other.write_text(generate_key_text())
    private, public = maddr(netns.addr_a, 4001), maddr(netns.addr_a, 4002)
    netns.popen(netns.a, *LAN, "announce", "--swarm-key", str(key), "--peer", private, "--interval", "0.5")
    netns.popen(netns.a, *LAN, "announce", "--model-key", MODEL, "--peer", public, "--interval", "0.5")
    listeners = {
        "member": netns.popen(netns.b, *LAN, "listen", "--swarm-key", str(key), "--timeout", "4"),
        "wrong key": netns.popen(netns.b, *LAN, "listen", "--swarm-key", str(other), "--timeout", "3"),
        "open, same model": netns.popen(netns.b, *LAN, "listen", "--model-key", MODEL, "--timeout", "4"),
        "open, other model": netns.popen(netns.b, *LAN, "listen", "--model-key", "x/1", "--timeout", "3"),
    }
    out = {name: proc.communicate(timeout=30) for name, proc in listeners.items()}
    assert out["member"][0].split() == [private], out["member"]
    assert out["open, same model"][0].split() == [public], out["open, same model"]
    for name in ("wrong key", "open, other model"):
        assert listeners[name].returncode == 1 and out[name][0].split() == [], (name, out[name])


SEND = """
import socket, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sys.argv[1]))
*forged, genuine = [bytes.fromhex(h) for h in sys.argv[2:]]
for _ in range(10):
    for packet in forged:
        sock.sendto(packet, ({group!r}, {port}))
    time.sleep(0.2)
sock.sendto(genuine, ({group!r}, {port}))
""".format(group=GROUP, port=PORT)


def test_forged_stale_and_replayed_packets_are_refused_on_the_wire(netns, tmp_path):
    (tmp_path / "lab.key").write_text(generate_key_text())
    key, outsider = parse_key((tmp_path / "lab.key").read_text()), new_key()
    fake, real = maddr("10.6.6.6", 6666), maddr(netns.addr_a, 4001)
    replayed = encode([fake], key, now=time.time() - MAX_AGE - 5)  # a member's old announcement, replayed
    tampered = bytearray(encode([fake], key))
    tampered[-3] ^= 0x40
    forged = [encode([fake], outsider), encode([fake], None, MODEL), replayed, bytes(tampered),
              MAGIC + PRIVATE + secrets.token_bytes(80)]
    listener = netns.popen(netns.b, *LAN, "listen", "--swarm-key", str(tmp_path / "lab.key"), "--timeout", "10")
    time.sleep(0.5)
    sender = netns.run(netns.a, sys.executable, "-c", SEND, netns.addr_a,
                       *(p.hex() for p in forged), encode([real], key).hex(), timeout=30)
    assert sender.returncode == 0, sender.stderr
    stdout, stderr = listener.communicate(timeout=30)
    assert stdout.split() == [real], (stdout, stderr)  # it heard the genuine one, refused every other


def test_bootstrap_node_and_status_find_each_other_with_lan_only(netns, tmp_path, tiny_path):
    key = tmp_path / "lab.key"
    key.write_text(generate_key_text())
    swarm, node = command("swarm", use_scripts=True), command("node", use_scripts=True)
    boot = netns.start(netns.a, *swarm, "bootstrap", "--lan", "--host", "0.0.0.0", "--swarm-key", str(key))
    boot.read_line(60)  # its first multiaddr: it is up (and announcing)
    server = netns.start(netns.b, *node, "serve", "--lan", "--model", str(tiny_path), "--blocks", "0:6",
                         "--host", netns.addr_b, "--swarm-key", str(key), "--shutdown-grace", "1",
                         "--throughput", "100")
    address = server.read_line(120)
    assert address.startswith(netns.addr_b) and not any("new swarm" in line for line in server.stderr_lines)
    (tmp_path / "other.key").write_text(generate_key_text())
    status = ["status", "--lan", "--model", str(tiny_path)]
    outsiders = [netns.popen(netns.a, *swarm, *status, "--swarm-key", str(tmp_path / "other.key"))]  # hears nothing
    client = netns.popen(netns.a, *swarm, "generate", "hi", "--lan", "--model", str(tiny_path), "--swarm-key", str(key),
                         "--max-new-tokens", "2")  # the client library's path: ClientConfig(lan=True)
    member = netns.run(netns.a, *swarm, *status, "--swarm-key", str(key))
    assert member.returncode == 0 and address in member.stdout, (member.stdout, member.stderr)
    stdout, stderr = client.communicate(timeout=120)
    assert client.returncode == 0 and stdout.startswith("hi"), (stdout, stderr)
    for proc in outsiders:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "no swarm peers announced on the LAN" in stderr, (stdout, stderr)


def test_open_bootstrap_announces_its_model_key(netns, tiny_path):
    from swarm.checkpoint import load_config
    from swarm.records import default_model_name, model_key

    key = model_key(default_model_name(str(tiny_path)), load_config(tiny_path))
    swarm = command("swarm", use_scripts=True)
    refused = netns.run(netns.a, *swarm, "bootstrap", "--lan", "--host", "0.0.0.0", timeout=60)
    assert refused.returncode != 0 and "needs --model" in refused.stderr, refused.stderr
    boot = netns.start(netns.a, *swarm, "bootstrap", "--lan", "--host", "0.0.0.0", "--model", str(tiny_path))
    shown = boot.read_line(60)
    found = netns.run(netns.b, *LAN, "listen", "--model-key", key, "--timeout", "5", timeout=30)
    assert found.stdout.split() == [shown], (found.stdout, found.stderr, shown)
