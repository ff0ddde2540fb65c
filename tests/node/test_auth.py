"""Authenticated RPCs in a private swarm, on a real node: calls without a valid proof of the swarm key
are refused with UNAUTHENTICATED before the node parses or computes anything; replayed, stale and
misdirected proofs are refused; members (the client with the key) work exactly as in an open swarm."""
import asyncio
import contextlib
import time

import grpc
import pytest
import torch

from client import AutoDistributedModelForCausalLM, ClientConfig
from client.transport import Connections, RemoteCallError, call_forward, forward_request
from node.auth import AuthError, NonceCache
from node.config import NodeConfig
from node.requests import max_message_bytes
from node.server import NodeThread
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize
from swarm.keys import AUTH_HEADER, body_digest, generate_key_text, load_key, parse_key, rpc_proof
from swarm.spans import Span
from tests.conftest import NUM_LAYERS
from tests.helpers.dht import bootstrap_peer
from tests.helpers.linked import chained_sessions

HIDDEN = 64
CACHE = 512
SERVICE = pb.DESCRIPTOR.services_by_name["Node"].full_name  # the package is part of every method name
INFO, FORWARD, INFERENCE = (f"/{SERVICE}/{name}" for name in ("Info", "Forward", "Inference"))


@pytest.fixture(scope="module")
def private_node(tiny_path, private_peers, key_path):
    node = NodeThread(NodeConfig(model=str(tiny_path), blocks=Span(0, NUM_LAYERS), cache_tokens=CACHE,
                                 initial_peers=tuple(private_peers), swarm_key=str(key_path)))
    node.start()
    try:
        yield node
    finally:
        node.stop(0.5)


@pytest.fixture
def node(private_node, key_path):
    """(node thread, stub without proofs, the swarm key, the node's model key)."""
    key = load_key(key_path)
    channel = grpc.insecure_channel(private_node.address)
    stub = pb_grpc.NodeStub(channel)
    model = stub.Info(pb.InfoRequest(), metadata=proof(key, private_node, INFO, pb.InfoRequest())).model
    try:
        yield private_node, stub, key, model
    finally:
        channel.close()


def proof(key, node, method, request, address=None, **kw):
    """Metadata proving ``key`` for one call to ``node`` (a stream: ``request`` is its first message)."""
    kw.setdefault("epoch", node.node.auth.epoch)
    digest = body_digest(request.SerializeToString())
    return [(AUTH_HEADER, rpc_proof(key, method, address or node.address, digest, **kw))]


def forward_req(model, **changes):
    req = pb.ForwardRequest(model=model, start=0, end=2, hidden_states=serialize(torch.randn(1, 3, HIDDEN)))
    for name, value in changes.items():
        setattr(req, name, value)
    return req


def open_request(model):
    return pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=NUM_LAYERS, batch_size=1,
                                                      max_length=CACHE))


def refused(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (err.value.code(), err.value.details())
    return err.value.details()


def cache_free(stub, key, node) -> int:
    return stub.Info(pb.InfoRequest(), metadata=proof(key, node, INFO, pb.InfoRequest())).cache_tokens_free


def test_calls_without_a_proof_are_refused_before_any_work(node):
    handle, stub, key, model = node
    auth, servicer = handle.node.auth, handle.node.servicer
    accepted, refused_before = auth.accepted, auth.refused
    assert "private swarm" in refused(lambda: stub.Info(pb.InfoRequest(), timeout=10))
    # a request the node would answer NOT_FOUND if it parsed it: it never gets that far
    assert "swarm key" in refused(lambda: stub.Forward(forward_req("other/model"), timeout=10))
    # bytes that are not even a protobuf message are not parsed either
    raw = grpc.insecure_channel(handle.address).unary_unary(FORWARD)
    refused(lambda: raw(b"\xff\x00garbage", timeout=10))
    # an inference session without a proof reserves no cache
    refused(lambda: list(stub.Inference(iter([open_request(model)]), timeout=10)))
    assert (auth.accepted, auth.refused) == (accepted, refused_before + 4)
    assert servicer.open_sessions == 0 and servicer.in_flight == 0
    assert cache_free(stub, key, handle) == CACHE


def test_a_wrong_key_is_refused(node):
    handle, stub, _, model = node
    wrong = parse_key(generate_key_text())
    req = forward_req(model)
    message = refused(lambda: stub.Forward(req, metadata=proof(wrong, handle, FORWARD, req), timeout=10))
    assert "does not match" in message
    refused(lambda: list(stub.Inference(iter([open_request(model)]), timeout=10,
                                        metadata=proof(wrong, handle, INFERENCE, open_request(model)))))


def test_replayed_stale_and_misdirected_proofs_are_refused(node):
    handle, stub, key, model = node
    req = forward_req(model)
    metadata = proof(key, handle, FORWARD, req)
    assert list(stub.Forward(req, metadata=metadata, timeout=30).hidden_states.shape) == [1, 3, HIDDEN]
    assert "replayed" in refused(lambda: stub.Forward(req, metadata=metadata, timeout=10))
    for skew in (-120, 120):
        stale = proof(key, handle, FORWARD, req, now=time.time() + skew)
        assert "stale" in refused(lambda: stub.Forward(req, metadata=stale, timeout=10))
    other_body = forward_req(model, end=3)  # a proof covers exactly the bytes it was made for
    for_req = proof(key, handle, FORWARD, req)
    assert "SHA-256 differs" in refused(lambda: stub.Forward(other_body, metadata=for_req, timeout=10))
    elsewhere = proof(key, handle, FORWARD, req, address="127.0.0.1:1")  # made for another node
    assert "does not match" in refused(lambda: stub.Forward(req, metadata=elsewhere, timeout=10))
    info_proof = proof(key, handle, INFO, req)  # made for another method
    refused(lambda: stub.Forward(req, metadata=info_proof, timeout=10))
    other_run = proof(key, handle, FORWARD, req, epoch="ab" * 16)  # made for another run of the node
    assert handle.node.auth.epoch in refused(lambda: stub.Forward(req, metadata=other_run, timeout=10))
    garbled = [(AUTH_HEADER, "v2.123.abc")]
    assert "malformed" in refused(lambda: stub.Forward(req, metadata=garbled, timeout=10))
    # a fresh, proper proof still works afterwards, for streams too
    assert stub.Forward(req, metadata=proof(key, handle, FORWARD, req), timeout=30).hidden_states.shape
    opening = open_request(model)
    (ack,) = stub.Inference(iter([opening]), metadata=proof(key, handle, INFERENCE, opening), timeout=30)
    assert ack.cache_length == 0


def test_a_stream_proof_covers_its_own_first_message_only(node):
    """A stream's proof used to cover a fixed marker: any captured opening proof opened any session."""
    handle, stub, key, model = node
    opening = open_request(model)
    other = pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=2, batch_size=1, max_length=16))
    metadata = proof(key, handle, INFERENCE, opening)
    message = refused(lambda: list(stub.Inference(iter([other]), metadata=metadata, timeout=10)))
    assert "first message" in message
    assert handle.node.servicer.open_sessions == 0 and cache_free(stub, key, handle) == CACHE
    # and the same opening sent again (a captured stream, replayed) is refused
    (ack,) = stub.Inference(iter([opening]), metadata=proof(key, handle, INFERENCE, opening, nonce="cd" * 16),
                            timeout=30)
    assert ack.cache_length == 0
    again = proof(key, handle, INFERENCE, opening, nonce="cd" * 16)
    assert "replayed" in refused(lambda: list(stub.Inference(iter([opening]), metadata=again, timeout=10)))


def test_a_keyless_call_with_a_big_body_is_refused_without_hashing_it(node):
    """The proof is checked from the metadata: a caller without the key gets UNAUTHENTICATED and the node
    never hashes (or parses) its body. Bodies used to be received and hashed first (100 concurrent 9 MB
    calls took a node from 422 MB to 2.3 GB)."""
    handle, stub, key, model = node
    auth = handle.node.auth
    body = bytes(max_message_bytes(handle.node.servicer.limits) - 1024)  # as big as the node takes (never parsed)
    hashed = auth.hashed
    fake = [(AUTH_HEADER, rpc_proof(parse_key(generate_key_text()), FORWARD, handle.address,
                                    body_digest(b"x"), epoch=auth.epoch))]

    async def many(n):
        async with grpc.aio.insecure_channel(handle.address, options=[("grpc.max_send_message_length", -1)]) as ch:
            call = ch.unary_unary(FORWARD)
            results = await asyncio.gather(*(call(body, metadata=m, timeout=30) for m in [None, fake] * (n // 2)),
                                           return_exceptions=True)
        return [r.code() if isinstance(r, grpc.aio.AioRpcError) else r for r in results]

    codes = asyncio.run(many(20))
    assert auth.hashed == hashed  # not one body hashed
    assert set(codes) <= {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL}
    assert grpc.StatusCode.UNAUTHENTICATED in codes
    assert auth.draining == 0
    req = forward_req(model)  # members are still served, their body checked against the proof
    assert stub.Forward(req, metadata=proof(key, handle, FORWARD, req), timeout=30).hidden_states.shape
    assert auth.hashed == hashed + 1


def test_members_get_the_same_results_as_local(private_node, private_peers, key_path, open_client, tiny_path,
                                               local_model):
    accepted = private_node.node.auth.accepted
    model = open_client(tiny_path, initial_peers=private_peers, swarm_key=str(key_path))
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (2, 7))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)
    expected = local_model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0), expected)
    assert private_node.node.auth.accepted > accepted


def test_a_client_without_the_key_sees_no_nodes(private_peers, open_client, tiny_path):
    from client import ClientConfig
    from swarm.routing import NoRouteError

    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(private_peers), max_wait=0.5))
    assert model.chain.servers(refresh=True) == []
    with pytest.raises(NoRouteError):
        model(input_ids=torch.tensor([[5, 6, 7]]))


def test_an_authentication_failure_is_a_clear_client_error_not_a_dead_node(node):
    handle, _, _, model = node

    async def call(conns):
        try:
            req = forward_request(model, Span(0, 2), torch.randn(1, 3, HIDDEN), None, None)
            return await call_forward(conns, handle.address, req, torch.zeros(1, 3, HIDDEN), timeout=10)
        finally:
            await conns.close()

    with pytest.raises(RemoteCallError) as err:
        asyncio.run(call(Connections(parse_key(generate_key_text()))))
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and err.value.client_fault  # never banned or retried
    assert "swarm key" in str(err.value)
    with pytest.raises(RemoteCallError, match="no swarm key proof"):
        asyncio.run(call(Connections()))


def test_nonce_cache_forgets_old_nonces_and_stays_bounded():
    cache = NonceCache(keep_seconds=10, max_entries=3)
    for i in range(3):
        cache.add(f"n{i}", now=100.0 + i)
    with pytest.raises(AuthError, match="replayed"):
        cache.add("n1", now=103.0)
    with pytest.raises(AuthError, match="too many"):
        cache.add("n3", now=105.0)
    cache.add("n3", now=110.5)  # n0 (and only n0) has left the window
    assert len(cache) == 3
    with pytest.raises(AuthError, match="replayed"):
        cache.add("n2", now=110.6)


def test_a_refused_stream_reports_unauthenticated_not_a_local_write_error(node):
    """The node refuses an unauthenticated Inference stream after its first message: refused earlier,
    while the client is still writing, the client would only see INTERNAL from its own failed write."""
    handle, _, _, model = node
    opening = pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=2, batch_size=1, max_length=8))

    async def attempts(conns):
        codes = []
        try:
            for _ in range(10):
                call = conns.stub(handle.address).Inference()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.write(opening)
                    await call.read()
                codes.append((await call.code(), await call.details()))
        finally:
            await conns.close()
        return codes

    codes = asyncio.run(attempts(Connections(parse_key(generate_key_text()))))
    assert all(code == grpc.StatusCode.UNAUTHENTICATED and "swarm key" in details for code, details in codes), codes


@pytest.fixture
def own_swarm(dht_loop, tmp_path):
    """(peers, key path) of a private swarm of its own (no other node serves there)."""
    path = tmp_path / "own.key"
    path.write_text(generate_key_text())
    with bootstrap_peer(dht_loop, load_key(path)) as peers:
        yield peers, path


def test_a_member_client_carries_on_after_the_node_restarts(tiny_path, own_swarm, open_client, local_model):
    """The client's proofs name the epoch of the node process it last talked to; after a restart at the
    same address the node refuses them naming its new epoch, and the client proves again (unary calls
    and stream openings), without the user seeing an error."""
    from client import ClientConfig
    from tests.helpers.network import free_port

    private_peers, key_path = own_swarm

    def start(port):
        return NodeThread(NodeConfig(model=str(tiny_path), blocks=Span(0, NUM_LAYERS), cache_tokens=CACHE, port=port,
                                     initial_peers=tuple(private_peers), swarm_key=str(key_path))).start()

    port = free_port()
    node = start(port)
    try:
        model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(private_peers),
                                                                  swarm_key=str(key_path), max_wait=30.0))
        ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(1))
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        expected = local_model.generate(ids, **kwargs)
        assert torch.equal(model.generate(ids, **kwargs), expected)
        before = node.node.auth.epoch
        node.stop(0.2)
        node = start(port)
        assert node.node.auth.epoch != before
        assert torch.equal(model.generate(ids, **kwargs), expected)  # a stream opening: proved again
        with torch.no_grad():  # unary calls too
            assert torch.allclose(model(input_ids=ids).logits, local_model(input_ids=ids).logits, atol=1e-4)
        assert node.node.auth.refused >= 1  # (the stale proofs were refused, then made again)
    finally:
        node.stop(0.2)


def test_chained_steps_in_a_private_swarm_carry_the_proof(start_nodes, own_swarm, tiny_path, local_model):
    """Node-to-node pushes (Relay) are proved like a client's calls; tokens equal local's. A swarm of its own:
    this module's node serving every block would make a one-hop route (nothing to chain)."""
    private_peers, key_path = own_swarm
    nodes = start_nodes("0:3", "3:6", initial_peers=tuple(private_peers), swarm_key=str(key_path))
    cfg = ClientConfig(initial_peers=tuple(private_peers), swarm_key=str(key_path))
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), client_config=cfg)
    torch.manual_seed(1)
    ids = torch.randint(3, 256, (2, 7))
    greedy = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    refused = nodes[1].node.auth.refused
    expected = local_model.generate(ids, **greedy)
    try:
        outs, chained, _ = chained_sessions(model, ids, new=8)  # a new session until one chains fully
    finally:
        model.close()
    assert all(torch.equal(out, expected) for out in outs)
    assert chained[-1] == 8, chained  # every step of a session went node to node, proved
    assert nodes[1].node.auth.refused - refused <= 2  # at most the epoch-learning refusals (client's, node 0's)
