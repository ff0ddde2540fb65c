"""Section: aggregate tokens/s of N concurrent client processes on one node pair with cross-session
batching on (the default) vs off (``--decode-batch 1``), and of a single session on each (issue 15
"nodes batch across sessions"). One swarm at a time (16 client processes of the 270M model do not fit
beside other work in memory): on, then off; within each, windows of 1 and N clients alternate.
``python -m bench.run --only section_batching --out FILE``; ``--quick``: tiny model only."""
from __future__ import annotations

import os
import statistics
import time

from bench.clients import NEW_TOKENS, PROMPT_LEN, ClientPool
from bench.common import Context, checkpoint, log
from bench.concurrency import summary, windows
from bench.generation import spans
from bench.procs import MAX_OTHER_LOAD, busy_seconds, proc_table, process_tree

CLIENTS = 8
SETTINGS = {"on": (), "off": ("--decode-batch", "1")}  # node flags of each swarm


class _Accounted:
    """A ClientPool whose windows also record where the CPU went: the CPU seconds of the client workers'
    and of the nodes' process trees (p2pd daemons included), against the machine's busy seconds."""

    def __init__(self, pool: ClientPool, node_pids: list[int]):
        self.pool, self.node_pids, self.cpu = pool, node_pids, {}

    def window(self, clients: int, seconds: float):
        def spent(table, roots):
            return sum(table[p][1] for root in roots for p in process_tree(root, table) if p in table)

        workers = [w.popen.pid for w in self.pool.workers[:clients]]
        before, busy0, t0 = proc_table(), busy_seconds(), time.monotonic()
        window = self.pool.window(clients, seconds)
        after, busy1, t1 = proc_table(), busy_seconds(), time.monotonic()
        client_s = spent(after, workers) - spent(before, workers)
        node_s = spent(after, self.node_pids) - spent(before, self.node_pids)
        cores, elapsed = os.cpu_count() or 1, t1 - t0
        self.cpu.setdefault(clients, []).append(
            (client_s / elapsed / cores, node_s / elapsed / cores, (busy1 - busy0) / elapsed / cores,
             1000 * node_s / elapsed / window.tokens_per_s))
        return window


def _shares(samples: list[tuple[float, float, float, float]]) -> tuple[str, float]:
    """('clients % / nodes % / machine busy %' of the CPUs, the nodes' CPU ms per token), medians over windows."""
    return (" / ".join(f"{statistics.median(s[i] for s in samples):.0%}" for i in range(3)),
            statistics.median(s[3] for s in samples))


def _measure(ctx: Context, spec, seconds: float, rounds: int) -> list[str]:
    from tests.helpers.launch import LocalSwarm

    path, layout, results, cpu = checkpoint(spec), spans(spec.num_layers, 2), {}, {}
    for k, flags in SETTINGS.items():
        with LocalSwarm(path, env=ctx.node_env) as swarm:
            swarm.start_nodes(layout, *flags)
            log(f"{spec.name}, batching {k}: starting {CLIENTS} client processes")
            with ClientPool(path, swarm.peers, CLIENTS, ctx.node_env, spec.vocab_size) as pool:
                accounted = _Accounted(pool, [node.pid for node in swarm.nodes])
                results.update(windows({f"{n} {k}": (accounted, n) for n in (1, CLIENTS)}, rounds, seconds))
                cpu.update({f"{n} {k}": _shares(samples) for n, samples in accounted.cpu.items()})
    single = {k: summary(results[f"1 {k}"])[0] for k in SETTINGS}
    rows = []
    for n in (1, CLIENTS):
        for k in SETTINGS:
            tps, ms, load = summary(results[f"{n} {k}"])
            rows.append(f"| {spec.name} | {n} | {k} | {tps:.1f} | {tps / n:.1f} | {ms:.1f} | {tps / single[k]:.2f} "
                        f"| {tps / single['on']:.2f} | {cpu[f'{n} {k}'][0]} | {cpu[f'{n} {k}'][1]:.1f} | {load} |")
    return rows


def section_batching(ctx: Context) -> str:
    """N client processes and one on a node pair, batching on vs off, per model of the run."""
    seconds, rounds = ctx.seconds(12), 1 if ctx.quick else 2
    rows = [row for spec in ctx.models for row in _measure(ctx, spec, seconds, rounds)]
    return "\n".join([
        f"## Nodes batching across sessions: aggregate tokens/s of {CLIENTS} clients vs 1, batching on vs off\n",
        "A node pair (the blocks in halves) with batching on (the default `--decode-batch 16 --decode-batch-wait-ms 5`) or off "
        f"(`--decode-batch 1`), one after the other (16 client processes do not fit in memory beside the "
        f"other jobs), with {CLIENTS} client processes (`python -m bench.clients`, as in the "
        f"concurrent clients table: {NEW_TOKENS}-token greedy replies to a {PROMPT_LEN}-token prompt back to "
        f"back, tokens arriving within a {seconds:.0f} s window count). Windows of 1 and {CLIENTS} clients "
        f"alternate, {rounds} per row, median; redone once above {MAX_OTHER_LOAD:.0%} other load. "
        "*vs 1 session*: against one client on the same swarm; *vs 1 session (on)*: against one client with "
        "batching on. All nodes and clients share this machine's 2 CPUs, which other engineers' jobs also "
        "used while this ran (see *other load*): treat the figures as noisy, the ratios of one run as the result. "
        "*CPU clients / nodes / busy*: the share of the machine's CPUs the client processes and the two nodes "
        "(process trees: their p2pd daemons included) used during a window, and how busy the machine was in "
        "all (medians over the windows): where the busy share nears 100%, the CPUs, not the nodes' batching, "
        "bound the aggregate, and the clients' share is work the nodes cannot batch away. *node CPU ms/token*: "
        "the two nodes' CPU time per token generated (their CPU seconds per second / aggregate tokens/s): what "
        "a token costs the nodes, which batching should shrink as sessions are added.\n",
        "| model | clients | batching | aggregate tok/s | per client tok/s | ms/token | vs 1 session "
        "| vs 1 session (on) | CPU clients / nodes / busy | node CPU ms/token | other load (redone) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
