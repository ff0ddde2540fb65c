"""The per-family seam: which transformers classes build a block, and which mask each layer uses.

Adding a Llama-layout family (pre-norm decoder layers under ``model.layers.N.``, rotary positions)
is one entry in FAMILIES.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers.models.llama import modeling_llama as llama
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.qwen2 import modeling_qwen2 as qwen2

LAYER_PREFIX = "model.layers."  # where every supported family keeps its decoder layers


@dataclass(frozen=True)
class Family:
    layer_cls: type[nn.Module]  # decoder layer: (config, layer_idx) -> module
    rotary_cls: type[nn.Module]  # rotary embedding: (config=...) -> module returning (cos, sin)
    norm_cls: type[nn.Module]  # final norm held by the client: (hidden_size, eps=...)
    layer_prefix: str = LAYER_PREFIX  # checkpoint key prefix of block i is f"{layer_prefix}{i}."


FAMILIES: dict[str, Family] = {
    "llama": Family(llama.LlamaDecoderLayer, llama.LlamaRotaryEmbedding, llama.LlamaRMSNorm),
    "mistral": Family(mistral.MistralDecoderLayer, mistral.MistralRotaryEmbedding, mistral.MistralRMSNorm),
    "qwen2": Family(qwen2.Qwen2DecoderLayer, qwen2.Qwen2RotaryEmbedding, qwen2.Qwen2RMSNorm),
}


def get_family(config: Any) -> Family:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def uses_sliding_window(config: Any, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` attends through a sliding window (Qwen2 layer types, Mistral)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx] == "sliding_attention"
    return getattr(config, "sliding_window", None) is not None


def linear_shapes(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """Projection name inside a block -> (in_features, out_features) for every Linear in it."""
    return {name: (m.in_features, m.out_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``linear_shapes`` of one block of ``config``'s model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return linear_shapes(get_family(config).layer_cls(config, 0))
