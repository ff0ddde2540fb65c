"""The torch thread counts a node computes with, picked by measuring at start-up, per step size.

No fixed guess fits every node. A decode step (one position) of a small model is a few tiny matrix
products separated by network waits: waking sleeping OpenMP threads for it can cost more than they
save, so one thread wins. The same step of a 1024-wide model is big enough for every core: with one
thread the 271M model generated at 0.57x local, with all of them at 0.83x. Prefills, forwards and
backwards are bigger still. So at start the node times its own span at both sizes with each candidate
count (1, 2, 4, ... up to the cores it may use), the candidates' calls interleaved so drifting load
slows all of them alike, decode calls each after a short idle gap (the network wait that lets the
threads fall asleep), and keeps the fastest count per size: within ``TIE`` of the fastest, the fewest
threads (they leave the CPU to others). The measuring time is bounded: about ``BUDGET`` seconds per
size, twice that at most unless a single round of calls takes longer (see time_counts).

Nodes on one machine measure one at a time (``measuring_alone``: a lock file every node of the machine
opens): two nodes measuring at once share the cores, so both saw more threads lose and picked one, while
in a generation only one of them computes at any moment (on 2 cores the 271M model's nodes chose 1
thread and generated at 0.85x local). A node holds that lock while it loads its weights too
(``starting_alone``, node/server.py): another node's measuring beside a load (copying hundreds of MiB)
saw 2 threads take 308 ms for a 29 ms step, chose 1 thread for larger steps, and its fine-tuning steps ran
at 0.74x local instead of 0.95x. Other processes can load the machine as well: when they used more than
``BUSY`` of the CPUs while the node measured (/proc/stat, the node's own CPU time left out), it measures
again, up to ``TRIES`` times, and says so.

``node serve --small-step-threads N`` / ``--large-step-threads N`` override either measurement.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Iterator

try:
    import fcntl
except ImportError:  # not POSIX: nodes measure without waiting for each other
    fcntl = None  # type: ignore[assignment]

import torch

from node.blocks import SpanBlocks, forward_span, torch_threads
from swarm.spans import Span

log = logging.getLogger(__name__)

BUDGET = 0.5  # seconds of measuring per size class (each candidate still gets MIN_ROUNDS timed calls)
MIN_ROUNDS, MAX_ROUNDS = 3, 15  # timed calls per candidate
DECODE_GAP = 0.005  # seconds idle before each timed decode call: the network wait between two steps
LARGE_TOKENS = 128  # positions of the larger step timed (through one block: all blocks cost the same)
LOSING = 3.0  # a count this many times slower than the fastest in its warm-up or a round is not timed again
TIE = 0.05  # a count this much slower than the fastest still counts as as fast (fewer threads win ties)
LOCK_WAIT = 60.0  # seconds a node waits for another one's measuring before it measures anyway
LOCK_FILE = "swarmlm-threads.lock"  # in the temporary directory (TMPDIR), shared by the machine's nodes
BUSY = 0.25  # other processes using more of the CPUs than this while a node measures: it measures again
TRIES = 3  # measurements at most, the last one kept however busy the machine
PAUSE = 0.5  # seconds between two measurements


@dataclass(frozen=True)
class ThreadChoice:
    """Torch intra-op threads per step size, and how they were chosen."""

    small: int  # threads for decode-sized inference steps (at most SessionPolicy.small_step_tokens positions)
    large: int  # threads for every other computation (prefills, Forward, Backward)
    source: str  # "measured", "flags" (both given), or "measured small" / "measured large" (one given)
    seconds: float = 0.0  # spent measuring
    small_ms: dict[int, float] | None = None  # median ms per decode call, by candidate count (when measured)
    large_ms: dict[int, float] | None = None  # median ms per larger call, by candidate count (when measured)

    def describe(self) -> str:
        def timings(ms: dict[int, float] | None) -> str:
            return "" if not ms else " (" + ", ".join(f"{n}: {v:.2f} ms" for n, v in ms.items()) + ")"
        return (f"torch threads: {self.small} for decode-sized steps{timings(self.small_ms)}, {self.large} for "
                f"larger ones{timings(self.large_ms)}; {self.source}"
                + (f" in {self.seconds:.2f} s" if self.seconds else ""))


def available_threads() -> int:
    """The most intra-op threads this process may use: OMP_NUM_THREADS if set, else the CPUs it may run on.
    (Not torch.get_num_threads(): other nodes in the same process change that while they measure.)"""
    given = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def measuring_alone(path: str | None = None, wait: float = LOCK_WAIT) -> Iterator[bool]:
    """Hold the machine's measuring lock (an exclusive ``flock`` on ``path``, default LOCK_FILE in the
    temporary directory) while the block runs; yields whether it was held. After ``wait`` seconds (a node
    stuck measuring, or a file we may not open) the block runs anyway, with a warning: measuring beside
    another node picks too few threads, never a wrong result."""
    path = path or os.path.join(tempfile.gettempdir(), LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if fcntl else None
    except OSError as e:
        log.warning("measuring thread counts without the lock %s: %s", path, e)
        fd = None
    held, deadline = False, time.monotonic() + wait
    try:
        while fd is not None and not held:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    log.warning("another node has been loading or measuring thread counts for %.0f s; going on beside it",
                                wait)
                    break
                time.sleep(0.05)
        yield held
    finally:
        if fd is not None:
            os.close(fd)  # closing drops the lock


@contextlib.asynccontextmanager
async def starting_alone(needed: bool) -> AsyncIterator[bool]:
    """``measuring_alone`` for a node's start-up coroutine (the wait for the lock runs on a worker thread,
    not the event loop); nothing is waited for unless ``needed`` (thread counts given by flags)."""
    if not needed:
        yield False
        return
    lock = measuring_alone()
    held = await asyncio.get_running_loop().run_in_executor(None, lock.__enter__)
    try:
        yield held
    finally:
        lock.__exit__(None, None, None)  # closes the lock file: quick


def machine_busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (everything but idle and iowait), from /proc/stat;
    None where it cannot be read (not Linux)."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def cpu_readings() -> tuple[float, float, float] | None:
    """(CPU seconds the machine has been busy, this process's CPU seconds, monotonic seconds), or None
    where /proc/stat cannot be read (not Linux)."""
    busy = machine_busy_seconds()
    return None if busy is None else (busy, time.process_time(), time.monotonic())


def other_load(before: tuple[float, float, float] | None, after: tuple[float, float, float] | None,
               cores: int) -> float:
    """The share of ``cores`` CPUs that processes other than this one kept busy between two cpu_readings
    (0.0 when either is missing)."""
    if before is None or after is None or after[2] <= before[2]:
        return 0.0
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (after[2] - before[2]) / max(1, cores))


def candidates(most: int) -> list[int]:
    """1, 2, 4, ... below ``most``, then ``most``: a few counts however many cores there are."""
    if most < 1:
        raise ValueError(f"most must be >= 1, got {most}")
    counts, n = [], 1
    while n < most:
        counts.append(n)
        n *= 2
    return counts + [most]


def time_counts(run: Callable[[], object], counts: list[int], *, budget: float = BUDGET, gap: float = 0.0,
                min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                clock: Callable[[], float] = time.perf_counter) -> dict[int, float]:
    """Median seconds of one ``run()`` on each thread count: one warm-up call each, then rounds of one
    timed call per count (each after ``gap`` seconds idle) until ``budget`` seconds have passed, at most
    ``max_rounds`` rounds; at least ``min_rounds`` unless that takes past twice the budget (slow calls on
    a loaded machine), and one in any case. A count ``LOSING`` times slower than the fastest in its warm-up
    or after a round sits out the later rounds (a count timed in its warm-up only reports that time)."""
    if not counts or min_rounds < 1 or max_rounds < min_rounds or budget < 0 or gap < 0:
        raise ValueError("need counts, 1 <= min_rounds <= max_rounds, budget >= 0 and gap >= 0")
    start = clock()
    warm: dict[int, float] = {}
    for n in counts:
        with torch_threads(n):
            began = clock()
            run()
            warm[n] = clock() - began
    # the first warm-up also pays the cold start, so this drops only counts clearly slower still
    live = [n for n in counts if warm[n] <= LOSING * min(warm.values())]
    times: dict[int, list[float]] = {n: [] for n in live}
    rounds = 0

    def more() -> bool:
        spent = clock() - start
        return rounds < 1 or spent < budget or (rounds < min_rounds and spent < 2 * budget)

    while rounds < max_rounds and more():
        for n in live:
            if gap:
                time.sleep(gap)
            with torch_threads(n):
                began = clock()
                run()
                times[n].append(clock() - began)
        rounds += 1
        best = min(statistics.median(times[n]) for n in live)
        live = [n for n in live if statistics.median(times[n]) <= LOSING * best]  # no more calls for a clear loser
    return {n: statistics.median(times[n]) if n in times else warm[n] for n in counts}


def fastest(medians: dict[int, float], tie: float = TIE) -> int:
    """The fewest threads whose median time is within ``tie`` of the fastest one's."""
    best = min(medians.values())
    return min(n for n, t in medians.items() if t <= best * (1 + tie))


def choose_threads(blocks: SpanBlocks, small: int | None = None, large: int | None = None,
                   most: int | None = None, budget: float = BUDGET, alone: bool = True,
                   readings: Callable[[], tuple[float, float, float] | None] = cpu_readings) -> ThreadChoice:
    """Thread counts for ``blocks``: ``small`` / ``large`` as given (0: ``large`` / ``most``), the others measured on
    a decode step of the whole span and a LARGE_TOKENS forward of its first block, again (up to TRIES times)
    while other processes keep over BUSY of the CPUs busy. ``alone``: take the machine's measuring lock here
    (False: the caller holds it, see starting_alone). Runs on the calling thread (leaves its thread count as
    it was)."""
    most = most or available_threads()
    counts = candidates(most)
    small_ms = large_ms = None
    hidden = blocks.config.hidden_size
    measure_small, measure_large = small is None, large is None
    measure = measure_small or measure_large
    with torch.no_grad(), (measuring_alone() if measure and alone else contextlib.nullcontext()):
        started = time.perf_counter()  # after the wait for the lock
        for attempt in range(1, TRIES + 1 if measure else 1):
            before = readings()
            if measure_small:
                x = torch.zeros(1, 1, hidden, dtype=blocks.dtype)
                medians = time_counts(lambda: forward_span(blocks, blocks.span, x), counts, budget=budget,
                                      gap=DECODE_GAP)
                small, small_ms = fastest(medians), {n: 1000 * t for n, t in medians.items()}
            if measure_large:
                x = torch.zeros(1, LARGE_TOKENS, hidden, dtype=blocks.dtype)
                first = Span(blocks.span.start, blocks.span.start + 1)
                medians = time_counts(lambda: forward_span(blocks, first, x), counts, budget=budget)
                large, large_ms = fastest(medians), {n: 1000 * t for n, t in medians.items()}
            busy = other_load(before, readings(), os.cpu_count() or 1)
            if busy <= BUSY:
                break
            log.warning("other processes used %.0f%% of the CPUs while measuring thread counts (try %d of %d)%s",
                        100 * busy, attempt, TRIES, "; measuring again" if attempt < TRIES else "; keeping these")
            if attempt < TRIES:
                time.sleep(PAUSE)
    source = {(True, True): "measured", (True, False): "measured small", (False, True): "measured large",
              (False, False): "flags"}[(small_ms is not None, large_ms is not None)]
    seconds = time.perf_counter() - started if source != "flags" else 0.0
    large = large or most
    return ThreadChoice(small or large, large, source, seconds, small_ms, large_ms)


def set_pool_threads(pool: ThreadPoolExecutor, workers: int, n: int, timeout: float = 30.0) -> None:
    """Set torch's thread count to ``n`` in each of the ``workers`` threads of the idle ``pool`` (the
    setting is per thread): one task per thread, all held at a barrier so no thread takes two."""
    barrier = threading.Barrier(workers, timeout=timeout)

    def apply() -> None:
        barrier.wait()
        torch.set_num_threads(n)

    for future in [pool.submit(apply) for _ in range(workers)]:
        future.result(timeout + 5)
