"""A model's identity from its weights: content hashes of each block's tensors.

The DHT key's fingerprint (swarm.records.model_key) covers the config only, so two checkpoints with the
same config and folder name but other weights share it. What tells them apart is the tensors
themselves: every block gets a SHA-256 over its tensors' names, dtypes, shapes and raw bytes (as stored
in the safetensors files, so sharding does not matter), and a node announces one digest over the block
hashes of its span (``span_digest``). A client that holds the checkpoint (or its manifest) computes the
same digest for every announced span and never routes to a node whose digest differs.

Hashing reads every byte once, so the tensor hashes are kept beside the checkpoint in a small JSON
manifest (``MANIFEST``), one entry per safetensors file keyed by its size and mtime: an entry whose file
changed is recomputed; an entry whose file is absent (a partial download) is used as it is. A folder we
cannot write to only costs the recomputation next time.

A hub model is identified the same way once its files are local; the hub's published file hashes and
revision are not used yet.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from pathlib import Path
from typing import Iterable

from swarm.checkpoint import CheckpointError, weight_files
from swarm.spans import Span

log = logging.getLogger(__name__)

MANIFEST = "swarmlm-weights.json"  # beside the checkpoint's safetensors files
MANIFEST_VERSION = 1
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is refused
CHUNK = 16 << 20  # bytes read at a time while hashing


def _file_tensor_hashes(path: Path) -> dict[str, str]:
    """name -> SHA-256 of (dtype, shape, raw bytes) of every tensor in one safetensors file, read from
    the file itself (format: 8-byte little-endian header length, JSON header, data)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {length} bytes is too large")
        header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        base = 8 + length
        out = {}
        for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):  # in file order
            begin, end = entry["data_offsets"]
            digest = hashlib.sha256(f"{entry['dtype']}\0{entry['shape']}\0".encode())
            f.seek(base + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise CheckpointError(f"{path}: truncated tensor {name}")
                digest.update(chunk)
                left -= len(chunk)
            out[name] = digest.hexdigest()
    return out


def _stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_manifest(folder: Path) -> dict:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or not isinstance(data.get("files"), dict):
        return {}
    return data["files"]


def _write_manifest(folder: Path, files: dict) -> None:
    tmp = folder / f".{MANIFEST}.{os.getpid()}.{threading.get_ident()}.tmp"  # writers never share a file
    try:
        tmp.write_text(json.dumps({"version": MANIFEST_VERSION, "files": files}, indent=1, sort_keys=True))
        os.replace(tmp, folder / MANIFEST)
    except OSError as e:
        log.info("could not keep the weight hashes in %s (%s); they will be recomputed next time", folder, e)
        tmp.unlink(missing_ok=True)


def tensor_hashes(folder: Path, files: Iterable[str] | None = None) -> dict[str, str]:
    """Tensor name -> content hash for the checkpoint's safetensors files (``files``: only these names
    relative to ``folder``), from the manifest where it is fresh, recomputed (and kept) where not.
    Files neither present nor in the manifest contribute nothing."""
    by_file = sorted({p.name for p in weight_files(folder).values()})
    wanted = by_file if files is None else sorted(set(files) & set(by_file))
    manifest = _read_manifest(folder)
    changed, out = False, {}
    for name in wanted:
        path, entry = folder / name, manifest.get(name)
        fresh = isinstance(entry, dict) and isinstance(entry.get("tensors"), dict)
        if path.is_file():
            stamp = _stamp(path)
            if not fresh or {k: entry.get(k) for k in stamp} != stamp:
                log.info("hashing the tensors of %s (once; kept in %s)", path, MANIFEST)
                entry, changed = {**stamp, "tensors": _file_tensor_hashes(path)}, True
                manifest[name] = entry
        elif not fresh:
            continue
        out.update(entry["tensors"])
    if changed:
        _write_manifest(folder, manifest)
    return out


def block_hashes(folder: Path, span: Span, layer_prefix: str) -> dict[int, str] | None:
    """Block -> hash of its tensors for every block of ``span``; None if some block's tensors are
    neither in the checkpoint's files nor in its manifest (e.g. a client that fetched only its own part
    of a hub model)."""
    prefixes = {i: f"{layer_prefix}{i}." for i in range(span.start, span.end)}
    try:
        names_all = weight_files(folder)
    except CheckpointError:  # no weights here at all (a config-only download)
        return None
    files = {p.name for n, p in names_all.items() if n.startswith(tuple(prefixes.values()))}
    hashes = tensor_hashes(folder, files)
    out = {}
    for i, prefix in prefixes.items():
        names = [name for name in names_all if name.startswith(prefix)]
        if not names or any(name not in hashes for name in names):  # a block hashed in part is not its hash
            return None
        mine = sorted((name[len(prefix):], hashes[name]) for name in names)
        out[i] = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in mine).encode()).hexdigest()
    return out


def span_digest(blocks: dict[int, str], span: Span) -> str:
    """The digest a node serving ``span`` announces: one SHA-256 over the span and its block hashes."""
    missing = [i for i in range(span.start, span.end) if i not in blocks]
    if missing:
        raise ValueError(f"no weight hashes of blocks {missing}")
    text = f"swarmlm-weights-v1 {span}\n" + "".join(f"{blocks[i]}\n" for i in range(span.start, span.end))
    return hashlib.sha256(text.encode()).hexdigest()


class WeightsCheck:
    """Tells nodes announcing the digest of the expected weights for their span from the others."""

    def __init__(self, blocks: dict[int, str]):
        self.blocks = dict(blocks)  # block -> expected hash
        self._digests: dict[Span, str] = {}
        self._warned: set[str] = set()

    def expected(self, span: Span) -> str | None:
        """The digest a node serving ``span`` must announce; None if some of its blocks are unknown."""
        if span not in self._digests:
            if any(i not in self.blocks for i in range(span.start, span.end)):
                return None
            self._digests[span] = span_digest(self.blocks, span)
        return self._digests[span]

    def matches(self, server) -> bool:
        return bool(server.weights) and server.weights == self.expected(server.span)

    def split(self, servers: list) -> tuple[list, list]:
        """(servers announcing the expected weights, the others), each in the given order."""
        same = [s for s in servers if self.matches(s)]
        return same, [s for s in servers if not self.matches(s)]

    def warn_once(self, server) -> None:
        """Log (once per node) that ``server`` is left out."""
        if server.node_id not in self._warned and len(self._warned) < 10_000:
            self._warned.add(server.node_id)
            log.warning("not using node %s (blocks %s): it announces %s", server.address, server.span,
                        "other weights" if server.weights else "no weights digest")
