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
BLOCKWISE8 = "blockwise8"  # int8 codes with one float32 absmax scale per block of values (Tensor.encoding)
ENCODINGS = frozenset({BLOCKWISE8})  # encodings besides plain (""), as Tensor.encoding names them
BLOCK_SIZE = 64  # values per scale we send: 1 + 4/64 bytes per value instead of 4 (float32)
MIN_BLOCK, MAX_BLOCK = 8, 4096  # block sizes accepted
# what activations may travel as (ClientConfig.wire_dtype / train_wire, the node record's "wire")
WIRE_FORMATS = ("float32", "bfloat16", "float16", BLOCKWISE8)


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


def quantize_blockwise(tensor: torch.Tensor, block: int = BLOCK_SIZE) -> pb.Tensor:
    """Encode a float tensor as ``blockwise8``: per block of ``block`` values (in C order), int8 codes
    round(x / s) with s = absmax / 127 (an all-zero block has s = 0). Decoding gives codes x s in
    ``tensor``'s dtype: at most s / 2 off per value."""
    if DTYPE_NAMES.get(tensor.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"blockwise8 encodes float tensors, not {tensor.dtype}")
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise ValueError(f"block size must be in {MIN_BLOCK}..{MAX_BLOCK}, got {block}")
    flat = tensor.detach().to("cpu", torch.float32).reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, -n % block)).view(-1, block)
    scales = blocks.abs().amax(dim=1) / 127
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (blocks / safe[:, None]).round_().clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return pb.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=codes.numpy().tobytes(),
                     encoding=BLOCKWISE8, scales=scales.numpy().tobytes(), block_size=block)


def encode(tensor: torch.Tensor, wire: str | None) -> pb.Tensor:
    """``tensor`` as activations travel in format ``wire`` (one of WIRE_FORMATS; None: its own dtype).
    16-bit formats are torch's own cast (``tensor.to(bfloat16)``); the receiver gets that tensor exactly."""
    if wire is None:
        return serialize(tensor)
    if wire == BLOCKWISE8:
        return quantize_blockwise(tensor)
    if wire not in FLOAT_DTYPES:
        raise ValueError(f"unknown wire format {wire!r}; expected one of {', '.join(WIRE_FORMATS)}")
    return serialize(tensor.to(DTYPES[wire]))


def serialize_like(tensor: torch.Tensor, like: pb.Tensor) -> pb.Tensor:
    """An answer encoded as its request's ``like`` was: blockwise8 with its block size, else plain."""
    if like.encoding == BLOCKWISE8:
        return quantize_blockwise(tensor, like.block_size)
    return serialize(tensor)


def deserialize(
    msg: pb.Tensor,
    *,
    name: str,
    allowed: Collection[str],
    max_bytes: int,
    ndim: int | None = None,
    encodings: Collection[str] = (),
) -> torch.Tensor:
    """Decode ``msg`` after checking dtype, rank, shape against bytes and a byte budget.

    Every check uses only the declared header, so a hostile 1 GiB shape costs nothing. ``max_bytes``
    bounds the decoded tensor; ``encodings``: the encodings besides plain accepted here (ENCODINGS).
    """
    if msg.encoding and msg.encoding not in encodings:
        known = "unknown" if msg.encoding not in ENCODINGS else "not accepted here"
        raise TensorError(f"{name}: encoding {capped_name(msg.encoding)!r} is {known}; expected "
                          f"{' or '.join(['plain', *sorted(encodings)])}")
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
    if msg.encoding == BLOCKWISE8:
        return _dequantize(msg, name, shape, math.prod(shape))
    if len(msg.data) != nbytes:
        raise TensorError(f"{name}: shape {shape_text(shape)} ({msg.dtype}) needs {nbytes} bytes, got {len(msg.data)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=DTYPES[msg.dtype])
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(DTYPES[msg.dtype]).reshape(shape)


def capped_name(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _dequantize(msg: pb.Tensor, name: str, shape: list[int], n: int) -> torch.Tensor:
    """A blockwise8 message whose decoded size is already within budget: check its byte counts, then decode."""
    block = msg.block_size
    if not MIN_BLOCK <= block <= MAX_BLOCK:
        raise TensorError(f"{name}: blockwise8 block_size must be in {MIN_BLOCK}..{MAX_BLOCK}, got {block}")
    blocks = -(-n // block)
    if len(msg.data) != n or len(msg.scales) != 4 * blocks:
        raise TensorError(f"{name}: blockwise8 shape {shape_text(shape)} needs {n} code bytes and {4 * blocks} "
                          f"scale bytes (block {block}), got {len(msg.data)} and {len(msg.scales)}")
    if n == 0:
        return torch.empty(shape, dtype=DTYPES[msg.dtype])
    scales = torch.frombuffer(bytearray(msg.scales), dtype=torch.float32)
    if not (torch.isfinite(scales).all() and (scales >= 0).all()):
        raise TensorError(f"{name}: blockwise8 scales must be finite and >= 0")
    codes = torch.frombuffer(bytearray(msg.data), dtype=torch.int8).to(torch.float32)
    padded = torch.nn.functional.pad(codes, (0, blocks * block - n)).view(blocks, block)
    return (padded * scales[:, None]).reshape(-1)[:n].reshape(shape).to(DTYPES[msg.dtype])


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
