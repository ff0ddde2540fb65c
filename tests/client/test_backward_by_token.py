"""Backward by token (issue 16): after a Forward that kept its activations, the Backward sends the kept
pass's token and the output gradients, not the inputs again; a node that lost the pass answers
``inputs_needed`` and gets them; a node that does not announce ``backward_by_token`` gets them as before.
Gradients equal local PEFT in every case; bytes are the client's own counters. A token works only for
the client that kept the pass (another IP address: 127.0.0.2 through a relay of this test)."""
from __future__ import annotations

import asyncio
import contextlib
import copy

import grpc
import pytest
import torch

from client import get_peft_model
from node.activations import ActivationCache
from node.blocks import SavedPass
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import FLOAT_DTYPES, deserialize, serialize
from swarm.aio import LoopThread
from swarm.spans import Span
from tests.client.test_lora import CONFIG, batch, local_peft, lora_grads_local, lora_grads_ours

HIDDEN = 64
ACTIVATION = 3 * 10 * HIDDEN * 4  # bytes of one hop's float32 hidden states for batch() (3 x 10 tokens)


class NoByToken(pb_grpc.NodeServicer):
    """A node as before backward_by_token: it keeps activations but never says the token alone will do."""

    def __init__(self, inner: pb_grpc.NodeServicer):
        self.inner = inner

    async def Info(self, request, context):
        return await self.inner.Info(request, context)

    async def Forward(self, request, context):
        response = await self.inner.Forward(request, context)
        response.backward_by_token = False
        return response

    async def Backward(self, request, context):
        return await self.inner.Backward(request, context)


def make_pair(start_nodes, open_client, tiny_path, **node_options):
    nodes = start_nodes("0:3", "3:6", **node_options)
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(CONFIG))
    with torch.no_grad():
        for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return nodes, ours, local_peft(tiny_path, ours)


def step(ours, local, between=None) -> tuple[int, int]:
    """One forward + backward through the swarm and locally; asserts the LoRA gradients agree. Returns the
    bytes the client sent for the forward pass and for the backward pass. ``between()`` runs in between."""
    ids, mask, labels = batch()
    conns = ours.chain.connections
    before = conns.bytes_sent
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    forward = conns.bytes_sent - before
    if between is not None:
        between()
    out.loss.backward()
    backward = conns.bytes_sent - before - forward
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    ref.loss.backward()
    expected, got = lora_grads_local(local), lora_grads_ours(ours)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    return forward, backward


def resent(ours) -> float:
    return ours.chain.router.metrics.registry.get_sample_value("swarmlm_client_backward_inputs_resent_total")


def hits(nodes) -> int:
    return sum(n.node.servicer.activations.hits for n in nodes)


def test_backward_sends_only_the_token_and_output_gradients(start_nodes, open_client, tiny_path):
    nodes, ours, local = make_pair(start_nodes, open_client, tiny_path)
    forward, backward = step(ours, local)
    assert forward > 2 * ACTIVATION  # the forward carries each hop's hidden states (and the LoRA weights)
    # each of the 2 hops: its output gradients, a token and the model key; the inputs would double it
    assert 2 * ACTIVATION < backward < 2.25 * ACTIVATION, backward
    assert hits(nodes) == 2
    assert resent(ours) == 0


def test_evicted_activations_make_the_backward_resend_its_inputs(start_nodes, open_client, tiny_path):
    nodes, ours, local = make_pair(start_nodes, open_client, tiny_path)
    misses = sum(n.node.servicer.activations.misses for n in nodes)

    def evict():
        for n in nodes:
            n.node.servicer.activations.clear()

    _, backward = step(ours, local, between=evict)
    # asked by token first (refused: inputs_needed), then sent again with inputs (mask too): > 4 activations
    assert backward > 2 * ACTIVATION + 2 * 2 * ACTIVATION, backward
    assert sum(n.node.servicer.activations.misses for n in nodes) == misses + 2 and hits(nodes) == 0
    assert resent(ours) == 2
    assert not ours.chain.router.banned()
    _, backward = step(ours, local)  # the next step goes by token again
    assert backward < 2.25 * ACTIVATION and hits(nodes) == 2


def test_a_node_that_does_not_announce_it_gets_the_inputs_as_before(start_nodes, open_client, tiny_path):
    nodes, ours, local = make_pair(start_nodes, open_client, tiny_path, wrap_servicer=NoByToken)
    _, backward = step(ours, local)
    assert backward > 2 * 2 * ACTIVATION, backward  # inputs and output gradients at each hop
    assert hits(nodes) == 2  # its token still spared the recompute
    assert resent(ours) == 0


# ---- another client -------------------------------------------------------------------------------
class FromOtherAddress:
    """A TCP relay on 127.0.0.1 whose connections to ``target_port`` leave from 127.0.0.2: calls through it
    reach the node as another client (another IP address)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self._loop = LoopThread("other-client")
        self._server = self._loop.run(asyncio.start_server(self._accept, "127.0.0.1", 0), timeout=10)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._tasks: set[asyncio.Task] = set()

    async def _accept(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port,
                                                             local_addr=("127.0.0.2", 0))
        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(reader, writer):
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    def close(self):
        async def stop():
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
        self._loop.run(stop(), timeout=10)
        self._loop.close()


def tensor(msg):
    return deserialize(msg, name="t", allowed=FLOAT_DTYPES, max_bytes=1 << 24)


def test_a_token_is_useless_to_another_client(start_nodes):
    (handle,) = start_nodes("1:5")
    cache = handle.node.servicer.activations
    port = int(handle.address.rsplit(":", 1)[1])
    relay = FromOtherAddress(port)
    torch.manual_seed(0)
    x, grad = torch.randn(2, 6, HIDDEN), torch.randn(2, 6, HIDDEN)
    try:
        with grpc.insecure_channel(handle.address) as mine, grpc.insecure_channel(relay.address) as theirs:
            victim, attacker = pb_grpc.NodeStub(mine), pb_grpc.NodeStub(theirs)
            model = victim.Info(pb.InfoRequest()).model
            inputs = pb.ForwardRequest(model=model, start=1, end=5, hidden_states=serialize(x))
            kept = victim.Forward(pb.ForwardRequest(model=model, start=1, end=5, hidden_states=serialize(x),
                                                    keep_for_backward=True))
            assert kept.backward_by_token and len(kept.backward_token) == 32
            by_token = pb.BackwardRequest(inputs=pb.ForwardRequest(model=model, start=1, end=5),
                                          grad_outputs=serialize(grad), backward_token=kept.backward_token)
            stolen = attacker.Backward(by_token, timeout=30)
            assert stolen.inputs_needed and not stolen.HasField("grad_inputs")
            # with inputs, the other client gets its own recompute; the victim's pass stays where it was
            recomputed = attacker.Backward(pb.BackwardRequest(inputs=inputs, grad_outputs=serialize(grad),
                                                              backward_token=kept.backward_token), timeout=30)
            assert len(cache) == 1 and cache.hits == 0 and cache.misses == 2
            guessed = victim.Backward(pb.BackwardRequest(inputs=pb.ForwardRequest(model=model, start=1, end=5),
                                                         grad_outputs=serialize(grad), backward_token="0" * 32))
            assert guessed.inputs_needed
            mine_back = victim.Backward(by_token, timeout=30)
            assert not mine_back.inputs_needed and cache.hits == 1 and len(cache) == 0
            assert torch.allclose(tensor(mine_back.grad_inputs), tensor(recomputed.grad_inputs), atol=1e-6)
            assert tensor(mine_back.grad_inputs).abs().max() > 0
            assert victim.Backward(by_token).inputs_needed  # single use
    finally:
        relay.close()


def test_a_backward_by_token_carries_nothing_else(start_nodes):
    (handle,) = start_nodes("1:5")
    with grpc.insecure_channel(handle.address) as channel:
        stub = pb_grpc.NodeStub(channel)
        model = stub.Info(pb.InfoRequest()).model
        x = torch.randn(1, 4, HIDDEN)
        kept = stub.Forward(pb.ForwardRequest(model=model, start=1, end=5, hidden_states=serialize(x),
                                              keep_for_backward=True))
        cases = {  # each refused, and the node keeps serving
            "carries only": pb.BackwardRequest(inputs=pb.ForwardRequest(
                model=model, start=1, end=5, attention_mask=serialize(torch.ones(1, 4, dtype=torch.int64))),
                grad_outputs=serialize(x), backward_token=kept.backward_token),
            "needs a backward_token": pb.BackwardRequest(inputs=pb.ForwardRequest(model=model, start=1, end=5),
                                                         grad_outputs=serialize(x)),
            "names a pass over blocks": pb.BackwardRequest(inputs=pb.ForwardRequest(model=model, start=2, end=5),
                                                           grad_outputs=serialize(x), backward_token=kept.backward_token),
        }
        for expected, request in cases.items():
            with pytest.raises(grpc.RpcError) as e:
                stub.Backward(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and expected in e.value.details()
        assert stub.Info(pb.InfoRequest()).model == model


def test_the_cache_finds_a_pass_only_for_its_owner():
    cache = ActivationCache(max_bytes=1 << 20, ttl=60)
    saved = SavedPass(Span(0, 1), torch.zeros(1), [torch.zeros(1)], None, False, nbytes=100)
    token = cache.put(saved, owner="10.0.0.5")
    other = cache.put(saved, owner="10.0.0.6")
    assert token != other and len(token) == 32
    assert cache.pop(token, "10.0.0.6") is None and len(cache) == 2 and cache.used == 200  # not theirs: stays
    assert cache.pop(token, "10.0.0.5").saved is saved and cache.used == 100
    assert cache.pop(token, "10.0.0.5") is None
