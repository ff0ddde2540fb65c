"""A node's Prometheus metrics (``node serve --metrics-port``): a gRPC server interceptor counts every
call by RPC and status, its latency and its bytes; a collector reads the servicer's own counts (tokens,
sessions, caches, refusals) on each scrape, so serving pays nothing for them between scrapes.

Each node has its own CollectorRegistry, so nodes started in one process (the tests') do not clash.
Verification re-runs cannot be counted here by design: a re-run must look like any other request, or a
dishonest node could compute honestly only when checked. The client counts the ones it asks for
(``swarmlm_client_verifications_total``).
"""
from __future__ import annotations

import asyncio
import time
from typing import Callable

import grpc
from prometheus_client import Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from node.handler import TOKEN_KINDS, NodeServicer
from swarm.metrics import Exposed
from swarm.spans import NodeState

# seconds: decode steps take milliseconds, long prefills and backward passes of big spans seconds
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HANDLER_KINDS: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class NodeMetrics(Exposed):
    """The registry of one node. ``interceptor`` goes first in the gRPC server's interceptors (so calls an
    inner interceptor refuses count too); ``watch(servicer)`` once the servicer exists; ``serve`` exposes it."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = Counter("swarmlm_node_requests", "gRPC calls finished, by RPC and status code",
                                ["rpc", "code"], registry=self.registry)
        self.latency = Histogram("swarmlm_node_request_seconds", "seconds per unary call, or per inference "
                                 "message answered (open or step: message in to answer out), by RPC", ["rpc"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.received = Counter("swarmlm_node_received_bytes", "serialized request bytes received, by RPC",
                                ["rpc"], registry=self.registry)
        self.sent = Counter("swarmlm_node_sent_bytes", "serialized response bytes sent, by RPC", ["rpc"],
                            registry=self.registry)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU seconds, open fds
        self._collector = _ServicerCollector()
        self.registry.register(self._collector)
        self.interceptor = MetricsInterceptor(self)

    def watch(self, servicer: NodeServicer, threads=None) -> None:
        """Report ``servicer``'s counts, and ``threads`` (a node.threads.ThreadChoice) if given."""
        self._collector.servicer, self._collector.threads = servicer, threads


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: NodeMetrics):
        self.metrics = metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        return self.observed(handler, details.method.rsplit("/", 1)[-1])

    def observed(self, handler: grpc.RpcMethodHandler, rpc: str) -> grpc.RpcMethodHandler:
        """``handler`` counting its bytes (at (de)serialization: the wire payload), status and latency."""
        parse, dump = handler.request_deserializer, handler.response_serializer
        received, sent = self.metrics.received.labels(rpc), self.metrics.sent.labels(rpc)

        def counted_parse(raw: bytes):
            received.inc(len(raw))
            return parse(raw) if parse is not None else raw

        def counted_dump(message) -> bytes:
            data = dump(message) if dump is not None else message
            sent.inc(len(data))
            return data

        if handler.unary_unary is not None:
            behavior = self._unary(handler.unary_unary, rpc)
        elif handler.stream_unary is not None:  # the swarm key check's refusals take any call as a stream
            behavior = self._unary(handler.stream_unary, rpc)
        elif handler.stream_stream is not None:
            behavior = self._stream(handler.stream_stream, rpc)
        else:  # the node serves no other shapes; count the bytes anyway
            return handler._replace(request_deserializer=counted_parse, response_serializer=counted_dump)
        make = HANDLER_KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
        return make(behavior, request_deserializer=counted_parse, response_serializer=counted_dump)

    def _unary(self, behavior, rpc: str):
        latency = self.metrics.latency.labels(rpc)

        async def call(request, context):
            started, code = time.perf_counter(), "OK"
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = _status(context)
                raise
            finally:
                latency.observe(time.perf_counter() - started)
                self.metrics.requests.labels(rpc, code).inc()

        return call

    def _stream(self, behavior, rpc: str):
        latency = self.metrics.latency.labels(rpc)

        async def call(requests, context):
            timed, code = _Arrivals(requests), "OK"
            try:
                async for response in behavior(timed, context):
                    if timed.arrived is not None:
                        latency.observe(time.perf_counter() - timed.arrived)
                        timed.arrived = None
                    yield response
                code = _status(context, "OK")
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                code = _status(context)
                raise
            finally:
                self.metrics.requests.labels(rpc, code).inc()

        return call


class _Arrivals:
    """A request stream that notes when its latest message arrived (a class, not an async generator: a
    cancelled read, e.g. an idle timeout, must not end the stream for the handler)."""

    def __init__(self, requests):
        self._requests, self.arrived = requests, None

    def __aiter__(self) -> "_Arrivals":
        return self

    async def __anext__(self):
        message = await self._requests.__anext__()
        self.arrived = time.perf_counter()
        return message


def _status(context, otherwise: str = "UNKNOWN") -> str:
    """The status a call ends with: what it aborted with (or set); CANCELLED when the client cancelled it
    (a stream's handler then just sees its requests end); else ``otherwise`` (UNKNOWN: an exception)."""
    code = context.code()
    if isinstance(code, int) and not isinstance(code, grpc.StatusCode):  # grpc.aio may report the number
        code = next((c for c in grpc.StatusCode if c.value[0] == code), None)
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code.name
    if context.cancelled():
        return "CANCELLED"
    return otherwise


class _ServicerCollector:
    """Reads the servicer's counts at scrape time (the servicer appears once the blocks are loaded)."""

    def __init__(self) -> None:
        self.servicer: NodeServicer | None = None
        self.threads = None  # node.threads.ThreadChoice

    def collect(self):
        s = self.servicer
        if s is None:
            return
        if self.threads is not None:
            yield _labelled(GaugeMetricFamily, "swarmlm_node_torch_threads", "torch intra-op threads per step "
                            "size (measured at start unless --small/large-step-threads give them)", "steps",
                            {"small": self.threads.small, "large": self.threads.large})
        yield _gauge("swarmlm_node_sessions_open", "inference sessions open", s.open_sessions)
        yield _gauge("swarmlm_node_cache_tokens_used", "inference cache tokens reserved (batch x max_length)",
                     s.budget.used)
        yield _gauge("swarmlm_node_cache_tokens_total", "inference cache tokens this node holds", s.budget.capacity)
        yield _gauge("swarmlm_node_online", "1 while the node serves (ONLINE), else 0", s.state is NodeState.ONLINE)
        yield _labelled(CounterMetricFamily, "swarmlm_node_tokens", "tokens computed (batch x positions) by kind",
                        "kind", {kind: s.counts.tokens.get(kind, 0) for kind in TOKEN_KINDS})
        yield _labelled(CounterMetricFamily, "swarmlm_node_activation_cache", "Backward calls whose kept "
                        "forward activations were found (hit) or had to be recomputed (miss)", "result",
                        {"hit": s.activations.hits, "miss": s.activations.misses})
        yield _labelled(CounterMetricFamily, "swarmlm_node_lora_cache", "requests naming a client LoRA adapter "
                        "without its weights: cached here (hit) or not (miss: the client re-sends them)", "result",
                        {"hit": s.adapters.cache.hits, "miss": s.adapters.cache.misses})
        if s.batcher is not None:
            stats = s.batcher.stats
            yield _labelled(CounterMetricFamily, "swarmlm_node_decode_calls", "decode block calls through the "
                            "batcher (node.batching), by how many sessions' steps each computed", "sessions",
                            {str(n): count for n, count in sorted(stats.calls.items())})
            yield _labelled(CounterMetricFamily, "swarmlm_node_decode_batch_events", "batcher events: waits that "
                            "ran out before every expected session came (expired), batched calls that failed and "
                            "ran one session at a time (fallback)", "event",
                            {"expired": stats.expired, "fallback": stats.fallbacks})
        yield _labelled(CounterMetricFamily, "swarmlm_node_sessions_refused", "inference sessions refused, by "
                        "reason", "reason", dict(s.counts.refused))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=float(value))


def _labelled(kind, name: str, documentation: str, label: str, values: dict[str, float]):
    family = kind(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], float(value))
    return family
