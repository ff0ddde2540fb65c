"""Kept activations: a Backward carrying a Forward's token skips the recompute and gives the same
gradients; an unknown token falls back to the stateless recompute."""
import grpc
import pytest
import torch

from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import FLOAT_DTYPES, deserialize, serialize


def tensor(msg):
    return deserialize(msg, name="t", allowed=FLOAT_DTYPES, max_bytes=1 << 24)


@pytest.fixture
def node(start_nodes):
    (node,) = start_nodes("1:5")
    channel = grpc.insecure_channel(node.address)
    try:
        yield node, pb_grpc.NodeStub(channel)
    finally:
        channel.close()


def test_backward_with_token_equals_recompute_and_releases_memory(node):
    handle, stub = node
    model = stub.Info(pb.InfoRequest()).model
    torch.manual_seed(0)
    x, grad = torch.randn(2, 6, 64), torch.randn(2, 6, 64)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    req = pb.ForwardRequest(model=model, start=1, end=5, hidden_states=serialize(x), attention_mask=serialize(mask),
                            keep_for_backward=True)
    kept = stub.Forward(req)
    plain = stub.Forward(pb.ForwardRequest(model=model, start=1, end=5, hidden_states=serialize(x),
                                           attention_mask=serialize(mask)))
    assert kept.backward_token and not plain.backward_token
    assert torch.equal(tensor(kept.hidden_states), tensor(plain.hidden_states))
    cache = handle.node.servicer.activations
    assert cache.used > 0
    req.keep_for_backward = False
    with_token = stub.Backward(pb.BackwardRequest(inputs=req, grad_outputs=serialize(grad),
                                                  backward_token=kept.backward_token))
    assert cache.used == 0  # single use
    recomputed = stub.Backward(pb.BackwardRequest(inputs=req, grad_outputs=serialize(grad),
                                                  backward_token=kept.backward_token))  # now unknown
    assert torch.allclose(tensor(with_token.grad_inputs), tensor(recomputed.grad_inputs), atol=1e-6)
    assert tensor(with_token.grad_inputs).abs().max() > 0
