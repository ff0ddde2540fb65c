"""What a chaos soak (bench/chaos.py) found: counts, recoveries, the checks, and its bench/README.md table."""
from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass

FAULTS = ("kill", "stop", "blackhole", "term")  # the actions that take a serving node away
MEMORY_SLACK_MIB, MEMORY_SLACK_SHARE = 64.0, 0.25  # a node's RSS after the soak may exceed its baseline by this


@dataclass(frozen=True)
class SoakResult:
    seconds: float  # how long the nemesis acted
    results: list[dict]  # the workers' result lines (kind, start, end, ok, error, times)
    events: list[tuple[float, str]]  # (monotonic time, action) of every nemesis action
    unfinished: int  # client processes still silent past the hang bound
    nodes: list[dict]  # per live node after the soak: blocks, cache_used, baseline_mib, after_mib
    hang_bound: float
    wall: float  # seconds for the whole run, start-up included
    load: float  # the machine's 5-minute load average at the end (2 cores: above 2, processes waited for a CPU)

    def wrong(self) -> list[dict]:
        """Results that differ from local transformers/PEFT."""
        return [r for r in self.results if not r["ok"] and r["error"] is None]

    def errors(self) -> list[dict]:
        return [r for r in self.results if r["error"] is not None]

    def hangs(self) -> int:
        return self.unfinished + sum(r["end"] - r["start"] > self.hang_bound for r in self.results)

    def recoveries(self) -> list[float]:
        """Per fault: the longest wait, over the generations running when it struck, from the fault to the
        next token (detection, ban, re-route, replay, then the step itself)."""
        out = []
        for when, kind in self.events:
            if kind not in FAULTS:
                continue
            waits = [min(t for t in r["times"] if t > when) - when for r in self.results
                     if r["times"] and r["start"] <= when and any(t > when for t in r["times"])]
            if waits:
                out.append(max(waits))
        return out

    def memory_ok(self, node: dict) -> bool:
        """Back near its level before the nemesis (nodes started during the soak have no such level)."""
        if not node["baseline_mib"]:
            return True
        return node["after_mib"] <= node["baseline_mib"] * (1 + MEMORY_SLACK_SHARE) + MEMORY_SLACK_MIB

    def problems(self) -> list[str]:
        """Every way the soak failed its promises (empty: it passed)."""
        found = [f"{len(self.wrong())} results differ from local"] if self.wrong() else []
        found += [f"{len(self.errors())} requests failed, e.g. {e['kind']}: {e['error']}" for e in self.errors()[:1]]
        found += [f"{self.hangs()} requests hung past {self.hang_bound:.0f}s"] if self.hangs() else []
        found += [f"node {n['blocks']} still holds {n['cache_used']} cache tokens" for n in self.nodes if n["cache_used"]]
        found += [f"node {n['blocks']} RSS {n['after_mib']:.0f} MiB vs {n['baseline_mib']:.0f} before"
                  for n in self.nodes if not self.memory_ok(n)]
        return found

    def passed(self) -> bool:
        return not self.problems()


def markdown(result: SoakResult, config, model_name: str) -> str:
    """The chaos section of bench/README.md."""
    kinds = Counter(r["kind"] for r in result.results)
    actions = Counter(kind for _, kind in result.events)
    rec = [1000 * s for s in result.recoveries()]
    mem = [(n["after_mib"] / n["baseline_mib"]) for n in result.nodes if n["baseline_mib"]]
    return "\n".join([
        f"## Chaos soak, {model_name}\n",
        f"`python -m bench.chaos --minutes {config.seconds / 60:g} --nodes {config.nodes} --clients {config.clients} "
        f"--seed {config.seed}` ({result.wall / 60:.1f} min in all; load average {result.load:.1f} on "
        f"{os.cpu_count()} cores at the end). {config.nodes} `node serve` processes (halves "
        "served twice, the whole model, a middle span), each behind a relay on 127.0.0.1, and "
        f"{config.clients} client processes running greedy and seeded-sampling generation, two-turn inference "
        "sessions, beam search and LoRA forward+backward back to back, each result compared with local "
        "transformers / PEFT in the client process. Every "
        f"{config.fault_gap[0]:g}-{config.fault_gap[1]:g} s the nemesis SIGKILLs a node, SIGSTOPs one for "
        f"{config.pause_seconds:g} s, blackholes one's link for as long, SIGTERMs one, restarts a dead one or "
        f"starts a new one with `--num-blocks` (each once per shuffled round; it only takes down a node whose "
        "blocks others still serve). *recovery*: per fault, the longest wait from the fault to the next token "
        "of the generations it interrupted. *hang*: a request over "
        f"{result.hang_bound:.0f} s. After the nemesis stops every node's cache must be free and its RSS within "
        f"{MEMORY_SLACK_SHARE:.0%} + {MEMORY_SLACK_MIB:.0f} MiB of its level before the soak (nodes started "
        "before it).\n",
        "| requests (greedy / sample / session / beam / lora) | faults (kill / stop / blackhole / term) "
        "| restarts / joins | recovery median / max ms | wrong results | failed requests | hangs "
        "| caches freed | RSS after / before (max) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {sum(kinds.values())} ({' / '.join(str(kinds[k]) for k in ('greedy', 'sample', 'session', 'beam', 'lora'))}) "
        f"| {sum(actions[k] for k in FAULTS)} ({' / '.join(str(actions[k]) for k in FAULTS)}) "
        f"| {actions['restart']} / {actions['join']} "
        f"| {statistics.median(rec) if rec else float('nan'):.0f} / {max(rec) if rec else float('nan'):.0f} "
        f"| {len(result.wrong())} | {len(result.errors())} | {result.hangs()} "
        f"| {sum(not n['cache_used'] for n in result.nodes)}/{len(result.nodes)} "
        f"| {max(mem) if mem else float('nan'):.2f}x |",
    ])
