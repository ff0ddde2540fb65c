"""Section: a node's resident memory for a mixture-of-experts checkpoint (issue 12: memory stays
proportional to the span, MoE included: a node loads only its blocks' experts)."""
from __future__ import annotations

import json
import time

from bench.common import WORK, Context, checkpoint_mib, log
from bench.forward import BATCH, SEQ, call_node
from bench.procs import process_tree, proc_mib

# Mixtral layout (one tensor per expert in the checkpoint, fused into 3-D expert tensors at load), sized so
# that the experts are most of the weights and a run takes about a minute
MOE = dict(family="mixtral", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=1024,
           vocab_size=32000, overrides={"num_local_experts": 8, "num_experts_per_tok": 2})
EXPERTS = ".block_sparse_moe.experts."


def moe_checkpoint():
    """The seeded MoE checkpoint under bench/work/, built once and reused."""
    from tests.helpers.checkpoints import build_checkpoint

    dest, want = WORK / "bench-mixtral-moe", json.dumps(MOE, sort_keys=True)
    if not ((dest / "bench-spec.json").is_file() and (dest / "bench-spec.json").read_text() == want):
        log(f"building checkpoint {dest}")
        build_checkpoint(dest, **MOE, tokenizer=False, seed=0)
        (dest / "bench-spec.json").write_text(want)
    return dest


def section_node_memory_moe(ctx: Context) -> str:
    """Resident memory of one `node serve` process hosting a quarter of an MoE checkpoint's blocks vs all."""
    from swarm.arch import LAYER_PREFIX
    from swarm.checkpoint import load_config
    from swarm.records import default_model_name, model_key
    from tests.helpers.launch import LocalSwarm

    path, blocks = moe_checkpoint(), MOE["num_layers"]
    key = model_key(default_model_name(str(path)), load_config(path))
    tensors = {name: mib for name, mib in _tensor_mib(path).items() if name.startswith(LAYER_PREFIX)}
    rows = []
    with LocalSwarm(path, env=ctx.node_env) as swarm:
        swarm.start_bootstrap()
        for n in (blocks // 4, blocks):
            mine = [m for name, m in tensors.items() if int(name[len(LAYER_PREFIX):].split(".")[0]) < n]
            experts = sum(m for name, m in tensors.items()
                          if EXPERTS in name and int(name[len(LAYER_PREFIX):].split(".")[0]) < n)
            t0 = time.perf_counter()
            address = swarm.start_node(f"0:{n}")
            started, pid = time.perf_counter() - t0, swarm.nodes[-1].pid
            mib = [proc_mib(pid, "status", "VmRSS")]
            for backward in (False, True):
                call_node(address, key, n, MOE["hidden_size"], backward)
                mib.append(proc_mib(pid, "status", "VmRSS"))
            mib += [proc_mib(pid, "status", field) for field in ("RssFile", "VmHWM")]
            mib.append(sum(proc_mib(p, "smaps_rollup", "Pss") for p in process_tree(pid)))
            log(f"MoE node 0:{n}: RSS ready, after fwd, after bwd, file-backed, peak, tree PSS: {[round(m) for m in mib]} MiB")
            rows.append(f"| {n} of {blocks} | {sum(mine):.0f} | {experts:.0f} | {started:.1f} | "
                        + " | ".join(f"{m:.0f}" for m in mib) + " |")
    experts_total = sum(m for name, m in tensors.items() if EXPERTS in name)
    return "\n".join([
        f"### The same for a mixture of experts: Mixtral layout, {blocks} blocks of {MOE['overrides']['num_local_experts']} "
        f"experts (top {MOE['overrides']['num_experts_per_tok']}), hidden {MOE['hidden_size']}, expert width "
        f"{MOE['intermediate_size']} (checkpoint {checkpoint_mib(path):.0f} MiB of float32 tensors, "
        f"experts {experts_total:.0f} MiB)\n",
        "Columns as above (`python -m bench.run --only section_node_memory_moe --out FILE`); *experts* = float32 "
        "size of the hosted blocks' expert tensors (one tensor per expert in the checkpoint, read only for the "
        f"node's blocks and fused into 3-D tensors as transformers does). Requests of {BATCH} x {SEQ} tokens.\n",
        "| blocks served | weights MiB | experts MiB | start s | RSS ready MiB | after fwd MiB | after bwd MiB "
        "| file-backed MiB | peak MiB | tree PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


def _tensor_mib(folder) -> dict[str, float]:
    """Tensor name -> float32 MiB, from the safetensors headers."""
    import math

    from safetensors import safe_open

    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            out.update({k: 4 * math.prod(f.get_slice(k).get_shape()) / 2**20 for k in f.keys()})
    return out
