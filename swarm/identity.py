"""A model's identity from its weights: content hashes of each block's tensors, or of the files holding them.

The DHT key's fingerprint (swarm.records.model_key) covers the config only, so two checkpoints with the
same config and folder name but other weights share it. What tells them apart is the weights themselves,
in two kinds of block hash:

- *tensor hashes* (``block_hashes``): a SHA-256 over each of the block's tensors' names, dtypes, shapes and
  raw bytes as stored in the safetensors files, so sharding does not matter. Computed from the files.
- *file hashes* (``file_block_hashes``): a SHA-256 over the block's tensor names and the content hash of the
  file holding each: for a hub model the hashes the hub publishes for the commit (swarm.hub), so a client
  knows every block's hash from the index without downloading a block, and nobody hashes a tensor; for a
  local checkpoint the SHA-256 of each file, which is what the hub publishes for an LFS file, so a local
  copy of a repository's files matches the hub's. A resharded or re-saved copy does not.

A node announces one digest of each kind it knows over the block hashes of its span (``span_digest``;
a hub node: the file kind only); a client that knows the model's weights (a local checkpoint or its
manifest; a hub id: the published hashes) accepts a node when one of its digests equals the client's own
for the announced span (``WeightsCheck``), and never routes to the others.

Reading every byte once is kept in the manifest beside the checkpoint (swarm.manifest): local files are
hashed in one pass (tensors and file), per file version (size and mtime); an entry whose file is absent
(a partial download) is used as it is. A hub snapshot's files are checked against the published hashes
when they are downloaded (swarm.checkpoint.download) and again here if they changed since.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
from pathlib import Path
from typing import Iterable

from swarm import hub, manifest
from swarm.checkpoint import CheckpointError, weight_files
from swarm.manifest import MANIFEST  # noqa: F401 (where callers look for its name)
from swarm.spans import Span

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is refused
CHUNK = manifest.CHUNK
TENSORS, FILES = "swarmlm-weights-v1", "swarmlm-files-v1"  # the two kinds of block hash (and of span digest)


def _hash_file(path: Path) -> dict:
    """``{"tensors": name -> SHA-256 of (dtype, shape, raw bytes), "sha256": of the whole file}`` of one
    safetensors file (8-byte little-endian header length, JSON header, data), read once, in order."""
    whole = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {length} bytes is too large")
        raw = f.read(length)
        whole.update(head + raw)
        try:
            header = json.loads(raw)
            header.pop("__metadata__", None)
            spans = sorted((int(e["data_offsets"][0]), int(e["data_offsets"][1]), name,
                            hashlib.sha256(f"{e['dtype']}\0{e['shape']}\0".encode())) for name, e in header.items())
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
        pos, i, active = 0, 0, []  # position in the data; next span to start; spans being read
        while chunk := f.read(CHUNK):
            whole.update(chunk)
            end = pos + len(chunk)
            while i < len(spans) and spans[i][0] < end:
                active.append(spans[i])
                i += 1
            for begin, stop, _, digest in active:
                if max(begin, pos) < min(stop, end):
                    digest.update(chunk[max(begin, pos) - pos:min(stop, end) - pos])
            active = [s for s in active if s[1] > end]
            pos = end
    if any(stop > pos or begin < 0 or stop < begin for begin, stop, _, _ in spans):
        raise CheckpointError(f"{path}: truncated (a tensor ends past the file's {pos} data bytes)")
    return {"tensors": {name: digest.hexdigest() for _, _, name, digest in spans}, "sha256": whole.hexdigest()}


def _entries(folder: Path, wanted: Iterable[str], needs: str) -> dict[str, dict]:
    """File name -> its manifest entry holding ``needs`` ("tensors" or "sha256"), for the files of
    ``wanted`` that are present (hashed now if their entry is stale or lacks it, and kept) or that are
    absent but have an entry holding it."""
    kept, changed, out = manifest.read(folder), False, {}
    for name in sorted(set(wanted)):
        path = folder / name
        if path.is_file():
            entry = manifest.fresh_entry(kept, name, path)
            if not isinstance(entry.get("tensors"), dict) or not isinstance(entry.get("sha256"), str):  # one read: both
                log.info("hashing the tensors of %s (once; kept in %s)", path, MANIFEST)
                entry.update(_hash_file(path))
                changed = True
        else:
            entry = kept["files"].get(name)
            if not isinstance(entry, dict) or needs not in entry:
                continue
        out[name] = entry
    if changed:
        manifest.write(folder, kept)
    return out


def tensor_hashes(folder: Path, files: Iterable[str] | None = None) -> dict[str, str]:
    """Tensor name -> content hash for the checkpoint's safetensors files (``files``: only these names
    relative to ``folder``), from the manifest where it is fresh, recomputed (and kept) where not.
    Files neither present nor in the manifest contribute nothing."""
    by_file = sorted({p.name for p in weight_files(folder).values()})
    wanted = by_file if files is None else sorted(set(files) & set(by_file))
    out: dict[str, str] = {}
    for entry in _entries(folder, wanted, "tensors").values():
        if isinstance(entry.get("tensors"), dict):
            out.update(entry["tensors"])
    return out


def is_hub_snapshot(folder: Path) -> bool:
    """Whether ``folder`` came from the hub with the hashes it published (swarm.hub, kept in the manifest)."""
    return hub.recorded(folder) is not None


def file_tokens(folder: Path, files: Iterable[str]) -> dict[str, str]:
    """File name -> the content hash of that file as a token (swarm.hub): from the hub's published hashes
    for a hub snapshot (present files checked against them: a mismatch is a CheckpointError), else the
    SHA-256 of the local file (kept in the manifest). Files of unknown hash are left out."""
    files = sorted(set(files))
    published = hub.recorded(folder)
    if published is not None:
        problems = hub.verify(folder, files, published)
        if problems:
            raise CheckpointError(f"{folder}: {problems[0]}")
        return {name: published.files[name] for name in files if name in published.files}
    return {name: f"sha256:{entry['sha256']}" for name, entry in _entries(folder, files, "sha256").items()}


def _block_names(folder: Path, span: Span, layer_prefix: str) -> dict[int, list[str]] | None:
    """Block -> its tensor names (from the index or the single file); None without any weights here."""
    try:
        names_all = weight_files(folder)
    except CheckpointError:  # no weights here at all (a config-only download)
        return None
    out: dict[int, list[str]] = {i: [] for i in range(span.start, span.end)}
    for name in names_all:
        if name.startswith(layer_prefix):
            block = name[len(layer_prefix):].partition(".")[0]
            if block.isdigit() and int(block) in out:
                out[int(block)].append(name)
    return out


def _combine(names: dict[int, list[str]], layer_prefix: str, value: dict[str, str]) -> dict[int, str] | None:
    """Block -> SHA-256 over its tensors' block-relative names and ``value[name]``; None if some block has no
    tensors or a tensor no value (a block known in part is not known)."""
    out = {}
    for i, tensor_names in names.items():
        if not tensor_names or any(name not in value for name in tensor_names):
            return None
        prefix = f"{layer_prefix}{i}."
        mine = sorted((name[len(prefix):], value[name]) for name in tensor_names)
        out[i] = hashlib.sha256("".join(f"{n}\0{h}\n" for n, h in mine).encode()).hexdigest()
    return out


def block_hashes(folder: Path, span: Span, layer_prefix: str) -> dict[int, str] | None:
    """Block -> hash of its tensors for every block of ``span``; None if some block's tensors are
    neither in the checkpoint's files nor in its manifest (e.g. a client that fetched only its own part
    of a hub model)."""
    names = _block_names(folder, span, layer_prefix)
    if names is None:
        return None
    files = weight_files(folder)
    hashes = tensor_hashes(folder, {files[n].name for block in names.values() for n in block})
    return _combine(names, layer_prefix, hashes)


def file_block_hashes(folder: Path, span: Span, layer_prefix: str) -> dict[int, str] | None:
    """Block -> hash of its tensor names and the content hashes of the files holding them (see
    ``file_tokens``) for every block of ``span``; None if some file's hash is unknown."""
    names = _block_names(folder, span, layer_prefix)
    if names is None:
        return None
    files = weight_files(folder)
    rel = {n: files[n].relative_to(folder).as_posix() for block in names.values() for n in block}
    tokens = file_tokens(folder, set(rel.values()))
    return _combine(names, layer_prefix, {n: tokens[f] for n, f in rel.items() if f in tokens})


def span_digest(blocks: dict[int, str], span: Span, kind: str = TENSORS) -> str:
    """The digest a node serving ``span`` announces: one SHA-256 over the kind, the span and its block hashes."""
    missing = [i for i in range(span.start, span.end) if i not in blocks]
    if missing:
        raise ValueError(f"no weight hashes of blocks {missing}")
    text = f"{kind} {span}\n" + "".join(f"{blocks[i]}\n" for i in range(span.start, span.end))
    return hashlib.sha256(text.encode()).hexdigest()


def known_hashes(folder: Path, span: Span, layer_prefix: str) -> tuple[dict[int, str] | None, dict[int, str] | None]:
    """(tensor hashes, file hashes) of ``span``'s blocks, each None where unknown. A hub snapshot's blocks
    are known by the published file hashes alone (none of its tensors is hashed)."""
    tensors = None if is_hub_snapshot(folder) else block_hashes(folder, span, layer_prefix)
    return tensors, file_block_hashes(folder, span, layer_prefix)


def span_digests(folder: Path, span: Span, layer_prefix: str) -> tuple[str, str]:
    """(tensor digest, file digest) a node serving ``span`` from ``folder`` announces ("": unknown); a
    CheckpointError if neither is known."""
    tensors, files = known_hashes(folder, span, layer_prefix)
    if tensors is None and files is None:
        raise CheckpointError(f"checkpoint {folder} lacks the weights (or their hashes) of some of blocks {span}")
    return (span_digest(tensors, span) if tensors else "", span_digest(files, span, FILES) if files else "")


def weights_check(folder: Path, span: Span, layer_prefix: str) -> "WeightsCheck | None":
    """The check of nodes against the weights of ``folder`` (blocks of ``span``); None when neither kind
    of hash is known for every block."""
    tensors, files = known_hashes(folder, span, layer_prefix)
    return WeightsCheck(tensors, files) if tensors is not None or files is not None else None


class WeightsCheck:
    """Tells nodes announcing the digest of the expected weights for their span from the others: a node
    passes when its tensor digest or its file digest equals the one expected (of a kind this check knows)."""

    def __init__(self, blocks: dict[int, str] | None, files: dict[int, str] | None = None):
        self.kinds = {kind: dict(known) for kind, known in ((TENSORS, blocks), (FILES, files)) if known is not None}
        self._digests: dict[tuple[str, Span], str | None] = {}
        self._warned: set[str] = set()

    def expected(self, span: Span, kind: str = TENSORS) -> str | None:
        """The digest of ``kind`` a node serving ``span`` must announce; None if some of its blocks are unknown."""
        if (kind, span) not in self._digests:
            known = self.kinds.get(kind)
            ok = known is not None and all(i in known for i in range(span.start, span.end))
            self._digests[kind, span] = span_digest(known, span, kind) if ok else None
        return self._digests[kind, span]

    def matches(self, server) -> bool:
        return any(announced and announced == self.expected(server.span, kind)
                   for kind, announced in ((TENSORS, server.weights), (FILES, server.files)))

    def split(self, servers: list) -> tuple[list, list]:
        """(servers announcing the expected weights, the others), each in the given order."""
        same = [s for s in servers if self.matches(s)]
        return same, [s for s in servers if not self.matches(s)]

    def warn_once(self, server) -> None:
        """Log (once per node) that ``server`` is left out."""
        if server.node_id not in self._warned and len(self._warned) < 10_000:
            self._warned.add(server.node_id)
            log.warning("not using node %s (blocks %s): it announces %s", server.address, server.span,
                        self.reason(server))

    def reason(self, server) -> str:
        """Why ``server`` does not pass, in a few words."""
        announced = {TENSORS: server.weights, FILES: server.files}
        if any(digest and kind in self.kinds for kind, digest in announced.items()):
            return "other weights"
        if any(announced.values()):  # e.g. a re-saved copy of a hub model, to a client that knows the hub's hashes
            return "only a kind of weights digest this client cannot check (tensor hashes; it knows file hashes)" \
                if FILES in self.kinds else "only a kind of weights digest this client cannot check (file hashes)"
        return "no weights digest"
