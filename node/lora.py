"""Client-held LoRA adapters applied by a node to its frozen blocks.

Every Linear of every hosted block carries a forward hook that adds ``scaling * B A dropout(x)``
when the current thread has an adapter active. Requests run in worker threads, so concurrent
requests with different adapters never see each other's weights. Dropout masks come from a seed
the client sends, so the backward pass recomputes exactly the same forward.
"""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

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
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (A [r, in], B [out, r])
    blocks: frozenset[int] = frozenset()  # blocks whose weights were sent (some may have no module)

    def for_span(self, start: int, end: int) -> "Lora":
        """The same adapter restricted to blocks [start, end), with fresh leaf tensors for autograd."""
        weights = {k: (a.detach().requires_grad_(True), b.detach().requires_grad_(True))
                   for k, (a, b) in self.weights.items() if start <= k[0] < end}
        return Lora(self.id, self.version, self.scaling, self.dropout, self.seed, weights, self.blocks)


def linear_shapes(layer: nn.Module) -> dict[str, tuple[int, int]]:
    """Projection name inside a block -> (in_features, out_features) for every Linear in it."""
    return {name: (m.in_features, m.out_features) for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def install_hooks(layers: nn.ModuleList, first_block: int) -> None:
    """Give every Linear of every block the hook that applies the thread's active adapter."""
    for offset, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(_hook((first_block + offset, name)))


def _hook(key: tuple[int, str]):
    def apply(module: nn.Linear, args, output: torch.Tensor):
        lora: Lora | None = getattr(_active, "lora", None)
        if lora is None or key not in lora.weights:
            return None
        a, b = lora.weights[key]
        x = args[0].to(a.dtype)
        if lora.dropout > 0:
            generator = torch.Generator().manual_seed((lora.seed * 1_000_003 + key[0] * 7919 + zlib.crc32(key[1].encode())) % (1 << 62))
            keep = torch.rand(x.shape, generator=generator) >= lora.dropout
            x = x * keep / (1 - lora.dropout)
        return output + ((x @ a.t()) @ b.t() * lora.scaling).to(output.dtype)

    return apply


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
    """The latest weights of recently used adapters, so an unchanged adapter is not re-sent."""

    def __init__(self, max_adapters: int = 32):
        self.max_adapters = max_adapters
        self._items: OrderedDict[str, Lora] = OrderedDict()

    def get(self, adapter_id: str, version: int) -> Lora | None:
        lora = self._items.get(adapter_id)
        if lora is None or lora.version != version:
            return None
        self._items.move_to_end(adapter_id)
        return lora

    def put(self, lora: Lora) -> Lora:
        """Store ``lora``; weights for other blocks of the same version are kept beside it."""
        old = self._items.get(lora.id)
        if old is not None and old.version == lora.version:
            lora.weights = {**old.weights, **lora.weights}
            lora.blocks = old.blocks | lora.blocks
        self._items[lora.id] = lora
        self._items.move_to_end(lora.id)
        while len(self._items) > self.max_adapters:
            self._items.popitem(last=False)
        return lora
