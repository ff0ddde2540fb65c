"""Processes and timing under background load: CPU used by everyone else, memory of a node, and
rounds of timed calls that are redone while other processes load the machine."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable, TypeVar

from bench.common import log

MAX_OTHER_LOAD = 0.1  # a timing round during which other processes used more of the CPUs is redone
T = TypeVar("T")


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and of its reaped children) for every live process."""
    table, tick = {}, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(f[1]), sum(int(x) for x in f[11:15]) / tick)
        except (OSError, IndexError, ValueError):
            continue
    return table


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (everything but idle and iowait), from /proc/stat
    (node.threads reads it the same way for a node's own measuring)."""
    from node.threads import machine_busy_seconds

    busy = machine_busy_seconds()
    if busy is None:
        raise OSError("the benchmark needs /proc/stat (Linux)")
    return busy


def process_tree(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``pid`` and every live descendant (for a node: its p2pd daemon)."""
    table, tree, frontier = table or proc_table(), [pid], [pid]
    while frontier:
        frontier = [p for p, (parent, _) in table.items() if parent in frontier]
        tree += frontier
    return tree


def proc_mib(pid: int, file: str, key: str) -> float:
    """A KiB field (VmRSS, VmHWM, Pss, ...) of /proc/<pid>/status or smaps_rollup, in MiB; 0 if gone."""
    try:
        lines = Path(f"/proc/{pid}/{file}").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(f"{key}:")), 0.0)


class OtherLoad:
    """Share of the CPUs busy since construction with anything but this benchmark's process tree
    (other processes, short-lived ones included, the kernel, hypervisor steal): it skews the timings."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.mine0 = time.monotonic(), busy_seconds(), self._mine()

    @staticmethod
    def _mine() -> float:
        table = proc_table()
        return sum(table[pid][1] for pid in process_tree(os.getpid(), table) if pid in table)

    def share(self, gone: float = 0.0) -> float:
        """``gone``: CPU seconds of processes that left this benchmark's tree meanwhile without being
        reaped by it (e.g. a SIGKILLed node's p2pd daemon, orphaned): counted as ours, not as other load."""
        other = (busy_seconds() - self.busy0) - (self._mine() - self.mine0) - gone
        return max(other, 0.0) / ((time.monotonic() - self.t0) * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float = 90) -> None:
    """Wait up to ``max_wait`` s for a 3 s window in which other processes stay under MAX_OTHER_LOAD."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        load = OtherLoad()
        time.sleep(3)
        if (share := load.share()) <= MAX_OTHER_LOAD:
            return
        log(f"other processes use {share:.0%} of the CPUs; waiting (at most {max_wait:.0f}s) for a quieter machine")


def interleaved_rounds(fns: dict[str, Callable[[], T]], repeats: int
                       ) -> tuple[dict[str, list[tuple[float, T]]], float, int]:
    """``repeats`` kept rounds that call every callable in turn, after one warm-up round. A round
    during which other processes used over MAX_OTHER_LOAD of the CPUs is redone, at most ``repeats``
    times. Returns ({name: [(seconds, result) per kept round]}, mean other load of kept rounds, rounds redone)."""
    kept: dict[str, list[tuple[float, T]]] = {name: [] for name in fns}
    loads: list[float] = []
    rnd = dropped = 0
    while len(loads) < repeats:
        load, results = OtherLoad(), {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            result = fn()
            results[name] = (time.perf_counter() - t0, result)
        share, verdict = load.share(), "warm-up" if rnd == 0 else "kept"
        if rnd and share > MAX_OTHER_LOAD and dropped < repeats:
            dropped, verdict = dropped + 1, "redone"
        elif rnd:
            loads.append(share)
            for name, sample in results.items():
                kept[name].append(sample)
        log(f"  round {rnd} ({verdict}, other load {share:.0%}): "
            + ", ".join(f"{k} {t:.3f}s" for k, (t, _) in results.items()))
        rnd += 1
    return kept, statistics.mean(loads), dropped


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], float, int]:
    """Median seconds per callable over the kept rounds of ``interleaved_rounds``.
    Returns (medians, mean other load of kept rounds, rounds redone)."""
    kept, other, dropped = interleaved_rounds(fns, repeats)
    return {name: statistics.median(t for t, _ in s) for name, s in kept.items()}, other, dropped


def quiet_attempts(measure: Callable[[], T], attempts: int, what: str) -> tuple[T, float, int]:
    """Run ``measure`` until other processes used at most MAX_OTHER_LOAD of the CPUs meanwhile, at
    most ``attempts`` times; keeps the least disturbed run. Returns (result, its other load, runs redone)."""
    best: tuple[T, float] | None = None
    for attempt in range(attempts):
        load = OtherLoad()
        result = measure()
        share = load.share()
        if best is None or share < best[1]:
            best = (result, share)
        if share <= MAX_OTHER_LOAD:
            return result, share, attempt
        log(f"  {what}: other load {share:.0%}" + ("; redoing" if attempt + 1 < attempts else "; keeping the quietest run"))
    assert best is not None
    return best[0], best[1], attempts - 1
