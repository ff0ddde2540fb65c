import math

import pytest
from transformers import LlamaConfig

from swarm.records import RECORD_FIELDS, config_fingerprint, make_record, model_key, parse_record
from swarm.spans import NodeState, ServerInfo, Span

INFO = ServerInfo("peerA", "127.0.0.1:5000", Span(2, 6), NodeState.ONLINE, 123.0, "0.1.0", "float32")


def test_record_round_trip():
    assert parse_record("peerA", make_record(INFO), block=3, num_blocks=8) == INFO


@pytest.mark.parametrize(
    "change",
    [
        {"address": "no-port"},
        {"address": "host:99999"},
        {"start": "2"},
        {"start": True},
        {"end": 9},  # past the model's blocks
        {"start": 4},  # block 3 is not inside the span it is stored under
        {"state": "BUSY"},
        {"dtype": "int8"},
        {"throughput": math.nan},
        {"throughput": -1.0},
        {"version": "x" * 1000},
        {"extra": 1},
        {"adapters": "style"},
        {"adapters": [1]},
        {"adapters": ["x" * 1000]},
    ],
)
def test_malformed_records_are_ignored(change):
    value = {**make_record(INFO), **change}
    assert parse_record("peerA", value, block=3, num_blocks=8) is None


@pytest.mark.parametrize("value", [None, 5, "str", [1, 2], {"address": "a:1"}])
def test_non_dict_or_partial_values_are_ignored(value):
    assert parse_record("peerA", value, block=3, num_blocks=8) is None


def test_fingerprint_separates_models_and_ignores_paths():
    a = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    b = LlamaConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4)
    b._name_or_path = "/somewhere/else"
    c = LlamaConfig(hidden_size=64, num_hidden_layers=5, num_attention_heads=4)
    assert config_fingerprint(a) == config_fingerprint(b) != config_fingerprint(c)
    assert model_key("tiny", a) != model_key("tiny", c)


def test_tls_is_an_optional_field_old_readers_skip():
    tls_info = ServerInfo("peerA", "127.0.0.1:5000", Span(2, 6), NodeState.ONLINE, 123.0, "0.1.0", "float32", tls=True)
    assert make_record(tls_info)["tls"] is True
    assert parse_record("peerA", make_record(tls_info), block=3, num_blocks=8) == tls_info
    assert "tls" not in make_record(INFO)  # a plaintext node's record is unchanged: every reader understands it
    assert set(make_record(tls_info)) - set(RECORD_FIELDS) == {"tls"}  # readers with the exact old schema skip it


@pytest.mark.parametrize("value", [False, 1, "yes", None, [True]])
def test_tls_field_must_be_exactly_true(value):
    assert parse_record("peerA", {**make_record(INFO), "tls": value}, block=3, num_blocks=8) is None


@pytest.mark.parametrize("field", ["weights", "files"])
def test_weights_digests_are_optional_strict_fields(field):
    info = ServerInfo("peerA", "127.0.0.1:5000", Span(2, 6), NodeState.ONLINE, 123.0, "0.1.0", "float32",
                      **{field: "ab" * 32})
    assert make_record(info)[field] == "ab" * 32
    assert parse_record("peerA", make_record(info), block=3, num_blocks=8) == info
    assert field not in make_record(INFO)
    for bad in ("AB" * 32, "ab" * 31, "zz" * 32, 5, None, ["ab" * 32]):
        assert parse_record("peerA", {**make_record(info), field: bad}, block=3, num_blocks=8) is None


def test_quantization_is_an_optional_strict_field_old_readers_skip():
    info = ServerInfo("peerA", "127.0.0.1:5000", Span(2, 6), NodeState.ONLINE, 123.0, "0.1.0", "float32",
                      quantization="int8")
    assert make_record(info)["quantization"] == "int8"
    assert parse_record("peerA", make_record(info), block=3, num_blocks=8) == info
    assert "quantization" not in make_record(INFO)  # an unquantized node's record is what it always was
    assert parse_record("peerA", make_record(INFO), block=3, num_blocks=8).quantization == "none"
    assert set(make_record(info)) - set(RECORD_FIELDS) == {"quantization"}  # readers with the old schema skip it
    for bad in ("none", "int4", "INT8", "", 8, None, ["int8"]):  # "none" is said by the field's absence
        assert parse_record("peerA", {**make_record(info), "quantization": bad}, block=3, num_blocks=8) is None


def test_verification_tolerance_follows_dtype_and_quantization():
    from dataclasses import replace

    from client.verify import BFLOAT16_TOLERANCE, FLOAT32_TOLERANCE, QUANTIZED_TOLERANCE, default_tolerance

    int8, bf16 = replace(INFO, quantization="int8"), replace(INFO, dtype="bfloat16")
    assert default_tolerance(INFO, INFO) == default_tolerance(int8, int8) == FLOAT32_TOLERANCE  # same math
    assert default_tolerance(INFO, bf16) == BFLOAT16_TOLERANCE
    assert default_tolerance(INFO, int8) == default_tolerance(bf16, int8) == QUANTIZED_TOLERANCE


def test_nf4_nodes_check_only_nf4_nodes_at_the_default_tolerance():
    from dataclasses import replace

    from client.verify import comparable

    int8, nf4 = replace(INFO, quantization="int8"), replace(INFO, quantization="nf4")
    assert comparable(nf4, nf4) and comparable(INFO, int8) and comparable(INFO, INFO)
    assert not comparable(nf4, INFO) and not comparable(int8, nf4)


def test_fingerprint_is_family_neutral():
    """Fields only one family has (Gemma's soft-caps, an MoE's expert count) separate models; fields every
    config has for bookkeeping (labels of a classification head, token ids, paths) do not."""
    from transformers import AutoConfig

    gemma = AutoConfig.for_model("gemma2", num_hidden_layers=2)
    softer = AutoConfig.for_model("gemma2", num_hidden_layers=2, final_logit_softcapping=5.0)
    assert config_fingerprint(gemma) != config_fingerprint(softer)
    moe = AutoConfig.for_model("mixtral", num_hidden_layers=2, num_local_experts=4)
    assert config_fingerprint(moe) != config_fingerprint(AutoConfig.for_model("mixtral", num_hidden_layers=2))
    relabelled = AutoConfig.for_model("gemma2", num_hidden_layers=2, num_labels=5, pad_token_id=3)
    relabelled._name_or_path = "/elsewhere"
    assert config_fingerprint(relabelled) == config_fingerprint(gemma)


def test_wire_formats_are_an_optional_strict_field():
    from dataclasses import replace

    wired = replace(INFO, wire=("bfloat16", "float16", "blockwise8"))
    assert make_record(wired)["wire"] == ["bfloat16", "float16", "blockwise8"]
    assert parse_record("peerA", make_record(wired), block=3, num_blocks=8) == wired
    assert "wire" not in make_record(INFO)  # nothing announced: the record is what it was
    # a format this reader does not know is dropped (never sent); a malformed list drops the record
    newer = {**make_record(INFO), "wire": ["blockwise4", "blockwise8"]}
    assert parse_record("peerA", newer, block=3, num_blocks=8).wire == ("blockwise8",)
    for bad in ("blockwise8", ["blockwise8", "blockwise8"], [1], ["x" * 100], ["a"] * 9, {"blockwise8": 1}):
        assert parse_record("peerA", {**make_record(INFO), "wire": bad}, block=3, num_blocks=8) is None
