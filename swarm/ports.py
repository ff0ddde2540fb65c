"""Refuse a port another process already listens on, naming the port and (when we may know) who holds it.

gRPC's server sockets set SO_REUSEPORT by default, and so may the p2p daemon's: a second process on a
busy port then binds too and the kernel splits connections between the two. Our servers turn
SO_REUSEPORT off (``grpc.so_reuseport=0``), and before starting a server on a fixed port we bind it
ourselves once without SO_REUSEPORT: that bind fails while any socket listens there, whatever flags the
holder set.
"""
from __future__ import annotations

import errno
import socket


class PortInUseError(OSError):
    """A fixed port is taken by another socket; the message names the port and, if known, its holder."""


def holder(port: int) -> str | None:
    """``pid N (command line)`` of a process listening on TCP ``port``, when the OS tells us (our own
    user's processes, or all as root); None otherwise."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline()) or psutil.Process(conn.pid).name()
                except psutil.Error:
                    cmd = "?"
                return f"pid {conn.pid} ({cmd[:120]})"
    except Exception:  # noqa: BLE001 - naming the holder is a courtesy; the refusal stands without it
        return None
    return None


def in_use_message(host: str, port: int, what: str) -> str:
    held = holder(port)
    return (f"{what} port {port} on {host} is already in use{f' by {held}' if held else ''}; "
            "stop that process or choose another port (0 picks a free one)")


def check_free(host: str, port: int, what: str) -> None:
    """PortInUseError if TCP ``host:port`` cannot be bound now (``port`` 0, a free one, is always fine).
    ``what`` names the port in the message (e.g. "--port (gRPC)")."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket in TIME_WAIT is no clash
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(in_use_message(host, port, what)) from None
            raise
