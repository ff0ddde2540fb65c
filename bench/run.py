"""swarmlm benchmarks: ``python -m bench.run`` (or ``make bench``) writes bench/README.md.

Every number comes from real processes on 127.0.0.1 started by ``swarm.launch.LocalSwarm`` and
stopped before exit. Each benchmark is a *section*: a function ``(Context) -> markdown`` listed in
SECTIONS; a new benchmark (generation tokens/s, fine-tuning step time, ...) is one more function.
``--quick`` runs the tiny model only, with fewer repeats, and writes bench/work/README.quick.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
WORK = BENCH_DIR / "work"  # checkpoints (gitignored), reused between runs
BATCH, SEQ = 4, 64
MAX_OTHER_LOAD = 0.1  # a timing round during which other processes used more of the CPUs is redone


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int = 32000


TINY = ModelSpec("tiny", hidden_size=256, num_layers=8, num_heads=8, num_kv_heads=8, intermediate_size=688)
LLAMA_270M = ModelSpec("llama-270m", hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=16,
                       intermediate_size=2816)


@dataclass
class Context:
    models: list[ModelSpec]  # smallest first; node memory is measured on the last
    repeats: dict[str, int]  # timed repeats per model name, each after one warm-up
    node_env: dict[str, str]  # OMP/MKL thread count for nodes: the same as torch's in this process


def checkpoint(spec: ModelSpec) -> Path:
    """The seeded checkpoint for ``spec`` under bench/work/, built once and reused."""
    from client.tiny import build_checkpoint

    dest, want = WORK / f"bench-{spec.name}", json.dumps(asdict(spec), sort_keys=True)
    if not ((dest / "bench-spec.json").is_file() and (dest / "bench-spec.json").read_text() == want):
        log(f"building checkpoint {dest}")
        fields = {k: v for k, v in asdict(spec).items() if k != "name"}
        build_checkpoint(dest, **fields, tokenizer=False, seed=0)
        (dest / "bench-spec.json").write_text(want)
    return dest


def checkpoint_mib(folder: Path, prefix: str = "") -> float:
    """Float32 size of the checkpoint's tensors whose names start with ``prefix``, from the headers."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += sum(4 * math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix))
    return total / 2**20


# ---- processes: CPU used by everyone else, memory of a node --------------------------------------
def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds of it and of its reaped children) for every live process."""
    table, tick = {}, os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        try:
            f = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            table[int(entry.name)] = (int(f[1]), sum(int(x) for x in f[11:15]) / tick)
        except (OSError, IndexError, ValueError):
            continue
    return table


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (everything but idle and iowait), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int, table: dict[int, tuple[int, float]] | None = None) -> list[int]:
    """``pid`` and every live descendant (for a node: its p2pd daemon)."""
    table, tree, frontier = table or proc_table(), [pid], [pid]
    while frontier:
        frontier = [p for p, (parent, _) in table.items() if parent in frontier]
        tree += frontier
    return tree


def proc_mib(pid: int, file: str, key: str) -> float:
    """A KiB field (VmRSS, VmHWM, Pss, ...) of /proc/<pid>/status or smaps_rollup, in MiB; 0 if gone."""
    try:
        lines = Path(f"/proc/{pid}/{file}").read_text().splitlines()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith(f"{key}:")), 0.0)


class OtherLoad:
    """Share of the CPUs busy since construction with anything but this benchmark's process tree
    (other processes, short-lived ones included, the kernel, hypervisor steal): it skews the timings."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.mine0 = time.monotonic(), busy_seconds(), self._mine()

    @staticmethod
    def _mine() -> float:
        table = proc_table()
        return sum(table[pid][1] for pid in process_tree(os.getpid(), table) if pid in table)

    def share(self) -> float:
        other = (busy_seconds() - self.busy0) - (self._mine() - self.mine0)
        return max(other, 0.0) / ((time.monotonic() - self.t0) * (os.cpu_count() or 1))


def wait_for_quiet(max_wait: float = 90) -> None:
    """Wait up to ``max_wait`` s for a 3 s window in which other processes stay under MAX_OTHER_LOAD."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        load = OtherLoad()
        time.sleep(3)
        if (share := load.share()) <= MAX_OTHER_LOAD:
            return
        log(f"other processes use {share:.0%} of the CPUs; waiting (at most {max_wait:.0f}s) for a quieter machine")


# ---- section: forward and forward+backward, local vs swarm --------------------------------------
def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], float, int]:
    """Median seconds per callable over ``repeats`` rounds that call every callable in turn, after one
    warm-up round. A round during which other processes used over MAX_OTHER_LOAD of the CPUs is
    redone, at most ``repeats`` times. Returns (medians, mean other load of kept rounds, rounds redone)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    loads: list[float] = []
    rnd = dropped = 0
    while len(loads) < repeats:
        load, times = OtherLoad(), {}
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - t0
        share, verdict = load.share(), "warm-up" if rnd == 0 else "kept"
        if rnd and share > MAX_OTHER_LOAD and dropped < repeats:
            dropped, verdict = dropped + 1, "redone"
        elif rnd:
            loads.append(share)
            for name, t in times.items():
                samples[name].append(t)
        log(f"  round {rnd} ({verdict}, other load {share:.0%}): " + ", ".join(f"{k} {t:.3f}s" for k, t in times.items()))
        rnd += 1
    return {name: statistics.median(s) for name, s in samples.items()}, statistics.mean(loads), dropped


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

    from client import AutoDistributedModelForCausalLM
    from swarm.launch import LocalSwarm

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
            remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.peers)
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
        "node's backward is stateless and recomputes its forward, so even with free networking the "
        "fwd+bwd ratio is about 2/3, not 1. *other load*: mean share of the CPUs busy with anything but "
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
    from node.families import LAYER_PREFIX
    from node.loading import load_config
    from swarm.launch import LocalSwarm
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
        "= its RssFile after both: shared libraries plus the block weights, which are zero-copy views of the "
        "mmapped safetensors file paged in when first used (so RSS at ready hardly depends on the span); "
        "peak = VmHWM. "
        "*weights* = float32 size of the hosted blocks; *start* = seconds from launch to ready (bootstrap "
        "already up). *tree PSS* = proportional set size summed over the node and its child processes "
        "(p2pd), i.e. its memory cost without double-counting pages shared with other processes.\n",
        "| blocks served | weights MiB | start s | RSS ready MiB | after fwd MiB | after bwd MiB "
        "| file-backed MiB | peak MiB | tree PSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])


SECTIONS: list[Callable[[Context], str]] = [section_forward_backward, section_node_memory]


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed repeats for every model (default 15 tiny, 7 270M)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads everywhere")
    parser.add_argument("--out", type=Path, help="markdown file (default bench/README.md, quick: bench/work/)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeats = {TINY.name: 3 if args.quick else 15, LLAMA_270M.name: 7}
    ctx = Context(models=[TINY] if args.quick else [TINY, LLAMA_270M],
                  repeats={name: args.repeats or n for name, n in repeats.items()},
                  node_env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)})
    out = args.out or (WORK / "README.quick.md" if args.quick else BENCH_DIR / "README.md")
    WORK.mkdir(parents=True, exist_ok=True)
    t0, other, parts = time.perf_counter(), OtherLoad(), []
    for section in SECTIONS:
        log(f"section {section.__name__}")
        parts.append(section(ctx))
    wall = time.perf_counter() - t0
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    intro = (
        "# swarmlm benchmarks\n\n"
        "What a swarm costs against plain transformers on the same machine: forward and forward+backward "
        "time of a seeded Llama checkpoint run in one process vs split over two `node serve` processes "
        "on 127.0.0.1 (medians over N repeats after one warm-up; local and swarm calls alternate so "
        "drifting background load affects both alike), and the resident memory of a node. Rerun with "
        "`make bench` or `python -m bench.run` (`--quick`: tiny model only, fewer repeats, written to "
        "bench/work/); checkpoints are built once under `bench/work/`. Every process started is stopped "
        "at the end. Other work on the machine adds noise: compare ratios from one run, not seconds "
        "across runs.\n\n"
        f"Machine: nproc {os.cpu_count()} ({cpu}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; {args.threads} torch threads in "
        f"the local baseline and in every node (OMP_NUM_THREADS). Run {time.strftime('%Y-%m-%d %H:%M')} in "
        f"{wall / 60:.1f} min{' (--quick)' if args.quick else ''}; other processes used {other.share():.0%} "
        "of the CPUs meanwhile.\n"
    )
    out.write_text(intro + "\n" + "\n\n".join(parts) + "\n")
    log(f"wrote {out} in {wall:.0f}s")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
