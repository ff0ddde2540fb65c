"""The architecture seam: what the swarm needs to know about one transformers model family.

A family is described by where transformers keeps its pieces; the pieces themselves (decoder layer,
rotary embedding, input embeddings with their scaling, final norm) are transformers' own classes, so
a family's quirks (soft-capped attention, alternating sliding windows, a rotary per layer type, q/k
norms, fused projections) run as transformers wrote them, not as we re-wrote them.

Adding a family that transformers already has is one entry in FAMILIES plus its equivalence test
(tests/client/test_families.py): where its causal LM keeps the base model (``model``, ``transformer``,
``gpt_neox``), the block list and the client's parts (input embeddings, learned positions, an
embedding norm, final norm, head), and how a block learns positions (rotary, learned on the client,
ALiBi on the node). A model type outside FAMILIES, or a config a family cannot run exactly, is refused
with one clear error rather than run with what might be the wrong numbers.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from transformers.pytorch_utils import Conv1D

LAYER_PREFIX = "model.layers."  # where the Llama-layout families keep their decoder layers
ROTARY, LEARNED, ALIBI = "rotary", "learned", "alibi"  # how a family's blocks know positions
PROJECTIONS = (nn.Linear, Conv1D)  # what LoRA adapts: Linear, and GPT-2's Conv1D (weight [in, out])
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' names of the two causal layer types


@dataclass(frozen=True)
class Family:
    """One family: its transformers module and class names, and what its causal-LM forward adds."""

    model_type: str  # config.model_type
    module: str  # transformers.models.<module>.modeling_<module>
    prefix: str  # class name prefix there: <prefix>DecoderLayer, <prefix>RotaryEmbedding, <prefix>ForCausalLM
    base: str = "Model"  # base model class <prefix><base>: builds the client's embeddings and final norm
    logit_softcap: str | None = None  # config field of the final-logit soft-cap the *ForCausalLM forward applies
    base_attr: str = "model"  # the causal LM's attribute (and checkpoint prefix) holding the base model
    layers: str = "layers"  # the base model's attribute holding the block list
    layer: str = "DecoderLayer"  # block class: <prefix><layer>
    causal_lm: str = "ForCausalLM"  # causal LM class: <prefix><causal_lm> (GPT-2: LMHeadModel)
    embed: str = "embed_tokens"  # the base model's input embeddings
    norm: str = "norm"  # the base model's final norm
    head: str = "lm_head"  # checkpoint name of the LM head (GPT-NeoX saves it as embed_out)
    positions: str = ROTARY  # ROTARY: <prefix>RotaryEmbedding on the node; LEARNED: added on the client; ALIBI
    learned_positions: str | None = None  # the base model's position embeddings (LEARNED: GPT-2's wpe)
    embed_norm: str | None = None  # a norm the base model applies to the embeddings (BLOOM)
    materialize_mask: bool = False  # the base model builds its mask with allow_is_causal_skip=False (Falcon)
    refused: tuple[tuple[str, Any, str], ...] = ()  # (config field, value, why): configs not run exactly
    no_prefix_tuning: Callable[[Any], str | None] | None = None  # config -> why PEFT's prefixes do not fit, or None

    @property
    def layer_prefix(self) -> str:
        """Checkpoint key prefix of the block list: block i's tensors are under f"{layer_prefix}{i}."."""
        return f"{self.base_attr}.{self.layers}."

    def _cls(self, name: str) -> type:
        module = importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")
        return getattr(module, name)

    @property
    def layer_cls(self) -> type[nn.Module]:
        """The decoder layer: ``(config, layer_idx) -> module``."""
        return self._cls(f"{self.prefix}{self.layer}")

    @property
    def rotary_cls(self) -> type[nn.Module] | None:
        """The rotary embedding: ``(config=...) -> module`` returning (cos, sin), per layer type for some;
        None for a family without rotary positions."""
        return self._cls(f"{self.prefix}RotaryEmbedding") if self.positions == ROTARY else None

    @property
    def alibi_fn(self) -> Any:
        """ALiBi families: transformers' ``build_alibi_tensor(attention_mask, num_heads, dtype)`` of the family."""
        return self._cls("build_alibi_tensor")

    def client_names(self) -> dict[str, str]:
        """Checkpoint name prefix -> the client model's name prefix, for the weights the client holds."""
        base = self.base_attr
        names = {f"{base}.{self.embed}.": "model.embed_tokens.", f"{base}.{self.norm}.": "model.norm.",
                 f"{self.head}.": "lm_head."}
        if self.learned_positions:
            names[f"{self.base_attr}.{self.learned_positions}."] = "model.positions."
        if self.embed_norm:
            names[f"{self.base_attr}.{self.embed_norm}."] = "model.embed_norm."
        return names

    @property
    def base_model_cls(self) -> type[nn.Module]:
        """The base model (embeddings, layers, norm): the client builds it with no layers."""
        return self._cls(f"{self.prefix}{self.base}")

    @property
    def causal_lm_cls(self) -> type[nn.Module]:
        """The causal LM: which attention kernels the family supports."""
        return self._cls(f"{self.prefix}{self.causal_lm}")


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
    # other layouts
    Family("gpt_neox", "gpt_neox", "GPTNeoX", base_attr="gpt_neox", layer="Layer", embed="embed_in",
           norm="final_layer_norm", head="embed_out"),  # parallel residual, partial rotary, fused qkv
    Family("gpt2", "gpt2", "GPT2", base_attr="transformer", layers="h", layer="Block", causal_lm="LMHeadModel",
           embed="wte", norm="ln_f", positions=LEARNED, learned_positions="wpe",  # Conv1D, learned positions
           refused=(("add_cross_attention", True, "cross-attention needs an encoder's states"),)),
    Family("falcon", "falcon", "Falcon", base_attr="transformer", layers="h", embed="word_embeddings", norm="ln_f",
           materialize_mask=True,  # new and old decoder architectures, parallel attention, multi-query
           no_prefix_tuning=lambda c: None if c.new_decoder_architecture or not c.multi_query else
           "its old decoder architecture with multi_query caches one key/value head, PEFT's prefixes have "
           "num_attention_heads (local PEFT fails on it too)",
           refused=(("alibi", True, "ALiBi Falcon merges its bias into the mask inside FalconModel.forward, "
                                    "code the nodes cannot call per span"),)),
    Family("bloom", "bloom", "Bloom", base_attr="transformer", layers="h", layer="Block", embed="word_embeddings",
           norm="ln_f", positions=ALIBI, embed_norm="word_embeddings_layernorm"),  # ALiBi, fused query_key_value
)}
LAYER_PREFIXES = tuple(sorted({f.layer_prefix for f in FAMILIES.values()}))  # every family's block list prefix


def is_block_weight(name: str) -> bool:
    """Whether checkpoint tensor ``name`` belongs to a block (of any family's layout): nodes hold those."""
    return name.startswith(LAYER_PREFIXES)


def get_family(config: Any) -> Family:
    """The family of a transformers config; ValueError naming the family and what is supported if unknown."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))}); "
                         "a family whose blocks transformers builds can be added in swarm/arch.py FAMILIES once its "
                         "equivalence test passes")
    family = FAMILIES[model_type]
    for field, value, why in family.refused:
        if getattr(config, field, None) == value:
            raise ValueError(f"model family {model_type!r} with {field}={value!r} is not supported: {why}")
    for i in range(config.num_hidden_layers):
        uses_sliding_window(config, i)  # every block's attention type is one the node runs
    return family


def check_prefix_tuning(config: Any) -> None:
    """ValueError if PEFT's prefix-tuning prefixes do not fit the key/value cache of ``config``'s blocks."""
    family = get_family(config)
    why = family.no_prefix_tuning(config) if family.no_prefix_tuning is not None else None
    if why is not None:
        raise ValueError(f"prefix tuning is not supported for this {family.model_type!r} model: {why}")


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


def features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection: a Linear, or a Conv1D (``nx`` in, ``nf`` out)."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features


def linear_shapes(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """Projection name inside a block -> (in_features, out_features) for every Linear / Conv1D in it."""
    return {name: features(m) for name, m in layer.named_modules() if isinstance(m, PROJECTIONS)}


def projection_shapes(config: Any) -> dict[str, tuple[int, int]]:
    """``linear_shapes`` of one block of ``config``'s model, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        return linear_shapes(get_family(config).layer_cls(config, 0))
