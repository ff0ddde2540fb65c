"""The node's one seam to transformers internals: how a decoder layer and the mask functions are
called, and which attention kernel runs.

Each item names the behaviour and the versions it was checked on (the tested range is in
pyproject.toml; both ends run in CI). ``tests/test_contract.py`` runs these in seconds.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from transformers import masking_utils


def _cache_parameter(fn: Callable) -> str:
    """The name under which ``fn`` takes the key/value cache: ``past_key_values`` up to transformers
    5.23, ``cache`` from 5.24 (the old name still works there, with a FutureWarning, until 5.40);
    ``layer_past`` for the blocks of GPT-NeoX, BLOOM and Falcon (5.23, 5.24).
    Read from the signature (deprecation wrappers keep ``__wrapped__``, which inspect follows)."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values", "layer_past"):
        if name in params:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes neither `cache` nor `past_key_values`; "
                    "node/compat.py must learn the new cache keyword")


MASK_CACHE_ARG = _cache_parameter(masking_utils.create_causal_mask)


def attention_mask_for(config: Any, sliding: bool, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor, cache: Any, layer_idx: int | None, materialize: bool = False) -> Any:
    """The mask one kind of attention layer (full or sliding window) expects, made by transformers' own
    ``create_causal_mask`` / ``create_sliding_window_causal_mask`` (5.23, 5.24). With a cache, the
    functions read the past length from layer ``layer_idx`` (``layer_idx`` is a keyword of both).
    ``materialize``: never None for "causal, no padding" (``allow_is_causal_skip=False``, as Falcon asks)."""
    make = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    extra = {"allow_is_causal_skip": False} if materialize else {}
    return make(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                layer_idx=layer_idx, **{MASK_CACHE_ARG: cache}, **extra)


_LAYER_ARGS: dict[type, tuple[str, bool]] = {}  # block class -> (cache keyword, takes `alibi`)


def call_decoder_layer(layer: nn.Module, hidden: torch.Tensor, *, attention_mask: Any, position_ids: torch.Tensor,
                       position_embeddings: Any, cache: Any, alibi: torch.Tensor | None = None) -> torch.Tensor:
    """One transformers decoder layer: ``layer(hidden, attention_mask=, position_ids=,
    position_embeddings=(cos, sin), <cache keyword>=cache, use_cache=)``; ``position_embeddings`` only
    for rotary families, ``alibi=`` (the bias, or None) for blocks that take it (BLOOM; Falcon, which
    rotates when it is None). In transformers 5 a Llama-like layer returns the hidden states tensor;
    BLOOM's and Falcon's blocks return (hidden, attention weights), unpacked here."""
    kind = type(layer)
    if kind not in _LAYER_ARGS:
        _LAYER_ARGS[kind] = (_cache_parameter(kind.forward), "alibi" in inspect.signature(kind.forward).parameters)
    cache_arg, takes_alibi = _LAYER_ARGS[kind]
    extra = {"alibi": alibi} if takes_alibi else {}
    if position_embeddings is not None:
        extra["position_embeddings"] = position_embeddings
    out = layer(hidden, attention_mask=attention_mask, position_ids=position_ids, use_cache=cache is not None,
                **{cache_arg: cache}, **extra)
    return out[0] if isinstance(out, tuple) else out


def build_skeleton(causal_lm_cls: type, config: Any) -> nn.Module:
    """The family's whole causal LM on the meta device (no memory): what a span's layers are cut from.
    Building it also makes the choices ``from_pretrained`` makes (5.23, 5.24: ``PreTrainedModel.__init__``
    writes ``config._attn_implementation`` and ``config._experts_implementation``: "sdpa", or "eager"
    where the family cannot use sdpa, e.g. Gemma 2's soft-capped attention; "grouped_mm" for MoE experts),
    so blocks run the kernels a local model runs and outputs equal it bit for bit."""
    with torch.device("meta"):
        return causal_lm_cls(config)


def load_converted(skeleton: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> Any:
    """Load checkpoint ``tensors`` (a subset, under their checkpoint names) into ``skeleton`` the way
    ``from_pretrained`` does, with the family's conversions: renamings, per-expert MoE weights fused into
    3-D expert tensors (5.23, 5.24: ``conversion_mapping.get_model_conversion_mapping`` and
    ``core_model_loading.convert_and_load_state_dict_in_model``). Tensors not given stay on meta.
    Returns transformers' LoadStateDictInfo (``missing_keys``, ``unexpected_keys``, ``conversion_errors``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    skeleton.to(dtype=dtype)  # on meta: only the dtype the loader casts to changes
    load_config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(skeleton), dtype=dtype)
    info, _ = convert_and_load_state_dict_in_model(skeleton, tensors, load_config)
    return info


def rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                      layer_types: set[str]) -> dict[str, Any]:
    """(cos, sin) per attention layer type. Most families' rotary is ``rotary(x, position_ids)``, one for
    every layer; Gemma 3's is ``rotary(x, position_ids, layer_type)``, a base frequency per type
    (5.23, 5.24). Told apart by the signature of the rotary's forward."""
    if "layer_type" in inspect.signature(type(rotary).forward).parameters:
        return {kind: rotary(hidden, position_ids, layer_type=kind) for kind in layer_types}
    shared = rotary(hidden, position_ids)
    return {kind: shared for kind in layer_types}


def cached_keys_values(cache: Any, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The keys and values a ``DynamicCache`` holds for layer ``layer_idx`` ([batch, kv_heads, length,
    head_dim] each), or None when that layer holds nothing yet: ``cache.layers[i].keys`` / ``.values`` of
    a ``DynamicLayer`` (5.23, 5.24). Read by node.batching, which lays several sessions' caches side by side."""
    layers = getattr(cache, "layers", None)
    if layers is None or layer_idx >= len(layers) or not getattr(layers[layer_idx], "is_initialized", False):
        return None
    layer = layers[layer_idx]
    return layer.keys, layer.values
