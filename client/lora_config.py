"""Which PEFT ``LoraConfig`` settings the swarm runs exactly; everything else is refused, never approximated.

The nodes apply ``y = W x + scaling * B A dropout(x)`` to whole projections of every targeted block, with A and
B initialised as PEFT's default does, or DoRA's form of it (``use_dora=True``: the nodes hold W, so they compute
its row norms; client/dora.py). A setting that changes that math (per-module ranks, LoRA biases, ...) or needs
the base weights on the client (PiSSA, LoftQ, EVA, ... initialisations) would silently give another adapter than
local PEFT, so it is refused with its name. AdaLoRA has a config of its own (client/adalora.py).
"""
from __future__ import annotations

import dataclasses
from typing import Any

from peft import LoraConfig

# fields the swarm honours or that do not change the adapter's math (bookkeeping, mode, runtime placement)
HONOURED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "use_rslora", "runtime_config",
    "fan_in_fan_out",  # how the base weight is stored (PEFT sets it from the module: True for GPT-2's Conv1D)
    "use_dora",  # the nodes apply DoRA with PEFT's math (node/lora.py); magnitudes start as PEFT's (client/dora.py)
    "init_lora_weights",  # checked below: the initialisations that need no base weights are done as PEFT does
})
INITS = (True, False, "gaussian")


def check_exact(config: Any) -> None:
    """Raise ValueError/TypeError unless ``config`` is a plain LoraConfig whose other fields keep PEFT's defaults."""
    if type(config) is not LoraConfig:
        raise TypeError(f"{type(config).__name__} is not supported over the swarm (it is not plain LoRA, which is "
                        "all the nodes apply); use LoraConfig, PromptTuningConfig, PromptEncoderConfig or "
                        "PrefixTuningConfig")
    if config.init_lora_weights not in INITS:
        raise ValueError(f"init_lora_weights={config.init_lora_weights!r} needs the base weights, which the client "
                         "does not hold; use True (PEFT's default), False or 'gaussian', or initialise locally "
                         "with PEFT, save, and load the adapter with DistributedPeftModel.from_pretrained")
    default = LoraConfig()
    changed = sorted(f.name for f in dataclasses.fields(LoraConfig)
                     if f.name not in HONOURED and getattr(config, f.name) != getattr(default, f.name))
    if changed:
        shown = ", ".join(f"{name}={getattr(config, name)!r}"[:80] for name in changed)
        raise ValueError(f"LoraConfig settings not supported over the swarm (the nodes would compute another "
                         f"adapter than local PEFT): {shown}")
