"""Remote == local transformers: logits, loss and gradients, through 1, 2 and 3 real nodes."""
import pytest
import torch

from tests.conftest import NUM_LAYERS

ATOL = 1e-4


def padded_batch(side: str, vocab: int = 256):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (3, 12))
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :5] = 0
        mask[1, :2] = 0
    elif side == "right":
        mask[0, 7:] = 0
        mask[2, 10:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize(
    "spans",
    [
        ("0:6",),  # one node
        ("0:2", "2:6"),  # two nodes, uneven
        ("0:4", "1:3", "3:6"),  # three nodes, overlapping, different lengths
    ],
    ids=["1-node", "2-nodes", "3-nodes-overlapping"],
)
def test_logits_and_loss_equal_local(spans, start_nodes, open_client, tiny_path, local_model):
    start_nodes(*spans)
    model = open_client(tiny_path)
    for side in ("none", "left", "right"):
        ids, mask, labels = padded_batch(side)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            ref = local_model(input_ids=ids, attention_mask=mask, labels=labels)
        assert out.logits.shape == ref.logits.shape
        assert torch.allclose(out.logits, ref.logits, atol=ATOL), (side, (out.logits - ref.logits).abs().max())
        assert torch.allclose(out.loss, ref.loss, atol=ATOL)


def count_forwards(monkeypatch) -> list[tuple[object, int, int]]:
    """(servicer, start, end) of every Forward call any in-process node serves from now on. Patch before the
    nodes start: gRPC binds a servicer's methods when it is added to the server."""
    from node.handler import NodeServicer

    served = []
    real_forward = NodeServicer.Forward

    async def counted(self, request, context):
        served.append((self, request.start, request.end))
        return await real_forward(self, request, context)

    monkeypatch.setattr(NodeServicer, "Forward", counted)
    return served


def test_three_hop_route_is_really_used(start_nodes, open_client, tiny_path, local_model, monkeypatch):
    """Each forward pass is computed hop by hop by the nodes: each of three nodes serves exactly one
    Forward over its own span per pass, in order, and the result equals local."""
    served = count_forwards(monkeypatch)
    nodes = start_nodes("0:2", "2:4", "4:6")
    model = open_client(tiny_path)
    ids, mask, _ = padded_batch("left")
    passes = 2
    for _ in range(passes):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
        assert torch.allclose(out.logits, local_model(input_ids=ids, attention_mask=mask).logits, atol=ATOL)
    servicers = [node.node.servicer for node in nodes]
    calls = [(servicers.index(servicer), start, end) for servicer, start, end in served]
    assert calls == [(0, 0, 2), (1, 2, 4), (2, 4, NUM_LAYERS)] * passes


@pytest.mark.parametrize("spans", [("0:6",), ("0:3", "2:6")], ids=["1-node", "2-nodes"])
def test_gradients_equal_local(spans, start_nodes, open_client, tiny_path, local_model):
    start_nodes(*spans)
    model = open_client(tiny_path)
    ids, mask, labels = padded_batch("left")
    emb = local_model.get_input_embeddings()(ids).detach()

    remote_in = emb.clone().requires_grad_(True)
    out = model(inputs_embeds=remote_in, attention_mask=mask, labels=labels)
    out.loss.backward()
    local_in = emb.clone().requires_grad_(True)
    ref = local_model(inputs_embeds=local_in, attention_mask=mask, labels=labels)
    ref.loss.backward()
    assert torch.allclose(out.loss, ref.loss, atol=ATOL)
    assert remote_in.grad.abs().max() > 0
    assert torch.allclose(remote_in.grad, local_in.grad, atol=1e-5), (remote_in.grad - local_in.grad).abs().max()


def test_client_side_parameters_get_gradients(start_nodes, open_client, tiny_path, local_model):
    """Autograd reaches client-held parameters (embeddings, norm, head) through the remote blocks."""
    start_nodes("0:6")
    model = open_client(tiny_path)
    ids, mask, labels = padded_batch("right")
    for m in (model, local_model):
        m.zero_grad()
        m(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        remote = dict(model.named_parameters())[name].grad
        local = dict(local_model.named_parameters())[name].grad
        assert torch.allclose(remote, local, atol=1e-5), name
    local_model.zero_grad()


def test_client_holds_no_block_weights(start_nodes, open_client, tiny_path, local_model):
    start_nodes("0:6")
    model = open_client(tiny_path)
    # the state dict holds every parameter and persistent buffer: only the client-side ones are there
    assert set(model.state_dict()) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def test_missing_blocks_give_a_typed_error_after_the_bounded_wait(start_nodes, open_client, tiny_path, bootstrap):
    import time

    from client import ClientConfig
    from swarm.routing import NoRouteError

    start_nodes("0:3")
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), max_wait=2.0))
    started = time.monotonic()
    with pytest.raises(NoRouteError, match=r"no ONLINE node serves block\(s\) 3:6") as err:
        model(input_ids=torch.tensor([[5, 6, 7]]))
    assert err.value.missing == [3, 4, 5]
    assert 2.0 <= time.monotonic() - started < 10


def test_bad_request_is_reported_not_retried(start_nodes, open_client, tiny_path):
    start_nodes("0:6", max_batch_tokens=16)
    model = open_client(tiny_path)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED.*over this node's limit of 16"):
        model(input_ids=torch.ones(2, 20, dtype=torch.long))
    assert model(input_ids=torch.ones(1, 8, dtype=torch.long)).logits.shape == (1, 8, 256)
