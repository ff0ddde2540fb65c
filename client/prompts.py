"""Prompt tuning, p-tuning and prefix tuning held by the client, computed by PEFT's own prompt
encoders (so initialisation, math and saved format match PEFT). Prompt methods prepend virtual
tokens to the input embeddings; prefix tuning sends per-block key/value prefixes to the nodes."""
from __future__ import annotations

from typing import Any

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from torch import nn

from client import compat
from swarm.arch import check_prefix_tuning

PromptEmbedding, PromptEncoder, PrefixEncoder = compat.prompt_encoders()


class RemotePrompt(nn.Module):
    """Virtual prompt tokens for a distributed model (the blocks on the nodes stay untouched)."""

    def __init__(self, model_config: Any, peft_config: Any, word_embeddings: nn.Module):
        super().__init__()
        if not isinstance(peft_config, (PromptTuningConfig, PromptEncoderConfig)):
            raise TypeError(f"{type(peft_config).__name__} is not a prompt method")
        peft_config = compat.prepare_prompt_learning_config(peft_config, model_config)
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


class RemotePrefix(nn.Module):
    """Prefix tuning: per-block key/value prefixes from PEFT's PrefixEncoder, sent to the nodes that
    run those blocks; their attention uses them and backward returns their gradients."""

    def __init__(self, model_config: Any, peft_config: PrefixTuningConfig):
        super().__init__()
        check_prefix_tuning(model_config)
        peft_config = compat.prepare_prompt_learning_config(peft_config, model_config)
        peft_config.num_transformer_submodules = 1
        self.config = peft_config
        self.num_virtual_tokens = peft_config.num_virtual_tokens
        self.heads = peft_config.num_attention_heads  # PEFT sizes prefixes by key/value heads (GQA)
        self.head_dim = peft_config.token_dim // peft_config.num_attention_heads
        self.encoder = PrefixEncoder(peft_config)
        self.fixed: torch.Tensor | None = None  # embeddings loaded from a saved adapter (inference)

    def embeddings(self, batch_size: int) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed.unsqueeze(0).expand(batch_size, -1, -1)
        tokens = torch.arange(self.num_virtual_tokens).unsqueeze(0).expand(batch_size, -1)
        return self.encoder(tokens)

    def key_values(self, batch_size: int) -> torch.Tensor:
        """[blocks, 2 (key, value), batch, kv_heads, virtual tokens, head_dim], laid out as PEFT's."""
        layers = self.config.num_layers
        kv = self.embeddings(batch_size).view(batch_size, self.num_virtual_tokens, layers * 2, self.heads,
                                              self.head_dim)
        return kv.permute(2, 0, 3, 1, 4).reshape(layers, 2, batch_size, self.heads, self.num_virtual_tokens,
                                                 self.head_dim)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.embeddings(1)[0].detach().contiguous()}

    def load_peft_state_dict(self, state: dict[str, torch.Tensor], trainable: bool) -> None:
        weights = state.get("prompt_embeddings")
        if weights is None or weights.shape[0] != self.num_virtual_tokens:
            raise ValueError("adapter has no prompt_embeddings for this prefix-tuning config")
        if not self.config.prefix_projection:
            with torch.no_grad():
                self.encoder.embedding.weight.copy_(weights)
            self.encoder.requires_grad_(trainable)
        elif trainable:
            raise ValueError("a saved prefix_projection adapter holds computed prefixes only; it cannot be trained")
        else:
            self.fixed = weights.clone()
            self.encoder.requires_grad_(False)
