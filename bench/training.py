"""Section: fine-tuning step time and bytes per step, local PEFT vs the same adapter through the swarm."""
from __future__ import annotations

import copy
from typing import Callable

import torch

from bench.common import Context, checkpoint, log
from bench.procs import time_interleaved, wait_for_quiet

BATCH, SEQ = 4, 64
TARGET = 0.95  # issue 15 ("Faster than Petals"): swarm steps/s >= 0.95x local on loopback (an older issue asked 0.8)


def _configs():
    from peft import LoraConfig, PromptTuningConfig

    return {
        "LoRA r=8 (q_proj, v_proj)": LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"]),
        "prompt tuning (16 virtual tokens)": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
    }


def step_fn(model, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    """One AdamW step of the adapter: zero_grad, forward with labels, backward, step."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        opt.zero_grad()
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
    return run


def section_training(ctx: Context) -> str:
    from peft import get_peft_model as local_peft
    from transformers import AutoModelForCausalLM

    from client import AutoDistributedModelForCausalLM, get_peft_model
    from tests.helpers.launch import LocalSwarm

    spec = ctx.models[-1]
    path, half, n = checkpoint(spec), spec.num_layers // 2, ctx.repeats[spec.name]
    ids = torch.randint(3, spec.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    rows = []
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_nodes([f"0:{half}", f"{half}:{spec.num_layers}"])
        for method, config in _configs().items():
            local = local_peft(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), copy.deepcopy(config))
            remote = get_peft_model(AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.peers),
                                    copy.deepcopy(config))
            try:
                local_step, remote_step = step_fn(local, ids, mask), step_fn(remote, ids, mask)
                local_step(), remote_step()  # warm-up (and the adapter's first upload)
                conns = remote.base_model.chain.connections
                sent, received = conns.bytes_sent, conns.bytes_received
                remote_step()
                sent, received = conns.bytes_sent - sent, conns.bytes_received - received
                log(f"training {method}: {sent / 2**20:.2f} MiB sent per step; timing x{n}")
                wait_for_quiet()
                t, other, redone = time_interleaved({"local": local_step, "swarm": remote_step}, n)
            finally:
                remote.base_model.close()
            ratio = t["local"] / t["swarm"]
            rows.append(f"| {method} | {t['local']:.3f} | {t['swarm']:.3f} | {ratio:.2f} | "
                        f"{'yes' if ratio >= TARGET else 'no'} | {sent / 2**20:.2f} | {received / 2**20:.2f} | "
                        f"{other:.0%} ({redone}) |")
            del local
    return "\n".join([
        f"## Fine-tuning step, {spec.name}, batch {BATCH} x {SEQ} tokens, float32\n",
        "One AdamW step (zero_grad, forward with labels, backward, step) of a fresh adapter: *local* is "
        "transformers + PEFT in the benchmark process; *swarm* is `get_peft_model` on "
        "`AutoDistributedModelForCausalLM` with the blocks split in half over two `node serve` processes "
        "(the client holds the adapter; nodes apply LoRA weights sent with the request and return their "
        "gradients; nodes keep forward activations for the following backward instead of recomputing). "
        f"Ratio = local s / swarm s; target >= {TARGET}. Bytes: serialized gRPC messages of one step "
        "(after the warm-up step).\n",
        f"| method | local s/step | swarm s/step | ratio | >= {TARGET}x | MiB sent/step | MiB received/step "
        "| other load (redone) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ])
