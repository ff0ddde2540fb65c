"""Helpers for fault-injection tests: a TCP proxy that can blackhole traffic, and free ports."""
from __future__ import annotations

import socket
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BlackholeProxy:
    """Forwards 127.0.0.1:listen_port -> 127.0.0.1:target_port until ``blackhole()``: from then on it
    keeps every connection open but silently drops all bytes (no FIN, no RST), like a dead link."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._dropping = threading.Event()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def blackhole(self) -> None:
        self._dropping.set()

    def heal(self) -> None:
        """Relay again. The connections open during the blackhole lost bytes mid-stream, so neither side
        could resume them: they are closed (both ends see the connection end and dial again)."""
        self._dropping.clear()
        sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv and sends FIN
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._closed.set()
        for s in [self._server, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self._closed.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not self._dropping.is_set():
                try:
                    dst.sendall(data)
                except OSError:
                    return
