"""A hub model's identity: the commit its revision names and the file hashes the hub publishes for it.

For every file of a commit the hub publishes a content hash (huggingface_hub's ``model_info(...,
files_metadata=True)``): the SHA-256 of an LFS file (every safetensors shard in practice; the same value
arrives as ``X-Linked-Etag`` when it is downloaded) or the git blob id of a file kept in git. Here that
hash is a *token*, ``"sha256:<hex>"`` or ``"git-sha1:<hex>"``, and it is what a hub model's blocks are
identified by (swarm.identity's file hashes): a client knows every block's identity from the index and
these tokens, without downloading a block, and a node checks each file it downloaded against its token
(huggingface_hub itself checks only sizes), once per file version (the result is kept in the manifest).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from swarm import manifest

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"(sha256:[0-9a-f]{64}|git-sha1:[0-9a-f]{40})")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Published:
    """What the hub publishes of one commit of a repository: path -> token of every file."""

    repo: str
    commit: str
    files: dict[str, str]


def published(model: str, revision: str | None) -> Published:
    """The commit ``revision`` (None: the default branch) names now, and its files' tokens, in one hub call
    (huggingface_hub's errors pass through: no such repository or revision, gated, offline)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(model, revision=revision, files_metadata=True)
    files = {}
    for sibling in info.siblings or ():
        if sibling.lfs is not None:
            files[sibling.rfilename] = f"sha256:{sibling.lfs.sha256}"
        elif sibling.blob_id:
            files[sibling.rfilename] = f"git-sha1:{sibling.blob_id}"
    if not isinstance(info.sha, str) or not _COMMIT.fullmatch(info.sha):
        raise ValueError(f"the hub named no commit for {model!r} at {revision or 'its default branch'} ({info.sha!r})")
    bad = sorted(path for path, token in files.items() if not _TOKEN.fullmatch(token))
    if bad:
        raise ValueError(f"the hub published malformed hashes of {bad[:3]} in {model!r}")
    return Published(model, info.sha, files)


def endpoint() -> str:
    """Where huggingface_hub asks (HF_ENDPOINT, or the hub)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def recorded(folder: Path) -> Published | None:
    """The hub's tokens as recorded in ``folder``'s manifest when it was downloaded (used offline)."""
    hub = manifest.read(folder)["hub"]
    if hub is None or hub["commit"] != folder.name:
        return None
    return Published(str(hub.get("repo", "")), hub["commit"], dict(hub["files"]))


def verify(folder: Path, names: Iterable[str], hub: Published, remove: bool = False) -> list[str]:
    """Check the files ``names`` of ``folder`` that are present against their tokens (hashing only files
    new or changed since last checked) and record ``hub`` in the manifest. Returns one line per file that
    does not match (or that the hub publishes no hash of); with ``remove`` (a folder of the hub cache)
    those are removed, blob and link, so that a retry downloads them again. An empty list: every present
    file is the hub's."""
    kept = manifest.read(folder)
    before = json.dumps(kept, sort_keys=True)
    kept["hub"] = {"repo": hub.repo, "commit": hub.commit, "files": hub.files}
    problems = []
    for name in sorted(set(names)):
        path = folder / name
        if name == manifest.MANIFEST or not path.is_file():  # ours, whatever the repository holds under that name
            continue
        token = hub.files.get(name)
        if token is None:
            problems.append(f"{name}: the hub publishes no hash of it at commit {hub.commit}")
            continue
        kind, _, want = token.partition(":")
        key = "sha256" if kind == "sha256" else "git_sha1"
        entry = manifest.fresh_entry(kept, name, path)
        if key not in entry:
            log.info("checking %s against the hash the hub publishes (once per file version)", path)
            entry.update(manifest.file_hashes(path, git=key == "git_sha1"))
        if entry[key] != want:
            problems.append(f"{name} does not match the hash the hub publishes for it at commit {hub.commit[:12]} "
                            f"({token}; the file has {kind}:{entry[key]}): corrupted or tampered with"
                            + ("; removed from the cache, a retry downloads it again" if remove else ""))
            kept["files"].pop(name, None)
            if remove:
                _remove(path)
    if json.dumps(kept, sort_keys=True) != before:  # unchanged: not rewritten (processes share the hub cache)
        manifest.write(folder, kept)
    return problems


def _remove(path: Path) -> None:
    """Remove a file of the hub cache: the blob a snapshot link points to, and the link."""
    target = path.resolve()
    for p in {target, path}:
        try:
            p.unlink()
        except OSError as e:
            log.warning("could not remove %s: %s", p, e)
