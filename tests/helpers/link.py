"""An emulated network link for benchmarks and tests: a TCP relay on 127.0.0.1 with a one-way delay
per direction, a bandwidth cap and optional jitter.

These machines have no ``tc netem``, so the link is emulated in user space. Each direction of each
connection is a pump: bytes read from one side are stamped with the time they would arrive at the
far end of a link of the profile's bandwidth and delay, queued, and written when that time comes.
The delay applies per chunk with a timestamp queue, so a link carries bandwidth x delay bytes in
flight (throughput is limited by the bandwidth, not by the delay). Jitter is added per chunk but
never reorders bytes (a chunk is never released before the one queued ahead of it).

Bounded and self-stopping: it listens on 127.0.0.1 only and relays only to 127.0.0.1, accepts at
most ``max_connections`` at once, queues at most ``max_queued`` bytes per direction (the reader then
waits: TCP backpressure), and closes itself after ``lifetime`` seconds even if nobody calls close().

Put one in front of each node's gRPC port and let the node announce the relay's address
(``node serve --port P --announce-host 127.0.0.1:RELAY``): then every client-to-node call crosses the
emulated link. ``LocalSwarm(..., link=PROFILES["far"])`` (tests/helpers/launch.py) does exactly that.
"""
from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

from swarm.aio import LoopThread

LOOPBACK = "127.0.0.1"
CHUNK = 64 << 10  # bytes read at once


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a link (both directions get the same)."""

    name: str
    delay: float  # one-way delay, seconds
    bandwidth: float  # bits per second
    jitter: float = 0.0  # extra delay per chunk, uniform in [0, jitter) seconds (bytes keep their order)

    def __post_init__(self) -> None:
        if not (self.delay >= 0 and self.bandwidth > 0 and self.jitter >= 0):
            raise ValueError(f"link {self.name!r}: delay and jitter must be >= 0 and bandwidth > 0")

    def transfer(self, nbytes: int) -> float:
        """Seconds one message of ``nbytes`` takes one way: the delay plus its time on the wire."""
        return self.delay + nbytes * 8 / self.bandwidth


PROFILES = {
    "lan": LinkProfile("lan", delay=0.25e-3, bandwidth=1e9),
    "broadband": LinkProfile("broadband", delay=10e-3, bandwidth=100e6),
    "far": LinkProfile("far", delay=50e-3, bandwidth=20e6),
}


class LinkRelay:
    """Relays 127.0.0.1:``port`` (picked at start) to 127.0.0.1:``target_port`` over an emulated link.
    Runs on a loop thread of its own; use as a context manager or call close()."""

    def __init__(self, target_port: int, profile: LinkProfile, *, lifetime: float = 1800.0,
                 max_connections: int = 256, max_queued: int = 8 << 20, seed: int = 0):
        if not 0 < target_port < 65536:
            raise ValueError(f"target_port must be in 1..65535, got {target_port}")
        self.target_port, self.profile = target_port, profile
        self.max_connections, self.max_queued = max_connections, max_queued
        self.bytes_relayed = 0  # both directions, for benchmarks
        self.peak_in_flight = 0  # most bytes queued at once in one direction (read, not yet delivered)
        self._random = random.Random(seed)
        self._loop = LoopThread(f"link-{profile.name}")
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server = self._loop.run(asyncio.start_server(self._accept, LOOPBACK, 0), timeout=10)
        self.port: int = self._server.sockets[0].getsockname()[1]
        self._loop.loop.call_soon_threadsafe(self._loop.loop.call_later, lifetime, self._expire)
        self.closed = False

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._writers) >= 2 * self.max_connections:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        pumps = [asyncio.ensure_future(self._pump(reader, up_writer)),
                 asyncio.ensure_future(self._pump(up_reader, writer))]
        self._tasks.update(pumps)
        try:
            # a direction ends at its EOF (the other may go on: a half-closed connection); a failure ends both
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                self._writers.discard(w)
                with contextlib.suppress(Exception):
                    w.close()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        """One direction: read, stamp with the arrival time, queue; a second task writes on time."""
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        room = asyncio.Semaphore(max(1, self.max_queued // CHUNK))
        in_flight = [0]  # bytes queued in this direction, shared with the writer
        writer = asyncio.ensure_future(self._release(queue, dst, room, in_flight))
        link_free = arrive_last = 0.0  # when the link finishes sending what is queued; latest arrival
        try:
            while True:
                data = await src.read(CHUNK)
                if not data:
                    break
                await room.acquire()
                now = time.monotonic()
                link_free = max(now, link_free) + len(data) * 8 / self.profile.bandwidth
                jitter = self._random.uniform(0, self.profile.jitter) if self.profile.jitter else 0.0
                arrive_last = max(arrive_last, link_free + self.profile.delay + jitter)  # never reorder
                queue.put_nowait((arrive_last, data))
                in_flight[0] += len(data)
                self.peak_in_flight = max(self.peak_in_flight, in_flight[0])
            queue.put_nowait(None)
            await writer  # deliver what is still in flight, then half-close
            with contextlib.suppress(Exception):
                dst.write_eof()
        finally:
            writer.cancel()

    async def _release(self, queue: asyncio.Queue, dst: asyncio.StreamWriter, room: asyncio.Semaphore,
                       in_flight: list[int]) -> None:
        while (item := await queue.get()) is not None:
            at, data = item
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.bytes_relayed += len(data)  # counted first: whoever received these bytes sees them counted
            dst.write(data)
            in_flight[0] -= len(data)
            room.release()
            await dst.drain()

    def _expire(self) -> None:
        asyncio.ensure_future(self._shutdown())  # the lifetime is up: stop relaying (close() still cleans up)

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.close()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """Stop listening and cut every relayed connection. Closing again does nothing."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(Exception):
            self._loop.run(self._shutdown(), timeout=10)
        self._loop.close()

    def __enter__(self) -> "LinkRelay":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
