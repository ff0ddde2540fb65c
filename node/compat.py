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
    5.23, ``cache`` from 5.24 (the old name still works there, with a FutureWarning, until 5.40).
    Read from the signature (deprecation wrappers keep ``__wrapped__``, which inspect follows)."""
    params = inspect.signature(fn).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes neither `cache` nor `past_key_values`; "
                    "node/compat.py must learn the new cache keyword")


MASK_CACHE_ARG = _cache_parameter(masking_utils.create_causal_mask)


def attention_mask_for(config: Any, sliding: bool, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                       position_ids: torch.Tensor, cache: Any, layer_idx: int | None) -> Any:
    """The mask one kind of attention layer (full or sliding window) expects, made by transformers' own
    ``create_causal_mask`` / ``create_sliding_window_causal_mask`` (5.23, 5.24). With a cache, the
    functions read the past length from layer ``layer_idx`` (``layer_idx`` is a keyword of both)."""
    make = masking_utils.create_sliding_window_causal_mask if sliding else masking_utils.create_causal_mask
    return make(config=config, inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                layer_idx=layer_idx, **{MASK_CACHE_ARG: cache})


_LAYER_CACHE_ARG: dict[type, str] = {}


def call_decoder_layer(layer: nn.Module, hidden: torch.Tensor, *, attention_mask: Any, position_ids: torch.Tensor,
                       position_embeddings: Any, cache: Any) -> torch.Tensor:
    """One transformers decoder layer: ``layer(hidden, attention_mask=, position_ids=,
    position_embeddings=(cos, sin), <cache keyword>=cache, use_cache=)``. In transformers 5 a layer
    returns the hidden states tensor (4.x returned a tuple; a tuple is unpacked here)."""
    kind = type(layer)
    if kind not in _LAYER_CACHE_ARG:
        _LAYER_CACHE_ARG[kind] = _cache_parameter(kind.forward)
    out = layer(hidden, attention_mask=attention_mask, position_ids=position_ids,
                position_embeddings=position_embeddings, use_cache=cache is not None,
                **{_LAYER_CACHE_ARG[kind]: cache})
    return out[0] if isinstance(out, tuple) else out


def use_attention_kernel(config: Any, kernel: str = "sdpa") -> None:
    """Pick the attention implementation blocks built from ``config`` use. transformers 5 reads
    ``config._attn_implementation`` when a layer runs; "sdpa" is what a local model picks on CPU, so
    outputs equal a local model's bit for bit."""
    config._attn_implementation = kernel


def default_attention_kernel(causal_lm_cls: type) -> str:
    """The kernel ``from_pretrained`` picks for a family when none is asked for (5.23, 5.24:
    ``get_correct_attn_implementation``): "sdpa" when the class declares ``_supports_sdpa``, else
    "eager" (Gemma 2, whose soft-capped attention sdpa cannot compute)."""
    return "sdpa" if getattr(causal_lm_cls, "_supports_sdpa", False) else "eager"


def rotary_embeddings(rotary: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor,
                      layer_types: set[str]) -> dict[str, Any]:
    """(cos, sin) per attention layer type. Most families' rotary is ``rotary(x, position_ids)``, one for
    every layer; Gemma 3's is ``rotary(x, position_ids, layer_type)``, a base frequency per type
    (5.23, 5.24). Told apart by the signature of the rotary's forward."""
    if "layer_type" in inspect.signature(type(rotary).forward).parameters:
        return {kind: rotary(hidden, position_ids, layer_type=kind) for kind in layer_types}
    shared = rotary(hidden, position_ids)
    return {kind: shared for kind in layer_types}
