"""Generation helpers shared by the sections, and concurrent clients as separate processes.

``ClientPool`` starts N processes, each ``python -m bench.clients`` with its own
``AutoDistributedModelForCausalLM`` (separate processes, so the clients do not share one GIL). Each
worker warms up with one generation, prints ``ready``, then on ``go T0 T1`` generates 64-token
replies back to back from T0 until T1 (CLOCK_MONOTONIC is system-wide) and prints, as JSON, when
every token arrived and which nodes each session used. Tokens that arrive inside [T0, T1] count.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bench.common import BENCH_DIR

PROMPT_LEN, NEW_TOKENS = 16, 64
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)


def prompt(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """A batch-1 prompt of PROMPT_LEN random token ids."""
    return torch.randint(3, vocab_size, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))


class Stamps(BaseStreamer):
    """Records when each new token arrives (generate() first puts the prompt: not a token)."""

    def __init__(self) -> None:
        self.calls, self.times = 0, []

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:
            self.times.append(time.monotonic())

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        """Seconds between consecutive tokens: decode steps only (the first token follows the prefill)."""
        return [b - a for a, b in zip(self.times, self.times[1:])]


def generate_fn(model, ids: torch.Tensor, **extra):
    """A callable running one greedy generate() of NEW_TOKENS; returns (sequences, decode-step gaps)."""
    def run():
        stamps = Stamps()
        with torch.no_grad():
            out = model.generate(ids, streamer=stamps, **GREEDY, **extra)
        return out, stamps.gaps()
    return run


def connect(path, peers, attempts: int = 3, **kwargs):
    """``AutoDistributedModelForCausalLM.from_pretrained``, retried: on a loaded machine the client's
    DHT peer sometimes fails to reach the bootstrap peer in time (DHTStartError)."""
    from client import AutoDistributedModelForCausalLM
    from swarm.dht import DHTStartError

    for attempt in range(attempts):
        try:
            return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers, **kwargs)
        except DHTStartError as e:
            if attempt + 1 == attempts:
                raise
            print(f"[bench] client could not join the swarm ({e}); retrying", file=sys.stderr, flush=True)
            time.sleep(2)


# ---- the worker process -----------------------------------------------------------------------
class Deadline(StoppingCriteria):
    """Ends a generation once the measuring window is over (its tokens would not count)."""

    def __init__(self, until: float):
        self.until = until

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), time.monotonic() > self.until, dtype=torch.bool)


def worker(path: str, peers: list[str], seed: int, vocab_size: int) -> None:
    model = connect(path, peers)
    ids = prompt(vocab_size, seed)
    try:
        model.generate(ids, **GREEDY)  # warm-up: connections, DHT view, first session
        print("ready", flush=True)
        for line in sys.stdin:
            cmd = line.split()
            if not cmd or cmd[0] != "go":
                break
            t0, t1 = float(cmd[1]), float(cmd[2])
            time.sleep(max(0.0, t0 - time.monotonic()))
            gens, routes = [], []
            while time.monotonic() < t1:
                stamps = Stamps()
                with model.inference_session(max_length=PROMPT_LEN + NEW_TOKENS) as sess:
                    model.generate(ids, session=sess, streamer=stamps,
                                   stopping_criteria=StoppingCriteriaList([Deadline(t1)]), **GREEDY)
                    routes.append([s.hop.server.address for s in getattr(sess, "_streams", [])])
                gens.append(stamps.times)
            print(json.dumps({"gens": gens, "routes": routes}), flush=True)
    finally:
        model.close()


# ---- the driver -------------------------------------------------------------------------------
@dataclass
class Window:
    clients: int
    seconds: float
    tokens: int  # arrived inside the window, all clients together
    token_ms: float  # median decode-step gap over every client's generations
    first_hops: Counter  # first-hop node address -> sessions that started there

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


class _Worker:
    def __init__(self, argv: list[str], env: dict[str, str]):
        self.log = tempfile.TemporaryFile(mode="w+")
        self.popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                      text=True, env=env, cwd=BENCH_DIR.parent)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            line = None
        if line is None:
            self.log.seek(0)
            tail = " | ".join(self.log.read().splitlines()[-5:])
            raise RuntimeError(f"client worker {self.popen.pid} failed or hung; stderr: {tail}")
        return line

    def send(self, line: str) -> None:
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                self.send("exit")
                self.popen.stdin.close()
                self.popen.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.popen.send_signal(signal.SIGKILL)
                self.popen.wait(10)
        self.log.close()


class ClientPool:
    """``n`` client processes on one swarm. Use as a context manager: every worker is stopped."""

    def __init__(self, path: Path, peers: list[str], n: int, env: dict[str, str], vocab_size: int):
        pythonpath = os.pathsep.join(filter(None, [str(BENCH_DIR.parent), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, **env, "PYTHONPATH": pythonpath}
        self.workers: list[_Worker] = []
        try:
            for i in range(n):
                argv = [sys.executable, "-m", "bench.clients", str(path), "--seed", str(i),
                        "--vocab-size", str(vocab_size), "--peers", *peers]
                self.workers.append(_Worker(argv, env))
            for w in self.workers:
                if (line := w.read(timeout=300)) != "ready":
                    raise RuntimeError(f"client worker said {line!r}, not ready")
        except BaseException:
            self.close()
            raise

    def window(self, clients: int, seconds: float) -> Window:
        """The first ``clients`` workers generate for ``seconds`` at once; what arrived in the window."""
        chosen = self.workers[:clients]
        t0 = time.monotonic() + 0.3
        t1 = t0 + seconds
        for w in chosen:
            w.send(f"go {t0} {t1}")
        results = [json.loads(w.read(timeout=seconds + 300)) for w in chosen]
        gens = [g for r in results for g in r["gens"]]
        tokens = sum(t0 <= t <= t1 for g in gens for t in g)
        gaps = [b - a for g in gens for a, b in zip(g, g[1:])]
        hops = Counter(route[0] for r in results for route in r["routes"] if route)
        return Window(clients, seconds, tokens, 1000 * statistics.median(gaps), hops)

    def close(self) -> None:
        for w in self.workers:
            w.stop()

    def __enter__(self) -> "ClientPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.clients", description="one benchmark client process")
    parser.add_argument("path")
    parser.add_argument("--peers", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=32000)
    args = parser.parse_args()
    worker(args.path, args.peers, args.seed, args.vocab_size)
