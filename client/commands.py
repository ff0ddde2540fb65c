"""Client-side commands behind the `swarm` CLI: `swarm generate` streams text from the swarm."""
from __future__ import annotations

import sys
from typing import Sequence

import torch


def generate_text(model_path: str, initial_peers: Sequence[str], prompt: str, *, max_new_tokens: int,
                  do_sample: bool, temperature: float, top_p: float, top_k: int, seed: int | None,
                  model_name: str | None = None, swarm_key: str | None = None, lan: bool = False,
                  tls_ca: str | None = None) -> str:
    """Generate from ``prompt`` through the swarm, printing text to stdout as tokens arrive."""
    from transformers import AutoTokenizer, TextStreamer

    from client.model import AutoDistributedModelForCausalLM
    from swarm.checkpoint import CheckpointError, no_weights, resolve_checkpoint

    folder = resolve_checkpoint(model_path, need_weights=no_weights, tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"{model_path} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers,
                                                            model_name=model_name, swarm_key=swarm_key, lan=lan,
                                                            tls_ca=tls_ca)
    try:
        if seed is not None:
            torch.manual_seed(seed)
        encoded = tokenizer(prompt, return_tensors="pt")
        sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}
        out = model.generate(
            encoded["input_ids"], attention_mask=encoded["attention_mask"], max_new_tokens=max_new_tokens,
            do_sample=do_sample, streamer=TextStreamer(tokenizer, skip_prompt=False),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling,
        )
        sys.stdout.flush()
        return tokenizer.decode(out[0], skip_special_tokens=True)
    finally:
        model.close()
