"""One client of the chaos soak (``python -m bench.chaos_worker``), started as its own process by bench/chaos.py.

It loads the checkpoint twice: locally with transformers (the checker's reference) and as a distributed
model through the swarm, plus a second distributed model wrapped in a LoRA adapter. It prints ``ready``
after a warm-up, reads ``go UNTIL`` on stdin (UNTIL in CLOCK_MONOTONIC, which is system-wide), then runs
requests back to back until UNTIL: greedy and seeded-sampling generation, a two-turn inference session,
beam search and a LoRA forward+backward, each compared with local transformers/PEFT. One JSON line per
request on stdout: kind, start, end, ok (equal to local), error (an exception's text), token times.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
import traceback

import torch
from peft import LoraConfig
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from bench.clients import Stamps

PAD = 0
LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
KINDS = ("greedy", "sample", "session", "beam", "lora")


def gen_kwargs(kind: str) -> dict:
    base = dict(max_new_tokens=10, pad_token_id=PAD, eos_token_id=None)
    if kind == "sample":
        return {**base, "do_sample": True, "top_k": 50, "top_p": 0.9, "temperature": 0.7}
    if kind == "beam":
        return {**base, "max_new_tokens": 6, "do_sample": False, "num_beams": 3}
    return {**base, "do_sample": False}


class Checker:
    """The local reference and the distributed models of one worker."""

    def __init__(self, path: str, peers: list[str], seed: int):
        self.path = path
        from bench.clients import connect
        from client import ClientConfig, get_peft_model

        config = ClientConfig(initial_peers=tuple(peers), ban_seconds=5, max_wait=120, request_timeout=30)
        self.local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.remote = connect(path, peers, client_config=config)
        self.peft = get_peft_model(connect(path, peers, client_config=config), copy.deepcopy(LORA))
        torch.manual_seed(seed)
        with torch.no_grad():
            for b in self.peft.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
                b.normal_(0, 0.1)
        self.local_peft = self._local_peft()
        self.vocab = self.local.config.vocab_size

    def _local_peft(self):
        model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32),
                                     copy.deepcopy(LORA))
        state = self.peft.adapter.peft_state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(state[name.replace(".default", "")])
        return model

    def run(self, kind: str, rng: random.Random) -> tuple[bool, list[float]]:
        """One request of ``kind``; (equal to local, token arrival times)."""
        ids = torch.tensor([[rng.randrange(3, self.vocab) for _ in range(rng.randrange(4, 12))]])
        if kind == "lora":
            return self._lora(ids), []
        if kind == "session":
            return self._session(ids, rng)
        seed, kwargs, stamps = rng.randrange(1 << 30), gen_kwargs(kind), Stamps()
        extra = {} if kind == "beam" else {"streamer": stamps}
        torch.manual_seed(seed)
        out = self.remote.generate(ids, **kwargs, **extra)
        torch.manual_seed(seed)
        ref = self.local.generate(ids, **kwargs)
        return torch.equal(out, ref), stamps.times

    def _session(self, ids: torch.Tensor, rng: random.Random) -> tuple[bool, list[float]]:
        turn2, stamps = torch.tensor([[rng.randrange(3, self.vocab) for _ in range(3)]]), Stamps()
        kwargs = gen_kwargs("greedy")
        with self.remote.inference_session(max_length=64) as sess:
            a = self.remote.generate(ids, session=sess, streamer=stamps, **kwargs)
            b = self.remote.generate(turn2, session=sess, streamer=stamps, **kwargs)
        ref_a = self.local.generate(ids, **kwargs)
        whole = torch.cat([ref_a, turn2], 1)  # the session attends to every token, a generated pad id too: an
        ref_b = self.local.generate(whole, attention_mask=torch.ones_like(whole), **kwargs)  # explicit mask
        return torch.equal(a, ref_a) and torch.equal(b, ref_b), stamps.times

    def _lora(self, ids: torch.Tensor) -> bool:
        labels = ids.clone()
        for model in (self.peft, self.local_peft):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=labels).loss.backward()
        ours = self.peft.adapter
        local = {n.replace(".default", ""): p.grad for n, p in self.local_peft.named_parameters() if "lora_" in n}
        for (block, path), a, b in zip(ours.keys, ours.lora_A, ours.lora_B):
            prefix = f"base_model.model.model.layers.{block}.{path}"
            for grad, name in ((a.grad, "lora_A"), (b.grad, "lora_B")):
                if grad is None or not torch.allclose(grad, local[f"{prefix}.{name}.weight"], atol=1e-5, rtol=1e-4):
                    return False
        return True

    def close(self) -> None:
        self.remote.close()
        self.peft.base_model.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos_worker")
    parser.add_argument("--model", required=True)
    parser.add_argument("--peers", nargs="+", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    checker = Checker(args.model, args.peers, args.seed)
    try:
        checker.run("greedy", random.Random(0))  # warm-up: the first route, with every node up
        print("ready", flush=True)
        until = float(sys.stdin.readline().split()[1])
        order = list(KINDS)
        while time.monotonic() < until:
            rng.shuffle(order)
            for kind in order:
                if time.monotonic() >= until:
                    break
                start, ok, error, times = time.monotonic(), False, None, []
                try:
                    ok, times = checker.run(kind, rng)
                except Exception as e:  # noqa: BLE001 - every failure is a result of the soak
                    error = f"{type(e).__name__}: {e}"[:300]
                    print(traceback.format_exc(), file=sys.stderr, flush=True)
                print(json.dumps({"kind": kind, "start": start, "end": time.monotonic(), "ok": ok,
                                  "error": error, "times": times}), flush=True)
    finally:
        checker.close()
    print("done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
