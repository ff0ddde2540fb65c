"""Micro-batches (ClientConfig.micro_batches): a batch's rows split into pieces that flow through the
spans as a pipeline.

Rows of a batch never interact inside a transformer block, so running each micro-batch through every
hop on its own and concatenating the outputs computes the same thing as the whole batch (up to float
rounding: matrix products of other shapes sum in other orders). Run concurrently, micro-batch i+1 is
at hop 1 while micro-batch i is at hop 2; backward likewise in reverse. Gradients are the same sums:
the input gradients concatenate, the adapter's (and a prefix's) add up over the micro-batches.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Awaitable, Iterable, TypeVar

import torch

T = TypeVar("T")
SEED_STRIDE = 1 << 48  # micro-batch i > 0 draws its LoRA dropout masks from seed + i x this (never a step's own)


def row_slices(rows: int, parts: int) -> list[slice]:
    """``rows`` split into ``min(parts, rows)`` contiguous slices whose sizes differ by at most one."""
    if parts < 1 or rows < 1:
        raise ValueError(f"need rows >= 1 and parts >= 1, got rows={rows}, parts={parts}")
    parts = min(parts, rows)
    base, extra = divmod(rows, parts)
    slices, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        slices.append(slice(start, end))
        start = end
    return slices


@dataclass(frozen=True)
class Piece:
    """One micro-batch's share of a pass's inputs."""

    hidden: torch.Tensor  # [rows, seq, hidden]
    mask: torch.Tensor | None  # [rows, positions]
    positions: torch.Tensor | None  # [rows or 1, seq]
    prefix: torch.Tensor | None  # [blocks, 2, rows, kv_heads, virtual, head_dim]


def piece(rows: slice, batch: int, hidden: torch.Tensor | None, mask: torch.Tensor | None,
          positions: torch.Tensor | None, prefix: torch.Tensor | None) -> Piece:
    """The ``rows`` of every per-row tensor of a batch of ``batch`` rows (position ids shared by all rows,
    [1, seq], are shared by every micro-batch too)."""
    if rows == slice(0, batch):
        return Piece(hidden, mask, positions, prefix)
    return Piece(hidden[rows] if hidden is not None else None,
                 mask[rows] if mask is not None else None,
                 positions[rows] if positions is not None and positions.shape[0] == batch else positions,
                 prefix[:, :, rows].contiguous() if prefix is not None else None)


def micro_seed(seed: int, index: int) -> int:
    """The LoRA dropout seed of micro-batch ``index``: its masks differ from every other micro-batch's
    (one seed for all would repeat micro-batch 0's masks in each)."""
    return seed if index == 0 else (seed + index * SEED_STRIDE) % (1 << 64)


def with_seed(lora, index: int):
    """``lora`` (client.chain.LoraUse or None) with micro-batch ``index``'s dropout seed."""
    return lora if lora is None or index == 0 else replace(lora, dropout_seed=micro_seed(lora.dropout_seed, index))


def sum_grads(parts: list[dict]) -> dict:
    """Per-module gradient tuples added up over micro-batches (the first one's dict when there is one)."""
    if len(parts) == 1:
        return parts[0]
    total: dict = {}
    for grads in parts:
        for key, tensors in grads.items():
            total[key] = tensors if key not in total else tuple(a + b for a, b in zip(total[key], tensors))
    return total


def cat_or_none(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    """The micro-batches' tensors joined along ``dim`` (None when they are None)."""
    if tensors[0] is None:
        return None
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=dim)


async def all_of(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Every coroutine run concurrently; the first failure cancels the others (none keeps running
    unobserved) and is raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    if len(tasks) == 1:
        return [await tasks[0]]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
