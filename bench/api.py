"""Section: the OpenAI HTTP API (`swarm api`) against the Python client on the same swarm (issue 13):
time to first token and tokens/s of one streamed request, then 8 concurrent streamed requests."""
from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

from bench.clients import NEW_TOKENS, PROMPT_LEN, Stamps, connect, prompt
from bench.common import TINY, Context, checkpoint, log
from bench.generation import spans
from bench.procs import interleaved_rounds, quiet_attempts, wait_for_quiet

CONCURRENT = 8


def add_tokenizer(path: Path, vocab_size: int) -> None:
    """The API needs the checkpoint's tokenizer; the benchmark checkpoints have none. A small byte-level BPE
    padded with added tokens to the model's vocabulary, so every token id the model picks has its own text
    (each token then arrives as one streamed chunk)."""
    if (path / "tokenizer.json").is_file():
        return
    from tests.helpers.checkpoints import build_tokenizer

    tokenizer = build_tokenizer(path, vocab_size=512)
    tokenizer.add_tokens([f"<t{i}>" for i in range(len(tokenizer), vocab_size)])
    assert len(tokenizer) == vocab_size, len(tokenizer)
    tokenizer.save_pretrained(path)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def stream_completion(client, model: str, ids: list[int]) -> tuple[float, float, str]:
    """One streamed greedy completion of NEW_TOKENS through the API: (seconds to first text, total seconds, text)."""
    body = {"model": model, "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0, first, text = time.perf_counter(), None, ""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece and first is None:
                first = time.perf_counter() - t0
            text += piece
    return first, time.perf_counter() - t0, text


def section_api(ctx: Context) -> str:
    import httpx
    import torch

    from tests.helpers.launch import LocalSwarm, Proc, command

    spec = TINY
    path = checkpoint(spec)
    add_tokenizer(path, spec.vocab_size)
    ids = prompt(spec.vocab_size)
    repeats, rounds = ctx.gen_repeats[spec.name], 2 if ctx.quick else 5
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_bootstrap()
        api = Proc([*command("swarm"), "api", "--model", str(path), "--model-name", path.name, "--initial-peers",
                    *swarm.peers, "--port", "0"], {**swarm.env, **ctx.node_env})
        try:
            swarm.start_nodes(spans(spec.num_layers, 2))
            url = api.read_line(180)
            model = connect(path, swarm.peers)
            loop = asyncio.new_event_loop()
            http = httpx.AsyncClient(base_url=url, timeout=120)

            def python_client():
                stamps, t0 = Stamps(), time.monotonic()
                with torch.no_grad():
                    out = model.generate(ids, streamer=stamps, max_new_tokens=NEW_TOKENS, do_sample=False,
                                         pad_token_id=0, eos_token_id=None)
                return stamps.times[0] - t0, time.monotonic() - t0, out[0, PROMPT_LEN:].tolist()

            def through_api():
                return loop.run_until_complete(stream_completion(http, path.name, ids[0].tolist()))

            log("api section: one streamed request, API vs Python client, alternating")
            wait_for_quiet()
            kept, load, redone = interleaved_rounds({"client": python_client, "api": through_api}, repeats)
            tokens = kept["client"][-1][1][2]
            same = kept["api"][-1][1][2] == model_text(path, tokens)

            async def burst():
                return await asyncio.gather(*(stream_completion(http, path.name, ids[0].tolist()) for _ in range(CONCURRENT)))

            def concurrent_round():
                t0 = time.perf_counter()
                results = loop.run_until_complete(burst())
                return time.perf_counter() - t0, results

            log(f"api section: {CONCURRENT} concurrent streamed requests, {rounds} rounds")
            bursts = [quiet_attempts(concurrent_round, 2, f"{CONCURRENT} concurrent") for _ in range(rounds)]
            loop.run_until_complete(http.aclose())
            loop.close()
            model.close()
        finally:
            api.stop()
    med = {name: (statistics.median(r[0] for _, r in s), statistics.median(r[1] for _, r in s))
           for name, s in kept.items()}
    (c_ttft, c_total), (a_ttft, a_total) = med["client"], med["api"]
    c_tps, a_tps = NEW_TOKENS / c_total, NEW_TOKENS / a_total
    ttfts = [r[0] for (_, results), _, _ in bursts for r in results]
    agg = statistics.median(CONCURRENT * NEW_TOKENS / wall for (wall, _), _, _ in bursts)
    burst_load = statistics.mean(l for _, l, _ in bursts)
    return "\n".join([
        f"## OpenAI HTTP API (`swarm api`) vs the Python client, {spec.name}, one node pair\n",
        f"The same swarm (nodes {' + '.join(spans(spec.num_layers, 2))}), a {PROMPT_LEN}-token prompt, "
        f"{NEW_TOKENS} greedy tokens (`ignore_eos`). *Python client*: `AutoDistributedModelForCausalLM.generate()` "
        "with a streamer in the benchmark process. *API*: a `swarm api` process (its own client of the "
        "swarm) streaming `POST /v1/completions` (server-sent events, read with httpx). *TTFT*: from the call to "
        "the first token (client: the streamer's first new token; API: the first event with text), session "
        f"opening and prefill included; *tok/s*: {NEW_TOKENS} / the whole call. Calls alternate round by "
        f"round, {repeats} kept rounds after a warm-up, medians; rounds with other load over 10% are redone. "
        "*overhead*: how much longer the whole call takes through the API (goal: at most 5%). The checkpoint "
        "has a padded BPE tokenizer so each token id has its own text.\n",
        "| path | TTFT ms | tok/s | overhead | same tokens | other load (redone) |",
        "|---|---|---|---|---|---|",
        f"| Python client | {c_ttft * 1e3:.1f} | {c_tps:.1f} | | | {load:.0%} ({redone}) |",
        f"| API | {a_ttft * 1e3:.1f} | {a_tps:.1f} | {a_total / c_total - 1:+.1%} | {'yes' if same else 'NO'} | |",
        "",
        f"{CONCURRENT} streamed requests sent at once through the API (each its own session; the API process "
        f"runs their generations on {CONCURRENT} threads); {rounds} rounds, each redone once above 10% other "
        "load. *aggregate tok/s*: all tokens / the round's wall time (median over rounds); TTFT percentiles "
        "over every request of every round.\n",
        "| concurrent requests | aggregate tok/s | TTFT p50 ms | TTFT p95 ms | other load |",
        "|---|---|---|---|---|",
        f"| {CONCURRENT} | {agg:.1f} | {percentile(ttfts, 0.5) * 1e3:.0f} | {percentile(ttfts, 0.95) * 1e3:.0f} "
        f"| {burst_load:.0%} |",
    ])


def model_text(path: Path, tokens: list[int]) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).decode(tokens, skip_special_tokens=True)
