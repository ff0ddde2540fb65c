"""The emulated link (tests/helpers/link.py) delays and caps by what it says and keeps bytes intact.

Timings are lower bounds only (a loaded machine makes everything slower, never faster)."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.helpers.link import PROFILES, LinkProfile, LinkRelay


class EchoServer:
    """127.0.0.1 TCP server writing back whatever it reads (one thread per connection)."""

    def __init__(self):
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self):
        self.server.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


def _round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` through 127.0.0.1:``port`` to the echo server; what came back and the seconds taken."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        got = bytearray()
        started = time.monotonic()
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        while len(got) < len(payload):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        seconds = time.monotonic() - started
        sender.join()
    return bytes(got), seconds


def test_round_trip_takes_at_least_twice_the_one_way_delay(echo):
    profile = LinkProfile("test", delay=0.05, bandwidth=1e9)
    with LinkRelay(echo.port, profile) as relay:
        for _ in range(3):
            got, seconds = _round_trip(relay.port, b"ping")
            assert got == b"ping" and seconds >= 2 * profile.delay


def test_bandwidth_cap_and_jitter_keep_bytes_in_order(echo):
    profile = LinkProfile("test", delay=0.01, bandwidth=16e6, jitter=0.005)  # 2 MB/s each way
    payload = os.urandom(1 << 20)
    with LinkRelay(echo.port, profile) as relay:
        got, seconds = _round_trip(relay.port, payload)
        assert relay.bytes_relayed == 2 * len(payload)
    assert got == payload  # every byte, in order, jitter or not
    assert seconds >= 2 * profile.delay + len(payload) * 8 / profile.bandwidth  # both ways overlap: one transfer


def test_throughput_is_not_limited_by_the_delay(echo):
    """1 MiB through a 100 ms link: bandwidth-delay product in flight, not one chunk per round trip
    (one chunk per round trip would cap it at 64 KiB per 0.2 s). Checked by what was in flight at once,
    not by a time limit."""
    profile = LinkProfile("test", delay=0.1, bandwidth=1e9)
    with LinkRelay(echo.port, profile) as relay:
        got, seconds = _round_trip(relay.port, os.urandom(1 << 20))
        assert relay.peak_in_flight > 4 * (64 << 10)  # many chunks on the link at once
    assert len(got) == 1 << 20 and seconds >= 2 * profile.delay


def test_the_relay_stops_by_itself_and_listens_on_loopback_only(echo):
    with LinkRelay(echo.port, PROFILES["lan"], lifetime=0.3) as relay:
        assert relay.address.startswith("127.0.0.1:")
        assert _round_trip(relay.port, b"x")[0] == b"x"
        time.sleep(1.0)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", relay.port), timeout=2).recv(1)


def test_profiles():
    assert {name: (p.delay, p.bandwidth) for name, p in PROFILES.items()} == {
        "lan": (0.25e-3, 1e9), "broadband": (10e-3, 100e6), "far": (50e-3, 20e6)}
    assert PROFILES["far"].transfer(250_000) == pytest.approx(0.05 + 0.1)
    with pytest.raises(ValueError):
        LinkProfile("bad", delay=-1, bandwidth=1)
