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
from swarm.arch import get_family, projection_shapes
from proto import swarmlm_pb2 as pb
from proto.tensors import MODULE_FIELDS, lora_digest, serialize
from swarm.spans import Span



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


class ClientAdapter(nn.Module):
    """Weights of some projections of every block, kept by the client and sent to the nodes that apply them.

    Subclasses set ``keys`` ((block, projection path) per module), ``method`` (LoraAdapter.method), ``scaling``
    and ``dropout``, and ``module_tensors(i)``: the tensors module ``i`` travels as, in
    ``proto.tensors.MODULE_FIELDS[method]`` order (parameters, or tensors computed from them with autograd);
    the nodes return the gradients of exactly those."""

    method = ""
    scaling = 1.0
    dropout = 0.0

    def __init__(self):
        super().__init__()
        self.keys: list[tuple[int, str]] = []
        self.id = uuid.uuid4().hex
        self.dropout_seed = 0  # seeds of LoRA dropout masks so far; save it to resume training exactly
        self._version = 0
        self._snapshot: list[torch.Tensor] | None = None
        self._digests: dict[tuple[int, Span], str] = {}  # (version, span) -> lora_digest of those weights

    def module_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def empty_module(self, i: int) -> tuple[torch.Tensor, ...]:
        """Tensors of an exact zero update of module ``i`` (sent when no module of a span has anything to send)."""
        raise NotImplementedError

    def _span_modules(self, span: Span) -> list[tuple[int, tuple[torch.Tensor, ...]]]:
        """(index, tensors) of the modules sent for blocks ``span``: those with tensors (an AdaLoRA module whose
        ranks are all masked has none), or one exact zero update if none has any (a message names its modules)."""
        picked = [(i, self.module_tensors(i)) for i, key in enumerate(self.keys) if key[0] in span]
        sent = [(i, tensors) for i, tensors in picked if tensors]
        if picked and not sent:
            sent = [(picked[0][0], self.empty_module(picked[0][0]))]
        return sent

    def module_flags(self, i: int) -> dict[str, Any]:
        """Extra LoraModule fields of module ``i`` (IA3's ia3_input)."""
        return {}

    def wire_tensors(self) -> list[torch.Tensor]:
        """Every module's tensors, flat in module order: the inputs the remote blocks' autograd function takes."""
        return [t for i in range(len(self.keys)) for t in self.module_tensors(i)]

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
        msg = pb.LoraAdapter(id=self.id, version=version, scaling=self.scaling, method=self.method,
                             dropout=self.dropout if self.training else 0.0, dropout_seed=dropout_seed)
        if with_weights or (version, span) not in self._digests:
            fields = MODULE_FIELDS[self.method]
            with torch.no_grad():
                modules = [pb.LoraModule(block=self.keys[i][0], module=self.keys[i][1], **self.module_flags(i),
                                         **{f: serialize(t.detach()) for f, t in zip(fields, tensors)})
                           for i, tensors in self._span_modules(span)]
            if any(v != version for v, _ in self._digests):  # only the current version's are ever named
                self._digests.clear()
            self._digests[(version, span)] = lora_digest(modules)
            if with_weights:
                msg.modules.extend(modules)
        msg.digest = self._digests[(version, span)]
        return msg

    def shapes(self, span: Span) -> dict[tuple[int, str], tuple[torch.Tensor, ...]]:
        """The tensors of the modules inside ``span``: what their gradients must look like."""
        with torch.no_grad():
            return {self.keys[i]: tensors for i, tensors in self._span_modules(span)}

    def gradients(self, grads: dict) -> list[torch.Tensor]:
        """Gradients in ``wire_tensors`` order; zeros for modules not reached (an empty module's are dropped)."""
        out = []
        for i, key in enumerate(self.keys):
            tensors = self.module_tensors(i)
            out.extend(grads[key] if key in grads else [torch.zeros_like(t) for t in tensors])
        return out


def _refuse_dora_off_linear(model_config: Any, paths: list[str]) -> None:
    """The nodes run DoRA on nn.Linear projections only (node/lora.py base_weight); GPT-2's Conv1D stores its
    weight transposed and is not covered by a test, so it is refused rather than run."""
    with torch.device("meta"):
        modules = dict(get_family(model_config).layer_cls(model_config, 0).named_modules())
    other = sorted(p for p in paths if not isinstance(modules[p], nn.Linear))
    if other:
        raise ValueError(f"DoRA (use_dora=True) runs on nn.Linear projections only; {other} of "
                         f"{model_config.model_type!r} are {type(modules[other[0]]).__name__}: use plain LoRA there")


class RemoteLora(ClientAdapter):
    """LoRA A/B matrices (and DoRA's magnitudes) for every (block, projection) of the model, kept by the client."""

    def __init__(self, model_config: Any, lora_config: Any, layers: Iterable[int] | None = None):
        super().__init__()
        check_exact(lora_config)
        shapes = projection_shapes(model_config)
        self.peft_prefix = peft_prefix(model_config)
        self.paths = _targets(shapes, lora_config.target_modules)
        r, alpha = lora_config.r, lora_config.lora_alpha
        self.scaling = alpha / math.sqrt(r) if lora_config.use_rslora else alpha / r
        self.dropout = float(lora_config.lora_dropout)
        self.method = "dora" if lora_config.use_dora else ""
        if self.method == "dora":
            _refuse_dora_off_linear(model_config, self.paths)
        blocks = list(layers if layers is not None else range(model_config.num_hidden_layers))
        self.keys = [(b, p) for b in blocks for p in self.paths]
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.lora_magnitude = nn.ParameterList()  # DoRA: per output row; set by dora.init_magnitudes or loaded
        for _, path in self.keys:
            fan_in, fan_out = shapes[path]
            a, b = init_pair(lora_config.init_lora_weights, r, fan_in, fan_out)
            self.lora_A.append(nn.Parameter(a))
            self.lora_B.append(nn.Parameter(b))
            if self.method == "dora":
                self.lora_magnitude.append(nn.Parameter(torch.full((fan_out,), math.nan)))

    def module_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.method == "dora":
            return self.lora_A[i], self.lora_B[i], self.lora_magnitude[i]
        return self.lora_A[i], self.lora_B[i]

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under the names PEFT saves for a causal LM (``adapter_model.safetensors``)."""
        out = {}
        for i, (block, path) in enumerate(self.keys):
            out[f"{self.peft_prefix}.{block}.{path}.lora_A.weight"] = self.lora_A[i].detach().contiguous()
            out[f"{self.peft_prefix}.{block}.{path}.lora_B.weight"] = self.lora_B[i].detach().contiguous()
            if self.method == "dora":
                out[f"{self.peft_prefix}.{block}.{path}.lora_magnitude_vector"] = self.lora_magnitude[i].detach().contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.peft_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if ".lora_" in k)
        if missing or unexpected:
            raise ValueError(f"adapter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")
        wrong = sorted(k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape))
        if wrong:
            raise ValueError(f"adapter does not fit: {wrong[0]} has shape {list(state[wrong[0]].shape)}, this model "
                             f"needs {list(expected[wrong[0]].shape)}")
        with torch.no_grad():
            for i, (block, path) in enumerate(self.keys):
                self.lora_A[i].copy_(state[f"{self.peft_prefix}.{block}.{path}.lora_A.weight"])
                self.lora_B[i].copy_(state[f"{self.peft_prefix}.{block}.{path}.lora_B.weight"])
                if self.method == "dora":
                    self.lora_magnitude[i].copy_(state[f"{self.peft_prefix}.{block}.{path}.lora_magnitude_vector"])
