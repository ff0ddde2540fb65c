"""The client's one seam to transformers and PEFT internals.

Everything on the client that depends on how a transformers or PEFT release behaves goes through
here, each item with a comment naming the behaviour and the versions it was checked on. Tested
range: see pyproject.toml (both ends run in CI); ``tests/test_contract.py`` runs generate() through
these in seconds and names what moved when a release changes one of them.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
import transformers
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

TRANSFORMERS_VERSION = transformers.__version__


def _cache_keyword() -> str:
    """The keyword generate() hands the KV cache to a model's forward() under, and the field of the
    model outputs it reads it back from: ``past_key_values`` up to transformers 5.23, ``cache`` from
    5.24 (where ``past_key_values`` is a deprecated alias that warns). Read from the signature of
    ``GenerationMixin.prepare_inputs_for_generation`` (its deprecation wrapper keeps ``__wrapped__``)."""
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise ImportError(f"transformers {TRANSFORMERS_VERSION}: prepare_inputs_for_generation takes neither `cache` "
                      "nor `past_key_values`; client/compat.py must learn the new cache keyword")


CACHE_KWARG = _cache_keyword()
CACHE_NAMES = ("cache", "past_key_values")  # every name the client's forward() accepts the cache under


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """The cache passed to forward()/generate() under either name (both given: TypeError)."""
    given = {name: kwargs.pop(name) for name in CACHE_NAMES if kwargs.get(name) is not None}
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    if len(given) > 1:
        raise TypeError("pass the cache as `cache` or as `past_key_values`, not both")
    return next(iter(given.values()), None)


def causal_lm_output(loss: torch.Tensor | None, logits: torch.Tensor, cache: Any) -> CausalLMOutputWithPast:
    """The output generate() expects, the cache under its field name (``past_key_values`` <= 5.23,
    ``cache`` >= 5.24; the same rename as the keyword)."""
    return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: cache})


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for a call to generate() (5.24 warns on the old keyword)."""
    return {CACHE_KWARG: cache}


def model_inputs_cache(inputs: dict[str, Any]) -> Any:
    """The cache in the dict ``prepare_inputs_for_generation`` returns (its key is the keyword's name)."""
    return inputs.get(CACHE_KWARG)


def drop_cache_position(inputs: dict[str, Any]) -> None:
    """``cache_position`` was a model input up to 5.2x and is no longer made by generate() for library
    models (5.23, 5.24); drop it if a version still adds it, the nodes compute positions themselves."""
    inputs.pop("cache_position", None)


def init_layerless_cache(cache: Cache) -> None:
    """Initialise a ``Cache`` subclass that holds no layers (the remote cache): ``Cache(layers=[])``
    is accepted by 5.23 and 5.24 (``layers`` or ``layer_class_to_replicate`` is required)."""
    Cache.__init__(cache, layers=[])


def no_init_weights() -> Any:
    """transformers' context that skips random init while modules are built (5.23, 5.24:
    ``transformers.initialization.no_init_weights``): weights loaded right after need none."""
    from transformers.initialization import no_init_weights as skip

    return skip()


def soft_cap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """The final-logit soft-cap Gemma 2 / Gemma 3's *ForCausalLM.forward applies after the head
    (``logits / cap``, ``tanh``, ``* cap``; 5.23, 5.24): inline code there, no module to call."""
    return torch.tanh(logits / cap) * cap
def generation_attention_mask(model: Any, ids: torch.Tensor, generation_config: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """The attention mask generate() infers for ``ids`` given without one, with its warnings: 1 everywhere,
    or 0 at the pad id when the inputs hold it and it differs from the end token (transformers'
    ``_prepare_special_tokens`` then ``_prepare_attention_mask_for_generation``, checked on 5.23 and 5.24;
    the client hands generate() a mask of its own, so generate() would never infer one). ``kwargs``: the
    generate() call's, whose special token ids override the config's, as in generate()."""
    config = copy.deepcopy(generation_config)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if kwargs.get(name) is not None:
            setattr(config, name, kwargs[name])
    model._prepare_special_tokens(config, False, device=ids.device, batch_size=ids.shape[0])
    return model._prepare_attention_mask_for_generation(ids, config, {})


# Tied input/output embeddings are declared as {target: source} (transformers 5 form; 4.x used a list).
TIED_WEIGHTS_KEYS = {"lm_head.weight": "model.embed_tokens.weight"}


def causal_lm_loss(model: Any, logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """transformers' own shifted cross-entropy (``PreTrainedModel.loss_function``, 5.x), so the loss
    equals a local model's exactly (same ignore_index, same reduction)."""
    return model.loss_function(logits=logits, labels=labels, vocab_size=vocab_size)


def sequence_classification_loss(model: Any, logits: torch.Tensor, labels: torch.Tensor,
                                 pooled: torch.Tensor) -> torch.Tensor:
    """transformers' loss for *ForSequenceClassification (regression / single / multi label by config)."""
    return model.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=model.config)


# ---- PEFT (checked on 0.21.0 and 0.21.2) --------------------------------------------------------
def prepare_prompt_learning_config(peft_config: Any, model_config: Any) -> Any:
    """PEFT's private helper that fills a prompt-learning config from the model config (num_layers,
    token_dim, num_attention_heads = key/value heads for GQA models): the same values PEFT uses, so
    shapes and init equal a local PeftModel's."""
    from peft.utils.other import _prepare_prompt_learning_config

    return _prepare_prompt_learning_config(peft_config, model_config)


def prompt_encoders() -> tuple[type, type, type]:
    """PEFT's prompt encoder modules: (PromptEmbedding, PromptEncoder, PrefixEncoder)."""
    from peft.tuners.p_tuning import PromptEncoder
    from peft.tuners.prefix_tuning import PrefixEncoder
    from peft.tuners.prompt_tuning import PromptEmbedding

    return PromptEmbedding, PromptEncoder, PrefixEncoder


def ia3_modules(ia3_config: Any, model_config: Any) -> tuple[Any, Any]:
    """An IA3Config's (target_modules, feedforward_modules), PEFT's defaults for the model type where unset
    (``peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``, as ``IA3Model`` fills them)."""
    from peft.utils.constants import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING as FEEDFORWARD,
                                      TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as TARGETS)

    targets, feedforward = ia3_config.target_modules, ia3_config.feedforward_modules
    if targets is None or feedforward is None:
        kind = model_config.model_type
        if kind not in TARGETS or kind not in FEEDFORWARD:
            raise ValueError(f"PEFT has no default IA3 modules for {kind!r}: give target_modules and "
                             "feedforward_modules")
        targets = TARGETS[kind] if targets is None else targets
        feedforward = FEEDFORWARD[kind] if feedforward is None else feedforward
    return targets, feedforward


def adalora_rank_allocator(weights: Any, config: Any, adapter: str) -> Any:
    """PEFT's AdaLoRA ``RankAllocator`` over ``weights``, a module whose parameters are named as in PEFT's
    wrapped model (``....lora_A.<adapter>``, ``lora_E``, ``lora_B``): the allocator only reads those names
    (``peft.tuners.adalora.layer.RankAllocator``, 0.21)."""
    from peft.tuners.adalora.layer import RankAllocator

    return RankAllocator(weights, config, adapter)


def adalora_update_and_allocate(weights: Any, config: Any, allocator: Any, adapter: str, global_step: int) -> None:
    """PEFT's own ``AdaLoraModel.update_and_allocate`` run on the client's weights: it reads only
    ``peft_config``, ``trainable_adapter_name``, ``rankallocator`` and ``model`` from its model (0.21), so the
    budget schedule, masking and rank_pattern are PEFT's to the letter."""
    from types import SimpleNamespace

    from peft.tuners.adalora import AdaLoraModel

    owner = SimpleNamespace(peft_config={adapter: config}, trainable_adapter_name=adapter, rankallocator=allocator,
                            model=weights)
    AdaLoraModel.update_and_allocate(owner, global_step)
