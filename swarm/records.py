"""DHT record layout and its strict schema.

One DHT key per model (``servers_key``), subkey = node id, value = a small dict naming the node's span.
Records are validated when read: anything that does not match the schema exactly is ignored, never
trusted. (Until issue 19 there was one key per block, each holding the records of the nodes serving
that block: a reader then looked up every block's key, and at 50 peers a refresh took 2.4 s; one key
per model is one lookup. A key's records travel in one DHT message of at most 4 MiB, about 4,000
records: see the README's limits.)

Optional fields appear only when they say something: ``"tls": True`` marks a node that serves gRPC
over TLS. A plaintext node's record is what it always was, so every reader understands it; readers
that predate a field find a record with it malformed and skip that node, which is right for TLS
(they could not dial it). ``"weights"`` and ``"files"`` are the digests of the node's span's weights
(swarm.identity: over its tensors' hashes, over its files' hashes): clients that know the model's weights
route only to nodes announcing a digest they compute themselves.
``"wire"`` lists the activation formats a node accepts besides float32 (proto.tensors.WIRE_FORMATS:
16-bit floats and blockwise 8-bit): clients send a node only formats it announces. A name this reader
does not know is dropped (a newer node's format we would never send), anything else malformed in the
list makes the record malformed.
``"quantization"`` (``"int8"`` or ``"nf4"``) marks a node whose frozen weights are quantized (node serve
--quantize); an unquantized node's record has none. Readers that predate it skip quantized nodes, which is
right too: their results differ from the float model's by more than float noise.
``"chain": True`` marks a node that takes chained inference steps (issue 16: it pushes a step's outputs
straight to the next node of the client's route, node.chain); clients chain a session's steps only when
every node of its route announces it. Readers that predate it skip such nodes (as with ``"wire"``).
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from swarm.spans import NodeState, ServerInfo, Span

RECORD_FIELDS = {
    "address": str,
    "start": int,
    "end": int,
    "state": str,
    "throughput": float,
    "version": str,
    "dtype": str,
    "adapters": list,
}
OPTIONAL_FIELDS = {
    "tls": True,  # present (and exactly True) only for a node serving gRPC over TLS
    "chain": True,  # present (and exactly True) only for a node taking chained inference steps (node.chain)
}
DIGEST_FIELD = "weights"  # optional: 64 lowercase hex digits, the digest of the span's tensor hashes
FILES_FIELD = "files"  # optional: likewise, the digest of the span's file hashes (a hub model's, or a local copy's)
WIRE_FIELD = "wire"  # optional: activation formats accepted besides float32 (a list of names)
WIRE_NAMES = ("bfloat16", "float16", "blockwise8")  # the ones this version knows (proto.tensors.WIRE_FORMATS)
MAX_WIRE = 8  # entries in a record's wire list
QUANTIZATION_FIELD = "quantization"  # optional: how the node's frozen weights are quantized
ALLOWED_QUANTIZATIONS = frozenset({"int8", "nf4"})  # "none" is the field's absence
MAX_ADAPTERS = 64
ALLOWED_DTYPES = frozenset({"float32", "bfloat16", "float16"})
MAX_STRING = 256
MAX_NODE_ID = 1024  # a node id is its peer id plus its owner public key marker (see swarm.dht)
MAX_RECORD_LIFETIME = 300.0  # seconds: no record may expire later than this from now (swarm.validator enforces it)

# The fingerprint covers every field a family's config class adds to PretrainedConfig's own (which
# are bookkeeping: paths, labels, output switches), so it is family-neutral: Gemma's soft-caps or an
# MoE's expert counts separate models as Llama's sizes do. Left out: private fields and those that
# never change what a block computes (token ids, tying, cache switch, init scale).
NOT_BLOCK_FIELDS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "use_cache",
                              "initializer_range"})


def fingerprint_fields(config: Any) -> dict[str, Any]:
    """The block-defining fields of a transformers config (see NOT_BLOCK_FIELDS)."""
    from transformers import PretrainedConfig

    own = set(config.to_dict()) - set(PretrainedConfig().to_dict()) - NOT_BLOCK_FIELDS
    fields = {name: getattr(config, name, None) for name in own if not name.startswith("_")}
    return {"model_type": getattr(config, "model_type", None), **fields}


def config_fingerprint(config: Any) -> str:
    """A short stable hash of the block-defining fields of a transformers config."""
    blob = json.dumps(fingerprint_fields(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_model_name(model: str) -> str:
    """The name part of the model key: a local directory's name, or a hub id as given."""
    path = Path(model)
    return path.resolve().name if path.exists() else model


def model_key(name: str, config: Any) -> str:
    """``<name>/<fingerprint>``: nodes serving a different model under the same name never mix."""
    return f"{name}/{config_fingerprint(config)}"


def servers_key(model: str) -> str:
    """The DHT key under which every node serving ``model`` keeps its record (subkey: its node id)."""
    return f"swarmlm/{model}/servers"


def make_record(info: ServerInfo) -> dict[str, Any]:
    return {
        "address": info.address,
        "start": info.span.start,
        "end": info.span.end,
        "state": info.state.value,
        "throughput": float(info.throughput),
        "version": info.version,
        "dtype": info.dtype,
        "adapters": list(info.adapters),
        **({"tls": True} if info.tls else {}),
        **({"chain": True} if info.chain else {}),
        **({DIGEST_FIELD: info.weights} if info.weights else {}),
        **({FILES_FIELD: info.files} if info.files else {}),
        **({WIRE_FIELD: list(info.wire)} if info.wire else {}),
        **({QUANTIZATION_FIELD: info.quantization} if info.quantization != "none" else {}),
    }


def _parse_wire(value: object) -> tuple[str, ...] | None:
    """The known formats of a record's wire list (in our order); None when the list is malformed."""
    if not isinstance(value, list) or len(value) > MAX_WIRE or len(set(map(repr, value))) != len(value):
        return None
    if not all(isinstance(name, str) and 0 < len(name) <= 32 for name in value):
        return None
    return tuple(name for name in WIRE_NAMES if name in value)


def valid_digest(value: object) -> bool:
    """A weights digest as announced: SHA-256 in lowercase hex."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _valid_address(address: str) -> bool:
    host, sep, port = address.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536 and " " not in host)


def parse_record(node_id: Any, value: Any, *, num_blocks: int, block: int | None = None) -> ServerInfo | None:
    """Validate one record of a model of ``num_blocks`` blocks (that serves ``block``, if given);
    return None when it is malformed in any way."""
    if not isinstance(node_id, str) or not 0 < len(node_id) <= MAX_NODE_ID:
        return None
    allowed = set(RECORD_FIELDS) | set(OPTIONAL_FIELDS) | {DIGEST_FIELD, FILES_FIELD, WIRE_FIELD, QUANTIZATION_FIELD}
    if not isinstance(value, dict) or not set(RECORD_FIELDS) <= set(value) <= allowed:
        return None
    if any(value[name] is not only for name, only in OPTIONAL_FIELDS.items() if name in value):
        return None
    if any(field in value and not valid_digest(value[field]) for field in (DIGEST_FIELD, FILES_FIELD)):
        return None
    wire = _parse_wire(value[WIRE_FIELD]) if WIRE_FIELD in value else ()
    if wire is None:
        return None
    quantization = value.get(QUANTIZATION_FIELD, "none")
    if QUANTIZATION_FIELD in value and (type(quantization) is not str or quantization not in ALLOWED_QUANTIZATIONS):
        return None
    for field, kind in RECORD_FIELDS.items():
        item = value[field]
        if kind is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if type(item) is not kind:
            return None
        if kind is str and len(item) > MAX_STRING:
            return None
    adapters = value["adapters"]
    if len(adapters) > MAX_ADAPTERS or not all(isinstance(a, str) and 0 < len(a) <= MAX_STRING for a in adapters):
        return None
    if not _valid_address(value["address"]):
        return None
    if value["state"] not in NodeState.__members__ or value["dtype"] not in ALLOWED_DTYPES:
        return None
    throughput = float(value["throughput"])
    if not math.isfinite(throughput) or throughput < 0:
        return None
    start, end = value["start"], value["end"]
    if not 0 <= start < end <= num_blocks or (block is not None and not start <= block < end):
        return None
    return ServerInfo(
        node_id=node_id,
        address=value["address"],
        span=Span(start, end),
        state=NodeState(value["state"]),
        throughput=throughput,
        version=value["version"],
        dtype=value["dtype"],
        adapters=tuple(adapters),
        tls="tls" in value,
        chain="chain" in value,
        weights=value.get(DIGEST_FIELD, ""),
        files=value.get(FILES_FIELD, ""),
        wire=wire,
        quantization=quantization,
    )
