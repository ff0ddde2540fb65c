"""Prometheus exposition shared by nodes and clients: one registry per node or client (never the
process-wide default one, so several nodes and clients in one process do not clash), served over HTTP
by prometheus_client's own server on a thread of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server


class MetricsServer:
    """``GET /metrics`` (any path, as prometheus_client serves it) of ``registry`` on ``host:port``
    (port 0 picks a free one; ``port`` is then the one picked). ``close()`` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        if not 0 <= port < 65536:
            raise ValueError(f"metrics port must be in 0..65535, got {port}")
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host, self.port = host, self._httpd.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class Exposed:
    """A registry of its own and, once ``serve`` is called, the HTTP endpoint showing it (nodes' and
    clients' metrics both are one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.server: MetricsServer | None = None

    def serve(self, host: str, port: int) -> MetricsServer:
        self.server = MetricsServer(self.registry, host, port)
        return self.server

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
