"""Which DHT records a swarmlm peer accepts, stores and returns (a hivemind record validator).

Everywhere (open or private swarm):
  - a record must live under a subkey naming its owner's RSA public key (``[owner:...]``) and be
    signed by that key (hivemind's RSASignatureValidator checks the signature), so nobody can
    overwrite or forge another node's record;
  - an expiration more than ``max_lifetime`` seconds ahead is refused (nobody pins a stale record);
  - values over ``max_value_bytes`` and subkeys over ``max_subkey_bytes`` are refused;
  - the value must deserialize (msgpack), or readers of its key would hang.
In a private swarm the value (with its signature inside) is encrypted with AES-256-GCM under a key
derived from the swarm key; key, subkey and expiration are bound as associated data. A record that
does not decrypt and authenticate is refused, so outsiders can neither read nor inject records.
Before encryption the value is padded to a multiple of ``PAD_BYTES`` (capped by the size limit), so
its length does not tell outsiders a node's span, address, state or adapters: every ordinary record
has the same size.

Order: this validator runs before the RSA one when checking (priority 20 > 10) and after it when
signing, so cheap checks and decryption come first and the signature travels encrypted.
"""
from __future__ import annotations

import hashlib
import os
import struct
from collections import OrderedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.validation import CompositeValidator, DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.keys import SwarmKey
from swarm.records import MAX_RECORD_LIFETIME  # defined there: node.config checks ttl without importing hivemind

MAX_VALUE_BYTES = 4096  # bytes of a stored value (signature and encryption included)
MAX_SUBKEY_BYTES = 1024  # bytes of a serialized subkey (peer id plus owner public key)
_OWNER = b"[owner:"
_MAGIC = b"swk2"  # (swk1: unpadded)
_NONCE = 12
PAD_BYTES = 1024  # private record plaintexts are padded to a multiple of this
_SEALED = 3 + len(_MAGIC) + _NONCE + 16  # what framing, nonce and tag add to a padded plaintext
_AAD = b"swarmlm-dht-v1\0"
_NONE = b"\xc0"  # msgpack nil: what a record that fails to open reads as


class SwarmRecordValidator(RecordValidatorBase):
    """Size, lifetime and ownership checks everywhere; encryption with a swarm key."""

    def __init__(self, key: SwarmKey | None = None, *, max_lifetime: float = MAX_RECORD_LIFETIME,
                 max_value_bytes: int = MAX_VALUE_BYTES, max_subkey_bytes: int = MAX_SUBKEY_BYTES):
        if max_lifetime <= 0 or max_value_bytes < 64 or max_subkey_bytes < 16:
            raise ValueError("max_lifetime must be > 0, max_value_bytes >= 64, max_subkey_bytes >= 16")
        self.max_lifetime, self.max_value_bytes, self.max_subkey_bytes = max_lifetime, max_value_bytes, max_subkey_bytes
        self._aead = AESGCM(key.records) if key is not None else None

    @property
    def priority(self) -> int:
        return 20

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) > self.max_value_bytes or len(record.subkey) > self.max_subkey_bytes:
            return False
        if record.expiration_time - get_dht_time() > self.max_lifetime:
            return False
        if _OWNER not in record.subkey or not RSASignatureValidator._PUBLIC_KEY_RE.search(record.subkey):
            return False  # unowned records (anyone could overwrite them) are not accepted at all
        return self._aead is None or self._open(record) is not None

    def sign_value(self, record: DHTRecord) -> bytes:
        if self._aead is None:
            return record.value
        nonce = os.urandom(_NONCE)
        body = struct.pack(">H", len(record.value)) + record.value
        size = max(len(body), min(-(-len(body) // PAD_BYTES) * PAD_BYTES, self.max_value_bytes - _SEALED))
        body += bytes(size - len(body))  # outsiders see a size that says nothing about the record
        payload = _MAGIC + nonce + self._aead.encrypt(nonce, body, _associated(record))
        return b"\xc5" + struct.pack(">H", len(payload)) + payload  # a msgpack bin16: outsiders see bytes

    def strip_value(self, record: DHTRecord) -> bytes:
        if self._aead is None:
            return record.value
        opened = self._open(record)
        return _NONE if opened is None else opened

    def _open(self, record: DHTRecord) -> bytes | None:
        value = record.value
        if len(value) < 3 + len(_MAGIC) + _NONCE + 16 or value[0] != 0xC5:
            return None
        (length,) = struct.unpack(">H", value[1:3])
        payload = value[3:]
        if length != len(payload) or not payload.startswith(_MAGIC):
            return None
        nonce, sealed = payload[len(_MAGIC):len(_MAGIC) + _NONCE], payload[len(_MAGIC) + _NONCE:]
        try:
            body = self._aead.decrypt(nonce, sealed, _associated(record))
        except InvalidTag:
            return None
        (size,) = struct.unpack(">H", body[:2]) if len(body) >= 2 else (len(body),)
        return body[2:2 + size] if 2 + size <= len(body) else None

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False


def _associated(record: DHTRecord) -> bytes:
    """What a sealed value is bound to: a copy under another key, subkey or expiration fails to open."""
    return _AAD + struct.pack(">HH", len(record.key), len(record.subkey)) + record.key + record.subkey + \
        struct.pack(">d", record.expiration_time)


class _Decodable(RecordValidatorBase):
    """Runs last, on the plain value: it must deserialize. (hivemind's reader deserializes in a future
    callback; a signed but undecodable value would make every later read of its key hang.)"""

    @property
    def priority(self) -> int:
        return 0

    def validate(self, record: DHTRecord) -> bool:
        try:
            MSGPackSerializer.loads(record.value)
        except Exception:  # msgpack raises several types for malformed input
            return False
        return True


class _Signer(RSASignatureValidator):
    """hivemind's owner signatures, where a malformed public key is a refusal, not an exception.

    A record that verified once is remembered by the SHA-256 of everything the signature covers (key,
    subkey, value, expiration): a reader gets the same record from every peer holding a copy of its
    key (5 replicas and caches) and again on every refresh until it is re-announced, and checking an
    RSA signature (parsing the public key, serializing, verifying) was most of a refresh's time."""

    MAX_REMEMBERED = 16384  # verified records kept (~100 bytes each)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._verified: OrderedDict[bytes, None] = OrderedDict()

    def validate(self, record: DHTRecord) -> bool:
        digest = hashlib.sha256(b"\0".join((
            struct.pack(">IIId", len(record.key), len(record.subkey), len(record.value), record.expiration_time),
            record.key, record.subkey, record.value))).digest()
        if digest in self._verified:
            self._verified.move_to_end(digest)
            return True
        try:
            valid = super().validate(record)
        except Exception:  # e.g. an [owner:...] marker that is not an RSA key
            return False
        if valid:
            self._verified[digest] = None
            if len(self._verified) > self.MAX_REMEMBERED:
                self._verified.popitem(last=False)
        return valid


def make_validator(key: SwarmKey | None, owner: RSAPrivateKey) -> tuple[CompositeValidator, str]:
    """The validator a SwarmDHT peer uses, and the ``[owner:...]`` marker its own records carry."""
    signer = _Signer(owner)
    return CompositeValidator([_Decodable(), signer, SwarmRecordValidator(key)]), signer.local_public_key.decode()


def looks_sealed(value: bytes) -> bool:
    """Whether a stored value is sealed with some swarm key (what a reader without that key sees: bytes
    it cannot open). Used to tell a user "records present but not readable with this key"."""
    return len(value) > 3 + len(_MAGIC) and value[0] == 0xC5 and value[3:3 + len(_MAGIC)] == _MAGIC
