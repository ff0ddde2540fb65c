"""Swarm keys: the shared secret of a private swarm, and what is derived from it.

A key file is a comment line and one line of base64 (32 random bytes), made by ``swarm keygen``.
Nothing uses the secret directly: separate subkeys are derived from it (HKDF-SHA256, RFC 5869) for
RPC authentication, DHT record encryption, DHT key names and LAN discovery, so one use never weakens another.

RPC proofs (``rpc_proof`` / ``mac_matches``) travel in gRPC metadata: an HMAC over the method, the
node address dialed, a timestamp, a random nonce, the node's epoch and the SHA-256 of the request body
(streams: of the stream's first message). The body's hash travels in the proof itself, so a node checks
the proof before it reads the body, then checks the body against the hash. The epoch is a random value
each node process picks when it starts and tells every caller (in its refusals): a proof made for one
run of a node is refused by the next, so a captured proof cannot be replayed after a restart, when the
node's memory of used nonces is gone.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

KEY_BYTES = 32  # length of a new key's secret
MIN_KEY_BYTES = 16  # shortest secret a key file may hold
KEY_HEADER = "# swarmlm swarm key: every member of the swarm needs this file; keep it secret"
AUTH_HEADER = "swarmlm-auth"  # gRPC metadata key carrying the proof
PROOF_VERSION = "v2"
NO_EPOCH = "-"  # the epoch of a proof made before the caller knows the node's (the node refuses it, saying its own)
EPOCH_MARK = "node epoch "  # how a refusal names the node's current epoch: "... (node epoch 3f2a...)"
_SALT = b"swarmlm swarm key v1"


class SwarmKeyError(ValueError):
    """A swarm key file is missing, unreadable or malformed."""


def _hkdf(secret: bytes, label: bytes) -> bytes:
    """HKDF-SHA256 with a fixed salt, one 32-byte output block per label."""
    prk = hmac.new(_SALT, secret, hashlib.sha256).digest()
    return hmac.new(prk, label + b"\x01", hashlib.sha256).digest()


@dataclass(frozen=True)
class SwarmKey:
    """A loaded swarm key. Its repr never shows the secret."""

    secret: bytes = field(repr=False)  # the shared secret from the key file
    rpc: bytes = field(init=False, repr=False)  # HMAC key of RPC proofs
    records: bytes = field(init=False, repr=False)  # AES-256-GCM key of DHT record values
    names: bytes = field(init=False, repr=False)  # HMAC key hiding DHT key names
    lan: bytes = field(init=False, repr=False)  # AES-256-GCM key of LAN discovery announcements (swarm.lan)
    fingerprint: str = field(init=False)  # public short id of the key, safe to log

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < MIN_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key needs at least {MIN_KEY_BYTES} secret bytes")
        object.__setattr__(self, "rpc", _hkdf(self.secret, b"rpc-auth"))
        object.__setattr__(self, "records", _hkdf(self.secret, b"dht-records"))
        object.__setattr__(self, "names", _hkdf(self.secret, b"dht-names"))
        object.__setattr__(self, "lan", _hkdf(self.secret, b"lan-discovery"))
        object.__setattr__(self, "fingerprint", _hkdf(self.secret, b"fingerprint")[:6].hex())

    def hide_name(self, name: str) -> str:
        """A DHT key name outsiders cannot link to the model it stands for."""
        return "swarmlm/private/" + hmac.new(self.names, name.encode(), hashlib.sha256).hexdigest()[:40]


def generate_key_text() -> str:
    """The contents of a new key file: a comment line and 32 random bytes in base64."""
    return f"{KEY_HEADER}\n{base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()}\n"


def parse_key(text: str, source: str = "swarm key") -> SwarmKey:
    """Read key file text: comment lines (#) and blank lines are skipped, one base64 line remains."""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(lines) != 1:
        raise SwarmKeyError(f"{source}: expected one line of base64 (made by `swarm keygen`), found {len(lines)}")
    try:
        secret = base64.b64decode(lines[0], validate=True)
    except (binascii.Error, ValueError):
        raise SwarmKeyError(f"{source}: the key line is not valid base64 (make one with `swarm keygen`)") from None
    if len(secret) < MIN_KEY_BYTES:
        raise SwarmKeyError(f"{source}: the key has {len(secret)} bytes; at least {MIN_KEY_BYTES} are needed")
    return SwarmKey(secret)


def load_key(path: str | os.PathLike) -> SwarmKey:
    """Load a key file; SwarmKeyError (a ValueError) says what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {path} does not exist (make one with `swarm keygen > {path.name}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmKeyError(f"cannot read swarm key file {path}: {e}") from None
    return parse_key(text, f"swarm key file {path}")


def load_optional(path: str | os.PathLike | None) -> SwarmKey | None:
    """``load_key(path)``, or None (an open swarm) when no path is given."""
    return None if path is None else load_key(path)


def body_digest(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def _mac(key: SwarmKey, method: str, audience: str, stamp: str, nonce: str, epoch: str, digest: str) -> str:
    message = "\0".join((PROOF_VERSION, method, audience, stamp, nonce, epoch, digest)).encode()
    return hmac.new(key.rpc, message, hashlib.sha256).hexdigest()


def new_epoch() -> str:
    """A node process's epoch: random, so no two runs of a node share one."""
    return secrets.token_hex(16)


def rpc_proof(key: SwarmKey, method: str, audience: str, digest: bytes, epoch: str = NO_EPOCH,
              now: float | None = None, nonce: str | None = None) -> str:
    """The metadata value proving the key for one call of ``method`` to the node at ``audience`` in its
    ``epoch``, whose body (a stream: first message) has SHA-256 ``digest``."""
    stamp = str(int((time.time() if now is None else now) * 1000))
    nonce = nonce or secrets.token_hex(16)
    body = digest.hex()
    return ".".join((PROOF_VERSION, stamp, nonce, epoch, body, _mac(key, method, audience, stamp, nonce, epoch, body)))


@dataclass(frozen=True)
class Proof:
    """A parsed proof: when it was made, its nonce, epoch and body hash, its MAC (still to be checked)."""

    timestamp: float  # seconds since the epoch, by the caller's clock
    nonce: str  # random hex chosen by the caller
    stamp: str  # the timestamp as sent (milliseconds)
    epoch: str  # the node run it was made for (NO_EPOCH: the caller did not know it)
    digest: str  # hex SHA-256 of the body it covers
    mac: str  # hex HMAC-SHA256


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def parse_proof(value: str | bytes | None) -> Proof:
    """Split a metadata value into its parts; ValueError says what is malformed."""
    if value is None:
        raise ValueError("missing")
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    parts = value.split(".")
    if len(parts) != 6 or parts[0] != PROOF_VERSION:
        raise ValueError(f"malformed (expected {PROOF_VERSION}.<ms>.<nonce>.<epoch>.<sha256>.<mac>)")
    _, stamp, nonce, epoch, digest, mac = parts
    if not (stamp.isdigit() and len(stamp) <= 16 and 16 <= len(nonce) <= 64 and len(mac) == 64
            and len(digest) == 64 and (epoch == NO_EPOCH or 1 <= len(epoch) <= 64)):
        raise ValueError("malformed fields")
    if not _is_hex(nonce + mac + digest) or not (epoch == NO_EPOCH or _is_hex(epoch)):
        raise ValueError("malformed fields (not lowercase hex)")
    return Proof(int(stamp) / 1000, nonce, stamp, epoch, digest, mac)


def mac_matches(key: SwarmKey, proof: Proof, method: str, audience: str) -> bool:
    """Whether ``proof`` was made with ``key`` for this method and node (its epoch and body hash included)."""
    expected = _mac(key, method, audience, proof.stamp, proof.nonce, proof.epoch, proof.digest)
    return hmac.compare_digest(proof.mac, expected)


def epoch_in(message: str) -> str | None:
    """The node epoch a refusal message names, if any (see EPOCH_MARK)."""
    _, mark, rest = message.rpartition(EPOCH_MARK)
    epoch = rest[:64].split(")")[0] if mark else ""
    return epoch if epoch and _is_hex(epoch) else None
