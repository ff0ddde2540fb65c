"""PEFT-style fine-tuning of a distributed model: the client owns every trainable parameter.

``get_peft_model(model, LoraConfig(...))`` accepts PEFT's own config objects and returns a model
whose ``save_pretrained`` writes an adapter in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(local_model, dir)`` loads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file, save_file
from torch import nn

from client.adapters import RemoteLora
from client.model import DistributedModelForCausalLM

ADAPTER_WEIGHTS = "adapter_model.safetensors"


class DistributedPeftModel(nn.Module):
    """A distributed causal LM with a client-held adapter; frozen everywhere else."""

    def __init__(self, model: DistributedModelForCausalLM, peft_config: PeftConfig):
        super().__init__()
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"{type(peft_config).__name__} is not supported yet over the swarm; use LoraConfig")
        self.base_model = model
        self.peft_config = peft_config
        model.requires_grad_(False)
        model.model.layers.lora = RemoteLora(model.config, peft_config)

    @property
    def adapter(self) -> RemoteLora:
        return self.base_model.model.layers.lora

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep: int = 0):
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, labels=labels, logits_to_keep=logits_to_keep)

    def generate(self, *args, **kwargs):
        """generate() with the adapter applied by every node of the session."""
        return self.base_model.generate(*args, **kwargs)

    def inference_session(self, max_length: int):
        return self.base_model.inference_session(max_length)

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Like PEFT's; 'all params' counts what the client holds (the blocks live on the nodes)."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params (client-side): {total:,d} "
              f"|| trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter in PEFT's own format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_config.base_model_name_or_path = self.base_model.config.name_or_path or None
        self.peft_config.save_pretrained(str(directory))
        save_file(self.adapter.peft_state_dict(), str(directory / ADAPTER_WEIGHTS))

    @classmethod
    def from_pretrained(cls, model: DistributedModelForCausalLM, directory: str | Path,
                        is_trainable: bool = False) -> "DistributedPeftModel":
        """Load a PEFT adapter (trained here or locally with PEFT) onto a distributed model."""
        directory = Path(directory)
        config = PeftConfig.from_pretrained(str(directory))
        peft = cls(model, config)
        peft.adapter.load_peft_state_dict(load_file(str(directory / ADAPTER_WEIGHTS)))
        peft.adapter.requires_grad_(is_trainable)
        return peft.train(is_trainable)


def get_peft_model(model: DistributedModelForCausalLM, peft_config: PeftConfig) -> DistributedPeftModel:
    """Attach a fresh, trainable client-held adapter described by a PEFT config."""
    if not isinstance(model, DistributedModelForCausalLM):
        raise TypeError("get_peft_model here takes a model from AutoDistributedModelForCausalLM.from_pretrained")
    return DistributedPeftModel(model, peft_config)
