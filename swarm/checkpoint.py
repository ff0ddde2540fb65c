"""Load a checkpoint's config and ONLY the tensors a caller asks for, from safetensors.

A node reads the tensors of its blocks; a client reads everything outside the blocks (embeddings,
final norm, LM head). Nobody materialises the whole model.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path, PurePosixPath
from typing import Callable

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from swarm import hub

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable, or lacks tensors we need."""


# what a tokenizer may need (transformers' file names); fetched only by callers that ask for the tokenizer
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "*.model", "chat_template.*", "generation_config.json")


def no_weights(name: str) -> bool:
    """``need_weights`` of a caller that reads only the config (and maybe the tokenizer): no shard at all."""
    return False


def resolve_checkpoint(model: str, *, need_weights: Callable[[str], bool] | None = None,
                       revision: str | None = None, tokenizer: bool = False) -> Path:
    """A local checkpoint directory for ``model`` (a path, or a hub id when the hub is reachable).

    For a hub id only config.json, the safetensors index, the shards holding tensors ``need_weights``
    wants (None: all) and, with ``tokenizer``, the tokenizer's files are fetched (see ``download``).
    """
    path = Path(model).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"a revision ({revision!r}) picks a version of a hub repository; {model!r} is a "
                                  "local directory")
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise CheckpointError(f"checkpoint directory {model!r} does not exist")
    try:
        return download(model, need_weights, revision, tokenizer)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{model!r} is not a local checkpoint directory and the hub gave no copy: "
                              f"{hub_failure(e, revision)}") from e


def hub_failure(error: Exception, revision: str | None) -> str:
    """One line saying why a hub download failed (huggingface_hub's messages span several lines)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RevisionNotFoundError):
        return f"the repository has no revision {revision!r} (--revision: a branch, tag or commit)"
    if isinstance(error, GatedRepoError):
        return "the repository is gated: set HF_TOKEN to a token of an account that was granted access"
    if isinstance(error, RepositoryNotFoundError):
        return "no such repository (or it is private: set HF_TOKEN to a token that can read it)"
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def download(model: str, need_weights: Callable[[str], bool] | None, revision: str | None, tokenizer: bool) -> Path:
    """Fetch the parts of hub repository ``model`` a caller needs into the usual hub cache (huggingface_hub
    reads HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE); returns its snapshot folder. Every file
    comes from one commit, the one ``revision`` (None: the default branch) names when the hub is asked for
    its files' hashes (swarm.hub); each file is checked against its hash, and one that does not match is
    refused (CheckpointError). Offline, the hashes recorded at download time are used."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, OfflineModeIsEnabled

    try:
        published = hub.published(model, revision)
    except OfflineModeIsEnabled:
        published = None
    # by the revision's name, so that the cache records which commit it names (what offline use looks up)
    folder = Path(hf_hub_download(model, "config.json", revision=revision)).parent
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else revision  # snapshots/<commit>/
    if published is None:  # offline: the cache's commit, and the hashes recorded when it was downloaded
        published = hub.recorded(folder)
        if published is None:
            log.warning("offline, and %s holds no hashes the hub published: its files are not checked, and its "
                        "blocks are identified by hashing their tensors", folder)
    elif commit != published.commit:  # the branch moved since we asked: that commit's hashes
        published = hub.published(model, commit)
    if published is not None and not published.files:  # an endpoint (a mirror) that publishes no file hashes
        log.warning("%s publishes no hashes of %r's files: they are not checked, and its blocks are identified "
                    "by hashing their tensors", hub.endpoint(), model)
        published = None
    try:
        index = Path(hf_hub_download(model, INDEX_FILE, revision=commit))
    except EntryNotFoundError:
        index = None
    if index is not None:
        for shard in needed_shards(index, need_weights):
            hf_hub_download(model, shard, revision=commit)
    elif need_weights is not no_weights:  # one file holds everything: there is nothing smaller to fetch
        hf_hub_download(model, SINGLE_FILE, revision=commit)
    if tokenizer:
        snapshot_download(model, revision=commit, allow_patterns=list(TOKENIZER_PATTERNS))
    if published is not None:
        problems = hub.verify(folder, published.files, published, remove=True)
        if problems:
            raise CheckpointError(f"{model!r}: {problems[0]}" + (f" (and {len(problems) - 1} more files)"
                                                                  if len(problems) > 1 else ""))
    return folder


def needed_shards(index: Path, need_weights: Callable[[str], bool] | None) -> list[str]:
    """The shard files of a safetensors index that hold a wanted tensor (names checked before any download)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        wanted = {file for name, file in weight_map.items() if need_weights is None or need_weights(name)}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{index.name} is not a safetensors index: {e}") from None
    for file in wanted:
        if not shard_name_ok(file):
            raise CheckpointError(f"{index.name} names {file!r}: only .safetensors files inside the repository are read")
    return sorted(wanted)


def shard_name_ok(file: object) -> bool:
    """Whether an index's shard name is a relative path to a .safetensors file below the checkpoint. Checked
    on the name, not on the resolved path: the hub cache's snapshot files are symlinks into its blob store."""
    if not isinstance(file, str) or not file.endswith(".safetensors") or "\\" in file or "\0" in file:
        return False
    parts = PurePosixPath(file).parts
    return bool(parts) and not file.startswith("/") and ".." not in parts


def load_config(folder: Path) -> PretrainedConfig:
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face checkpoint directory?")
    return AutoConfig.from_pretrained(folder)


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
    if (folder / INDEX_FILE).is_file():
        weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        for file in set(weight_map.values()):  # an index must not point outside its checkpoint
            if not shard_name_ok(file):
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
