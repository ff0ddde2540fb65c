"""Section: int8 nodes (`node serve --quantize int8`) against float32 ones: resident memory of a span,
greedy decode tokens/s and a LoRA fine-tuning step (QLoRA through the swarm)."""
from __future__ import annotations

import copy
import os
import time

import torch

from bench.common import Context, checkpoint, checkpoint_mib, log
from bench.forward import call_node
from bench.procs import proc_mib, time_interleaved, wait_for_quiet
from bench.training import step_fn

BATCH, SEQ = 4, 64  # fine-tuning batch
PROMPT, NEW = 16, 32  # generation: prompt tokens, new tokens
MODES = ("none", "int8")
LABEL = {"none": "float32", "int8": "int8 (torchao weight-only)"}


def _memory(ctx: Context, spec, path, key: str) -> tuple[list[str], dict[str, float]]:
    """VmRSS (ready, after a Forward, after a Backward) of nodes serving a quarter and all of the blocks, per
    mode; a span's memory = RSS(all) - RSS(quarter), so the process' own memory (Python, torch, torchao,
    gRPC, hivemind) cancels out: it is what the other 3/4 of the blocks cost."""
    from tests.helpers.launch import LocalSwarm

    quarter, rows, span_mib = spec.num_layers // 4, [], {}
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_bootstrap()
        for mode in MODES:
            rss = {}
            for n in (quarter, spec.num_layers):
                swarm.start_node(f"0:{n}", "--quantize", mode)
                proc = swarm.nodes[-1]
                mib = [proc_mib(proc.pid, "status", "VmRSS")]
                for backward in (False, True):
                    call_node(swarm.addresses[-1], key, n, spec.hidden_size, backward)
                    mib.append(proc_mib(proc.pid, "status", "VmRSS"))
                mib.append(proc_mib(proc.pid, "status", "VmHWM"))
                proc.stop()
                rss[n] = mib
                log(f"{mode} node 0:{n}: RSS ready, after fwd, after bwd, peak {[round(m) for m in mib]} MiB")
            span_mib[mode] = rss[spec.num_layers][0] - rss[quarter][0]
            for n in (quarter, spec.num_layers):
                rows.append(f"| {LABEL[mode]} | {n} of {spec.num_layers} | " + " | ".join(f"{m:.0f}" for m in rss[n]) + " |")
    return rows, span_mib


def _logit_gap(spec, path) -> tuple[float, float]:
    """Local transformers on the bench's prompt, float32 then quantized in place like the nodes: the relative
    L2 difference of the logits at the last position, and the float32 model's gap between its two likeliest
    tokens there relative to the logits' spread (a seeded random checkpoint has nearly flat logits, so
    int8's small difference can change the greedy token, and then every later one)."""
    from transformers import AutoModelForCausalLM

    from client.verify import relative_difference
    from node.quantize import quantize_linears

    gen = torch.randint(3, spec.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(input_ids=gen).logits[:, -1:]
        quantize_linears(model.model.layers, "int8")
        after = model(input_ids=gen).logits[:, -1:]
    top2 = before[0, 0].topk(2).values
    return relative_difference(after, before), float((top2[0] - top2[1]) / before.std())


def _threads(proc) -> str:
    """What a node process logged about the torch thread counts it measured at start."""
    line = next((line for line in proc.stderr_lines if "torch threads:" in line), "torch threads: ?")
    return line.split("torch threads:", 1)[1].split(";", 1)[0].strip()


def _speed(ctx: Context, spec, path) -> tuple[list[str], int, dict[str, str]]:
    """Decode tokens/s and LoRA step time through a float32 and an int8 node serving all blocks (one swarm,
    each client routing only through the quantization it asks for), calls alternating round by round."""
    from peft import LoraConfig

    from client import AutoDistributedModelForCausalLM, ClientConfig, get_peft_model
    from tests.helpers.launch import LocalSwarm

    n = ctx.gen_repeats[spec.name]
    gen = torch.randint(3, spec.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    ids = torch.randint(3, spec.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        for mode in MODES:  # one after the other: a node measures its thread counts while the other is idle
            swarm.start_nodes([f"0:{spec.num_layers}"], "--quantize", mode)  # (started together, one measured
            # while the other loaded its weights: 1 thread vs 2, and the speed ratio measured the thread counts)
        threads = {mode: _threads(proc) for mode, proc in zip(MODES, swarm.nodes[-2:])}
        log(f"quantized: node threads {threads}")
        models = {mode: AutoDistributedModelForCausalLM.from_pretrained(str(path), client_config=ClientConfig(
            initial_peers=tuple(swarm.peers), quantization=mode)) for mode in MODES}
        try:
            def generate(model):
                return lambda: model.generate(gen, max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)

            fns = {mode: generate(model) for mode, model in models.items()}
            outputs = {mode: fn() for mode, fn in fns.items()}  # warm-up
            for model in models.values():
                with torch.no_grad():
                    model(input_ids=gen)  # a forward: its route is kept (chain.last_route)
            routes = {mode: {h.server.quantization for h in m.model.layers.chain.last_route} for mode, m in models.items()}
            assert all(routes[mode] == {mode} for mode in MODES), routes
            log(f"quantized: decode x{n}")
            wait_for_quiet()
            decode, other_gen, redone_gen = time_interleaved(fns, n)
            peft = {mode: get_peft_model(model, copy.deepcopy(lora)) for mode, model in models.items()}
            steps = {mode: step_fn(model, ids, mask) for mode, model in peft.items()}
            for step in steps.values():
                step()  # warm-up and the adapter's first upload
            log(f"quantized: fine-tuning step x{n}")
            wait_for_quiet()
            step_s, other_step, redone_step = time_interleaved(steps, n)
        finally:
            for model in models.values():
                model.close()
    same = sum(int(a == b) for a, b in zip(outputs["none"][0].tolist(), outputs["int8"][0].tolist())) - PROMPT
    return [
        f"| decode tok/s (batch 1, {PROMPT}-token prompt, {NEW} new) | {NEW / decode['none']:.1f} | "
        f"{NEW / decode['int8']:.1f} | {decode['none'] / decode['int8']:.2f} | {other_gen:.0%} ({redone_gen}) |",
        f"| LoRA r=8 step s (batch {BATCH} x {SEQ}, AdamW) | {step_s['none']:.3f} | {step_s['int8']:.3f} | "
        f"{step_s['none'] / step_s['int8']:.2f} | {other_step:.0%} ({redone_step}) |",
    ], same, threads


def section_quantized(ctx: Context) -> str:
    from swarm.arch import LAYER_PREFIX
    from swarm.checkpoint import load_config
    from swarm.records import default_model_name, model_key

    spec = ctx.models[-1]
    path = checkpoint(spec)
    key = model_key(default_model_name(str(path)), load_config(path))
    started, loads = time.perf_counter(), [os.getloadavg()]
    memory_rows, span_mib = _memory(ctx, spec, path, key)
    loads.append(os.getloadavg())
    speed_rows, same, threads = _speed(ctx, spec, path)
    gap, margin = _logit_gap(spec, path)
    loads.append(os.getloadavg())
    load_text = ", ".join(f"{when} {' / '.join(f'{x:.1f}' for x in avg)}"
                          for when, avg in zip(("start", "after the memory table", "end"), loads))
    block_mib = checkpoint_mib(path, LAYER_PREFIX) / spec.num_layers
    ratio = span_mib["int8"] / span_mib["none"]
    log(f"section quantized: {time.perf_counter() - started:.0f}s; span memory int8/float32 {ratio:.2f}")
    three_quarters = spec.num_layers - spec.num_layers // 4
    return "\n".join([
        f"## int8 nodes vs float32, {spec.name}\n",
        "`node serve --quantize int8`: torchao's weight-only int8 (one scale per output row) on every Linear "
        "of the hosted blocks; norms stay float32; compute in float32. Measured on a 2-core machine that "
        "other work may share: timings are noisy, compare the ratios of one run. "
        f"Load average (1 / 5 / 15 min): {load_text}.\n",
        "### Resident memory of a span\n",
        "VmRSS of one `node serve` process serving a quarter or all of the blocks: ready, after one Forward and "
        f"after one Backward of 4 x 64 tokens; peak = VmHWM. *span* = RSS ready (all) - RSS ready (quarter): "
        f"what {three_quarters} blocks ({three_quarters * block_mib:.0f} MiB of float32 weights) cost, the "
        "process' own memory cancelling out. A Backward rebuilds each layer's float weight only for that "
        "layer's own backward step (node.quantize), so it adds one layer's float weights at a time.\n",
        "| weights | blocks served | RSS ready MiB | after fwd MiB | after bwd MiB | peak MiB |",
        "|---|---|---|---|---|---|",
        *memory_rows,
        "",
        f"Span memory: float32 {span_mib['none']:.0f} MiB, int8 {span_mib['int8']:.0f} MiB: "
        f"**{ratio:.2f}x** (goal <= 0.35x).\n",
        "### Decode and fine-tuning speed\n",
        "One swarm with a float32 and an int8 node each serving all blocks; two clients, "
        "`ClientConfig(quantization=\"none\")` and `ClientConfig(quantization=\"int8\")` (each route checked to "
        "use only its kind), their calls alternating round by round; medians after one warm-up; rounds with other "
        f"load over 10% redone. Greedy tokens equal between the two: {same} of {NEW} (this seeded random "
        f"checkpoint's logits are nearly flat: locally, int8 moves the last prompt position's logits by "
        f"{gap:.3f} relative L2 while float32's two likeliest tokens there are only {margin:.2f} standard "
        "deviations of the logits apart, so the first greedy token can differ and every later one with it; "
        "the tests' accuracy bounds are on logits). Thread counts each node measured at start: "
        + "; ".join(f"{LABEL[m]}: {t}" for m, t in threads.items()) + ".\n",
        "| measure | float32 | int8 | int8 speed vs float32 | other load (redone) |",
        "|---|---|---|---|---|",
        *speed_rows,
    ])
