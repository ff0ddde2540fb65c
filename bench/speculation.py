"""Section: speculative decoding over emulated links with a checkpoint that continues a quoted passage
(issue 16, item 3). The network section's seeded checkpoint never continues a quote, so prompt lookup
drafts nothing there; here the same tiny checkpoint is first trained locally (a few AdamW steps, fixed
seed) to continue the passage of ``bench.network.repetitive_prompt``, as a real model continues code or a
quotation it has just read, and the drafts are accepted. Tokens are checked against local transformers'
plain greedy ones in every round.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from bench.common import WORK, Context, checkpoint, log
from bench.generation import spans
from bench.network import HOPS, PROFILE_NAMES, SPEC_TOKENS, _connect, _speculate, repetitive_prompt, truncated_assistant
from bench.procs import interleaved_rounds, wait_for_quiet

NEW = SPEC_TOKENS  # new tokens per generate() (as the network section); ms/token = the whole call / NEW
PASSAGE = 8  # the quoted passage's length in tokens (the prompt quotes it 4 times)
MAX_STEPS = 200  # AdamW steps at most to make the checkpoint continue the passage
MAX_LOSS = 0.05  # and sure of it: float32 rounding (~1e-6) of the swarm then never flips an argmax


def copier_checkpoint(spec) -> Path:
    """The ``spec`` checkpoint trained to continue the quoted passage (built once under bench/work/)."""
    from transformers import AutoModelForCausalLM

    dest = WORK / f"bench-{spec.name}-copier"
    rep = repetitive_prompt(spec.vocab_size)
    want = json.dumps({"base": spec.name, "passage": rep[0, :PASSAGE].tolist(), "new": NEW, "loss": MAX_LOSS})
    if (dest / "copier.json").is_file() and (dest / "copier.json").read_text() == want:
        return dest
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(checkpoint(spec), dtype=torch.float32)
    text = rep[:, :PASSAGE].repeat(1, (rep.shape[1] + NEW + 2 * PASSAGE) // PASSAGE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, MAX_STEPS + 1):
        loss = model(text, labels=text).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            out = model.eval().generate(rep, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
        model.train()
        if loss.item() < MAX_LOSS and torch.equal(out[:, rep.shape[1]:], text[:, rep.shape[1]:rep.shape[1] + NEW]):
            log(f"speculation: the checkpoint continues the passage after {step} AdamW steps (loss {loss.item():.4f})")
            break
    else:
        raise RuntimeError(f"the checkpoint did not learn to continue the passage in {MAX_STEPS} steps "
                           f"(loss {loss.item():.4f})")
    model.save_pretrained(dest)
    (dest / "copier.json").write_text(want)
    return dest


def _generate(model, ids: torch.Tensor, draft: dict):
    """A callable: one greedy generate() of NEW tokens with ``draft``; returns (tokens, steps per hop)."""
    router = getattr(getattr(model, "chain", None), "router", None)  # None: local transformers

    def messages() -> float:
        if router is None:
            return 0.0
        return router.metrics.registry.get_sample_value("swarmlm_client_hops_total", {"kind": "inference"}) or 0.0

    speculate = _speculate(model, ids, **draft)

    def run():
        before = messages()
        out = speculate()
        return out, (messages() - before) / HOPS
    return run


def section_speculation(ctx: Context) -> str:
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    spec = ctx.models[0]
    started, n = time.monotonic(), 3 if ctx.quick else 5
    path = copier_checkpoint(spec)
    rep = repetitive_prompt(spec.vocab_size)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    half = spec.num_layers // 2

    def drafts() -> dict[str, dict]:
        """The drafts one client tries; an assistant of its own (transformers adapts an assistant's draft
        length from call to call, in its generation config)."""
        return {"none": {}, "prompt lookup (4)": {"prompt_lookup_num_tokens": 4},
                "prompt lookup (10)": {"prompt_lookup_num_tokens": 10},
                f"assistant: first {half} of {spec.num_layers} blocks": {"assistant_model": truncated_assistant(path, half)}}

    reference, _ = _generate(local, rep, {})()
    wait_for_quiet()
    local_rounds, local_load, _ = interleaved_rounds({d: _generate(local, rep, kw) for d, kw in drafts().items()}, n)
    results, loads = {("local", "", d): rounds for d, rounds in local_rounds.items()}, [local_load]
    clients = {"chained": {}, "per hop": {"chained_steps": False}}
    with LocalSwarm(path, env=ctx.node_env, link=PROFILES["lan"]) as swarm:
        swarm.start_nodes(spans(spec.num_layers, HOPS))
        models = {name: _connect(path, swarm.peers, **fields) for name, fields in clients.items()}
        try:
            client_drafts = {name: drafts() for name in models}
            wait_for_quiet()
            for profile in PROFILE_NAMES:
                swarm.set_link(PROFILES[profile])
                log(f"speculation: {profile} x{n}")
                fns = {(c, d): _generate(m, rep, kw) for c, m in models.items() for d, kw in client_drafts[c].items()}
                kept, load, _ = interleaved_rounds(fns, n)
                loads.append(load)
                results.update({(profile, *key): rounds for key, rounds in kept.items()})
        finally:
            for m in models.values():
                m.close()
    return _table(spec, n, results, reference, statistics.mean(loads), time.monotonic() - started)


def _table(spec, n: int, results: dict, reference: torch.Tensor, load: float, seconds: float) -> str:
    ms = {key: 1000 * statistics.median(t for t, _ in rounds) / NEW for key, rounds in results.items()}
    rows = []
    for (where, client, draft), rounds in results.items():
        plain = ms[(where, client, "none")]
        same = all(torch.equal(out, reference) for _, (out, _) in rounds)
        steps = statistics.median(s for _, (_, s) in rounds)
        rows.append(f"| {where} | {client or '-'} | {draft} | {ms[(where, client, draft)]:.1f} | "
                    f"{1000 / ms[(where, client, draft)]:.1f} | {plain / ms[(where, client, draft)]:.2f}x | "
                    f"{f'{steps:.0f}' if where != 'local' else '-'} | {'yes' if same else '**no**'} |")
    return "\n".join([
        f"## Speculative decoding over emulated links, a checkpoint that continues a quote ({spec.name})\n",
        f"Run {time.strftime('%Y-%m-%d %H:%M')} ({seconds / 60:.1f} min, `python -m bench.run --only "
        f"section_speculation`); other processes used {load:.0%} of the CPUs meanwhile. The {spec.name} checkpoint "
        f"trained locally (seeded AdamW steps until its greedy continuation is the passage and its loss under "
        f"{MAX_LOSS}) to continue a "
        f"{PASSAGE}-token passage it sees quoted 4 times in its {4 * PASSAGE}-token prompt, as a real model continues code "
        f"or a quotation it has just read (bench/speculation.py; the network section's untrained checkpoint never "
        f"does, so prompt lookup drafts nothing there). Greedy, {NEW} new tokens, batch 1, float32, {HOPS} nodes "
        f"behind relays (tests/helpers/link.py); ms/token = the whole generate() call / {NEW} (prefill included); "
        f"medians of {n} rounds, every client and draft alternating within a round. *vs none*: against the same "
        f"client without drafts. *steps*: inference step messages per hop in one call (prefill included): a draft "
        f"is checked in one multi-token step. *tokens == greedy*: every round's tokens equal local plain greedy "
        f"ones. *local*: transformers in the bench process, no network.\n",
        "| link | client | draft | ms/token | tok/s | vs none | steps | tokens == greedy |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
