"""AdaLoRA held by the client: SVD-form weights (lora_A, lora_E, lora_B; ranknum) and PEFT's own rank allocator
run here; the nodes apply plain LoRA.

PEFT's SVDLinear adds ``dropout(x) (A * E)^T B^T * scaling / (ranknum + 1e-5)``. That is LoRA with
A' = A * E * scaling / (ranknum + 1e-5) and B' = B at scaling 1, so the client computes A' with autograd, sends
(A', B'), and the gradients the nodes return for them flow back to A, E and B here.

Which ranks travel: PEFT masks a rank by zeroing its singular value E_i, yet still gives E_i a gradient (through
the A_i and B_i the node would need), and between masking steps (deltaT > 1) AdamW brings masked ranks back to
life; so while the budget is being allocated every rank is sent, or the gradients would not be PEFT's. Once the
allocation is final (step >= total_step - tfinal, after which PEFT re-masks every step) masked ranks are not sent
at all: they cost no wire bytes, for training as for generate(). A saved adapter is resized by its rank_pattern as
PEFT saves it, so a loaded one holds (and sends) only its kept ranks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from peft import LoraConfig
from torch import nn

from client import compat
from client.adapters import ClientAdapter, _targets, peft_prefix
from swarm.arch import get_family, projection_shapes

ADAPTER = "default"  # PEFT's adapter name, part of the parameter names its rank allocator reads
# AdaLoraConfig fields the swarm honours (or that do not change the math); every other LoRA field keeps its default
HONOURED = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "target_modules", "lora_alpha", "lora_dropout", "init_lora_weights", "runtime_config",
    "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step",
    "rank_pattern",
})


def check_exact(config: Any) -> None:
    """ValueError unless ``config``'s LoRA fields outside HONOURED keep PEFT's defaults."""
    default = LoraConfig()
    fields = [f.name for f in dataclasses.fields(LoraConfig) if f.name not in HONOURED]
    changed = sorted(name for name in fields if getattr(config, name) != getattr(default, name))
    if changed:
        shown = ", ".join(f"{name}={getattr(config, name)!r}"[:80] for name in changed)
        raise ValueError(f"AdaLoraConfig settings not supported over the swarm: {shown}")
    if config.init_lora_weights not in (True, False):
        raise ValueError(f"AdaLoRA's init_lora_weights={config.init_lora_weights!r}: use True or False")


class SVDWeights(nn.Module):
    """One projection's AdaLoRA weights, named as PEFT's SVDLinear names them (``lora_A.default``, ...)."""

    def __init__(self, r: int, fan_in: int, fan_out: int, init: bool):
        super().__init__()
        self.lora_A = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(r, fan_in))})
        self.lora_E = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(r, 1))})
        self.lora_B = nn.ParameterDict({ADAPTER: nn.Parameter(torch.randn(fan_out, r))})
        if init:  # PEFT's reset_lora_parameters
            nn.init.zeros_(self.lora_E[ADAPTER])
            nn.init.normal_(self.lora_A[ADAPTER], mean=0.0, std=0.02)
            nn.init.normal_(self.lora_B[ADAPTER], mean=0.0, std=0.02)

    @property
    def tensors(self) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
        return self.lora_A[ADAPTER], self.lora_E[ADAPTER], self.lora_B[ADAPTER]


def _child(root: nn.Module, dotted: str) -> nn.Module:
    """The module at ``dotted`` below ``root``, made of empty modules where missing."""
    for part in dotted.split("."):
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root


class RemoteAdaLora(ClientAdapter):
    """AdaLoRA weights for every (block, projection) of the model and the rank allocator, kept by the client."""

    def __init__(self, model_config: Any, config: Any, layers: Iterable[int] | None = None, loaded: bool = False):
        """``loaded``: the weights come from a saved adapter, resized by its rank_pattern as PEFT saves them."""
        super().__init__()
        check_exact(config)
        self.peft_prefix = peft_prefix(model_config)
        self.layer_prefix = get_family(model_config).layer_prefix  # rank_pattern's names: the checkpoint's
        self.config = config
        self.dropout = float(config.lora_dropout)
        shapes = projection_shapes(model_config)
        self.paths = _targets(shapes, config.target_modules)
        blocks = list(layers if layers is not None else range(model_config.num_hidden_layers))
        self.keys = [(b, p) for b in blocks for p in self.paths]
        # PEFT: scaling = lora_alpha (or r), divided by ranknum = init_r (kept at init_r when resized on loading)
        self.factor = (config.lora_alpha if config.lora_alpha > 0 else float(config.init_r)) / (config.init_r + 1e-5)
        self.tree = nn.Module()  # named like PEFT's model below its wrapper: model.layers.<i>.<path>.lora_A.default
        self.svd: list[SVDWeights] = []
        for block, path in self.keys:
            pattern = self._pattern(block, path) if loaded else None
            rank = int(sum(pattern)) if pattern is not None else config.init_r
            fan_in, fan_out = shapes[path]
            parent, _, leaf = f"{self.layer_prefix}{block}.{path}".rpartition(".")
            weights = SVDWeights(rank, fan_in, fan_out, config.init_lora_weights)
            _child(self.tree, parent).add_module(leaf, weights)
            self.svd.append(weights)
        self.kept: list[torch.Tensor | None] = [None] * len(self.keys)  # ranks sent per module (None: all)
        self.allocator = None if config.inference_mode else compat.adalora_rank_allocator(self.tree, config, ADAPTER)

    def _pattern(self, block: int, path: str) -> list[bool] | None:
        """This module's entry of config.rank_pattern (keys with or without the adapter name, as PEFT writes them)."""
        pattern = self.config.rank_pattern or {}
        name = f"{self.layer_prefix}{block}.{path}.lora_E"
        found = pattern.get(f"{name}.{ADAPTER}", pattern.get(name))
        return None if found is None else [bool(v) for v in found]

    def module_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        a, e, b = self.svd[i].tensors
        kept = self.kept[i]
        if kept is not None and kept.numel() == 0 or a.shape[0] == 0:  # no rank left: nothing to send
            return ()
        wire_a, wire_b = a * e * self.factor, b
        if kept is not None:
            wire_a, wire_b = wire_a[kept], wire_b[:, kept]
        return wire_a, wire_b

    def empty_module(self, i: int) -> tuple[torch.Tensor, ...]:
        a, _, b = self.svd[i].tensors
        return torch.zeros(1, a.shape[1]), torch.zeros(b.shape[0], 1)

    def update_and_allocate(self, global_step: int) -> None:
        """PEFT's ``AdaLoraModel.update_and_allocate``: call after optimizer.step(), before zero_grad()."""
        if self.allocator is None:
            raise ValueError("this AdaLoRA adapter is not trainable (inference_mode or loaded without is_trainable)")
        compat.adalora_update_and_allocate(self.tree, self.config, self.allocator, ADAPTER, global_step)
        if global_step >= self.config.total_step - self.config.tfinal and self.config.rank_pattern:
            kept = []
            for block, path in self.keys:
                pattern = self._pattern(block, path)
                kept.append(None if pattern is None else torch.tensor(pattern).nonzero().flatten())
            if [None if k is None else k.tolist() for k in kept] != [None if k is None else k.tolist()
                                                                  for k in self.kept]:
                self.kept = kept
                self._snapshot = None  # other tensors travel from now on: a new version, new digests
                self._digests.clear()

    def orthogonal_regularization(self) -> torch.Tensor:
        """PEFT's AdaLoRA term added to the loss: mean over A and B of |A A^T - I|_F and |B^T B - I|_F."""
        terms = []
        for weights in self.svd:
            a, _, b = weights.tensors
            for cov in (a @ a.t(), b.t() @ b):
                terms.append(torch.norm(cov - torch.eye(*cov.shape), p="fro"))
        return torch.stack(terms).mean() if terms else torch.zeros(())

    def _saved_ranks(self, block: int, path: str):
        pattern = self._pattern(block, path)
        return None if pattern is None else torch.tensor(pattern, dtype=torch.bool)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """What PEFT saves: lora_A, lora_E, lora_B per module, the ranks rank_pattern masks left out."""
        if self.config.rank_pattern:  # PEFT saves the pattern without the adapter name (and so do we)
            self.config.rank_pattern = {k.replace(f".{ADAPTER}", ""): v for k, v in self.config.rank_pattern.items()}
        out = {}
        for (block, path), weights in zip(self.keys, self.svd):
            a, e, b = (t.detach() for t in weights.tensors)
            mask = self._saved_ranks(block, path)
            if mask is not None and int(mask.sum()) != a.shape[0]:
                a, e, b = a[mask], e[mask], b[:, mask]
            for name, t in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
                out[f"{self.peft_prefix}.{block}.{path}.{name}"] = t.contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {}
        for (block, path), weights in zip(self.keys, self.svd):
            for name, t in zip(("lora_A", "lora_E", "lora_B"), weights.tensors):
                expected[f"{self.peft_prefix}.{block}.{path}.{name}"] = t
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if ".lora_" in k)
        wrong = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"adapter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"other shapes {wrong[:3]}")
        with torch.no_grad():
            for name, t in expected.items():
                t.copy_(state[name])
