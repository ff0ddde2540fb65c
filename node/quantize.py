"""Quantized frozen blocks (``node serve --quantize``), by a well-kept library, never by our own kernels.

``int8``: torchao's weight-only int8 (``Int8WeightOnlyConfig``: symmetric, one scale per output row) on
every Linear of the hosted blocks. The modules stay ``nn.Linear`` (their weight becomes torchao's
``Int8Tensor``), so the LoRA hooks (node.lora) still wrap them, and autograd reaches the input through
the frozen int8 weight: clients can train LoRA and prompts through int8 nodes (QLoRA). Norms, rotary
tables and biases stay in the compute dtype. ``quantize_linears`` is also what a local reference model
is quantized with (tests, bench): same library, same settings.

``nf4``: bitsandbytes' 4-bit NormalFloat (``Params4bit``, blocks of 64, double-quantized scales, as QLoRA
and transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`` do) on a CUDA GPU. Each Linear's packed weight lives on the GPU and its
product runs there (``bitsandbytes.matmul_4bit``, whose backward gives the input's gradient); the rest of
the block (norms, attention, rotary, biases, the LoRA hooks) stays on the CPU like every node's, so only a
Linear's input and output cross to and from the GPU. bitsandbytes is imported only then; without a CUDA
GPU or without bitsandbytes ``--quantize nf4`` is refused in one line saying which is missing (a config
we cannot run is refused, never approximated). This path has not run on this project's CI (no GPU).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import logging
import types

import torch
from torch import nn
from torch.nn import functional as F

from node.config import QUANTIZATIONS


class QuantizationUnavailable(ValueError):
    """``--quantize`` names a method this machine cannot run."""


def check_available(method: str) -> None:
    """QuantizationUnavailable unless ``method`` can run here (before any weight is loaded)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if method == "int8" and importlib.util.find_spec("torchao") is None:
        raise QuantizationUnavailable("--quantize int8 needs torchao: pip install 'swarmlm[quant]'")
    if method == "nf4":
        import torch

        missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                         ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None))
                   if not ok]
        if missing:
            raise QuantizationUnavailable(f"--quantize nf4 needs {' and '.join(missing)} (its 4-bit weights and "
                                          "their products live on the GPU), which this machine lacks; use "
                                          "--quantize int8 (CPU) or none")


def _torchao():
    """torchao's quantization API, imported quietly: on a CPU-only machine its CUDA kernels fail to load
    and it logs a warning per library, which says nothing about the int8 CPU path used here."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return Int8WeightOnlyConfig, quantize_


def quantize_linears(module: nn.Module, method: str, skip: tuple[str, ...] = ()) -> nn.Module:
    """Quantize every ``nn.Linear`` inside ``module`` in place by ``method`` ("none": unchanged); Linears
    whose qualified name contains one of ``skip`` stay as they are (a local PEFT model's lora_A/lora_B)."""
    if method == "none":
        return module
    check_available(method)
    if method == "nf4":
        _nf4_linears(module, skip)
        release_freed_memory()
        return module
    config_cls, quantize_ = _torchao()
    quantize_(module, config_cls(set_inductor_config=False),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and not any(s in name for s in skip))
    release_freed_memory()
    return module


NF4_BLOCKSIZE = 64  # values per absmax scale (bitsandbytes' and QLoRA's default)


def _nf4_linears(module: nn.Module, skip: tuple[str, ...]) -> None:
    """Every Linear inside ``module`` (but ``skip``) gets its weight as a bitsandbytes NF4 ``Params4bit`` on
    the current CUDA device (quantized by bitsandbytes as it moves there) and ``_nf4_forward``."""
    import bitsandbytes as bnb  # only here: nf4 was asked for and check_available found CUDA and bitsandbytes

    device = nf4_device()
    for name, m in list(module.named_modules()):
        if not isinstance(m, nn.Linear) or any(s in name for s in skip) or is_nf4(m.weight):
            continue
        compute_dtype = m.weight.dtype
        weight = bnb.nn.Params4bit(m.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                   blocksize=NF4_BLOCKSIZE).to(device)
        m.weight = weight  # the float copy goes with the old Parameter
        m.nf4_compute_dtype = compute_dtype
        m.forward = types.MethodType(_nf4_forward, m)


def nf4_device() -> torch.device:
    """Where NF4 weights live and multiply: the current CUDA device (CUDA_VISIBLE_DEVICES picks it)."""
    return torch.device("cuda", torch.cuda.current_device())


def _nf4_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` with ``W`` the module's NF4 weight on the GPU: ``x`` goes there in the compute dtype,
    the product (bitsandbytes.matmul_4bit: dequantizes blocks on the fly; autograd gives ``x`` its gradient
    through the frozen weight) comes back to ``x``'s device and dtype; the bias is added there."""
    import bitsandbytes as bnb

    weight = self.weight
    out = bnb.matmul_4bit(x.to(weight.device, self.nf4_compute_dtype), weight.t(), bias=None,
                          quant_state=weight.quant_state)
    out = out.to(x.device, x.dtype)
    return out + self.bias.to(out.dtype) if self.bias is not None else out


def is_nf4(tensor) -> bool:
    """Whether a parameter is a bitsandbytes 4-bit weight (packed, with its quantization state)."""
    return getattr(tensor, "quant_state", None) is not None and type(tensor).__name__ == "Params4bit"


def float_weight(module: nn.Linear) -> torch.Tensor:
    """A Linear's frozen weight as [out, in] floats on the CPU, dequantized if the node quantized it
    (torchao int8, bitsandbytes NF4); a plain weight as it is."""
    weight = module.weight
    if is_nf4(weight):
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, weight.quant_state).to("cpu", module.nf4_compute_dtype)
    if is_quantized(weight):  # a torchao tensor subclass
        return weight.dequantize()
    return weight


class _BackwardFromDequantized(torch.autograd.Function):
    """``linear(x, W)`` by torchao, whose backward multiplies by ``W.dequantize()`` made then, for one layer
    at a time. Left to autograd, torchao's matrix product saves the float copy of ``W`` it multiplies by,
    so a kept forward pass (node.activations) held a float32 copy of every weight of the span: an int8
    node then needed more memory for training than a float32 one (measured: 2003 vs 1640 MiB peak, 16
    blocks of a 270M model). The weight is frozen: only the input's gradient is computed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Linear) -> torch.Tensor:
        ctx.module = module
        return F.linear(x, module.weight, module.bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.module.weight.dequantize(grad.dtype), None


def _lean_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _BackwardFromDequantized.apply(x, self)


def lean_backward(module: nn.Module) -> None:
    """Give every quantized Linear inside ``module`` the backward of ``_BackwardFromDequantized`` (its
    forward, hooks included, is unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and is_quantized(m.weight):
            m.forward = types.MethodType(_lean_forward, m)


def release_freed_memory() -> None:
    """Give the float weights just freed back to the system (glibc's malloc_trim; elsewhere nothing).

    Quantizing allocates each int8 weight while its float one is still there, then frees the float one:
    the heap is left with holes between int8 weights that the allocator keeps, so without this a node
    serving 16 int8 blocks of a 270M model stayed at float32's resident memory (measured: 1302 MiB
    vs 1279 MiB float32)."""
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is not None:
        trim(0)


def is_quantized(tensor) -> bool:
    """Whether a parameter is a quantized tensor subclass (its data lives in inner tensors)."""
    return hasattr(tensor, "__tensor_flatten__")


def inner_tensors(tensor) -> list:
    """The plain tensors holding a (possibly quantized) parameter's data: itself, or a subclass's parts."""
    if not is_quantized(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]
