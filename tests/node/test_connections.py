"""Connections a node accepts are bounded: idle ones are closed, at most a fixed number are open at once,
and the node raises its open-files limit at start (20,000 idle HTTP/2 connections used to exhaust a
node's descriptors and make it unreachable). Raw TCP connections to a real gRPC server with the node's
options, on 127.0.0.1."""
import socket
from concurrent.futures import ThreadPoolExecutor
import time

import grpc
import pytest

from node.server import connection_options

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # preface + empty SETTINGS


def serve(options):
    server = grpc.server(ThreadPoolExecutor(2), options=options)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (everything it sends before is read and dropped)."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(1 << 16) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def http2_connection(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(PREFACE)
    return sock


def test_idle_connections_are_closed_and_their_number_is_capped():
    server, port = serve(connection_options(max_connections=3, idle=0.5))
    socks = []
    try:
        socks = [http2_connection(port) for _ in range(3)]
        extra = http2_connection(port)  # one over the cap: refused (closed), the others are not
        socks.append(extra)
        assert closed_within(extra, 3)
        idle = socks[0]
        assert closed_within(idle, 5)  # no call on it: closed after the idle time
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # room again: a real client connects
            grpc.channel_ready_future(channel).result(timeout=10)
    finally:
        for sock in socks:
            sock.close()
        server.stop(0)


def test_the_open_files_limit_is_raised_to_the_hard_limit():
    import resource

    from node.server import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit of open files here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard - 1), hard))  # below the hard limit (safely)
    assert raise_open_files_limit() == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
