"""A reference for generation with PEFT prompt-learning adapters that does not depend on PEFT's generate().

PEFT 0.21's ``PeftModelForCausalLM.prepare_inputs_for_generation`` looks for the cache under
``past_key_values``; transformers 5.24 passes it as ``cache``, so PEFT sees "no cache" at every step and
injects the virtual prompt (or the prefix) again: its own generate() then returns other tokens than its
forward() implies (checked: transformers 5.23 + PEFT 0.21 agree, 5.24 + 0.21.2 do not). Greedy decoding by
re-running PEFT's forward() over the whole sequence each step is PEFT's math without that bug, on every
version: it is what our tests compare the swarm's generate() with.
"""
from __future__ import annotations

import torch
from packaging.version import Version


def peft_generate_is_sound() -> bool:
    """Whether PEFT's own generate() with prompt-learning adapters is right with the installed versions."""
    import peft
    import transformers

    return Version(transformers.__version__) < Version("5.24") or Version(peft.__version__) > Version("0.21.2")


def greedy_by_forward(model, ids: torch.Tensor, mask: torch.Tensor | None, new_tokens: int,
                      position_offset: int | None = None) -> torch.Tensor:
    """Greedy continuation of ``ids`` by ``new_tokens`` tokens, recomputing the whole sequence each step.

    ``position_offset``: pass position ids as generate() makes them (from the attention mask, padding at 0)
    plus this offset: what a prefix-tuning adapter's positions are (they continue after the prefix). None:
    let the model number positions itself (PEFT ignores position ids for prompt tuning / p-tuning)."""
    seq = ids
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        for _ in range(new_tokens):
            extra = {}
            if position_offset is not None:
                extra["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0) + position_offset
            logits = model(input_ids=seq, attention_mask=mask, **extra).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return seq
