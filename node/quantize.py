"""Quantized frozen blocks (``node serve --quantize``), by a well-kept library, never by our own kernels.

``int8``: torchao's weight-only int8 (``Int8WeightOnlyConfig``: symmetric, one scale per output row) on
every Linear of the hosted blocks. The modules stay ``nn.Linear`` (their weight becomes torchao's
``Int8Tensor``), so the LoRA hooks (node.lora) still wrap them, and autograd reaches the input through
the frozen int8 weight: clients can train LoRA and prompts through int8 nodes (QLoRA). Norms, rotary
tables and biases stay in the compute dtype. ``quantize_linears`` is also what a local reference model
is quantized with (tests, bench): same library, same settings.

``nf4``: 4-bit NormalFloat needs bitsandbytes on a CUDA GPU, and nodes compute on the CPU, so it is
refused with a line saying what is missing (a config we cannot run is refused, never approximated).
"""
from __future__ import annotations

import importlib.util
import logging

from torch import nn

from node.config import QUANTIZATIONS


class QuantizationUnavailable(ValueError):
    """``--quantize`` names a method this machine cannot run."""


def check_available(method: str) -> None:
    """QuantizationUnavailable unless ``method`` can run here (before any weight is loaded)."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {method!r}")
    if method == "int8" and importlib.util.find_spec("torchao") is None:
        raise QuantizationUnavailable("--quantize int8 needs torchao (pip install torchao; see requirements.lock)")
    if method == "nf4":
        import torch

        missing = [what for what, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                         ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None))
                   if not ok]
        if missing:
            raise QuantizationUnavailable(f"--quantize nf4 needs {' and '.join(missing)}, which this machine "
                                          "lacks; use --quantize int8 (CPU) or none")
        raise QuantizationUnavailable("--quantize nf4 needs the blocks on the GPU, and nodes compute on the CPU; "
                                      "use --quantize int8 or none")


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
    config_cls, quantize_ = _torchao()
    quantize_(module, config_cls(set_inductor_config=False),
              filter_fn=lambda m, name: isinstance(m, nn.Linear) and not any(s in name for s in skip))
    return module


def is_quantized(tensor) -> bool:
    """Whether a parameter is a quantized tensor subclass (its data lives in inner tensors)."""
    return hasattr(tensor, "__tensor_flatten__")


def inner_tensors(tensor) -> list:
    """The plain tensors holding a (possibly quantized) parameter's data: itself, or a subclass's parts."""
    if not is_quantized(tensor):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in inner_tensors(getattr(tensor, name))]
