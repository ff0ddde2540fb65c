"""Client-held LoRA adapters applied by a node to its frozen blocks.

Every Linear of every hosted block carries a forward hook that adds ``scaling * B A dropout(x)``
when the current thread has an adapter active. Requests run in worker threads, so concurrent
requests with different adapters never see each other's weights. Dropout masks come from a seed
the client sends, so the backward pass recomputes exactly the same forward.
"""
from __future__ import annotations

import json
import math
import re
import threading
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from node.quantize import float_weight
from proto.tensors import shape_text
from swarm.arch import LAYER_PREFIXES, PROJECTIONS

_active = threading.local()
MAX_RANK = 256


@dataclass
class Lora:
    """One adapter as a node applies it: weights keyed by (block, module name)."""

    id: str
    version: int
    scaling: float
    dropout: float
    seed: int
    # per module, by method (proto.tensors.MODULE_FIELDS): LoRA (A [r, in], B [out, r]); DoRA (A, B, magnitude
    # [out]); IA3 (ia3_l [out], or [in] for the modules in ``inputs``)
    weights: dict[tuple[int, str], tuple[torch.Tensor, ...]]
    blocks: frozenset[int] = frozenset()  # blocks whose weights were sent (some may have no module)
    method: str = ""  # LoraAdapter.method: "" (LoRA), "dora" or "ia3"
    inputs: frozenset[tuple[int, str]] = frozenset()  # IA3: modules whose input is scaled (feedforward modules)

    def for_span(self, start: int, end: int) -> "Lora":
        """The same adapter restricted to blocks [start, end), with fresh leaf tensors for autograd."""
        weights = {k: tuple(t.detach().requires_grad_(True) for t in ts)
                   for k, ts in self.weights.items() if start <= k[0] < end}
        return replace(self, weights=weights)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.weights.values() for t in ts)


def install_hooks(layers: nn.ModuleList, first_block: int) -> None:
    """Give every projection (Linear, or GPT-2's Conv1D: the same ``x A^T B^T`` update, as PEFT's
    fan_in_fan_out LoRA) of every block the hook that applies the thread's active adapter."""
    for offset, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, PROJECTIONS):
                module.register_forward_hook(_hook((first_block + offset, name)))
                module.register_forward_pre_hook(_input_hook((first_block + offset, name)))


def _hook(key: tuple[int, str]):
    def apply(module: nn.Linear, args, output: torch.Tensor):
        lora: Lora | None = getattr(_active, "lora", None)
        if lora is None or key not in lora.weights:
            return None
        if lora.method == "ia3":
            if key in lora.inputs:  # scaled the input (_input_hook)
                return None
            (scale,) = lora.weights[key]
            return (output.to(scale.dtype) * scale).to(output.dtype)
        a, b = lora.weights[key][:2]
        x = args[0].to(a.dtype)
        if lora.dropout > 0:
            generator = torch.Generator().manual_seed((lora.seed * 1_000_003 + key[0] * 7919 + zlib.crc32(key[1].encode())) % (1 << 62))
            keep = torch.rand(x.shape, generator=generator) >= lora.dropout
            x = x * keep / (1 - lora.dropout)
        if lora.method == "dora":
            return output + _dora_delta(module, x, output, lora, lora.weights[key]).to(output.dtype)
        return (output + (x @ a.t()) @ b.t() * lora.scaling).to(output.dtype)  # summed in float32, as PEFT does

    return apply


def _input_hook(key: tuple[int, str]):
    """IA3 on a feedforward module: the input is scaled before the projection, as PEFT's IA3 Linear does."""
    def apply(module: nn.Linear, args):
        lora: Lora | None = getattr(_active, "lora", None)
        if lora is None or lora.method != "ia3" or key not in lora.inputs:
            return None
        (scale,) = lora.weights[key]
        return ((args[0].to(scale.dtype) * scale).to(args[0].dtype), *args[1:])

    return apply


def base_weight(module: nn.Module) -> torch.Tensor:
    """A projection's frozen weight as [out, in] floats (dequantized when the node quantized it)."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"DoRA is applied to nn.Linear projections only, not {type(module).__name__}")
    return float_weight(module)


def _dora_delta(module: nn.Module, x: torch.Tensor, output: torch.Tensor, lora: Lora, weights) -> torch.Tensor:
    """What DoRA adds to ``output`` (= W x + bias), with PEFT's math (peft.tuners.lora.dora.DoraLinearLayer):
    magnitude / |W + scaling B A| per output row (the norm a constant: no gradient), times W x' + scaling B A x'
    (x' the dropped-out input), minus the W x already in ``output``."""
    a, b, magnitude = weights
    weight = base_weight(module).to(a.dtype)
    with torch.no_grad():
        norm = torch.linalg.norm(weight + lora.scaling * (b @ a), dim=1)
    scale = (magnitude / norm).view(1, -1)
    if lora.dropout > 0:  # PEFT recomputes the base term on the dropped-out input
        base = x @ weight.t()
    else:
        base = output.to(a.dtype)
        if module.bias is not None:
            base = base - module.bias.to(a.dtype)
    return (scale - 1) * base + scale * ((x @ a.t()) @ b.t()) * lora.scaling


@contextmanager
def active(lora: Lora | None) -> Iterator[None]:
    """Apply ``lora`` to forward passes run by this thread inside the block."""
    previous = getattr(_active, "lora", None)
    _active.lora = lora
    try:
        yield
    finally:
        _active.lora = previous


class LoraCache:
    """Recently used client adapters' weights, so an unchanged adapter is not re-sent. Keyed by the SHA-256
    of the weights (proto.tensors.lora_digest), never by the client-chosen id and version: anyone can claim
    an id, so weights sent under a victim's id only make an entry of their own. Bounded in count and bytes
    (least recently used first out), so clients cannot pile up weights in a node's memory."""

    def __init__(self, max_adapters: int = 32, max_bytes: int = 1 << 30):
        self.max_adapters, self.max_bytes = max_adapters, max_bytes
        self._items: OrderedDict[str, Lora] = OrderedDict()
        self.hits = 0  # requests that named a cached adapter without its weights (metrics)
        self.misses = 0  # requests that did so for weights not cached here (the client must re-send them)

    def get(self, digest: str) -> Lora | None:
        lora = self._items.get(digest)
        if lora is not None:
            self._items.move_to_end(digest)
        return lora

    def put(self, digest: str, lora: Lora) -> Lora:
        """Keep ``lora``, whose weights hash to ``digest``; nothing is merged into other entries."""
        if lora.nbytes > self.max_bytes:  # too big to keep: used by this request only, others stay
            return lora
        self._items[digest] = lora
        self._items.move_to_end(digest)
        while len(self._items) > self.max_adapters or self.nbytes > self.max_bytes:
            self._items.popitem(last=False)
        return lora

    @property
    def nbytes(self) -> int:
        return sum(lora.nbytes for lora in self._items.values())


def load_peft_adapter(directory: Path, first: int, end: int, shapes: dict[str, tuple[int, int]]) -> Lora:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), restricted to
    blocks [first, end): what a node serves under the folder's name."""
    config = json.loads((directory / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{directory} is not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    if config.get("use_dora"):  # served as plain LoRA it would be another adapter: refused, never approximated
        raise ValueError(f"{directory} is a DoRA adapter; nodes serve plain LoRA adapters only (a client applies "
                         "DoRA: DistributedPeftModel.from_pretrained)")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    weights: dict[tuple[int, str], list] = {}
    layouts = "|".join(re.escape(p) for p in LAYER_PREFIXES)  # any family's block list
    pattern = re.compile(rf"^base_model\.model\.(?:{layouts})(\d+)\.(.+)\.lora_([AB])\.weight$")
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        for name in f.keys():
            match = pattern.match(name)
            if match is None or not first <= int(match[1]) < end:
                continue
            block, path, which = int(match[1]), match[2], match[3]
            if path not in shapes:
                raise ValueError(f"{directory}: {path} is not a projection of these blocks")
            weights.setdefault((block, path), [None, None])[0 if which == "A" else 1] = f.get_tensor(name).float()
    if any(a is None or b is None for a, b in weights.values()):
        raise ValueError(f"{directory}: some modules have lora_A without lora_B or the other way round")
    check_adapter_weights(directory, r, weights, shapes)
    return Lora(directory.name, 0, scaling, 0.0, 0, {k: (a, b) for k, (a, b) in weights.items()},
                frozenset(range(first, end)))


def check_adapter_weights(directory: Path, r: int, weights: dict, shapes: dict[str, tuple[int, int]]) -> None:
    """ValueError unless every module's A is [r, in] and B [out, r] for this model's projection, with
    0 < r <= MAX_RANK, and all weights are finite: a bad adapter is refused at start, not on every request."""
    if not 0 < r <= MAX_RANK:
        raise ValueError(f"--adapters {directory}: rank r={r} is outside 1..{MAX_RANK}")
    for (block, path), (a, b) in sorted(weights.items()):
        fan_in, fan_out = shapes[path]
        if tuple(a.shape) != (r, fan_in) or tuple(b.shape) != (fan_out, r):
            raise ValueError(f"--adapters {directory}: {path} of block {block} has lora_A {shape_text(a.shape)} "
                             f"and lora_B {shape_text(b.shape)}; this model with r={r} needs [{r}, {fan_in}] and "
                             f"[{fan_out}, {r}] (an adapter of another model?)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise ValueError(f"--adapters {directory}: {path} of block {block} contains NaN or infinity")


def load_adapter_dir(root: Path, first: int, end: int, shapes: dict[str, tuple[int, int]]) -> dict[str, Lora]:
    """Every adapter folder under ``root``, by folder name."""
    if not root.is_dir():
        raise ValueError(f"--adapters {root} is not a directory")
    found = {d.name: load_peft_adapter(d, first, end, shapes)
             for d in sorted(root.iterdir()) if (d / "adapter_config.json").is_file()}
    if not found:
        raise ValueError(f"--adapters {root} holds no PEFT adapter folders (adapter_config.json)")
    return found
