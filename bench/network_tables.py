"""The markdown of bench/network.py's section: one block of tables per link profile, then the goals."""
from __future__ import annotations

from bench.clients import PROMPT_LEN
from tests.helpers.link import PROFILES


def _bound(hops: int, delay_ms: float, local_ms: float, chained: bool) -> float:
    """Per-hop steps: 2 x hops one-way delays per token; chained: hops + 1; plus the local compute."""
    return (hops + 1 if chained else 2 * hops) * delay_ms + local_ms


def _generation(net, profile, local_ms, results) -> list[str]:
    p = PROFILES[profile]
    rows = ["| hops | setup | tokens/s | ms/token | bound ms | / bound | bytes/token/hop |", "|---|---|---|---|---|---|---|"]
    for (hops, prof, setup), ms in results["gen_ms"].items():
        if prof != profile:
            continue
        bound = _bound(hops, p.delay * 1000, local_ms, "chained" in setup)
        per_hop = results["per_hop"].get(setup) if hops == net.HOPS else None
        rows.append(f"| {hops} | {setup} | {1000 / ms:.1f} | {ms:.1f} | {bound:.1f} | {ms / bound:.2f} | "
                    f"{f'{per_hop:,.0f}' if per_hop is not None else '-'} |")
    return rows


def _speculative(profile, results) -> list[str]:
    rows = ["| client | draft | tokens/s | ms/token | speed-up | tokens == greedy |", "|---|---|---|---|---|---|"]
    spec = {k[1:]: v for k, v in results["spec"].items() if k[0] == profile}
    for (setup, draft), (ms, same) in spec.items():
        plain = spec[(setup, "none")][0]
        rows.append(f"| {setup} | {draft} | {1000 / ms:.1f} | {ms:.1f} | {plain / ms:.2f}x | {'yes' if same else 'NO'} |")
    return rows


def _training(net, profile, results) -> list[str]:
    rows = ["| activations on the wire | s/step | lan s / this s | MiB/step |", "|---|---|---|---|"]
    for (prof, setup), s in results["train_s"].items():
        if prof != profile:
            continue
        ratio = results["train_s"][("lan", setup)] / s
        rows.append(f"| {setup} | {s:.3f} | {ratio:.2f} | {results['step_bytes'][setup] / 2**20:.2f} |")
    return rows


def _goals(net, local_ms, results) -> list[str]:
    far = PROFILES["far"].delay * 1000
    lines = []
    for hops in (2, 3):
        rows = {setup: ms for (h, prof, setup), ms in results["gen_ms"].items() if h == hops and prof == "far"
                and setup.startswith("float32")}
        setup = min(rows, key=rows.get)
        bound = _bound(hops, far, local_ms, chained=True)
        ratio = rows[setup] / bound
        lines.append(f"- far, {hops} hops, ms/token <= {net.BOUND_GOAL} x ((hops + 1) x 50 ms + compute) = "
                     f"{net.BOUND_GOAL * bound:.1f} ms: best float32 row ({setup}) {rows[setup]:.1f} ms = "
                     f"{ratio:.2f} x: **{'met' if ratio <= net.BOUND_GOAL else 'not met'}**")
    for setup in dict.fromkeys(s for _, s in results["train_s"]):
        ratio = results["train_s"][("lan", setup)] / results["train_s"][("broadband", setup)]
        lines.append(f"- fine-tuning step at broadband >= {net.TARGET} x lan, {setup}: {ratio:.2f} (lan s / broadband s): "
                     f"**{'met' if ratio >= net.TARGET else 'not met'}**")
    return lines


def tables(spec, rounds, local_ms, results, load_avg, seconds) -> str:
    import bench.network as net

    parts = [
        f"## Over emulated links, {spec.name}, {net.HOPS} and 3 nodes\n",
        "Each node sits behind a relay emulating a link (tests/helpers/link.py: one-way delay per direction, "
        "bandwidth cap; the nodes announce the relays' addresses), so every call to a node crosses it; one "
        "swarm per hop count, the relays switch profile between measurements. Measured in one run "
        f"(`python -m bench.run --only section_network`, {seconds / 60:.1f} min) on a shared 2-core machine "
        f"(1-min load average up to {load_avg:.1f}; other processes used {results['other']:.0%} of the CPUs "
        f"during the kept rounds): timings are noisy, compare within a table. Medians of {rounds[0]} rounds "
        f"(generation) and {rounds[1]} (fine-tuning) after a warm-up, the compared setups alternating.\n",
        f"*Generation*: greedy, {PROMPT_LEN}-token random prompt, {net.NEW_TOKENS} new tokens, batch 1; ms/token "
        "is the median gap between tokens. Per-hop steps go client -> node 1 -> client -> node 2 -> client: "
        "bound 2 x hops x one-way delay + the local compute per token "
        f"({local_ms:.1f} ms: transformers in this process); chained steps (rows marked so, when the client "
        "has `chained_steps`): (hops + 1) x delay + compute. bytes/token/hop: serialized gRPC messages of one "
        "decode step through one hop, both ways (2 hops).\n",
        f"*Speculative decoding*: 2 hops, float32, greedy, a repetitive {4 * 8}-token prompt (8 tokens "
        f"quoted 4 times), {net.SPEC_TOKENS} new tokens; ms/token = the whole generate() call / "
        f"{net.SPEC_TOKENS} (drafts arrive in bursts; prefill included, so the plain row is slightly above "
        "its generation-table figure). A draft is checked in one multi-token step; rejected positions "
        "are dropped by the nodes with the next step (no extra round trip). *tokens == greedy*: every "
        "round's tokens equal local transformers' plain greedy ones. The assistant rows use a local model "
        "(the target checkpoint cut to its first blocks; the target itself as an upper bound: every "
        "draft accepted, the assistant's compute still paid).\n",
        "*Fine-tuning step*: LoRA r=8 on q_proj, v_proj; AdamW; batch "
        f"{net.TRAIN_BATCH} x {net.TRAIN_SEQ} tokens; the profiles alternate within each round. *bfloat16*: "
        "every activation and gradient as bfloat16 (`wire_dtype`, `train_wire`); *blockwise8*: training "
        "traffic as int8 with one float32 absmax scale per 64 values (`train_wire`). MiB: serialized messages "
        "of one step after the warm-up, both ways (LoRA weights and their gradients included, float32 in "
        "every row).\n",
    ]
    for profile in net.PROFILE_NAMES:
        p = PROFILES[profile]
        parts += [f"### {profile}: {p.delay * 1000:g} ms one-way, {p.bandwidth / 1e6:g} Mbit/s\n",
                  *_generation(net, profile, local_ms, results), "", *_speculative(profile, results), "",
                  *_training(net, profile, results), ""]
    parts += ["### Goals (issue 16)\n", *_goals(net, local_ms, results)]
    return "\n".join(parts)
