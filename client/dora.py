"""DoRA's starting magnitudes: the row norms of each targeted projection's W + scaling B A, as PEFT sets them.

Only the nodes hold W while training (they recompute the norm at every pass, node/lora.py), but a fresh DoRA
adapter's magnitude vector starts at ``|W + scaling B A|`` per output row, a value the client must own. It is
read once from the checkpoint, one projection at a time (only its row norm is kept): from the hub that means
the shards holding the blocks' weights are downloaded once. An adapter loaded with ``from_pretrained`` (trained
here, or initialised by local PEFT) needs none of this.
"""
from __future__ import annotations

from typing import Any

import torch
from safetensors import safe_open

from client.adapters import RemoteLora
from swarm.arch import get_family
from swarm.checkpoint import CheckpointError, resolve_checkpoint, weight_files


def init_magnitudes(adapter: RemoteLora, model_config: Any, revision: str | None = None) -> None:
    """Set ``adapter.lora_magnitude`` to PEFT's initial values from the checkpoint ``model_config`` was read from."""
    source = getattr(model_config, "name_or_path", None)
    if not source:
        raise ValueError("DoRA's magnitudes start at the base weights' row norms, and this model's checkpoint is "
                         "unknown; initialise the adapter with local PEFT, save it, and load it with "
                         "DistributedPeftModel.from_pretrained")
    prefix = get_family(model_config).layer_prefix
    names = {f"{prefix}{block}.{path}.weight": i for i, (block, path) in enumerate(adapter.keys)}
    folder = resolve_checkpoint(source, need_weights=lambda name: name in names, revision=revision)
    files = weight_files(folder)
    lacking = sorted(set(names) - set(files))
    if lacking:
        raise CheckpointError(f"checkpoint {folder} lacks {lacking[:3]}")
    by_file: dict[Any, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    with torch.no_grad():
        for file, wanted in by_file.items():
            with safe_open(file, framework="pt") as f:
                for name in wanted:
                    i = names[name]
                    a, b = adapter.lora_A[i], adapter.lora_B[i]
                    weight = f.get_tensor(name).to(a.dtype)  # PEFT: norm of W + scaling * (B A), row-wise
                    adapter.lora_magnitude[i].copy_(torch.linalg.norm(weight + adapter.scaling * (b @ a), dim=1))
