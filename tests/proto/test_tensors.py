import pytest
import torch

from proto import swarmlm_pb2 as pb
from proto.tensors import DTYPES, TensorError, deserialize, serialize

ALL = set(DTYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool])
def test_round_trip_is_exact(dtype):
    t = (torch.randn(3, 5, 7) * 100).to(dtype)
    back = deserialize(serialize(t), name="t", allowed=ALL, max_bytes=1 << 20)
    assert back.dtype == dtype and torch.equal(back, t)


def test_non_contiguous_and_empty():
    t = torch.randn(4, 6).t()
    assert torch.equal(deserialize(serialize(t), name="t", allowed=ALL, max_bytes=1 << 20), t)
    e = torch.empty(0, 3)
    assert deserialize(serialize(e), name="t", allowed=ALL, max_bytes=10).shape == (0, 3)


@pytest.mark.parametrize(
    "msg, ndim, match",
    [
        (pb.Tensor(dtype="float64", shape=[1], data=b"\0" * 8), None, "unknown dtype"),
        (pb.Tensor(dtype="int64", shape=[1], data=b"\0" * 8), None, "not allowed"),
        (pb.Tensor(dtype="float32", shape=[1 << 28, 1 << 28], data=b""), None, "over the limit"),
        (pb.Tensor(dtype="float32", shape=[2, 2], data=b"\0" * 15), None, "needs 16 bytes"),
        (pb.Tensor(dtype="float32", shape=[-1, 4], data=b""), None, "negative"),
        (pb.Tensor(dtype="float32", shape=[4], data=b"\0" * 16), 2, "expected 2 dimensions"),
    ],
)
def test_bad_tensors_are_refused_before_allocation(msg, ndim, match):
    with pytest.raises(TensorError, match=match):
        deserialize(msg, name="x", allowed={"float32"}, max_bytes=1 << 20, ndim=ndim)


# ---- activations on the wire: 16-bit casts and blockwise 8-bit (issue 16) ----------------------------
from proto.tensors import BLOCKWISE8, ENCODINGS, encode, quantize_blockwise  # noqa: E402


@pytest.mark.parametrize("wire", ["bfloat16", "float16"])
def test_16_bit_wire_is_exactly_torchs_own_cast(wire):
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1)) * 30
    msg = encode(x, wire)
    assert msg.dtype == wire and len(msg.data) == x.numel() * 2
    back = deserialize(msg, name="x", allowed={wire}, max_bytes=1 << 20)
    assert back.dtype == getattr(torch, wire) and torch.equal(back, x.to(getattr(torch, wire)))


def _reference_blockwise(x: torch.Tensor, block: int) -> torch.Tensor:
    """The decoded values, computed value by value in plain Python floats (an independent reference)."""
    flat = x.reshape(-1).tolist()
    out = []
    for lo in range(0, len(flat), block):
        chunk = flat[lo:lo + block]
        scale = torch.tensor(max(abs(v) for v in chunk), dtype=torch.float32) / 127
        for v in chunk:
            code = 0 if scale == 0 else max(-127, min(127, round(float(torch.tensor(v) / scale))))
            out.append(float(torch.tensor(code, dtype=torch.float32) * scale))
    return torch.tensor(out).reshape(x.shape)


@pytest.mark.parametrize("block", [64, 8])
def test_blockwise8_decodes_to_codes_times_absmax_scales(block):
    x = torch.randn(3, 7, 10, generator=torch.Generator().manual_seed(2)) * 5  # 210 values: a ragged last block
    x.view(-1)[:block] = 0.0  # an all-zero block decodes to zeros
    msg = quantize_blockwise(x, block)
    assert msg.encoding == BLOCKWISE8 and len(msg.data) == x.numel() and len(msg.scales) == 4 * -(-x.numel() // block)
    back = deserialize(msg, name="x", allowed={"float32"}, max_bytes=x.numel() * 4, encodings=ENCODINGS)
    assert back.dtype == torch.float32 and back.shape == x.shape
    assert torch.equal(back, _reference_blockwise(x, block))
    assert torch.equal(back.reshape(-1)[:block], torch.zeros(block))
    # every value is within half a step of its block's scale
    scales = torch.frombuffer(bytearray(msg.scales), dtype=torch.float32).repeat_interleave(block)[:x.numel()]
    assert ((back - x).abs().reshape(-1) <= scales / 2 + 1e-6).all()


def test_blockwise8_keeps_the_senders_dtype():
    x = torch.randn(4, 64).to(torch.bfloat16)
    back = deserialize(quantize_blockwise(x), name="x", allowed={"bfloat16"}, max_bytes=1 << 20, encodings=ENCODINGS)
    assert back.dtype == torch.bfloat16 and (back.float() - x.float()).abs().max() < 0.1


def _q8(**fields) -> pb.Tensor:
    base = dict(dtype="float32", shape=[2, 64], data=b"\0" * 128, encoding=BLOCKWISE8, scales=b"\0" * 8, block_size=64)
    return pb.Tensor(**{**base, **fields})


@pytest.mark.parametrize(
    "msg, encodings, match",
    [
        (_q8(), (), "not accepted here"),
        (_q8(encoding="zstd"), ENCODINGS, "unknown"),
        (_q8(shape=[1 << 28, 1 << 28], data=b""), ENCODINGS, "over the limit"),  # decoded size, before anything
        (_q8(data=b"\0" * 127), ENCODINGS, "needs 128 code bytes"),
        (_q8(scales=b"\0" * 4), ENCODINGS, "8 scale bytes"),
        (_q8(block_size=0), ENCODINGS, "block_size"),
        (_q8(block_size=1 << 20), ENCODINGS, "block_size"),
        (_q8(scales=torch.tensor([1.0, float("nan")]).numpy().tobytes()), ENCODINGS, "finite"),
        (_q8(scales=torch.tensor([1.0, -1.0]).numpy().tobytes()), ENCODINGS, ">= 0"),
        (_q8(dtype="int64"), ENCODINGS, "not allowed"),
    ],
)
def test_bad_blockwise8_tensors_are_refused(msg, encodings, match):
    with pytest.raises(TensorError, match=match):
        deserialize(msg, name="x", allowed={"float32"}, max_bytes=1 << 20, encodings=encodings)


def test_only_float_tensors_are_quantized():
    with pytest.raises(TypeError, match="float"):
        quantize_blockwise(torch.arange(10))
    with pytest.raises(ValueError, match="wire format"):
        encode(torch.zeros(3), "int4")
