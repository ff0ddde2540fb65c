"""The owner-signature check remembers records it verified, by their content only."""
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from swarm.validator import _Signer


def signed(signer, marker, value, expiration):
    record = DHTRecord(b"key", MSGPackSerializer.dumps(f"node{marker}"), MSGPackSerializer.dumps(value), expiration)
    return DHTRecord(record.key, record.subkey, signer.sign_value(record), expiration)


def test_a_verified_record_is_remembered_and_any_change_is_checked_again():
    signer = _Signer(RSAPrivateKey())
    marker = signer.local_public_key.decode()
    exp = get_dht_time() + 60
    record = signed(signer, marker, {"address": "127.0.0.1:1"}, exp)
    reader = _Signer(RSAPrivateKey())  # another peer verifying it
    assert reader.validate(record) and reader.validate(record)
    assert len(reader._verified) == 1
    assert not reader.validate(DHTRecord(record.key, record.subkey, record.value, exp + 1))  # other expiration
    tampered = record.value.replace(b"127.0.0.1:1", b"6.6.6.6:666")
    assert not reader.validate(DHTRecord(record.key, record.subkey, tampered, exp))
    assert not reader.validate(DHTRecord(b"other key", record.subkey, record.value, exp))
    assert len(reader._verified) == 1  # refusals are not remembered


def test_memory_is_bounded():
    signer = _Signer(RSAPrivateKey())
    marker = signer.local_public_key.decode()
    reader = _Signer(RSAPrivateKey())
    reader.MAX_REMEMBERED = 3
    exp = get_dht_time() + 60
    for i in range(5):
        assert reader.validate(signed(signer, marker, i, exp))
    assert len(reader._verified) == 3
