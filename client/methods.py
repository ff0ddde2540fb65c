"""`swarm finetune --method`: the PEFT config each fine-tuning method starts from, built from the command's options.

Every method is PEFT's own config class, so what `swarm finetune` saves is what ``peft.PeftModel.from_pretrained``
loads: lora (LoraConfig), dora (LoraConfig(use_dora=True)), adalora (AdaLoraConfig, its budget over --steps),
ia3 (IA3Config), prompt (PromptTuningConfig), ptuning (PromptEncoderConfig) and prefix (PrefixTuningConfig,
p-tuning v2's deep prompts; --prefix-projection for its MLP reparameterisation).
"""
from __future__ import annotations

from typing import Any

METHODS = ("lora", "dora", "adalora", "ia3", "prompt", "ptuning", "prefix")
LORA_TARGETS = "q_proj,v_proj"  # --target-modules default for the LoRA family (IA3: PEFT's own per model type)


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [t.strip() for t in text.split(",") if t.strip()]


def peft_config(opts: Any) -> Any:
    """The PEFT config of ``opts.method`` (a FinetuneOptions); ValueError for an unknown method or bad options."""
    from peft import (AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig)

    method = opts.method
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if opts.num_virtual_tokens < 1:
        raise ValueError("--num-virtual-tokens must be positive")
    targets = _names(opts.target_modules)
    lora = dict(lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                target_modules=targets or _names(LORA_TARGETS), task_type="CAUSAL_LM")
    if method in ("lora", "dora"):
        return LoraConfig(r=opts.lora_r, use_dora=method == "dora", **lora)
    if method == "adalora":
        if not 0 <= opts.adalora_tinit < opts.steps - opts.adalora_tfinal:
            raise ValueError("--adalora-tinit and --adalora-tfinal leave no budgeting phase within --steps")
        return AdaLoraConfig(init_r=opts.adalora_init_r, target_r=opts.adalora_target_r, tinit=opts.adalora_tinit,
                             tfinal=opts.adalora_tfinal, deltaT=opts.adalora_delta_t, total_step=opts.steps, **lora)
    if method == "ia3":
        return IA3Config(target_modules=targets, feedforward_modules=_names(opts.feedforward_modules),
                         task_type="CAUSAL_LM")
    prompts = dict(num_virtual_tokens=opts.num_virtual_tokens, task_type="CAUSAL_LM")
    if method == "prompt":
        return PromptTuningConfig(**prompts)
    encoder = {"encoder_hidden_size": opts.encoder_hidden_size} if opts.encoder_hidden_size else {}
    if method == "ptuning":
        return PromptEncoderConfig(**prompts, **encoder)
    return PrefixTuningConfig(**prompts, prefix_projection=opts.prefix_projection, **encoder)


def describe(config: Any) -> str:
    """One line naming the method and its main settings, for the start of a run."""
    kind = type(config).__name__.removesuffix("Config")
    targets = ",".join(sorted(getattr(config, "target_modules", None) or []))
    if kind == "Lora":
        return f"{'DoRA' if config.use_dora else 'LoRA'} r={config.r} on {targets}"
    if kind == "AdaLora":
        return f"AdaLoRA r={config.init_r}->{config.target_r} on {targets}"
    if kind == "IA3":
        return f"IA3 on {targets or 'PEFT defaults'}"
    return f"{kind} with {config.num_virtual_tokens} virtual tokens"
