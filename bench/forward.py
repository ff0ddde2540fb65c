"""Sections: forward and forward+backward time, local transformers vs the swarm; node memory."""
from __future__ import annotations

import time
from typing import Callable

import torch

from bench.clients import connect
from bench.common import Context, checkpoint, checkpoint_mib, log
from bench.procs import MAX_OTHER_LOAD, process_tree, proc_mib, time_interleaved, wait_for_quiet

BATCH, SEQ = 4, 64


# ---- section: forward and forward+backward, local vs swarm --------------------------------------
def forward_fn(model, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask).logits
    return run


def forward_backward_fn(model, ids: torch.Tensor, mask: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Loss backward w.r.t. inputs_embeds only (every weight is frozen), as in prompt tuning."""
    def run() -> torch.Tensor:
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        model(inputs_embeds=emb, attention_mask=mask, labels=ids).loss.backward()
        return emb.grad
    return run


def section_forward_backward(ctx: Context) -> str:
    """Local transformers vs the same model split in half over two local nodes, timed interleaved."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.launch import LocalSwarm

    rows = []
    for spec in ctx.models:
        path, half, n = checkpoint(spec), spec.num_layers // 2, ctx.repeats[spec.name]
        ids = torch.randint(3, spec.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        mask = torch.ones_like(ids)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().requires_grad_(False)
        params = sum(p.numel() for p in local.parameters())
        log(f"{spec.name}: {params / 1e6:.1f}M params; starting nodes 0:{half} and {half}:{spec.num_layers}")
        with LocalSwarm(path, env=ctx.node_env) as swarm:
            swarm.start_nodes([f"0:{half}", f"{half}:{spec.num_layers}"])
            remote = connect(path, swarm.peers)
            try:
                remote.requires_grad_(False)
                diffs = [(make(local, ids, mask)() - make(remote, ids, mask)()).abs().max().item()
                         for make in (forward_fn, forward_backward_fn)]
                log(f"{spec.name}: max |diff| logits {diffs[0]:.1e}, input grad {diffs[1]:.1e}; timing x{n}")
                wait_for_quiet()
                t, other, redone = time_interleaved({
                    "local fwd": forward_fn(local, ids, mask), "swarm fwd": forward_fn(remote, ids, mask),
                    "local fwd+bwd": forward_backward_fn(local, ids, mask),
                    "swarm fwd+bwd": forward_backward_fn(remote, ids, mask),
                }, n)
            finally:
                remote.close()
        del local
        lf, sf, lb, sb = t["local fwd"], t["swarm fwd"], t["local fwd+bwd"], t["swarm fwd+bwd"]
        rows.append(f"| {spec.name} | {params / 1e6:.1f}M | {n} | {lf:.3f} | {sf:.3f} | {lf / sf:.2f} | {lb:.3f} "
                    f"| {sb:.3f} | {lb / sb:.2f} | {other:.0%} ({redone}) | {diffs[0]:.0e} / {diffs[1]:.0e} |")
    return "\n".join([
        f"## Forward and forward+backward, batch {BATCH} x {SEQ} tokens, float32\n",
        "*local*: `AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)` in the benchmark "
        "process. *swarm*: `AutoDistributedModelForCausalLM` (embeddings, final norm, LM head in the "
        "benchmark process) with the blocks split in half over two `node serve` processes. Backward is "
        "w.r.t. `inputs_embeds` with every weight frozen. Ratio = local / swarm (1.00 = no overhead). A "
        "node keeps a forward's activations for the Backward that follows (`--activation-cache-mb`); a "
        "Backward that finds none recomputes the forward, which would cap fwd+bwd near 2/3. *other load*: mean share of the CPUs busy with anything but "
        f"this benchmark's processes during the kept rounds (from /proc/stat); rounds above {MAX_OTHER_LOAD:.0%} are redone, at most "
        "`repeats` times (count in brackets). Under such load the local baseline suffers most (its OpenMP "
        "threads spin at every op barrier while one of them is descheduled; nodes compute in short bursts "
        "after sleeping, which the scheduler favours), so the ratios then flatter the swarm; on a busy "
        "machine try `OMP_WAIT_POLICY=PASSIVE` or `--threads 1` (both apply to the nodes too). Last "
        "column: max abs difference local vs swarm of the logits / of the input gradient (sanity check).\n",
        "| model | params | repeats | local fwd s | swarm fwd s | ratio | local fwd+bwd s | swarm fwd+bwd s "
        "| ratio | other load (redone) | max diff logits / grad |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


# ---- section: node memory ------------------------------------------------------------------------
def call_node(address: str, key: str, blocks: int, hidden_size: int, backward: bool) -> None:
    """One Forward (or Backward) request of BATCH x SEQ tokens through blocks 0:``blocks`` of a node."""
    import grpc

    from client.transport import CHANNEL_OPTIONS, forward_request
    from proto import swarmlm_pb2 as pb
    from proto import swarmlm_pb2_grpc as pb_grpc
    from proto.tensors import serialize
    from swarm.spans import Span

    hidden = torch.randn(BATCH, SEQ, hidden_size, generator=torch.Generator().manual_seed(0))
    req = forward_request(key, Span(0, blocks), hidden, torch.ones(BATCH, SEQ, dtype=torch.int64), None)
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = pb_grpc.NodeStub(channel)
        if backward:
            stub.Backward(pb.BackwardRequest(inputs=req, grad_outputs=serialize(torch.ones_like(hidden))), timeout=300)
        else:
            stub.Forward(req, timeout=300)


def section_node_memory(ctx: Context) -> str:
    """Resident memory of one `node serve` process hosting a quarter of the blocks vs all of them."""
    from swarm.arch import LAYER_PREFIX
    from swarm.checkpoint import load_config
    from tests.helpers.launch import LocalSwarm
    from swarm.records import default_model_name, model_key

    spec = ctx.models[-1]
    path = checkpoint(spec)
    key = model_key(default_model_name(str(path)), load_config(path))
    block_mib, rows = checkpoint_mib(path, LAYER_PREFIX) / spec.num_layers, []
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_bootstrap()
        for n in (spec.num_layers // 4, spec.num_layers):
            t0 = time.perf_counter()
            address = swarm.start_node(f"0:{n}")
            started, pid = time.perf_counter() - t0, swarm.nodes[-1].pid
            mib = [proc_mib(pid, "status", "VmRSS")]
            for backward in (False, True):
                call_node(address, key, n, spec.hidden_size, backward)
                mib.append(proc_mib(pid, "status", "VmRSS"))
            mib += [proc_mib(pid, "status", key) for key in ("RssFile", "VmHWM")]
            mib.append(sum(proc_mib(p, "smaps_rollup", "Pss") for p in process_tree(pid)))
            log(f"node 0:{n}: RSS ready, after fwd, after bwd, file-backed, peak, tree PSS: {[round(m) for m in mib]} MiB")
            rows.append(f"| {n} of {spec.num_layers} | {n * block_mib:.0f} | {started:.1f} | "
                        + " | ".join(f"{m:.0f}" for m in mib) + " |")
    return "\n".join([
        f"## Node resident memory, {spec.name} (checkpoint {checkpoint_mib(path):.0f} MiB of float32 tensors, "
        f"{sum(f.stat().st_size for f in path.iterdir()) / 2**20:.0f} MiB on disk)\n",
        "VmRSS of the `node serve` process from /proc/<pid>/status: once it printed its address (ready), "
        f"after one Forward request and after one Backward request of {BATCH} x {SEQ} tokens; *file-backed* "
        "= its RssFile after both: shared libraries (the loader copies only its span's tensors out of the "
        "safetensors file into anonymous memory, so the file is not kept mapped and RSS at ready grows with "
        "the span); peak = VmHWM. "
        "*weights* = float32 size of the hosted blocks; *start* = seconds from launch to ready (bootstrap "
        "already up). *tree PSS* = proportional set size summed over the node and its child processes "
        "(p2pd), i.e. its memory cost without double-counting pages shared with other processes.\n",
        "| blocks served | weights MiB | start s | RSS ready MiB | after fwd MiB | after bwd MiB "
        "| file-backed MiB | peak MiB | tree PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
