"""The small JSON file kept beside a checkpoint's safetensors files (``MANIFEST``): what was learnt about
them once, so nobody reads every byte again.

``files`` has one entry per weight file, keyed by the file's size and mtime (an entry whose file changed
is stale): the content hashes of its tensors (``tensors``, swarm.identity) and of the file itself
(``sha256``; ``git_sha1``, git's blob id, for a hub file kept outside LFS). ``hub`` is present in a hub
snapshot folder: the repository, the commit and every weight file's hash as the hub published it for that
commit (swarm.hub). A folder we cannot write to only costs the recomputation next time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "swarmlm-weights.json"  # beside the checkpoint's safetensors files
MANIFEST_VERSION = 1
CHUNK = 16 << 20  # bytes read at a time while hashing


def read(folder: Path) -> dict:
    """The manifest of ``folder`` as ``{"files": {...}, "hub": {...} or None}`` (empty when absent or unreadable)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("files"), dict):
        return {"files": {}, "hub": None}
    hub = data.get("hub")
    ok = isinstance(hub, dict) and isinstance(hub.get("commit"), str) and isinstance(hub.get("files"), dict) \
        and all(isinstance(k, str) and isinstance(v, str) for k, v in hub["files"].items())
    return {"files": data["files"], "hub": hub if ok else None}


def write(folder: Path, manifest: dict) -> None:
    """Replace the manifest of ``folder`` at once (a reader never sees half a file)."""
    tmp = folder / f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp"  # writers never share a file
    body = {"version": MANIFEST_VERSION, "files": manifest["files"], **({"hub": manifest["hub"]} if manifest.get("hub") else {})}
    try:
        tmp.write_text(json.dumps(body, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)
    except OSError as e:
        log.info("could not keep the weight hashes in %s (%s); they will be recomputed next time", folder, e)
        tmp.unlink(missing_ok=True)


def stamp(path: Path) -> dict[str, int]:
    """What makes a manifest entry stale when it changes: the file's size and mtime."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def fresh_entry(manifest: dict, name: str, path: Path) -> dict:
    """The manifest's entry of file ``name`` if it still describes ``path`` as it is, else a new empty one
    (stamped, put in the manifest)."""
    entry, now = manifest["files"].get(name), stamp(path)
    if not isinstance(entry, dict) or {k: entry.get(k) for k in now} != now:
        entry = manifest["files"][name] = dict(now)
    return entry


def file_hashes(path: Path, git: bool = False) -> dict[str, str]:
    """``{"sha256": ...}`` of the file's bytes (and with ``git`` its git blob id, ``"git_sha1"``), in one read."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {path.stat().st_size}\0".encode()) if git else None
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return {"sha256": sha256.hexdigest(), **({"git_sha1": sha1.hexdigest()} if sha1 is not None else {})}
