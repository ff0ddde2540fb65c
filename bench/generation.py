"""Sections: greedy generation over the swarm vs local transformers (tokens/s, ms per token, cost of
one more hop, where one token's time goes), and aggregate tokens/s of concurrent clients."""
from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench.clients import NEW_TOKENS, PROMPT_LEN, ClientPool, connect, generate_fn, prompt
from bench.common import TINY, Context, ModelSpec, checkpoint, log
from bench.procs import MAX_OTHER_LOAD, interleaved_rounds, quiet_attempts, wait_for_quiet

TARGETS = {"tiny": 0.6, "llama-270m": 0.85}  # swarm / local tokens/s, issue "Inference sessions"


def spans(num_layers: int, parts: int) -> list[str]:
    """``num_layers`` blocks split into ``parts`` contiguous spans of near-equal size."""
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def node_compute_ms(path: Path, span_list: list[str]) -> float:
    """Median ms of one decode step through every span with the node's own code (node.blocks),
    in this process: the compute a node does per token, without gRPC, asyncio or its thread pool."""
    from node.blocks import inference_step, load_span, new_cache
    from node.loading import load_config
    from swarm.spans import Span

    total, config = 0.0, load_config(path)
    for text in span_list:
        span = Span(*map(int, text.split(":")))
        blocks = load_span(path, config, span, torch.float32)
        cache, width = new_cache(blocks), config.hidden_size
        inference_step(blocks, span, cache, torch.randn(1, PROMPT_LEN, width), torch.ones(1, PROMPT_LEN, dtype=torch.int64),
                       torch.arange(PROMPT_LEN).unsqueeze(0), 4096)
        times = []
        for pos in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS):
            t0 = time.perf_counter()
            inference_step(blocks, span, cache, torch.randn(1, 1, width), torch.ones(1, pos + 1, dtype=torch.int64),
                           torch.tensor([[pos]]), 4096)
            times.append(time.perf_counter() - t0)
        total += statistics.median(times[3:])
        del blocks, cache
    return 1000 * total


def client_timings(model, ids: torch.Tensor, runs: int) -> tuple[float, float, float] | None:
    """Median ms per decode token of (whole token, InferenceSession.step, sum of the hops' round trips
    as the client sees them), over ``runs`` generations with the session's step and each stream's
    exchange wrapped in timers. None if the client's internals moved (the wrapper targets private names)."""
    from client import session as client_session

    stream_cls = getattr(client_session, "_Stream", None)
    if stream_cls is None or not hasattr(stream_cls, "exchange"):
        return None
    session_cls = client_session.InferenceSession
    orig_step, orig_exchange = session_cls.step, stream_cls.exchange
    steps: list[float] = []
    hops: list[float] = []
    now = {"decode": False, "hops": 0.0}

    def step(self, hidden, *args, **kwargs):
        now.update(decode=hidden.shape[1] == 1, hops=0.0)
        t0 = time.perf_counter()
        out = orig_step(self, hidden, *args, **kwargs)
        if now["decode"]:
            steps.append(time.perf_counter() - t0)
            hops.append(now["hops"])
        now["decode"] = False
        return out

    async def exchange(self, request, timeout):
        t0 = time.perf_counter()
        response = await orig_exchange(self, request, timeout)
        if now["decode"]:
            now["hops"] += time.perf_counter() - t0
        return response

    session_cls.step, stream_cls.exchange = step, exchange
    try:
        gaps = [g for _ in range(runs) for g in generate_fn(model, ids)()[1]]
    finally:
        session_cls.step, stream_cls.exchange = orig_step, orig_exchange
    return tuple(1000 * statistics.median(x) for x in (gaps, steps, hops))  # type: ignore[return-value]


def _measure_model(ctx: Context, spec: ModelSpec, hop_counts: tuple[int, ...]) -> dict:
    from transformers import AutoModelForCausalLM

    from swarm.launch import LocalSwarm

    path, n = checkpoint(spec), ctx.gen_repeats[spec.name]
    ids = prompt(spec.vocab_size)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    params = sum(p.numel() for p in local.parameters())
    with ExitStack() as stack:
        swarms = {h: stack.enter_context(LocalSwarm(path, env=ctx.node_env)) for h in hop_counts}
        log(f"{spec.name}: {params / 1e6:.1f}M params; starting nodes " + "; ".join(
            " + ".join(spans(spec.num_layers, h)) for h in hop_counts))
        for h in hop_counts:  # from this thread: LocalSwarm's children die with the thread that started them
            swarms[h].start_nodes(spans(spec.num_layers, h))
        remotes = {}
        for h in hop_counts:
            remotes[h] = connect(path, swarms[h].peers)
            stack.callback(remotes[h].close)
        fns = {"local": generate_fn(local, ids, use_cache=True)}
        fns.update({f"{h} node{'s' if h > 1 else ''}": generate_fn(remotes[h], ids) for h in hop_counts})
        reference = fns["local"]()[0]
        same = all(torch.equal(fn()[0], reference) for name, fn in fns.items() if name != "local")
        log(f"{spec.name}: swarm tokens identical to local: {same}; timing x{n}")
        wait_for_quiet()
        kept, other, redone = interleaved_rounds(fns, n)
        stats = {name: (NEW_TOKENS / statistics.median(t for t, _ in s),
                        1000 * statistics.median(statistics.median(gaps) for _, (_, gaps) in s))
                 for name, s in kept.items()}
        log(f"{spec.name}: timing one token of the 2-node swarm piece by piece")
        client = client_timings(remotes[2], ids, runs=2 if ctx.quick else 3)
    compute = node_compute_ms(path, spans(spec.num_layers, 2))
    return dict(spec=spec, params=params, n=n, stats=stats, other=other, redone=redone, same=same,
                client=client, compute=compute)


def section_generation(ctx: Context) -> str:
    """Greedy generate() of 64 tokens: local vs 2 nodes (both models); 1/2/3 nodes (tiny)."""
    results = [_measure_model(ctx, spec, (1, 2, 3) if spec == TINY else (2,)) for spec in ctx.models]
    rows, hop_rows, parts_rows = [], [], []
    for r in results:
        spec, stats = r["spec"], r["stats"]
        (lt, lms), (st, sms) = stats["local"], stats["2 nodes"]
        target = TARGETS.get(spec.name)
        met = "n/a" if target is None else ("**yes**" if st / lt >= target else "**no**")
        rows.append(f"| {spec.name} | {r['params'] / 1e6:.1f}M | {r['n']} | {lt:.1f} | {lms:.1f} | {st:.1f} | {sms:.1f} "
                    f"| {st / lt:.2f} | {target if target is not None else '-'} | {met} | {r['other']:.0%} ({r['redone']}) "
                    f"| {'yes' if r['same'] else 'NO'} |")
        if r["client"] is not None:
            token, step, hops = r["client"]
            parts_rows.append(f"| {spec.name} | {token:.1f} | {token - step:.1f} | {step - hops:.1f} | {hops:.1f} "
                              f"| {r['compute']:.1f} | {(hops - r['compute']) / 2:.1f} | {lms:.1f} | {lms - r['compute']:.1f} |")
        hop_counts = sorted(int(k.split()[0]) for k in stats if k != "local")
        if len(hop_counts) > 1:
            keys = [f"{h} node{'s' if h > 1 else ''}" for h in hop_counts]
            ms = [stats[k][1] for k in keys]
            mean_h, mean_ms = statistics.mean(hop_counts), statistics.mean(ms)
            slope = sum((h - mean_h) * (m - mean_ms) for h, m in zip(hop_counts, ms)) / sum(
                (h - mean_h) ** 2 for h in hop_counts)
            for h, k, m in zip(hop_counts, keys, ms):
                hop_rows.append(f"| {spec.name} | {' + '.join(spans(spec.num_layers, h))} | {h} "
                                f"| {stats[k][0]:.1f} | {m:.1f} | {m - ms[0]:+.1f} | {m - lms:+.1f} |")
            hop_rows.append(f"| {spec.name} | least-squares slope | | | **{slope:.1f} ms per extra hop** | | |")
    out = [
        f"## Generation: greedy `generate()`, batch 1, {PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, float32\n",
        "*local*: `AutoModelForCausalLM` in the benchmark process (`use_cache=True`). *swarm*: "
        "`AutoDistributedModelForCausalLM.generate()`, blocks split in half over two `node serve` processes "
        "that hold the key/value caches (one inference session, one gRPC stream per node). *tok/s* = "
        f"{NEW_TOKENS} / median wall time of the whole call (session open and prefill included); "
        "*ms/token* = median gap between consecutive tokens (decode steps only, from a streamer). Local "
        "and swarm calls alternate round by round as above; rounds with other load over "
        f"{MAX_OTHER_LOAD:.0%} are redone. Ratio = swarm / local tokens/s, against the targets of the "
        "issue \"Inference sessions\". Last column: the swarm's tokens equal the local ones.\n",
        "| model | params | repeats | local tok/s | local ms/token | swarm tok/s | swarm ms/token | ratio "
        "| target | met | other load (redone) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if hop_rows:
        out += [
            "\n### Cost of one more hop (tiny)\n",
            "The same blocks served by 1, 2 or 3 nodes (separate swarms, timed in the same interleaved "
            "rounds as the table above): the compute per token is the same, so the growth of ms/token with "
            "the number of hops is what a hop costs (gRPC round trip on loopback, (de)serialization, the "
            "node's request handling); the slope is fitted over the three points.\n",
            "| model | spans | hops | tok/s | ms/token | vs 1 node | vs local |",
            "|---|---|---|---|---|---|---|",
            *hop_rows,
        ]
    if parts_rows:
        out += [
            "\n### Where one token's time goes (2 nodes, ms per decode token, medians)\n",
            "Separate runs after the timed rounds, with `InferenceSession.step` and each stream's exchange "
            "wrapped in timers. *outside step*: the client's own work per token (embedding, final norm, LM "
            "head, transformers' generate loop). *bridge*: step minus the hops' round trips (handing the "
            "step to the client's event-loop thread and back, (de)serializing tensors). *round trips*: "
            "write-to-answer time of both hops as the client sees it. *node compute*: one decode step "
            "through both spans with the node's own code (`node.blocks.inference_step`) in the benchmark "
            "process. *per hop*: (round trips - compute) / 2 = gRPC, loopback, node-side handling per hop. "
            "*local outside blocks* = local ms/token - node compute: local transformers' own per-token "
            "overhead, to compare with *outside step*.\n",
            "| model | swarm ms/token | outside step | bridge | round trips | node compute | per hop "
            "| local ms/token | local outside blocks |",
            "|---|---|---|---|---|---|---|---|---|",
            *parts_rows,
        ]
    return "\n".join(out)


def section_concurrent_clients(ctx: Context) -> str:
    """Aggregate tokens/s of 1, 4 and 8 client processes generating at once on one node pair (tiny)."""
    from swarm.launch import LocalSwarm

    spec, counts, seconds = TINY, (1, 4, 8), ctx.seconds(8)
    rounds = 1 if ctx.quick else 2
    path = checkpoint(spec)
    results: dict[int, list] = {n: [] for n in counts}
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_nodes(spans(spec.num_layers, 2))
        log(f"starting {max(counts)} client processes")
        with ClientPool(path, swarm.peers, max(counts), ctx.node_env, spec.vocab_size) as pool:
            wait_for_quiet()
            for rnd in range(rounds):
                for n in counts:
                    window, load, redone = quiet_attempts(lambda: pool.window(n, seconds), 2, f"{n} clients")
                    log(f"  round {rnd}, {n} clients: {window.tokens_per_s:.1f} tok/s, {window.token_ms:.1f} "
                        f"ms/token, other load {load:.0%}")
                    results[n].append((window, load, redone))
    rows, base = [], None
    for n in counts:
        tps = statistics.median(w.tokens_per_s for w, _, _ in results[n])
        ms = statistics.median(w.token_ms for w, _, _ in results[n])
        base = base or tps
        load = statistics.mean(l for _, l, _ in results[n])
        rows.append(f"| {n} | {tps:.1f} | {tps / n:.1f} | {ms:.1f} | {tps / base:.2f} | "
                    f"{load:.0%} ({sum(r for _, _, r in results[n])}) |")
    return "\n".join([
        f"## Concurrent clients: aggregate tokens/s, {spec.name}, one node pair\n",
        f"Each client is a separate process (`python -m bench.clients`, its own "
        "`AutoDistributedModelForCausalLM`, so no shared GIL) generating "
        f"{NEW_TOKENS}-token greedy replies to a {PROMPT_LEN}-token prompt back to back, each in a new "
        f"session; all start together and the tokens that arrive within a {seconds:.0f} s window count. "
        f"Nodes {' + '.join(spans(spec.num_layers, 2))}; {rounds} window(s) per row, median; a window "
        f"with other load over {MAX_OTHER_LOAD:.0%} is redone once. Clients, nodes and their "
        "torch threads all share this machine's CPUs: on 2 cores more clients mostly fill the gaps a "
        "single client leaves while it waits for the network.\n",
        "| clients | aggregate tok/s | per client tok/s | ms/token | vs 1 client | other load (redone) |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
