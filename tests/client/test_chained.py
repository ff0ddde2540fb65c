"""Chained inference steps (issue 16): each node pushes a step's outputs straight to the next node; tokens and
logits stay identical to local transformers, failover and hostile pushes included. Real nodes, real gRPC."""
import secrets

import grpc
import pytest
import torch

from client import AutoDistributedModelForCausalLM, ClientConfig
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from tests.helpers.faults import NoRelayServicer

NEW = 12
GREEDY = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)


def connect(tiny_path, peers, **config):
    cfg = ClientConfig(initial_peers=tuple(peers), ban_seconds=60, **config)
    return AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), client_config=cfg)


def prompt():
    torch.manual_seed(3)
    return torch.randint(3, 256, (2, 7))


@pytest.mark.parametrize("spans", [("0:3", "3:6"), ("0:2", "2:4", "4:6")])
def test_chained_generation_equals_local(spans, start_nodes, bootstrap, tiny_path, local_model):
    start_nodes(*spans)
    model = connect(tiny_path, bootstrap)
    ids = prompt()
    try:
        with model.inference_session(max_length=ids.shape[1] + NEW) as session:
            out = model.generate(ids, session=session, **GREEDY)
            assert session.chain_steps == NEW  # every step travelled the chain
            assert len(session._streams) == len(spans)
    finally:
        model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))


def test_chained_logits_equal_local(start_nodes, bootstrap, tiny_path, local_model):
    start_nodes("0:2", "2:4", "4:6")
    model = connect(tiny_path, bootstrap)
    ids = prompt()
    try:
        with torch.no_grad(), model.inference_session(max_length=ids.shape[1] + 1) as session:
            def logits(tokens):
                return model.lm_head(model.model.norm(session.step(model.model.embed_tokens(tokens))))
            first = logits(ids)
            nxt = logits(ids[:, :1])
            assert session.chain_steps == 2
    finally:
        model.close()
    with torch.no_grad():
        ref = local_model(torch.cat([ids, ids[:, :1]], dim=1)).logits
    torch.testing.assert_close(first, ref[:, :-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nxt, ref[:, -1:], rtol=1e-5, atol=1e-5)


def test_push_with_a_wrong_token_is_refused_and_the_node_keeps_serving(start_nodes, bootstrap, tiny_path, local_model):
    nodes = start_nodes("0:3", "3:6")

    async def push():
        async with grpc.aio.insecure_channel(nodes[1].address) as channel:
            call = pb_grpc.NodeStub(channel).Relay()
            await call.write(pb.ChainPush(token=secrets.token_bytes(16)))
            with pytest.raises(grpc.aio.AioRpcError) as e:
                while await call.read() is not grpc.aio.EOF:
                    pass
                await call.code()
                raise grpc.aio.AioRpcError(await call.code(), None, None, await call.details())
            return e.value

    from swarm.aio import LoopThread
    loop = LoopThread("test-push")
    try:
        error = loop.run(push())
    finally:
        loop.close()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "chain token" in error.details()
    model = connect(tiny_path, bootstrap)
    ids = prompt()
    try:
        out = model.generate(ids, **GREEDY)
    finally:
        model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))


def test_per_hop_when_chained_steps_are_off(start_nodes, bootstrap, tiny_path, local_model):
    start_nodes("0:3", "3:6")
    model = connect(tiny_path, bootstrap, chained_steps=False)
    ids = prompt()
    try:
        with model.inference_session(max_length=ids.shape[1] + NEW) as session:
            out = model.generate(ids, session=session, **GREEDY)
            assert session.chain_steps == 0
    finally:
        model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))


@pytest.mark.parametrize("victim", [1, 2])  # the middle hop, the last hop
def test_chained_failover_killing_a_node_mid_generation(victim, tiny_path, local_model):
    import signal

    from tests.helpers.launch import LocalSwarm
    from tests.test_faults import OnToken

    with LocalSwarm(tiny_path, ready_timeout=120) as swarm:
        swarm.start_nodes(["0:2", "2:4", "2:4", "4:6", "4:6"], "--ttl", "3", "--shutdown-grace", "1")
        model = connect(tiny_path, swarm.peers)
        ids = prompt()
        try:
            with model.inference_session(max_length=ids.shape[1] + NEW) as session:
                def kill():
                    address = session._streams[victim].hop.server.address
                    swarm.nodes[swarm.addresses.index(address)].stop(signal.SIGKILL)
                out = model.generate(ids, session=session, streamer=OnToken(4, kill), **GREEDY)
                assert session.chain_steps == NEW
        finally:
            model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))


def test_chained_generation_over_an_emulated_link_equals_local(tiny_path, local_model):
    from tests.helpers.launch import LocalSwarm
    from tests.helpers.link import PROFILES

    with LocalSwarm(tiny_path, ready_timeout=120, link=PROFILES["broadband"]) as swarm:
        swarm.start_nodes(["0:3", "3:6"])
        model = connect(tiny_path, swarm.peers)
        ids = prompt()
        try:
            with model.inference_session(max_length=ids.shape[1] + NEW) as session:
                out = model.generate(ids, session=session, **GREEDY)
                assert session.chain_steps == NEW
        finally:
            model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))


def test_chained_beams_and_drafts_equal_local(start_nodes, bootstrap, tiny_path, local_model):
    """Beam reordering and draft cropping (prompt lookup, a small assistant model) travel the chain too."""
    start_nodes("0:3", "3:6")
    model = connect(tiny_path, bootstrap)
    ids, repetitive = prompt(), torch.tensor([[5, 9, 14, 27, 5, 9, 14, 27, 5, 9, 14]])
    beams = dict(GREEDY, num_beams=3)
    try:
        # beams run in a session of generate()'s own (chained by default: the same path as above)
        assert torch.equal(model.generate(ids, **beams), local_model.generate(ids, **beams))
        # the assistant is the target itself: every draft token is accepted, so fewer steps than tokens
        for draft, most in ((dict(prompt_lookup_num_tokens=3), NEW), (dict(assistant_model=local_model), NEW - 1)):
            with model.inference_session(max_length=repetitive.shape[1] + NEW + 4) as session:
                out = model.generate(repetitive, session=session, **GREEDY, **draft)
                assert 0 < session.chain_steps <= most, draft  # a draft is checked in one chained step
            assert torch.equal(out, local_model.generate(repetitive, **GREEDY)), draft
    finally:
        model.close()


def test_a_broken_link_between_live_nodes_is_fed_by_the_client(start_nodes, bootstrap, tiny_path, local_model):
    """Node 0's push to node 1 fails while both serve the client: the client learns which link broke, feeds
    that hop itself from then on, and the tokens stay local's."""
    start_nodes("0:3")
    start_nodes("3:6", wrap_servicer=NoRelayServicer)
    model = connect(tiny_path, bootstrap)
    ids = prompt()
    try:
        with model.inference_session(max_length=ids.shape[1] + NEW) as session:
            out = model.generate(ids, session=session, **GREEDY)
            assert len(session._streams) == 2 and not session._streams[1].linked  # hop 1's link given up
    finally:
        model.close()
    assert torch.equal(out, local_model.generate(ids, **GREEDY))
