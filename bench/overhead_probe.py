"""Overhead probe (issue 15 item 2; a tool, not a section of bench.run): the tiny bench model's 2-node greedy
generation with node settings (flags, environment) side by side, one swarm each, alternating rounds, medians
of each call's ms/token; checks every setting's tokens equal local transformers'. Edit VARIANTS to try more.

    ROUNDS=10 python bench/overhead_probe.py"""
import os, statistics, sys
from contextlib import ExitStack
import torch
sys.path.insert(0, os.getcwd())
from bench.clients import connect, generate_fn, prompt
from bench.common import TINY, checkpoint
from bench.generation import spans
from tests.helpers.launch import LocalSwarm
from transformers import AutoModelForCausalLM

ROUNDS = int(os.environ.get("ROUNDS", "8"))
path = checkpoint(TINY); ids = prompt(TINY.vocab_size)
local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ref = generate_fn(local, ids, use_cache=True)()[0]
VARIANTS = {"--decode-in-pool (before)": ({}, ("--decode-in-pool",)), "defaults (inline)": ({}, ()),
            "nodes OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, ())}
with ExitStack() as st:
    fns = {}
    for name, (env, flags) in VARIANTS.items():
        sw = st.enter_context(LocalSwarm(path, env=env))
        sw.start_nodes(spans(TINY.num_layers, 2), *flags)
        m = connect(path, sw.peers); st.callback(m.close)
        fns[name] = generate_fn(m, ids)
    for name, fn in fns.items():
        print(name, "same tokens:", torch.equal(fn()[0], ref), flush=True)
    res = {k: [] for k in fns}
    for r in range(ROUNDS):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            res[k].append(1000 * statistics.median(fns[k]()[1]))
        print(f"round {r} load {os.getloadavg()[0]:.1f}: " + ", ".join(f"{k} {v[-1]:.2f}" for k, v in res.items()), flush=True)
    base = res[list(fns)[0]]
    for k, v in res.items():
        wins = sum(a < b for a, b in zip(v, base))
        print(f"{k}: median {statistics.median(v):.2f} ms/token over {len(v)} rounds; faster than before in {wins}/{len(v)}")
