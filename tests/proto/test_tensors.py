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
