"""Sections: aggregate tokens/s of concurrent client processes (1, 4, 8 clients on one node pair),
and 4 clients on 1 vs 2 replicas per span (issue "A swarm that survives"). Tiny model."""
from __future__ import annotations

import statistics
from contextlib import ExitStack

from bench.clients import NEW_TOKENS, PROMPT_LEN, ClientPool, Window
from bench.common import TINY, Context, checkpoint, log
from bench.generation import spans
from bench.procs import MAX_OTHER_LOAD, quiet_attempts, wait_for_quiet


def windows(runs: dict[str, tuple[ClientPool, int]], rounds: int, seconds: float) -> dict[str, list]:
    """``rounds`` rounds of one window per setup (pool, clients), alternating; each window redone
    once if other processes used over MAX_OTHER_LOAD of the CPUs. {setup: [(Window, load, redone)]}."""
    wait_for_quiet()
    results: dict[str, list] = {name: [] for name in runs}
    for rnd in range(rounds):
        for name, (pool, clients) in runs.items():
            window, load, redone = quiet_attempts(lambda: pool.window(clients, seconds), 2, name)
            log(f"  round {rnd}, {name}: {window.tokens_per_s:.1f} tok/s, {window.token_ms:.1f} ms/token, "
                f"first hops {dict(window.first_hops)}, other load {load:.0%}")
            results[name].append((window, load, redone))
    return results


def summary(samples: list[tuple[Window, float, int]]) -> tuple[float, float, str]:
    """(median tokens/s, median ms/token, 'other load (redone)') over a setup's windows."""
    tps = statistics.median(w.tokens_per_s for w, _, _ in samples)
    ms = statistics.median(w.token_ms for w, _, _ in samples)
    load = statistics.mean(l for _, l, _ in samples)
    return tps, ms, f"{load:.0%} ({sum(r for _, _, r in samples)})"


def section_concurrent_clients(ctx: Context) -> str:
    """Aggregate tokens/s of 1, 4 and 8 client processes generating at once on one node pair."""
    from tests.helpers.launch import LocalSwarm

    spec, counts, seconds, rounds = TINY, (1, 4, 8), ctx.seconds(8), 1 if ctx.quick else 2
    path = checkpoint(spec)
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_nodes(spans(spec.num_layers, 2))
        log(f"starting {max(counts)} client processes")
        with ClientPool(path, swarm.peers, max(counts), ctx.node_env, spec.vocab_size) as pool:
            results = windows({f"{n} clients": (pool, n) for n in counts}, rounds, seconds)
    rows, base = [], None
    for n in counts:
        tps, ms, load = summary(results[f"{n} clients"])
        base = base or tps
        rows.append(f"| {n} | {tps:.1f} | {tps / n:.1f} | {ms:.1f} | {tps / base:.2f} | {load} |")
    return "\n".join([
        f"## Concurrent clients: aggregate tokens/s, {spec.name}, one node pair\n",
        "Each client is a separate process (`python -m bench.clients`, its own "
        "`AutoDistributedModelForCausalLM`, so no shared GIL) generating "
        f"{NEW_TOKENS}-token greedy replies to a {PROMPT_LEN}-token prompt back to back, each in a new "
        f"session; all start together and the tokens that arrive within a {seconds:.0f} s window count. "
        f"Nodes {' + '.join(spans(spec.num_layers, 2))}; {rounds} window(s) per row, rows alternating, "
        f"median; a window with other load over {MAX_OTHER_LOAD:.0%} is redone once. Clients, nodes "
        "and their torch threads all share this machine's 2 CPUs, so this shows how the swarm shares a "
        "fixed amount of compute between sessions, not how it scales with machines.\n",
        "| clients | aggregate tok/s | per client tok/s | ms/token | vs 1 client | other load (redone) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])


def section_replicas(ctx: Context) -> str:
    """4 concurrent client processes on 1 vs 2 replicas per span (two swarms, windows alternate)."""
    from tests.helpers.launch import LocalSwarm

    spec, clients, seconds, rounds = TINY, 4, ctx.seconds(8), 1 if ctx.quick else 2
    path, halves = checkpoint(spec), spans(spec.num_layers, 2)
    layouts = {1: halves, 2: [s for s in halves for _ in range(2)]}
    with ExitStack() as stack:
        swarms = {k: stack.enter_context(LocalSwarm(path, env=ctx.node_env)) for k in layouts}
        for k, layout in layouts.items():
            swarms[k].start_nodes(layout)
        log(f"starting {clients} client processes per swarm")
        pools = {k: stack.enter_context(ClientPool(path, swarms[k].peers, clients, ctx.node_env, spec.vocab_size))
                 for k in layouts}
        results = windows({f"{k} replica(s)": (pools[k], clients) for k in layouts}, rounds, seconds)
    rows, base = [], None
    for k, layout in layouts.items():
        samples = results[f"{k} replica(s)"]
        tps, ms, load = summary(samples)
        base = base or tps
        hops: dict[str, int] = {}
        for w, _, _ in samples:
            for address, count in w.first_hops.items():
                hops[address] = hops.get(address, 0) + count
        split = " / ".join(str(c) for c in sorted(hops.values(), reverse=True))
        rows.append(f"| {k} | {' + '.join(layout)} | {tps:.1f} | {ms:.1f} | {tps / base:.2f} | {split} | {load} |")
    return "\n".join([
        f"## Replicas: aggregate tokens/s of {clients} concurrent clients, 1 vs 2 nodes per span, {spec.name}\n",
        f"Two swarms side by side, {clients} client processes on each (as in the table above), windows of "
        f"{seconds:.0f} s alternating between them, {rounds} per row, median; redone once above "
        f"{MAX_OTHER_LOAD:.0%} other load. *first hop sessions*: how many sessions started on each node "
        f"serving {halves[0]} (a session takes the route of lowest expected latency; a node whose latency "
        "the client has not measured yet counts as 5 ms, so clients also try the other replica). All "
        "nodes share the same 2 CPUs here, so a second replica adds no compute, only more processes: "
        "this measures what spreading sessions costs or gains on one machine, not a real swarm's scaling.\n",
        "| replicas per span | nodes | aggregate tok/s | ms/token | vs 1 replica | first hop sessions "
        "| other load (redone) |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ])
