"""Load a checkpoint's config and ONLY the tensors a caller asks for, from safetensors.

A node reads the tensors of its blocks; a client reads everything outside the blocks (embeddings,
final norm, LM head). Nobody materialises the whole model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or lacks tensors we need."""


def resolve_checkpoint(model: str, *, need_weights: Callable[[str], bool] | None = None) -> Path:
    """A local checkpoint directory for ``model`` (a path, or a hub id when the hub is reachable).

    For a hub id only config files and the safetensors shards holding wanted tensors are fetched.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {model!r} does not exist")
    try:
        from huggingface_hub import hf_hub_download, snapshot_download
        from huggingface_hub.utils import EntryNotFoundError

        folder = Path(snapshot_download(model, allow_patterns=["*.json", "*.model", "*.txt"]))
        try:
            index = json.loads(Path(hf_hub_download(model, INDEX_FILE)).read_text())
            shards = {f for name, f in index["weight_map"].items() if need_weights is None or need_weights(name)}
            for shard in sorted(shards):
                hf_hub_download(model, shard)
        except EntryNotFoundError:
            hf_hub_download(model, SINGLE_FILE)
        return folder
    except Exception as e:
        raise CheckpointError(f"{model!r} is not a local checkpoint directory and the hub gave no copy: {e}") from e


def load_config(folder: Path) -> PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint directory?")
    return AutoConfig.from_pretrained(folder)


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        root = folder.resolve()
        for file in set(weight_map.values()):  # an index must not point outside its checkpoint
            if not str(file).endswith(".safetensors") or not (folder / file).resolve().is_relative_to(root):
                raise CheckpointError(f"{folder / INDEX_FILE} names {file!r}: only .safetensors files inside the "
                                      "checkpoint directory are read")
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE_FILE).is_file():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {name: folder / SINGLE_FILE for name in f.keys()}
    raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are loaded)")


def read_tensors(folder: Path, want: Callable[[str], bool], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Read only the tensors whose names satisfy ``want``, opening only the shards that hold them."""
    by_file: dict[Path, list[str]] = {}
    for name, file in weight_files(folder).items():
        if want(name):
            by_file.setdefault(file, []).append(name)
    out: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:
            for name in names:
                t = f.get_tensor(name)
                # copy: an mmap-backed tensor would be read lazily (first request pays), could be
                # evicted under memory pressure, and would change if the file were overwritten
                out[name] = t.to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
    return out
