"""The local baseline as a user would run it: plain ``AutoModelForCausalLM.generate()`` in a fresh process
with torch's default threads, nothing else loaded (no swarm client, no DHT, no event loop threads).

``python -m bench.plain PATH`` loads the checkpoint, warms up with one generation, prints ``ready``, then
for each ``go`` line on stdin runs the benchmark's greedy generation once and prints, as JSON, its wall
seconds (timed inside the worker), the decode-step gaps and the tokens. ``PlainLocal`` drives it.

Why a separate process: timed in the benchmark process (which also holds the swarm clients, their DHT
peers and event loops) the local baseline ran slower than the same call in a fresh process, which
flattered the swarm (see bench/README.md, "local baseline").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from bench.common import BENCH_DIR


def serve(path: str, vocab_size: int) -> None:
    from transformers import AutoModelForCausalLM

    from bench.clients import generate_fn, prompt

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    run = generate_fn(model, prompt(vocab_size))
    run()  # warm-up
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t0 = time.perf_counter()
        out, gaps = run()
        seconds = time.perf_counter() - t0
        print(json.dumps({"seconds": seconds, "gaps": gaps, "tokens": out.tolist(),
                          "threads": torch.get_num_threads()}), flush=True)


class PlainLocal:
    """A ``python -m bench.plain`` worker. Calling it runs one generation there and returns
    (sequences, decode-step gaps, seconds measured in the worker). Use as a context manager."""

    def __init__(self, path: Path, vocab_size: int, env: dict[str, str] | None = None):
        from bench.clients import _Worker

        pythonpath = os.pathsep.join(filter(None, [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH")]))
        self.worker = _Worker([sys.executable, "-m", "bench.plain", str(path), "--vocab-size", str(vocab_size)],
                              {**(os.environ if env is None else env), "PYTHONPATH": pythonpath})
        self.threads: int | None = None
        try:
            if (line := self.worker.read(timeout=300)) != "ready":
                raise RuntimeError(f"plain local worker said {line!r}, not ready")
        except BaseException:
            self.close()
            raise

    def __call__(self) -> tuple[torch.Tensor, list[float], float]:
        self.worker.send("go")
        result = json.loads(self.worker.read(timeout=600))
        self.threads = result["threads"]
        return torch.tensor(result["tokens"]), result["gaps"], result["seconds"]

    def close(self) -> None:
        self.worker.stop()

    def __enter__(self) -> "PlainLocal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.plain", description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    serve(args.path, args.vocab_size)
