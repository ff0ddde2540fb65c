"""The committed generated code must be what `make proto` produces from proto/swarmlm.proto."""
from pathlib import Path

from proto.generate import GENERATED, ROOT, generate


def test_generated_code_is_up_to_date(tmp_path: Path):
    generate(tmp_path)
    stale = [p for p in GENERATED if (tmp_path / p).read_bytes() != (ROOT / p).read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_no_pickle_in_the_wire_contract():
    text = (ROOT / "proto" / "swarmlm.proto").read_text()
    assert "bytes data = 3" in text  # tensors travel as raw typed bytes
    # the source scan for pickle and torch.load is tests/test_no_unsafe_deserialization.py
