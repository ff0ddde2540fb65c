"""swarmlm benchmarks: ``python -m bench.run`` (or ``make bench``) writes bench/README.md.

Every number comes from real processes on 127.0.0.1 started by ``tests.helpers.launch.LocalSwarm`` (and, for
concurrent clients, ``bench.clients.ClientPool``) and stopped before exit. Each benchmark is a
*section*: a function ``(Context) -> markdown`` listed in SECTIONS, living in bench/forward.py,
bench/generation.py, bench/concurrency.py, bench/batching.py, bench/recovery.py, bench/training.py,
bench/network.py (emulated links) or bench/quantized.py; bench/procs.py measures other processes' load and memory.
``--quick`` runs the tiny model only, with fewer repeats, and writes bench/work/README.quick.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from bench.common import BENCH_DIR, LLAMA_270M, TINY, WORK, Context, log
from bench.api import section_api
from bench.batching import section_batching
from bench.forward import section_forward_backward, section_node_memory
from bench.memory_moe import section_node_memory_moe
from bench.concurrency import section_concurrent_clients, section_replicas
from bench.generation import section_generation
from bench.network import section_network, section_network_training
from bench.procs import OtherLoad
from bench.quantized import section_quantized
from bench.recovery import section_recovery
from bench.speculation import section_speculation
from bench.training import section_training

SECTIONS: list[Callable[[Context], str]] = [
    section_forward_backward, section_node_memory, section_node_memory_moe, section_generation, section_concurrent_clients,
    section_batching, section_recovery, section_replicas, section_training, section_api, section_network,
    section_network_training, section_speculation, section_quantized,
]


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only, fewer repeats")
    parser.add_argument("--repeats", type=int, help="timed forward repeats for every model (default 15 tiny, 7 270M)")
    parser.add_argument("--gen-repeats", type=int, help="timed generate() repeats for every model (default 8 tiny, 5 270M)")
    parser.add_argument("--threads", type=int, help="torch threads everywhere (default: torch's own default, "
                        "untouched: torch.set_num_threads() is not called, OMP_NUM_THREADS not set)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", choices=[s.__name__ for s in SECTIONS],
                        help="run only these sections (then give --out: the default README holds them all)")
    parser.add_argument("--out", type=Path, help="markdown file (default bench/README.md, quick: bench/work/)")
    args = parser.parse_args(argv)
    if args.only and not args.out:
        parser.error("--only needs --out, so a partial run does not replace bench/README.md")
    if args.threads is not None:  # a plain run never calls it (it also turns MKL's dynamic threads off)
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    repeats = {TINY.name: 3 if args.quick else 15, LLAMA_270M.name: 7}
    gen_repeats = {TINY.name: 3 if args.quick else 8, LLAMA_270M.name: 5}
    ctx = Context(models=[TINY] if args.quick else [TINY, LLAMA_270M],
                  repeats={name: args.repeats or n for name, n in repeats.items()},
                  gen_repeats={name: args.gen_repeats or n for name, n in gen_repeats.items()},
                  node_env={"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
                  if args.threads else {},
                  quick=args.quick)
    out = args.out or (WORK / "README.quick.md" if args.quick else BENCH_DIR / "README.md")
    WORK.mkdir(parents=True, exist_ok=True)
    t0, other, parts = time.perf_counter(), OtherLoad(), []
    for section in SECTIONS:
        if args.only and section.__name__ not in args.only:
            continue
        log(f"section {section.__name__}")
        started = time.perf_counter()
        parts.append(section(ctx))
        log(f"section {section.__name__} took {time.perf_counter() - started:.0f}s")
    wall = time.perf_counter() - t0
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    intro = (
        "# swarmlm benchmarks\n\n"
        "What a swarm costs against plain transformers on the same machine, and how it survives a "
        "failure, with seeded Llama checkpoints (tiny: hidden 256, 8 blocks; ~270M: hidden 1024, 16 blocks) "
        "and real `node serve` processes on 127.0.0.1: forward and forward+backward time, one process vs "
        "the blocks split over two nodes; the resident memory of a node; greedy generation tokens/s and "
        "ms per token against local transformers (with the targets of the issue \"Inference sessions\"), "
        "what one more hop costs and where one token's time goes; aggregate tokens/s of 1, 4 and 8 "
        "concurrent client processes; the time to the next token after the node serving a running "
        "generation is SIGKILLed (issue \"A swarm that survives\"); 4 concurrent clients on 1 vs 2 "
        "replicas per span; a fine-tuning step, local PEFT vs the same adapter through the swarm; the OpenAI HTTP API (`swarm api`) against the Python client (time to first token, tokens/s, 8 concurrent streams); the swarm over emulated network links (a table per profile, lan / broadband / far: generation at 2 and 3 hops against the delay bound, bytes per token per hop, speculative decoding with prompt lookup and a local assistant model, a fine-tuning step with float32, 16-bit and 8-bit activations on the wire); speculative decoding over those links with a checkpoint trained to continue a quoted passage; and int8 nodes (`--quantize int8`) against float32 ones (span memory, decode tokens/s, LoRA step). Timings are medians over N repeats after one warm-up; where two setups are "
        "compared their calls alternate (or their windows do), so drifting background load affects both "
        "alike, and rounds during which other processes kept the CPUs busy are redone. Rerun with "
        "`make bench` or `python -m bench.run` (`--quick`: tiny model only, fewer repeats, written to "
        "bench/work/; `--only SECTION --out FILE` for one table); checkpoints are built once under "
        "`bench/work/`. Every process started is stopped at the end. Other work on the machine adds "
        "noise: compare ratios from one run, not seconds across runs.\n\n"
        f"Machine: nproc {os.cpu_count()} ({cpu}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, Python {platform.python_version()}; {threads} torch threads in "
        f"the benchmark process, every node and every client process ("
        f"{'--threads: OMP_NUM_THREADS' if args.threads else 'torch default'}; each node measures at start "
        f"how many of them its decode-sized and its larger steps run fastest on, see the generation section); "
        f"the generation table's local baseline runs in a fresh process with torch's default threads. "
        f"Run {time.strftime('%Y-%m-%d %H:%M')} in "
        f"{wall / 60:.1f} min{' (--quick)' if args.quick else ''}; other processes used {other.share():.0%} "
        "of the CPUs meanwhile.\n"
    )
    from bench.scale import kept_sections  # the scale sections (python -m bench.scale) stay as they were

    kept = kept_sections(out.read_text()) if out.exists() else ""
    out.write_text(intro + "\n" + "\n\n".join(parts) + "\n" + (f"\n{kept}\n" if kept else ""))
    log(f"wrote {out} in {wall:.0f}s")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
