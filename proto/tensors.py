"""Tensor <-> protobuf codec with size checks done BEFORE anything is allocated."""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Collection, Iterable

import torch

from proto import swarmlm_pb2 as pb

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})
INDEX_DTYPES = frozenset({"int64", "int32"})
MASK_DTYPES = frozenset({"int64", "int32", "bool"})
MAX_NDIM = 8


def shape_text(shape, limit: int = MAX_NDIM) -> str:
    """A shape for an error message: at most ``limit`` sizes, so a hostile million-entry shape is not echoed."""
    sizes = list(shape)
    if len(sizes) <= limit:
        return str(sizes)
    return f"[{', '.join(map(str, sizes[:limit]))}, ... ({len(sizes)} dimensions)]"


class TensorError(ValueError):
    """An incoming tensor message is malformed or over a limit; the message says what is wrong."""


def serialize(tensor: torch.Tensor) -> pb.Tensor:
    """Encode a CPU tensor as a typed ``Tensor`` message (no pickle)."""
    if tensor.dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot send dtype {tensor.dtype}; supported: {sorted(DTYPES)}")
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def deserialize(
    msg: pb.Tensor,
    *,
    name: str,
    allowed: Collection[str],
    max_bytes: int,
    ndim: int | None = None,
) -> torch.Tensor:
    """Decode ``msg`` after checking dtype, rank, shape against bytes and a byte budget.

    Every check uses only the declared header, so a hostile 1 GiB shape costs nothing.
    """
    if msg.dtype not in DTYPES:
        raise TensorError(f"{name}: unknown dtype {msg.dtype!r}; expected one of {sorted(allowed)}")
    if msg.dtype not in allowed:
        raise TensorError(f"{name}: dtype {msg.dtype} not allowed here; expected one of {sorted(allowed)}")
    shape = list(msg.shape)
    if len(shape) > MAX_NDIM or (ndim is not None and len(shape) != ndim):
        raise TensorError(f"{name}: expected {ndim if ndim is not None else f'at most {MAX_NDIM}'} dimensions, got shape {shape_text(shape)}")
    if any(s < 0 for s in shape):
        raise TensorError(f"{name}: negative size in shape {shape_text(shape)}")
    itemsize = torch.empty((), dtype=DTYPES[msg.dtype]).element_size()
    nbytes = math.prod(shape) * itemsize
    if nbytes > max_bytes:
        raise TensorError(f"{name}: shape {shape_text(shape)} ({msg.dtype}) is {nbytes} bytes, over the limit of {max_bytes}")
    if len(msg.data) != nbytes:
        raise TensorError(f"{name}: shape {shape_text(shape)} ({msg.dtype}) needs {nbytes} bytes, got {len(msg.data)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=DTYPES[msg.dtype])
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(DTYPES[msg.dtype]).reshape(shape)


def lora_digest(modules: Iterable[pb.LoraModule]) -> str:
    """SHA-256 (hex) of LoRA module weights as sent (block, module name, then each of A and B: dtype, shape and
    bytes), in (block, module) order. Nodes cache client adapters under it: a cached adapter is named by
    its content, so whoever sends other weights makes another entry and nobody's weights change."""
    h = hashlib.sha256()
    for m in sorted(modules, key=lambda m: (m.block, m.module)):
        name = m.module.encode()
        h.update(struct.pack(">QI", m.block, len(name)) + name)
        for t in (m.a, m.b):
            _hash_tensor(h, t)
        for field in ("magnitude", "ia3"):  # DoRA's and IA3's tensors: hashed only when present, so a plain
            if m.HasField(field):  # LoRA adapter's digest is what it always was
                h.update(field.encode())
                _hash_tensor(h, getattr(m, field))
        if m.ia3_input:
            h.update(b"ia3_input")
    return h.hexdigest()


def _hash_tensor(h, t: pb.Tensor) -> None:
    dtype = t.dtype.encode()
    h.update(struct.pack(">II", len(dtype), len(t.shape)) + dtype)
    h.update(struct.pack(f">{len(t.shape)}q", *t.shape) + struct.pack(">Q", len(t.data)) + t.data)


# The LoraModule fields holding one module's tensors (its weights, or in a BackwardResponse their gradients),
# by LoraAdapter.method, in the order the node and the client list them
MODULE_FIELDS = {"": ("a", "b"), "dora": ("a", "b", "magnitude"), "ia3": ("ia3",)}
