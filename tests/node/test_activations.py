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


def graph_storages(saved, exclude: set[int]) -> int:
    """Bytes of the distinct storages ``saved``'s autograd graph holds, found by walking the graph itself
    (every node's saved tensors, every leaf), the model's weights excepted."""
    storages, seen, todo = {}, set(), [saved.out.grad_fn]

    def count(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in exclude:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        for name in dir(fn):
            if name.startswith("_saved_"):
                value = getattr(fn, name)
                for t in value if isinstance(value, (tuple, list)) else (value,):
                    count(t)
        count(getattr(fn, "variable", None))  # a leaf
        todo.extend(next_fn for next_fn, _ in fn.next_functions)
    for t in [saved.out, *saved.leaves]:
        count(t)
    return sum(storages.values())


def test_kept_bytes_are_what_the_graph_really_holds_with_a_padding_mask(tiny_path):
    """The attention weights a padding mask makes autograd keep are counted (the old estimate, 12 x the
    output per block, missed them: an 8,192-token pass estimated at 192 MB held 1.3 GB)."""
    from node.blocks import forward_for_backward, load_span, weight_storages
    from swarm.checkpoint import load_config
    from swarm.spans import Span

    blocks = load_span(tiny_path, load_config(tiny_path), Span(0, 2), torch.float32)
    seq = 256
    mask = torch.ones(2, seq, dtype=torch.int64)
    mask[0, :7] = 0  # left padding
    x = torch.randn(2, seq, 64)
    saved = forward_for_backward(blocks, Span(0, 2), x, mask)
    assert saved.nbytes == graph_storages(saved, weight_storages(blocks))  # the old estimate: 3.1 MB of 4.4
    unpadded = forward_for_backward(blocks, Span(0, 2), x, torch.ones_like(mask))
    assert unpadded.nbytes == graph_storages(unpadded, weight_storages(blocks))
    assert saved.nbytes > unpadded.nbytes + seq * seq * 4  # what the mask makes attention keep is counted


def test_kept_passes_expire_on_a_timer_without_further_calls():
    """Expiry used to run only inside the next put/pop: a node left alone kept its memory past the TTL."""
    import asyncio

    from node.activations import ActivationCache
    from node.blocks import SavedPass
    from swarm.spans import Span

    async def scenario():
        cache = ActivationCache(max_bytes=1 << 20, ttl=0.1)
        saved = SavedPass(Span(0, 1), torch.zeros(1), [], None, False, nbytes=1000)
        assert cache.put(saved) and cache.used == 1000
        await asyncio.sleep(0.5)  # nothing touches the cache meanwhile
        return cache.used, len(cache)

    assert asyncio.run(scenario()) == (0, 0)
