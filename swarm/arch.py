"""The architecture seam: what the swarm needs to know about one transformers model family.

A family is described by where transformers keeps its pieces; the pieces themselves (decoder layer,
rotary embedding, input embeddings with their scaling, final norm) are transformers' own classes, so
a family's quirks (soft-capped attention, alternating sliding windows, a rotary per layer type, q/k
norms, fused projections) run as transformers wrote them, not as we re-wrote them.

Adding a family that transformers already has, with the Llama layout (decoder layers under
``model.layers.N.``, ``model.embed_tokens``, ``model.norm``, ``lm_head``), is one entry in FAMILIES
plus its equivalence test (tests/test_families.py). A model type outside FAMILIES is refused with one
clear error rather than run with what might be the wrong numbers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

LAYER_PREFIX = "model.layers."  # where every supported family keeps its decoder layers
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' names of the two causal layer types


@dataclass(frozen=True)
class Family:
    """One family: its transformers module and class names, and what its causal-LM forward adds."""

    model_type: str  # config.model_type
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class name prefix there: <prefix>DecoderLayer, <prefix>RotaryEmbedding, <prefix>ForCausalLM
    base: str = "Model"  # base model class <prefix><base>: builds the client's embeddings and final norm
    logit_softcap: str | None = None  # config field of the final-logit soft-cap the *ForCausalLM forward applies
    layer_prefix: str = LAYER_PREFIX  # checkpoint key prefix of block i is f"{layer_prefix}{i}."

    def _cls(self, name: str) -> type:
        module = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(module, name)

    @property
    def layer_cls(self) -> type[nn.Module]:
        """The decoder layer: ``(config, layer_idx) -> module``."""
        return self._cls(f"{self.prefix}DecoderLayer")

    @property
    def rotary_cls(self) -> type[nn.Module]:
        """The rotary embedding: ``(config=...) -> module`` returning (cos, sin), per layer type for some."""
        return self._cls(f"{self.prefix}RotaryEmbedding")

    @property
    def base_model_cls(self) -> type[nn.Module]:
        """The base model (embeddings, layers, norm): the client builds it with no layers."""
        return self._cls(f"{self.prefix}{self.base}")

    @property
    def causal_lm_cls(self) -> type[nn.Module]:
        """The causal LM: which attention kernels the family supports."""
        return self._cls(f"{self.prefix}ForCausalLM")


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "llama", "Llama"),
    Family("mistral", "mistral", "Mistral"),
    Family("qwen2", "qwen2", "Qwen2"),
    Family("qwen3", "qwen3", "Qwen3"),  # q/k RMS norms inside attention
    Family("phi3", "phi3", "Phi3"),  # fused qkv_proj and gate_up_proj, partial rotary
    Family("gemma2", "gemma2", "Gemma2", logit_softcap="final_logit_softcapping"),  # eager attention (soft-capped)
    Family("gemma3_text", "gemma3", "Gemma3", base="TextModel", logit_softcap="final_logit_softcapping"),
    Family("mixtral", "mixtral", "Mixtral"),  # MoE: per-expert checkpoint tensors fused into 3-D on load
    Family("qwen3_moe", "qwen3_moe", "Qwen3Moe"),  # MoE with q/k norms
    Family("qwen2_moe", "qwen2_moe", "Qwen2Moe"),  # MoE with a gated shared expert
    Family("gpt_oss", "gpt_oss", "GptOss"),  # attention sinks, MoE with biases, alternating windows (eager)
    Family("starcoder2", "starcoder2", "Starcoder2"),  # LayerNorm with biases, GELU MLP, sliding window
    Family("olmo2", "olmo2", "Olmo2"),  # norms after attention and MLP, q/k norms over all heads
)}


def get_family(config: Any) -> Family:
    """The family of a transformers config; ValueError naming the family and what is supported if unknown."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))}); "
                         "a family with the Llama layout (model.layers.N, model.embed_tokens, model.norm, lm_head) "
                         "can be added in swarm/arch.py FAMILIES once its equivalence test passes")
    for i in range(config.num_hidden_layers):
        uses_sliding_window(config, i)  # every block's attention type is one the node runs
    return FAMILIES[model_type]


def layer_type(config: Any, layer_idx: int) -> str:
    """The attention type of block ``layer_idx``: ``config.layer_types`` (Qwen2/3, Gemma 2/3, ...) or, for a
    config without them (Mistral), sliding for every layer when ``sliding_window`` is set."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[layer_idx]
    return SLIDING if getattr(config, "sliding_window", None) is not None else FULL


def uses_sliding_window(config: Any, layer_idx: int) -> bool:
    """Whether block ``layer_idx`` attends through a sliding window."""
    kind = layer_type(config, layer_idx)
    if kind not in (FULL, SLIDING):
        raise ValueError(f"block {layer_idx} of {getattr(config, 'model_type', None)!r} has attention type {kind!r}; "
                         f"only {FULL!r} and {SLIDING!r} are supported")
    return kind == SLIDING


def linear_shapes(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """Projection name inside a block -> (in_features, out_features) for every Linear in it."""
    return {name: (m.in_features, m.out_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``linear_shapes`` of one block of ``config``'s model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return linear_shapes(get_family(config).layer_cls(config, 0))
