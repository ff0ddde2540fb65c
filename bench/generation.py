"""Section: greedy generation over the swarm vs local transformers: tokens/s, ms per token, the cost
of one more hop, and where one token's time goes."""
from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench.clients import NEW_TOKENS, PROMPT_LEN, connect, generate_fn, prompt
from bench.common import TINY, Context, ModelSpec, checkpoint, log
from bench.plain import PlainLocal
from bench.procs import MAX_OTHER_LOAD, interleaved_rounds, wait_for_quiet
from client import ClientConfig

TARGETS = {"tiny": 0.5, "llama-270m": 0.9}  # swarm / local tokens/s, issue 15 (against a fresh-process local)
# the per-token breakdown is measured for each of these settings (issue 15: each part before and after):
# name -> (the nodes' flags, the client's ClientConfig fields)
SETTINGS = {"2 nodes": ((), {}), "2 nodes, --decode-in-pool": (("--decode-in-pool",), {}),
            "2 nodes, per-hop steps": ((), {"chained_steps": False})}


def spans(num_layers: int, parts: int) -> list[str]:
    """``num_layers`` blocks split into ``parts`` contiguous spans of near-equal size."""
    cuts = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [f"{a}:{b}" for a, b in zip(cuts, cuts[1:])]


def node_compute_fn(path: Path, span_list: list[str], threads: list[int | None]):
    """A callable running NEW_TOKENS decode steps (after a PROMPT_LEN prefill) through every span
    with the node's own code (node.blocks) in this process, each span's decode steps on the torch
    threads its node chose for them (``threads``; None: this process's): the compute the nodes do
    per token, without gRPC, asyncio or their thread pools. Returns (None, seconds per step)."""
    from node.blocks import inference_step, load_span, new_cache, torch_threads
    from swarm.checkpoint import load_config
    from swarm.spans import Span

    config = load_config(path)
    hosted = [(Span.parse(text), load_span(path, config, Span.parse(text), torch.float32)) for text in span_list]

    def step(caches, hidden, length: int, positions: torch.Tensor) -> None:
        decode = hidden.shape[1] == 1
        for (span, blocks), cache, n in zip(hosted, caches, threads):
            with torch_threads(n if decode and n else 0):
                hidden = inference_step(blocks, span, cache, hidden, torch.ones(1, length, dtype=torch.int64),
                                        positions, 4096)

    def run():
        caches = [new_cache(blocks) for _, blocks in hosted]
        step(caches, torch.randn(1, PROMPT_LEN, config.hidden_size), PROMPT_LEN, torch.arange(PROMPT_LEN).unsqueeze(0))
        times = []
        for pos in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS - 1):
            t0 = time.perf_counter()
            step(caches, torch.randn(1, 1, config.hidden_size), pos + 1, torch.tensor([[pos]]))
            times.append(time.perf_counter() - t0)
        return None, times
    return run


class StepTimers:
    """Wraps InferenceSession.step, each stream's exchange and a chained step's run in timers, for one
    chain's decode steps (one new position): seconds per step, and the time on the network per step (the
    hops' round trips summed, or a chained step from its first write to the last hop's answer).
    ``available`` is False if the client's internals moved (the wrapper targets private classes)."""

    def __init__(self, chain) -> None:
        from client import chained, session as client_session

        self.chain, self.steps, self.hops = chain, [], []
        self._session_cls = client_session.InferenceSession
        self._stream_cls = getattr(client_session, "_Stream", None)
        self._chained_cls = getattr(chained, "ChainedStep", None)
        self.available = (self._stream_cls is not None and hasattr(self._stream_cls, "exchange")
                          and self._chained_cls is not None and hasattr(self._chained_cls, "run"))
        self._now = {"on": False, "hops": 0.0}

    def __enter__(self) -> "StepTimers":
        if not self.available:
            return self
        orig_step, orig_exchange, timers, now = self._session_cls.step, self._stream_cls.exchange, self, self._now
        orig_run = self._chained_cls.run
        self._orig = orig_step, orig_exchange, orig_run

        def step(session, hidden, *args, **kwargs):
            now.update(on=session.link is timers.chain.link and hidden.shape[1] == 1, hops=0.0)
            t0 = time.perf_counter()
            out = orig_step(session, hidden, *args, **kwargs)
            if now["on"]:
                timers.steps.append(time.perf_counter() - t0)
                timers.hops.append(now["hops"])
            now["on"] = False
            return out

        async def exchange(stream, request, timeout):
            t0 = time.perf_counter()
            response = await orig_exchange(stream, request, timeout)
            if now["on"]:
                now["hops"] += time.perf_counter() - t0
            return response

        async def run(chained_step):
            t0 = time.perf_counter()
            out = await orig_run(chained_step)
            if now["on"]:
                now["hops"] += time.perf_counter() - t0
            return out

        self._session_cls.step, self._stream_cls.exchange, self._chained_cls.run = step, exchange, run
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._session_cls.step, self._stream_cls.exchange, self._chained_cls.run = self._orig

    def timed(self, fn):
        """``fn`` (a generate_fn) returning (sequences, gaps, (step seconds, hop seconds) of this call)."""
        def run():
            self.steps, self.hops = [], []
            out, gaps = fn()
            return out, gaps, (self.steps, self.hops)
        return run


def _measure_model(ctx: Context, spec: ModelSpec, hop_counts: tuple[int, ...]) -> dict:
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import LocalSwarm

    path, n = checkpoint(spec), ctx.gen_repeats[spec.name]
    ids = prompt(spec.vocab_size)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    params = sum(p.numel() for p in local.parameters())
    with ExitStack() as stack:
        swarms = {h: stack.enter_context(LocalSwarm(path, env=ctx.node_env)) for h in hop_counts}
        others = {name: stack.enter_context(LocalSwarm(path, env=ctx.node_env)) for name in list(SETTINGS)[1:]}
        log(f"{spec.name}: {params / 1e6:.1f}M params; starting nodes " + "; ".join(
            " + ".join(spans(spec.num_layers, h)) for h in hop_counts) + "; and 2 with " + ", ".join(others))
        for h in hop_counts:  # from this thread: LocalSwarm's children die with the thread that started them
            swarms[h].start_nodes(spans(spec.num_layers, h))
        for name, swarm in others.items():
            swarm.start_nodes(spans(spec.num_layers, 2), *SETTINGS[name][0])
        remotes = {}
        for key, swarm in [*swarms.items(), *others.items()]:
            fields = SETTINGS[key][1] if key in SETTINGS else {}
            remotes[key] = connect(path, swarm.peers, client_config=ClientConfig(**fields) if fields else None)
            stack.callback(remotes[key].close)
        timers = {name: stack.enter_context(StepTimers(remotes[2 if name == "2 nodes" else name].chain))
                  for name in SETTINGS}
        plain = stack.enter_context(PlainLocal(path, spec.vocab_size))
        fns = {"local": plain, "local in-process": generate_fn(local, ids, use_cache=True)}
        fns.update({f"{h} node{'s' if h > 1 else ''}": generate_fn(remotes[h], ids) for h in hop_counts})
        fns.update({name: generate_fn(remotes[name], ids) for name in others})
        reference = fns["local"]()[0]
        same = all(torch.equal(fn()[0], reference) for name, fn in fns.items() if name != "local")
        for name, timer in timers.items():
            fns[name] = timer.timed(fns[name])
        log(f"{spec.name}: swarm tokens identical to local: {same}; timing x{n}")
        chosen = [next((line.split("node.server: ", 1)[-1] for line in proc.stderr_lines if "torch threads:" in line),
                       "?") for proc in swarms[2].nodes]
        log(f"{spec.name}: the 2 nodes chose " + " | ".join(chosen))
        small = [int(c.split()[2]) if c.startswith("torch threads: ") else None for c in chosen]
        fns["node compute"] = node_compute_fn(path, spans(spec.num_layers, 2), small)
        wait_for_quiet()
        kept, other, redone = interleaved_rounds(fns, n)
    ms = lambda xs: 1000 * statistics.median(statistics.median(x) for x in xs if x)  # noqa: E731
    # the plain local worker times its own call (the round trip to it is not the model's time)
    seconds = lambda name, r: r[1][2] if name == "local" else r[0]  # noqa: E731
    stats = {name: (NEW_TOKENS / statistics.median(seconds(name, r) for r in s), ms(r[1][1] for r in s))
             for name, s in kept.items()}
    parts = {name: (ms(r[1][2][0] for r in kept[name]), ms(r[1][2][1] for r in kept[name]))
             for name, timer in timers.items() if timer.available}
    return dict(spec=spec, params=params, n=n, stats=stats, other=other, redone=redone, same=same, parts=parts,
                plain_threads=plain.threads, chosen=chosen)


def section_generation(ctx: Context) -> str:
    """Greedy generate() of 64 tokens: local vs 2 nodes (both models); 1/2/3 nodes (tiny)."""
    results = [_measure_model(ctx, spec, (1, 2, 3) if spec == TINY else (2,)) for spec in ctx.models]
    rows, hop_rows, parts_rows = [], [], []
    for r in results:
        spec, stats = r["spec"], r["stats"]
        (lt, lms), (st, sms) = stats["local"], stats["2 nodes"]
        target = TARGETS.get(spec.name)
        met = "n/a" if target is None else ("**yes**" if st / lt >= target else "**no**")
        it = stats["local in-process"][0]
        rows.append(f"| {spec.name} | {r['params'] / 1e6:.1f}M | {r['n']} | {lt:.1f} | {lms:.1f} | {it:.1f} | {st:.1f} "
                    f"| {sms:.1f} | {st / lt:.3f} | {target if target is not None else '-'} | {met} "
                    f"| {r['other']:.0%} ({r['redone']}) | {'yes' if r['same'] else 'NO'} |")
        for name, (step, hops) in r["parts"].items():
            compute, total = stats["node compute"][1], stats[name][1]
            flags, fields = SETTINGS[name]
            setting = " ".join([*flags, *(f"client {k}={v}" for k, v in fields.items())]) or "defaults (chained)"
            parts_rows.append(f"| {spec.name} | {setting} | {total:.1f} | {total - step:.1f} | {step - hops:.1f} "
                              f"| {hops:.1f} | {compute:.1f} | {(hops - compute) / 2:.1f} | {lms:.1f} "
                              f"| {lms - compute:.1f} |")
        hop_counts = sorted(int(k.split()[0]) for k in stats if k.endswith(("node", "nodes")))
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
        "*local*: plain `AutoModelForCausalLM.from_pretrained(path).generate()` in a fresh process of its own "
        f"(`python -m bench.plain`, torch's default threads: {results[0]['plain_threads']}; nothing else loaded "
        "there), timed inside that process; *in-process local*: the same call in the benchmark process, which "
        "also holds the swarm clients (their DHT peers, event loops, gRPC channels), as this table's baseline "
        "was measured before: shown only to compare, the ratio is against the fresh process. *swarm*: "
        "`AutoDistributedModelForCausalLM.generate()`, blocks split in half over two `node serve` processes "
        "that hold the key/value caches (one inference session, one gRPC stream per node). *tok/s* = "
        f"{NEW_TOKENS} / median wall time of the whole call (session open and prefill included); "
        "*ms/token* = median gap between consecutive tokens (decode steps only, from a streamer). Local "
        "and swarm calls alternate round by round as above; rounds with other load over "
        f"{MAX_OTHER_LOAD:.0%} are redone. Ratio = swarm / local tokens/s, against the targets of the "
        "issue 15 (\"Faster than Petals\"; the older issue \"Inference sessions\" asked 0.6 / 0.85 against the in-process local). Last column: the swarm's tokens equal the local ones.\n",
        "| model | params | repeats | local tok/s | local ms/token | in-process local tok/s | swarm tok/s "
        "| swarm ms/token | ratio | target | met | other load (redone) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    out += ["\nThread counts the two nodes measured and chose at start (`node.threads`; decode-sized steps, "
            "larger ones, with the median ms per call of each candidate count):\n",
            *(f"- {r['spec'].name}: " + "; ".join(f"`{c}`" for c in r["chosen"]) for r in results)]
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
            "From the same timed rounds: during the 2-node calls `InferenceSession.step` and each stream's "
            "exchange are wrapped in timers, and each round also runs the decode steps of both spans with the "
            "node's own code (`node.blocks.inference_step`, same weights, same cache lengths) in the "
            "benchmark process. *outside step*: the client's own work per token (embedding, final norm, LM "
            "head, transformers' generate loop). *bridge*: step minus the time on the network (handing the "
            "step to the client's event-loop thread and back). *round trips*: per-hop steps: the "
            "write-to-answer time of both hops as the client sees it; chained steps (the default: the first "
            "node pushes its outputs to the second, which answers the client): from the first write to the "
            "last hop's answer, (de)serializing tensors included. *node compute*: both spans' decode "
            "step in-process. *per hop*: (round trips - node compute) / 2 = gRPC, loopback, the node's "
            "request handling and thread hand-off, per hop. *local outside blocks* = local ms/token - node "
            "compute: local transformers' own per-token work besides the blocks, to compare with *outside "
            "step*.\n",
            "*setting*: the nodes' flags or the client's config; `--decode-in-pool` is the node as before "
            "issue 15's overhead work (every step handed to the compute pool's thread and back), *defaults* "
            "computes a lone decode-sized step on the node's event-loop thread and sends chained steps; "
            "`chained_steps=False` is the client as before issue 16 (client -> node 1 -> client -> node 2 -> "
            "client). All are timed in the same rounds.\n",
            "| model | setting | swarm ms/token | outside step | bridge | round trips | node compute | per hop "
            "| local ms/token | local outside blocks |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *parts_rows,
        ]
    return "\n".join(out)
