"""Client-held LoRA weights for remote blocks, named and initialised as PEFT does.

The weights never leave the client for good: each request carries the weights of the blocks it
targets (or, when unchanged since the node last saw them, only the adapter's id and version), the
node applies them, and backward returns their gradients.
"""
from __future__ import annotations

import math
import uuid
from typing import Any, Iterable

import torch
from torch import nn

from client.lora_config import check_exact
from swarm.arch import LAYER_PREFIX, get_family, projection_shapes
from proto import swarmlm_pb2 as pb
from proto.tensors import lora_digest, serialize
from swarm.spans import Span

PEFT_PREFIX = f"base_model.model.{LAYER_PREFIX.rstrip('.')}"  # PEFT's names: its wrapper, then the checkpoint's


def peft_prefix(model_config: Any) -> str:
    """PEFT's name prefix of the family's block list (``base_model.model.transformer.h`` for GPT-2)."""
    return f"base_model.model.{get_family(model_config).layer_prefix.rstrip('.')}"


def _targets(shapes: dict[str, tuple[int, int]], target_modules: Any) -> list[str]:
    """Projection paths inside a block that ``target_modules`` (names or suffixes, as PEFT takes) select."""
    if isinstance(target_modules, str):
        raise ValueError("target_modules as a regular expression is not supported; list the module names")
    names = set(target_modules or ())
    picked = [path for path in shapes if path.split(".")[-1] in names or path in names]
    if not picked:
        raise ValueError(f"target_modules {sorted(names)} match no projection of a block; "
                         f"available: {sorted(p.split('.')[-1] for p in shapes)}")
    return sorted(picked)


def init_pair(init: bool | str, r: int, fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A and B as PEFT initialises them: True (default) A Kaiming-uniform, B zero; "gaussian" A normal with
    std 1/r, B zero; False both as a fresh nn.Linear (the adapter starts as a random change)."""
    a, b = torch.empty(r, fan_in), torch.zeros(fan_out, r)
    if init == "gaussian":
        nn.init.normal_(a, std=1 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    return a, b


class RemoteLora(nn.Module):
    """LoRA A/B matrices for every (block, projection) of the model, kept by the client."""

    def __init__(self, model_config: Any, lora_config: Any, layers: Iterable[int] | None = None):
        super().__init__()
        check_exact(lora_config)
        shapes = projection_shapes(model_config)
        self.peft_prefix = peft_prefix(model_config)
        self.paths = _targets(shapes, lora_config.target_modules)
        r, alpha = lora_config.r, lora_config.lora_alpha
        self.scaling = alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r
        self.dropout = float(lora_config.lora_dropout)
        blocks = list(layers if layers is not None else range(model_config.num_hidden_layers))
        self.keys = [(b, p) for b in blocks for p in self.paths]
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for _, path in self.keys:
            fan_in, fan_out = shapes[path]
            a, b = init_pair(lora_config.init_lora_weights, r, fan_in, fan_out)
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(b))
        self.id = uuid.uuid4().hex
        self.dropout_seed = 0  # seeds of LoRA dropout masks so far; save it to resume training exactly
        self._version = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._digests: dict[tuple[int, Span], str] = {}  # (version, span) -> lora_digest of those weights

    def version(self) -> int:
        """A number that changes whenever any weight changes. Compared by content: tensor version
        counters are not enough (fused optimizers update parameters without bumping them)."""
        current = [p.detach() for p in self.parameters()]
        if self._snapshot is None or any(not torch.equal(a, b) for a, b in zip(current, self._snapshot)):
            self._snapshot = [t.clone() for t in current]
            self._version += 1
        return self._version

    def next_dropout_seed(self) -> int:
        self.dropout_seed += 1
        return self.dropout_seed

    def message(self, span: Span, with_weights: bool, dropout_seed: int = 0, version: int | None = None
                ) -> pb.LoraAdapter:
        """The adapter for blocks ``span``; with_weights=False names only its id, version and the digest
        (SHA-256) of its weights in ``span``, under which a node that was sent them keeps them."""
        version = self.version() if version is None else version
        msg = pb.LoraAdapter(id=self.id, version=version, scaling=self.scaling,
                             dropout=self.dropout if self.training else 0.0, dropout_seed=dropout_seed)
        if with_weights or (version, span) not in self._digests:
            modules = [pb.LoraModule(block=block, module=path, a=serialize(a.detach()), b=serialize(b.detach()))
                       for (block, path), a, b in zip(self.keys, self.lora_A, self.lora_B) if block in span]
            if any(v != version for v, _ in self._digests):  # only the current version's are ever named
                self._digests.clear()
            self._digests[(version, span)] = lora_digest(modules)
            if with_weights:
                msg.modules.extend(modules)
        msg.digest = self._digests[(version, span)]
        return msg

    def shapes(self, span: Span) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) of the modules inside ``span``: what their gradients must look like."""
        return {key: (a, b) for key, a, b in zip(self.keys, self.lora_A, self.lora_B) if key[0] in span}

    def gradients(self, grads: dict) -> list[torch.Tensor]:
        """Gradients in parameter order (every A, then every B); zeros for modules not reached."""
        ga = [grads[k][0] if k in grads else torch.zeros_like(a) for k, a in zip(self.keys, self.lora_A)]
        gb = [grads[k][1] if k in grads else torch.zeros_like(b) for k, b in zip(self.keys, self.lora_B)]
        return ga + gb

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the names PEFT saves for a causal LM (``adapter_model.safetensors``)."""
        out = {}
        for (block, path), a, b in zip(self.keys, self.lora_A, self.lora_B):
            out[f"{self.peft_prefix}.{block}.{path}.lora_A.weight"] = a.detach().contiguous()
            out[f"{self.peft_prefix}.{block}.{path}.lora_B.weight"] = b.detach().contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.peft_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if ".lora_" in k)
        if missing or unexpected:
            raise ValueError(f"adapter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for (block, path), a, b in zip(self.keys, self.lora_A, self.lora_B):
                a.copy_(state[f"{self.peft_prefix}.{block}.{path}.lora_A.weight"])
                b.copy_(state[f"{self.peft_prefix}.{block}.{path}.lora_B.weight"])
