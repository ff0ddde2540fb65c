"""Block math as plain functions: build a node's span from a checkpoint, run it forward, backward.

Backward is stateless: it recomputes the forward pass from the inputs the client sends again, so a
node may vanish between forward and backward without losing anything.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from node import compat
from swarm.arch import ALIBI, Family, get_family, layer_type, uses_sliding_window
from swarm.checkpoint import CheckpointError, read_tensors
from node.lora import Lora, active, install_hooks
from node.quantize import inner_tensors, lean_backward, quantize_linears
from swarm.spans import Span


@dataclass
class SpanBlocks:
    """The decoder layers of one node's span, frozen, plus what they need to run."""

    config: Any  # transformers config of the whole model
    span: Span  # blocks hosted
    layers: nn.ModuleList  # layers[i - span.start] is block i
    rotary: nn.Module | None  # the family's rotary embedding (one (cos, sin) per attention layer type), if any
    dtype: torch.dtype  # compute dtype
    family: Family | None = None  # how the blocks are called (rotary, ALiBi, mask); None: from config
    quantization: str = "none"  # how the Linear weights are stored (node.quantize): none, int8 or nf4

    def layer(self, block: int) -> nn.Module:
        return self.layers[block - self.span.start]


def load_span(folder: Path, config: Any, span: Span, dtype: torch.dtype,
              progress: Callable[[int], None] | None = None, quantize: str = "none") -> SpanBlocks:
    """Build blocks ``span`` and fill them with their checkpoint tensors only (converted as transformers
    converts them when it loads the checkpoint), read and converted one block at a time (``progress(block)``
    after each: the node's progress bar). One block at a time: a conversion that makes new tensors (MoE
    experts fused into 3-D tensors) holds a second copy of one block's tensors, not of the span's (for the
    MoE node serving 8 blocks in bench/README.md: peak RSS 1,086 MiB instead of 1,481). ``quantize``: their
    Linear weights then quantized (node.quantize)."""
    if span.end > config.num_hidden_layers:
        raise CheckpointError(f"blocks {span} are outside the model's {config.num_hidden_layers} blocks")
    family = get_family(config)
    prefixes = tuple(f"{family.layer_prefix}{i}." for i in range(span.start, span.end))
    skeleton = compat.build_skeleton(family.causal_lm_cls, config)  # on meta: no memory
    problems: list[str] = []
    for i, prefix in zip(range(span.start, span.end), prefixes):
        block = read_tensors(folder, lambda name, prefix=prefix: name.startswith(prefix), dtype)
        if not block:
            raise CheckpointError(f"checkpoint {folder} has no weights for block {i} ({prefix}*)")
        info = compat.load_converted(skeleton, block, dtype)
        del block  # the checkpoint's copies, where the conversion made new tensors
        problems += sorted(k for k in info.missing_keys if k.startswith(prefix)) + sorted(info.conversion_errors)
        if progress is not None:
            progress(i)
    if problems:
        raise CheckpointError(f"checkpoint {folder} lacks or cannot convert {problems[:3]} for blocks {span}")
    block_list = skeleton.get_submodule(family.layer_prefix.rstrip("."))
    layers = nn.ModuleList(block_list[i] for i in range(span.start, span.end))
    unset = [name for name, t in [*layers.named_parameters(), *layers.named_buffers()] if t.is_meta]
    if unset:
        raise CheckpointError(f"checkpoint {folder}: blocks {span} have no value for {unset[:3]}")
    layers.eval().requires_grad_(False)
    del skeleton, block_list  # the float weights go as each Linear is quantized
    lean_backward(quantize_linears(layers, quantize))
    install_hooks(layers, span.start)
    rotary_cls = family.rotary_cls
    rotary = rotary_cls(config=config).to(dtype=torch.float32) if rotary_cls is not None else None
    return SpanBlocks(config=config, span=span, layers=layers, rotary=rotary, dtype=dtype, family=family,
                      quantization=quantize)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the enclosed torch ops on ``n`` intra-op threads (0: leave as is), then restore.

    A decode step is a few tiny matrix products separated by network waits: by then the extra OpenMP
    threads have gone to sleep, and waking them (or their spinning beside the next node's work on a
    shared machine) costs more than they save. The setting is per calling thread."""
    before = torch.get_num_threads()
    if n <= 0 or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_position_ids(seq_len: int, offset: int = 0) -> torch.Tensor:
    """Positions as local transformers assigns them when none are given: ``offset .. offset+seq-1``."""
    return torch.arange(offset, offset + seq_len).unsqueeze(0)


def _masks(blocks: SpanBlocks, span: Span, hidden: torch.Tensor, attention_mask, position_ids,
           cache: Cache | None) -> dict[bool, Any]:
    """One mask per attention kind in ``span`` (full / sliding window), made by transformers' own code.

    With a cache, the mask code reads the past length from the first layer of that kind in ``span``
    (the cache holds only this node's blocks, so layer 0 may be empty)."""
    masks = {}
    materialize = (blocks.family or get_family(blocks.config)).materialize_mask
    for i in range(span.start, span.end):
        sliding = uses_sliding_window(blocks.config, i)
        if sliding not in masks:
            masks[sliding] = compat.attention_mask_for(blocks.config, sliding, hidden, attention_mask, position_ids,
                                                       cache, i if cache is not None else None, materialize)
    return masks


def _alibi(blocks: SpanBlocks, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
           cache: Cache | None, first: int) -> torch.Tensor:
    """The family's own ALiBi bias over every position so far (past + new), from the 2-D padding mask
    (all ones when none is given, as the family's base model does)."""
    if attention_mask is None:
        past = cache.get_seq_length(first) if cache is not None else 0
        attention_mask = torch.ones(hidden.shape[0], past + hidden.shape[1], dtype=torch.int64)
    family = blocks.family or get_family(blocks.config)
    return family.alibi_fn(attention_mask, blocks.config.num_attention_heads, hidden.dtype)


def new_cache(blocks: SpanBlocks) -> DynamicCache:
    """An empty key/value cache; only the layers this node runs ever fill it.

    Every layer keeps all its positions, sliding-window layers included (their masks still see only
    the window): a session's budget reserves that room anyway, and only a full cache can drop rejected
    draft tokens or be rebuilt the same way by a replay (transformers' windowed layers cannot crop once
    the window is full)."""
    return DynamicCache()


def forward_span(
    blocks: SpanBlocks,
    span: Span,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
) -> torch.Tensor:
    """Run blocks ``span`` (inside what ``blocks`` hosts) over ``hidden`` [batch, seq, hidden_size].

    With ``cache``, ``hidden`` holds only new positions, ``attention_mask`` covers past + new
    positions, and the new keys/values are appended to ``cache``.
    """
    if not blocks.span.covers(span):
        raise ValueError(f"blocks {span} are not inside the hosted span {blocks.span}")
    if position_ids is None:
        past = cache.get_seq_length(span.start) if cache is not None else 0
        position_ids = default_position_ids(hidden.shape[1], past)
    x = hidden.to(blocks.dtype)
    masks = _masks(blocks, span, x, attention_mask, position_ids, cache)
    kinds = [layer_type(blocks.config, i) for i in range(span.start, span.end)]
    rotary = compat.rotary_embeddings(blocks.rotary, x, position_ids, set(kinds)) if blocks.rotary is not None else {}
    family = blocks.family or get_family(blocks.config)
    alibi = _alibi(blocks, x, attention_mask, cache, span.start) if family.positions == ALIBI else None
    for i, kind in zip(range(span.start, span.end), kinds):
        x = compat.call_decoder_layer(blocks.layer(i), x, attention_mask=masks[uses_sliding_window(blocks.config, i)],
                                      position_ids=position_ids, position_embeddings=rotary.get(kind), cache=cache,
                                      alibi=alibi)
    return x


def inference_step(
    blocks: SpanBlocks,
    span: Span,
    cache: Cache,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    max_chunk_tokens: int,
) -> torch.Tensor:
    """Append ``hidden`` (new positions) to a session's ``cache`` and return their outputs.

    ``attention_mask`` covers every position so far (past + new). Long inputs run in chunks of at
    most ``max_chunk_tokens`` (batch x positions) so a long prefill's attention scores stay small.
    """
    batch, new = hidden.shape[:2]
    past = attention_mask.shape[1] - new
    step = max(1, max_chunk_tokens // batch)
    outputs = []
    with torch.no_grad():
        for lo in range(0, new, step):
            hi = min(new, lo + step)
            outputs.append(forward_span(blocks, span, hidden[:, lo:hi], attention_mask[:, : past + hi],
                                        position_ids[:, lo:hi], cache))
    return torch.cat(outputs, dim=1)


def prefixed_cache(blocks: SpanBlocks, span: Span, prefix: torch.Tensor) -> DynamicCache:
    """A cache holding prefix-tuning keys/values ([blocks, 2, batch, kv_heads, virtual, head_dim])."""
    cache = new_cache(blocks)
    for j, i in enumerate(range(span.start, span.end)):
        cache.update(prefix[j, 0].to(blocks.dtype), prefix[j, 1].to(blocks.dtype), i)
    return cache


@dataclass
class SavedPass:
    """A forward pass kept with its autograd graph, so backward need not recompute it."""

    span: Span
    out: torch.Tensor
    leaves: list[torch.Tensor]  # [input hidden, the tensors of each adapter module (A, B, ...)..., prefix?]
    lora: Lora | None
    has_prefix: bool

    nbytes: int = 0  # bytes of the storages this pass keeps alive (see KeptBytes), measured, not estimated


class KeptBytes(torch.autograd.graph.saved_tensors_hooks):
    """Measures what autograd keeps for backward while it is active: the bytes of every distinct storage
    saved by the graph, except the model's own weights (shared, not kept for this pass). Measured because
    any estimate misses something: attention weights with a padding mask cost far more than the
    activations (an 8,192-token pass estimated at 192 MB held 1.3 GB)."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.storages = exclude, {}
        super().__init__(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude:
            self.storages[ptr] = storage.nbytes()
        return t

    def add(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage too (kept by the pass whether or not autograd saved it)."""
        self._pack(t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def weight_storages(blocks: SpanBlocks) -> set[int]:
    """Data pointers of the storages of ``blocks``' parameters and buffers (a quantized weight's: those
    of the tensors inside it)."""
    rotary = blocks.rotary if blocks.rotary is not None else nn.Module()
    tensors = [t for p in [*blocks.layers.parameters(), *blocks.layers.buffers(), *rotary.parameters(),
                           *rotary.buffers()] for t in inner_tensors(p)]
    return {t.untyped_storage().data_ptr() for t in tensors}


def forward_for_backward(
    blocks: SpanBlocks,
    span: Span,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    lora: Lora | None = None,
    prefix: torch.Tensor | None = None,
) -> SavedPass:
    """Forward over ``span`` with the graph kept for the gradients of input, LoRA weights and prefix."""
    leaf_lora = lora.for_span(span.start, span.end) if lora is not None else None
    kept = KeptBytes(weight_storages(blocks))
    with torch.enable_grad(), active(leaf_lora), kept:
        x = hidden.to(blocks.dtype).detach().requires_grad_(True)
        leaf_prefix = prefix.detach().requires_grad_(True) if prefix is not None else None
        cache = prefixed_cache(blocks, span, leaf_prefix) if leaf_prefix is not None else None
        out = forward_span(blocks, span, x, attention_mask, position_ids, cache)
    keys = list(leaf_lora.weights) if leaf_lora is not None else []
    leaves = [x] + [t for k in keys for t in leaf_lora.weights[k]] + ([leaf_prefix] if prefix is not None else [])
    for t in [out, *leaves]:
        kept.add(t)
    return SavedPass(span, out, leaves, leaf_lora, prefix is not None, kept.total)


def backward_saved(saved: SavedPass, grad_outputs: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[tuple[int, str], tuple[torch.Tensor, ...]], torch.Tensor | None]:
    """Gradients of a kept forward pass: input, each adapter module's tensors (LoRA A, B, ...), prefix."""
    grads = torch.autograd.grad(saved.out, saved.leaves, grad_outputs.to(saved.out.dtype), allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, saved.leaves)]
    lora_grads = {}
    if saved.lora is not None:
        at = 1
        for key, tensors in saved.lora.weights.items():  # each module's tensors, as laid out in leaves
            lora_grads[key] = tuple(grads[at:at + len(tensors)])
            at += len(tensors)
    return grads[0], lora_grads, grads[-1] if saved.has_prefix else None


def backward_span(
    blocks: SpanBlocks,
    span: Span,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    lora: Lora | None = None,
    prefix: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[tuple[int, str], tuple[torch.Tensor, ...]], torch.Tensor | None]:
    """d loss / d hidden for blocks ``span``, d loss / d (A, B) of ``lora``'s modules there and
    d loss / d ``prefix``, recomputing the forward pass (the node keeps nothing between calls)."""
    saved = forward_for_backward(blocks, span, hidden, attention_mask, position_ids, lora, prefix)
    return backward_saved(saved, grad_outputs)
