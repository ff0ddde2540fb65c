"""Section: the swarm over emulated network links (issue 16), one table per link profile (lan /
broadband / far): greedy generation against the delay bound with each feature on and off (the
activations' wire format, speculative decoding, chained steps where the client has them), bytes per
token per hop, and a LoRA fine-tuning step with float32, 16-bit and blockwise 8-bit training traffic.

Each node sits behind a relay (tests/helpers/link.py) that delays every chunk by the profile's one-way
delay and caps the bandwidth, and announces the relay's address, so every call to a node crosses the
emulated link. One swarm per hop count serves every profile: the relays change profile between
measurements. Features that other branches add (``ClientConfig.chained_steps``, a micro-batch
training pipeline) get their rows when the field exists.
"""
from __future__ import annotations

import copy
import dataclasses
import statistics
import time

import torch

from bench.clients import PROMPT_LEN, Stamps, prompt
from bench.common import Context, checkpoint, log
from bench.generation import spans
from bench.procs import interleaved_rounds, wait_for_quiet
from bench.network_tables import tables
from bench.training import step_fn

HOPS = 2
NEW_TOKENS = 24  # per generate(): enough decode steps for a median at 50 ms one-way
SPEC_TOKENS = 32  # per speculative generate(): its ms/token is the whole call's time / SPEC_TOKENS
LOOKUP = 4  # prompt_lookup_num_tokens
TRAIN_BATCH, TRAIN_SEQ = 4, 64
TARGET = 0.8  # the goal: a fine-tuning step at broadband >= 0.8x the same step at lan (steps/s)
BOUND_GOAL = 1.15  # the goal at far, 2 and 3 hops: ms/token <= 1.15 x the (chained) bound
PROFILE_NAMES = ("lan", "broadband", "far")
MICRO_BATCH_FIELDS = ("micro_batches",)  # the training pipeline's ClientConfig field (helper trainnet)


def _client_fields() -> set[str]:
    from client import ClientConfig

    return {f.name for f in dataclasses.fields(ClientConfig)}


def gen_setups(hops: int) -> dict[str, dict]:
    """Generation setups -> ClientConfig fields: the wire formats (2 hops), chained steps if present."""
    wires = {"float32": {}, "bfloat16": {"wire_dtype": "bfloat16"}, "float16": {"wire_dtype": "float16"}}
    setups = dict(wires) if hops == HOPS else {"float32": {}}
    if "chained_steps" in _client_fields():  # on by default: the rows without "chained" turn it off
        setups = {name: {**fields, "chained_steps": False} for name, fields in setups.items()}
        setups["float32, chained"] = {"chained_steps": True}
        if hops == HOPS:
            setups["bfloat16, chained"] = {"wire_dtype": "bfloat16", "chained_steps": True}
    return setups


def train_setups() -> dict[str, dict]:
    """Fine-tuning setups -> ClientConfig fields: float32, bfloat16, blockwise8 (+ micro-batches if present)."""
    setups = {"float32": {}, "bfloat16": {"wire_dtype": "bfloat16", "train_wire": "bfloat16"},
              "blockwise8": {"train_wire": "blockwise8"}}
    field = next((f for f in MICRO_BATCH_FIELDS if f in _client_fields()), None)
    if field is not None:
        setups[f"float32, {field}={TRAIN_BATCH}"] = {field: TRAIN_BATCH}
        setups[f"blockwise8, {field}={TRAIN_BATCH}"] = {"train_wire": "blockwise8", field: TRAIN_BATCH}
    return setups


def repetitive_prompt(vocab_size: int) -> torch.Tensor:
    """A quoted passage: 8 seeded token ids repeated 4 times (prompt lookup finds drafts in it)."""
    return torch.randint(3, vocab_size, (1, 8), generator=torch.Generator().manual_seed(1)).repeat(1, 4)


def truncated_assistant(path, layers: int):
    """The target checkpoint cut to its first ``layers`` blocks (same embeddings, norm, head): a local
    draft model with the target's vocabulary that agrees with it often."""
    from transformers import AutoModelForCausalLM, logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the dropped blocks' weights are "unused": expected
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, num_hidden_layers=layers).eval()
    finally:
        logging.set_verbosity(verbosity)


def _generate(model, ids: torch.Tensor, new_tokens: int = NEW_TOKENS):
    """A callable: one greedy generate(); returns the decode-step gaps (seconds)."""
    def run():
        stamps = Stamps()
        with torch.no_grad():
            model.generate(ids, streamer=stamps, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                           eos_token_id=None)
        return stamps.gaps()
    return run


def _speculate(model, ids: torch.Tensor, **draft):
    """A callable: one greedy generate() of SPEC_TOKENS with ``draft`` (none: plain); returns the tokens."""
    def run():
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=SPEC_TOKENS, do_sample=False, pad_token_id=0,
                                  eos_token_id=None, **draft)
    return run


def _bytes_per_token_per_hop(model, ids: torch.Tensor, hops: int) -> float:
    """Bytes (both ways) per decode step per hop: a generate of NEW_TOKENS minus one of 1 (the prefill)."""
    conns = model.chain.connections
    counts = []
    for new in (1, NEW_TOKENS):
        before = conns.bytes_sent + conns.bytes_received
        _generate(model, ids, new)()
        counts.append(conns.bytes_sent + conns.bytes_received - before)
    return (counts[1] - counts[0]) / (NEW_TOKENS - 1) / hops


def _connect(path, peers, **fields):
    from bench.clients import connect
    from client import ClientConfig

    return connect(path, peers, client_config=ClientConfig(initial_peers=tuple(peers), **fields))


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


def _median_ms(rounds) -> float:
    return 1000 * statistics.median(statistics.median(g) for _, g in rounds)


def _measure_generation(swarm, models, ids, n, hops, gen_ms, loads) -> None:
    """gen_ms[(hops, profile, setup)]: median ms between tokens, every setup alternating, per profile."""
    from tests.helpers.link import PROFILES

    for profile in PROFILE_NAMES:
        swarm.set_link(PROFILES[profile])
        log(f"network: {hops} hops, {profile}: generation x{n}")
        kept, other, _ = interleaved_rounds({name: _generate(m, ids) for name, m in models.items()}, n)
        loads.append(other)
        for name, rounds in kept.items():
            gen_ms[(hops, profile, name)] = _median_ms(rounds)


def _measure_speculative(swarm, models, drafts, ids, n, spec, loads) -> None:
    """spec[(profile, setup, draft)] = (ms per new token over the whole call, tokens == plain greedy)."""
    from tests.helpers.link import PROFILES

    reference = drafts.pop("reference")
    for profile in PROFILE_NAMES:
        swarm.set_link(PROFILES[profile])
        log(f"network: {profile}: speculative decoding x{n}")
        fns = {(setup, draft): _speculate(m, ids, **kw) for setup, m in models.items() for draft, kw in drafts.items()}
        kept, other, _ = interleaved_rounds(fns, n)
        loads.append(other)
        for key, rounds in kept.items():
            same = all(torch.equal(out, reference) for _, out in rounds)
            spec[(profile, *key)] = (1000 * statistics.median(t for t, _ in rounds) / SPEC_TOKENS, same)


def _swarm_2_hops(ctx, spec_model, path, n, train_n, ids, results) -> None:
    """Everything at 2 hops: generation setups, speculative decoding, bytes, the fine-tuning step."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    loads = results["loads"]
    train_ids = torch.randint(3, spec_model.vocab_size, (TRAIN_BATCH, TRAIN_SEQ),
                              generator=torch.Generator().manual_seed(0))
    train_mask = torch.ones_like(train_ids)
    target = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    rep = repetitive_prompt(spec_model.vocab_size)
    half = spec_model.num_layers // 2
    cautious = truncated_assistant(path, half)  # transformers' default: a draft stops below 0.4 confidence
    assistant, itself = truncated_assistant(path, half), copy.deepcopy(target)
    for model in (assistant, itself):  # a random tiny model is never 0.4 sure: draft the full length
        model.generation_config.assistant_confidence_threshold = 0.0
    drafts = {"reference": None, "none": {}, f"prompt lookup ({LOOKUP})": {"prompt_lookup_num_tokens": LOOKUP},
              f"assistant: first {half} of {spec_model.num_layers} blocks, confidence threshold 0.4 (default)":
                  {"assistant_model": cautious},
              f"assistant: first {half} of {spec_model.num_layers} blocks, threshold 0": {"assistant_model": assistant},
              "assistant: the target itself, threshold 0 (upper bound)": {"assistant_model": itself}}
    drafts["reference"] = _speculate(target, rep)()
    with LocalSwarm(path, env=ctx.node_env, link=PROFILES["lan"]) as swarm:
        swarm.start_nodes(spans(spec_model.num_layers, HOPS))
        opened = []
        try:
            gen = {name: _connect(path, swarm.peers, **f) for name, f in gen_setups(HOPS).items()}
            opened += gen.values()
            bases = {name: _connect(path, swarm.peers, **f) for name, f in train_setups().items()}
            opened += bases.values()
            train = {name: _peft(base) for name, base in bases.items()}
            results["per_hop"] = {name: _bytes_per_token_per_hop(m, ids, HOPS) for name, m in gen.items()}
            steps = {name: step_fn(m, train_ids, train_mask) for name, m in train.items()}
            for name, step in steps.items():
                conns = bases[name].chain.connections
                step()  # warm-up (and the adapter's first upload)
                before = conns.bytes_sent + conns.bytes_received
                step()
                results["step_bytes"][name] = conns.bytes_sent + conns.bytes_received - before
            wait_for_quiet()
            _measure_generation(swarm, gen, ids, n, HOPS, results["gen_ms"], loads)
            spec_clients = {name: gen[name] for name in gen if name in ("float32", "float32, chained")}
            _measure_speculative(swarm, spec_clients, drafts, rep, n, results["spec"], loads)
            log(f"network: fine-tuning steps at every profile, alternating, x{train_n}")
            kept, other, _ = interleaved_rounds({(profile, name): _on(swarm, PROFILES[profile], step)
                                                 for name, step in steps.items() for profile in PROFILE_NAMES},
                                                train_n)
            loads.append(other)
            for key, rounds in kept.items():
                results["train_s"][key] = statistics.median(t for t, _ in rounds)
        finally:
            for m in opened:
                m.close()


def _swarm_3_hops(ctx, spec_model, path, n, ids, results) -> None:
    """Generation at 3 hops (float32, chained if present), for the goal at far."""
    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    with LocalSwarm(path, env=ctx.node_env, link=PROFILES["lan"]) as swarm:
        swarm.start_nodes(spans(spec_model.num_layers, 3))
        gen = {name: _connect(path, swarm.peers, **f) for name, f in gen_setups(3).items()}
        try:
            wait_for_quiet()
            _measure_generation(swarm, gen, ids, n, 3, results["gen_ms"], results["loads"])
        finally:
            for m in gen.values():
                m.close()


def section_network(ctx: Context) -> str:
    import os

    from transformers import AutoModelForCausalLM

    spec = ctx.models[0]
    path, n = checkpoint(spec), 3 if ctx.quick else 5
    train_n = 3 if ctx.quick else 5
    ids = prompt(spec.vocab_size)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
    started, load_avg = time.monotonic(), []
    results = {"gen_ms": {}, "spec": {}, "train_s": {}, "step_bytes": {}, "per_hop": {}, "loads": []}
    wait_for_quiet()
    local_gaps, _, _ = interleaved_rounds({"local": _generate(local, ids)}, n)
    local_ms = _median_ms(local_gaps["local"])
    _swarm_2_hops(ctx, spec, path, n, train_n, ids, results)
    load_avg.append(os.getloadavg()[0])
    _swarm_3_hops(ctx, spec, path, n, ids, results)
    load_avg.append(os.getloadavg()[0])
    results["other"] = statistics.mean(results["loads"])
    return tables(spec, (n, train_n), local_ms, results, max(load_avg), time.monotonic() - started)



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
