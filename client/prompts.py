"""Prompt tuning and p-tuning held by the client: virtual tokens prepended to the input embeddings,
computed by PEFT's own prompt encoders (so initialisation, math and saved format match PEFT)."""
from __future__ import annotations

from typing import Any

import torch
from peft import PromptEncoderConfig, PromptTuningConfig
from peft.tuners.p_tuning import PromptEncoder
from peft.tuners.prompt_tuning import PromptEmbedding
from peft.utils.other import _prepare_prompt_learning_config
from torch import nn


class RemotePrompt(nn.Module):
    """Virtual prompt tokens for a distributed model (the blocks on the nodes stay untouched)."""

    def __init__(self, model_config: Any, peft_config: Any, word_embeddings: nn.Module):
        super().__init__()
        if not isinstance(peft_config, (PromptTuningConfig, PromptEncoderConfig)):
            raise TypeError(f"{type(peft_config).__name__} is not a prompt method")
        peft_config = _prepare_prompt_learning_config(peft_config, model_config)
        if peft_config.num_transformer_submodules not in (None, 1):
            raise ValueError("only decoder-only models are supported")
        peft_config.num_transformer_submodules = 1  # what PEFT sets for a decoder-only model
        self.num_virtual_tokens = peft_config.num_virtual_tokens
        self.config = peft_config
        if isinstance(peft_config, PromptTuningConfig):
            self.encoder = PromptEmbedding(peft_config, word_embeddings)
        else:
            self.encoder = PromptEncoder(peft_config)
        self.fixed: torch.Tensor | None = None  # embeddings loaded from a saved adapter (inference)

    def prompts(self, batch_size: int) -> torch.Tensor:
        """[batch, virtual tokens, hidden], exactly as PEFT computes them."""
        if self.fixed is not None:
            return self.fixed.unsqueeze(0).expand(batch_size, -1, -1)
        tokens = torch.arange(self.num_virtual_tokens).unsqueeze(0).expand(batch_size, -1)
        return self.encoder(tokens)

    def extend(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
               labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prepend the virtual tokens to embeddings, mask (ones) and labels (-100), as PEFT does."""
        batch = inputs_embeds.shape[0]
        prompts = self.prompts(batch).to(inputs_embeds.dtype)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.num_virtual_tokens), attention_mask], 1)
        if labels is not None:
            labels = torch.cat([labels.new_full((batch, self.num_virtual_tokens), -100), labels], 1)
        return torch.cat([prompts, inputs_embeds], dim=1), attention_mask, labels

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """What PEFT saves for prompt methods: the prompt embeddings themselves."""
        return {"prompt_embeddings": self.prompts(1)[0].detach().contiguous()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], trainable: bool) -> None:
        weights = state.get("prompt_embeddings")
        if weights is None or tuple(weights.shape) != (self.num_virtual_tokens, self.config.token_dim):
            raise ValueError(f"adapter has no prompt_embeddings of shape [{self.num_virtual_tokens}, "
                             f"{self.config.token_dim}]")
        if isinstance(self.encoder, PromptEmbedding):
            with torch.no_grad():
                self.encoder.embedding.weight.copy_(weights)
            self.encoder.requires_grad_(trainable)
        else:  # PEFT saves p-tuning's computed prompts; they can be used, not trained further
            if trainable:
                raise ValueError("a saved p-tuning adapter holds computed prompts only; it cannot be trained further")
            self.fixed = weights.clone()
            self.encoder.requires_grad_(False)
