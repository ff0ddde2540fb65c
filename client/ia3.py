"""IA3 held by the client, applied by the nodes: learned vectors scaling some projections' outputs (keys,
values) or inputs (PEFT's ``feedforward_modules``, the MLP's down projection by default), as PEFT's IA3 Linear
does: ``y = (W x + b) * l`` or ``y = W (x * l) + b``. Named, shaped and saved as PEFT saves them."""
from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import torch
from peft import IA3Config
from torch import nn

from client import compat
from client.adapters import ClientAdapter, _targets, peft_prefix
from swarm.arch import projection_shapes

# fields the swarm honours or that do not change the adapter's math
HONOURED = frozenset({"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
                      "revision", "inference_mode", "target_modules", "feedforward_modules", "init_ia3_weights"})


def check_exact(config: Any) -> None:
    """ValueError unless ``config``'s other fields keep PEFT's defaults (the nodes could not run them exactly)."""
    default = IA3Config()
    changed = sorted(f.name for f in dataclasses.fields(IA3Config)
                     if f.name not in HONOURED and getattr(config, f.name) != getattr(default, f.name))
    if changed:
        shown = ", ".join(f"{name}={getattr(config, name)!r}"[:80] for name in changed)
        raise ValueError(f"IA3Config settings not supported over the swarm: {shown}")


class RemoteIA3(ClientAdapter):
    """One IA3 vector per (block, projection) of the model, kept by the client."""

    method = "ia3"

    def __init__(self, model_config: Any, ia3_config: Any, layers: Iterable[int] | None = None):
        super().__init__()
        check_exact(ia3_config)
        self.peft_prefix = peft_prefix(model_config)
        targets, feedforward = compat.ia3_modules(ia3_config, model_config)
        shapes = projection_shapes(model_config)
        self.paths = _targets(shapes, targets)
        names = set(feedforward or ())
        self.inputs = {p for p in self.paths if p.split(".")[-1] in names or p in names}  # PEFT checks names ⊆ targets
        blocks = list(layers if layers is not None else range(model_config.num_hidden_layers))
        self.keys = [(b, p) for b in blocks for p in self.paths]
        self.ia3_l = nn.ParameterList()
        for _, path in self.keys:
            fan_in, fan_out = shapes[path]
            vector = torch.randn(fan_in if path in self.inputs else fan_out)
            if ia3_config.init_ia3_weights:
                nn.init.constant_(vector, 1.0)
            self.ia3_l.append(nn.Parameter(vector))

    def module_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        return (self.ia3_l[i],)

    def module_flags(self, i: int) -> dict[str, Any]:
        return {"ia3_input": self.keys[i][1] in self.inputs}

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """``ia3_l`` under PEFT's saved names: [1, in] for feedforward modules, else [out, 1]."""
        out = {}
        for (block, path), vector in zip(self.keys, self.ia3_l):
            shaped = vector.detach().view(1, -1) if path in self.inputs else vector.detach().view(-1, 1)
            out[f"{self.peft_prefix}.{block}.{path}.ia3_l"] = shaped.contiguous()
        return out

    def load_peft_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.peft_state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(k for k in set(state) - set(expected) if ".ia3_l" in k)
        wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            raise ValueError(f"adapter does not fit: missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"other shapes {wrong[:3]}")
        with torch.no_grad():
            for (block, path), vector in zip(self.keys, self.ia3_l):
                vector.copy_(state[f"{self.peft_prefix}.{block}.{path}.ia3_l"].flatten())
