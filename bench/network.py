"""Section: the swarm over emulated network links (issue 16): greedy generation and a LoRA fine-tuning
step per link profile, with activations on the wire in float32, 16-bit and (training) blockwise 8-bit.

Each node sits behind a relay (tests/helpers/link.py) that delays every chunk by the profile's one-way
delay and caps the bandwidth, and announces the relay's address, so every client-to-node call crosses
the emulated link. One swarm serves every profile: the relays change profile between measurements.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from bench.clients import PROMPT_LEN, Stamps, prompt
from bench.common import Context, checkpoint, log
from bench.generation import spans
from bench.procs import interleaved_rounds, wait_for_quiet
from bench.training import step_fn

HOPS = 2
NEW_TOKENS = 24  # per generate(): enough decode steps for a median at 50 ms one-way
TRAIN_BATCH, TRAIN_SEQ = 4, 64
TARGET = 0.8  # the goal: a fine-tuning step at broadband >= 0.8x the same step at lan (steps/s)
GEN_WIRES = {"float32": {}, "bfloat16": {"wire_dtype": "bfloat16"}}
TRAIN_WIRES = {"float32": {}, "bfloat16": {"wire_dtype": "bfloat16", "train_wire": "bfloat16"},
               "blockwise8": {"train_wire": "blockwise8"}}


def _generate(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS):
    """A callable: one greedy generate(); returns the decode-step gaps (seconds)."""
    def run():
        stamps = Stamps()
        with torch.no_grad():
            model.generate(ids, streamer=stamps, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
        return stamps.gaps()
    return run


def _bytes_per_token_per_hop(model, ids: torch.Tensor) -> float:
    """Bytes (both ways) per decode step per hop: a generate of NEW_TOKENS minus one of 1 (the prefill)."""
    conns = model.chain.connections
    counts = []
    for new in (1, NEW_TOKENS):
        before = conns.bytes_sent + conns.bytes_received
        _generate(model, ids, new)()
        counts.append(conns.bytes_sent + conns.bytes_received - before)
    return (counts[1] - counts[0]) / (NEW_TOKENS - 1) / HOPS


def _connect(path, peers, **wire):
    from bench.clients import connect
    from client import ClientConfig

    return connect(path, peers, client_config=ClientConfig(initial_peers=tuple(peers), **wire))


def _peft(base):
    from peft import LoraConfig

    from client import get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base, copy.deepcopy(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                         target_modules=["q_proj", "v_proj"])))


def _on(swarm, profile, fn):
    """``fn`` run with every relay of ``swarm`` emulating ``profile`` (switched between calls: the
    connections are idle then), so steps at two profiles can alternate within one round."""
    def run():
        swarm.set_link(profile)
        return fn()
    return run


def section_network(ctx: Context) -> str:
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    spec = ctx.models[0]
    path, n = checkpoint(spec), 3 if ctx.quick else 5
    train_n = 3 if ctx.quick else 9  # rounds of 6 steps: cheap, and the ratio is the goal
    ids = prompt(spec.vocab_size)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    train_ids = torch.randint(3, spec.vocab_size, (TRAIN_BATCH, TRAIN_SEQ), generator=torch.Generator().manual_seed(0))
    train_mask = torch.ones_like(train_ids)
    started = time.monotonic()
    with LocalSwarm(path, env=ctx.node_env, link=PROFILES["lan"]) as swarm:
        swarm.start_nodes(spans(spec.num_layers, HOPS))
        models = []
        try:
            gen = {name: _connect(path, swarm.peers, **wire) for name, wire in GEN_WIRES.items()}
            models += gen.values()
            train_bases = {name: _connect(path, swarm.peers, **wire) for name, wire in TRAIN_WIRES.items()}
            models += train_bases.values()
            train = {name: _peft(base) for name, base in train_bases.items()}
            per_hop = {name: _bytes_per_token_per_hop(m, ids) for name, m in gen.items()}
            steps = {name: step_fn(m, train_ids, train_mask) for name, m in train.items()}
            step_bytes = {}
            for name, step in steps.items():
                conns = train_bases[name].chain.connections
                step()  # warm-up (and the adapter's first upload)
                before = conns.bytes_sent + conns.bytes_received
                step()
                step_bytes[name] = conns.bytes_sent + conns.bytes_received - before
            wait_for_quiet()
            local_gaps, _, _ = interleaved_rounds({"local": _generate(local, ids)}, n)
            local_ms = 1000 * statistics.median(statistics.median(g) for _, g in local_gaps["local"])
            gen_ms, train_s, loads = {}, {}, []
            for profile in ("lan", "broadband", "far"):
                swarm.set_link(PROFILES[profile])
                log(f"network: {profile}: generation x{n}")
                kept, other, _ = interleaved_rounds({name: _generate(m, ids) for name, m in gen.items()}, n)
                loads.append(other)
                for name, rounds in kept.items():
                    gen_ms[(profile, name)] = 1000 * statistics.median(statistics.median(g) for _, g in rounds)
            log(f"network: fine-tuning steps at lan and broadband, alternating, x{train_n}")
            kept, other, _ = interleaved_rounds({(profile, name): _on(swarm, PROFILES[profile], step)
                                                 for name, step in steps.items() for profile in ("lan", "broadband")},
                                                train_n)
            loads.append(other)
            for key, rounds in kept.items():
                train_s[key] = statistics.median(t for t, _ in rounds)
        finally:
            for m in models:
                m.close()
    return _tables(spec, (n, train_n), local_ms, gen_ms, per_hop, train_s, step_bytes, statistics.mean(loads),
                   time.monotonic() - started)


def _tables(spec, rounds, local_ms, gen_ms, per_hop, train_s, step_bytes, load, seconds) -> str:
    from tests.helpers.link import PROFILES

    gen_rows = []
    for profile in ("lan", "broadband", "far"):
        p = PROFILES[profile]
        bound = 2 * HOPS * p.delay * 1000 + local_ms
        for wire in GEN_WIRES:
            ms = gen_ms[(profile, wire)]
            gen_rows.append(f"| {profile} ({p.delay * 1000:g} ms, {p.bandwidth / 1e6:g} Mbit/s) | {wire} | "
                            f"{1000 / ms:.1f} | {ms:.1f} | {bound:.1f} | {ms / bound:.2f} | {per_hop[wire]:,.0f} |")
    train_rows = []
    for wire in TRAIN_WIRES:
        lan, broadband = train_s[("lan", wire)], train_s[("broadband", wire)]
        ratio = lan / broadband
        train_rows.append(f"| {wire} | {lan:.3f} | {broadband:.3f} | {ratio:.2f} | {'yes' if ratio >= TARGET else 'no'} "
                          f"| {step_bytes[wire] / 2**20:.2f} |")
    return "\n".join([
        f"## Over emulated links, {spec.name}, {HOPS} nodes\n",
        "Each node sits behind a relay emulating a link (tests/helpers/link.py: one-way delay per direction, "
        "bandwidth cap; the nodes announce the relays' addresses), so every client-to-node call crosses it; "
        "one swarm, the relays switch profile between measurements. *lan* 0.25 ms one-way at 1 Gbit/s, "
        "*broadband* 10 ms at 100 Mbit/s, *far* 50 ms at 20 Mbit/s. Measured in one run "
        f"({seconds / 60:.1f} min) on a shared, loaded 2-core machine (other processes used {load:.0%} of the "
        f"CPUs meanwhile): timings are noisy, compare within a table. Medians of {rounds[0]} rounds (generation) "
        f"and {rounds[1]} (fine-tuning) after a warm-up, the compared setups alternating.\n",
        f"Greedy generation ({PROMPT_LEN}-token prompt, {NEW_TOKENS} new tokens, batch 1): ms/token is the median "
        "gap between tokens. Today a decode step goes client -> node 1 -> client -> node 2 -> client, so the "
        f"bound is 2 x hops x one-way delay + the local compute per token ({local_ms:.1f} ms: transformers in "
        "this process). Bytes: serialized gRPC messages of one decode step through one hop, both ways.\n",
        "| link | activations on the wire | tokens/s | ms/token | bound ms | / bound | bytes/token/hop |",
        "|---|---|---|---|---|---|---|",
        *gen_rows,
        "",
        f"Fine-tuning step (LoRA r=8 on q_proj, v_proj; AdamW; batch {TRAIN_BATCH} x {TRAIN_SEQ} tokens): seconds per "
        "step at lan and at broadband (alternating within each round), and their ratio (lan s / broadband s: "
        "the goal is >= "
        f"{TARGET}). *bfloat16*: every activation and gradient as bfloat16 (`wire_dtype`, `train_wire`); "
        "*blockwise8*: training traffic as int8 with one float32 absmax scale per 64 values (`train_wire`). "
        "MiB: serialized messages of one step after the warm-up, both ways (LoRA weights and their gradients "
        "included, float32 in every row).\n",
        "| activations on the wire | lan s/step | broadband s/step | lan / broadband | >= 0.8 | MiB/step |",
        "|---|---|---|---|---|---|",
        *train_rows,
    ])


PIPELINE_SETUPS = {  # ClientConfig settings of the fine-tuning step compared at lan and broadband
    "float32, inputs resent, whole batch": {"backward_by_token": False},
    "float32, by token, whole batch": {},
    "float32, inputs resent, 4 micro-batches": {"backward_by_token": False, "micro_batches": 4},
    "float32, by token, 2 micro-batches": {"micro_batches": 2},
    "float32, by token, 4 micro-batches": {"micro_batches": 4},
    "blockwise8, inputs resent, whole batch": {"train_wire": "blockwise8", "backward_by_token": False},
    "blockwise8, by token, 2 micro-batches": {"train_wire": "blockwise8", "micro_batches": 2},
    "blockwise8, by token, 4 micro-batches": {"train_wire": "blockwise8", "micro_batches": 4},
}


def section_network_training(ctx: Context) -> str:
    """The LoRA step at lan and broadband with and without a Backward by token (the forward's inputs not
    sent again) and micro-batch pipelining (ClientConfig.micro_batches), alternating, in one swarm."""
    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    spec = ctx.models[0]
    path, rounds = checkpoint(spec), 3 if ctx.quick else 7
    ids = torch.randint(3, spec.vocab_size, (TRAIN_BATCH, TRAIN_SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with LocalSwarm(path, env=ctx.node_env, link=PROFILES["lan"]) as swarm:
        swarm.start_nodes(spans(spec.num_layers, HOPS))
        bases = {name: _connect(path, swarm.peers, **setup) for name, setup in PIPELINE_SETUPS.items()}
        try:
            steps = {name: step_fn(_peft(base), ids, mask) for name, base in bases.items()}
            step_bytes = {}
            for name, step in steps.items():
                conns = bases[name].chain.connections
                step()  # warm-up (and the adapter's first upload)
                before = conns.bytes_sent + conns.bytes_received
                step()
                step_bytes[name] = conns.bytes_sent + conns.bytes_received - before
            wait_for_quiet()
            log(f"network: fine-tuning step setups at lan and broadband, alternating, x{rounds}")
            kept, load, _ = interleaved_rounds({(profile, name): _on(swarm, PROFILES[profile], step)
                                                for name, step in steps.items() for profile in ("lan", "broadband")},
                                               rounds)
        finally:
            for base in bases.values():
                base.close()
    s = {key: statistics.median(t for t, _ in samples) for key, samples in kept.items()}
    rows = [f"| {name} | {s[('lan', name)]:.3f} | {s[('broadband', name)]:.3f} | "
            f"{s[('lan', name)] / s[('broadband', name)]:.2f} | "
            f"{'yes' if s[('lan', name)] / s[('broadband', name)] >= TARGET else 'no'} | "
            f"{step_bytes[name] / 2**20:.2f} |" for name in PIPELINE_SETUPS]
    return "\n".join([
        f"## Fine-tuning over emulated links: Backward by token and pipelined micro-batches, {spec.name}\n",
        f"The LoRA step of the table above (batch {TRAIN_BATCH} x {TRAIN_SEQ}, {HOPS} nodes behind relays; training "
        "activations and gradients as float32 or `train_wire=\"blockwise8\"`) with the Backward naming the "
        "activations its node kept instead of resending the hop's inputs (`inputs resent`: `ClientConfig(backward_by_token=False)`, as before), and with the batch's rows "
        "in micro-batches that flow through the nodes as a pipeline (`micro_batches`). Medians of "
        f"{rounds} rounds, every setup at both profiles alternating within a round; other processes used "
        f"{load:.0%} of the CPUs meanwhile. MiB: serialized messages of one step, both ways (each micro-batch's "
        "Backward answer carries the LoRA gradients, so they travel once per micro-batch).\n",
        f"| setup | lan s/step | broadband s/step | lan / broadband | >= {TARGET} | MiB/step |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
