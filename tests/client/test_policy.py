"""The failure policy (client/policy.py) with made-up failures and spans; then against lying real nodes."""
import asyncio
import math

import grpc
import pytest
import torch

from client import ClientConfig
from client.policy import FailurePolicy, PolicyConfig, Verdict
from client.routing import Router
from client.transport import Connections, RemoteCallError, TLSHandshakeError, call_forward, forward_request
from swarm.routing import Hop, NoRouteError
from swarm.spans import NodeState, ServerInfo, Span
from tests.helpers.faults import NaNServicer, RefusingServicer, huge

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
INVALID = grpc.StatusCode.INVALID_ARGUMENT


HOSTS: dict[str, int] = {}


def server(name: str, start: int = 0, end: int = 6) -> ServerInfo:
    """A made-up node on a machine of its own (10.0.0.N)."""
    n = HOSTS.setdefault(name, len(HOSTS) + 1)
    return ServerInfo(name, f"10.0.0.{n}:7000", Span(start, end), NodeState.ONLINE, 100.0, "0.1.0", "float32")


def hop(name: str, start: int = 0, end: int = 6) -> Hop:
    return Hop(server(name, start, end), Span(start, end))


def error(code, name="a") -> RemoteCallError:
    return RemoteCallError(server(name).address, code, "made up")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(max_retries=4, ban_seconds=10.0) -> tuple[FailurePolicy, Clock]:
    clock = Clock()
    return FailurePolicy(PolicyConfig(max_retries, ban_seconds, max_wait=0.0), clock=clock), clock


def test_verdicts():
    p, _ = policy(max_retries=2)
    assert p.verdict(error(UNAVAILABLE), 0, disputed=False) is Verdict.BAN
    assert p.verdict(error(None), 1, disputed=False) is Verdict.BAN  # no answer / a malformed one
    assert p.verdict(error(UNAVAILABLE), 2, disputed=False) is Verdict.RAISE  # attempts used up
    assert p.verdict(error(INVALID), 0, disputed=False) is Verdict.ELSEWHERE  # not believed on one node's word
    assert p.verdict(error(INVALID), 1, disputed=True) is Verdict.RAISE  # a second node agrees: our mistake
    busy = error(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert p.verdict(busy, 1, disputed=True) is Verdict.ELSEWHERE  # busy is no dispute
    assert p.verdict(TLSHandshakeError("127.0.0.1:1", "bad cert"), 5, disputed=False) is Verdict.BAN
    assert policy(max_retries=0)[0].verdict(error(INVALID), 0, disputed=False) is Verdict.RAISE


def test_bans_double_on_repeat_expire_and_are_forgiven():
    p, clock = policy(ban_seconds=10.0)
    for strikes, seconds in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 160)]:
        p.ban(hop("a"), RuntimeError("x"))
        assert p.banned() == {"a"}
        clock.now += seconds - 0.01
        assert p.banned() == {"a"}, strikes
        clock.now += 0.02
        assert p.banned() == frozenset(), strikes
    p.forgive(hop("a"))
    p.ban(hop("a"), RuntimeError("x"))
    clock.now += 10.01
    assert p.banned() == frozenset()  # back to the first ban's length
    p.ban(hop("b"), RuntimeError("x"), forever=True)
    clock.now += 1e9
    assert p.banned() == {"b"}
    p.ban(hop("c"), TLSHandshakeError("127.0.0.1:3", "untrusted"))
    assert p.banned() == {"b", "c"} and "c" in p.untrusted


def test_attempts_raise_ban_or_avoid():
    async def scenario():
        p, _ = policy(max_retries=4, ban_seconds=10.0)
        tries = p.attempts()
        await tries.failed(hop("a"), error(UNAVAILABLE))  # banned, backed off
        assert p.banned() == {"a"} and tries.avoid == frozenset() and tries.number == 1
        await tries.failed(hop("b"), error(grpc.StatusCode.RESOURCE_EXHAUSTED))  # busy: avoided, not banned
        assert p.banned() == {"a"} and tries.avoid == {"b"} and tries.disputed_by == []
        await tries.failed(hop("c"), error(INVALID))  # disputed: asked elsewhere
        assert tries.avoid == {"b", "c"} and len(tries.disputed_by) == 1
        with pytest.raises(RemoteCallError):  # a second node calls it bad too: the caller's mistake
            await tries.failed(hop("d"), error(INVALID))
        assert p.banned() == {"a"}

        for name, code, lied in [("liar", INVALID, True), ("moved", grpc.StatusCode.OUT_OF_RANGE, False)]:
            tries = p.attempts()
            await tries.failed(hop(name), error(code))
            tries.succeeded(hop("honest"))  # the same request went through: the refusal was wrong
            assert name in p.banned() and (p._banned_until[name] == math.inf) == lied

        tries = p.attempts()  # two node ids at one address are one witness
        one_machine = [Hop(ServerInfo(n, "10.0.0.9:7000", Span(0, 6), NodeState.ONLINE, 1.0, "0.1.0", "float32"),
                           Span(0, 6)) for n in ("sybil1", "sybil2", "sybil3")]
        for sybil in one_machine:
            await tries.failed(sybil, RemoteCallError("10.0.0.9:7000", INVALID, "made up"))
        tries.succeeded(hop("honest"))
        assert {"sybil1", "sybil2", "sybil3"} <= p.banned()

    asyncio.run(scenario())


class MadeUpSwarm:
    """What Router reads from the DHT: a fixed list of servers."""

    def __init__(self, servers):
        self.servers = servers

    async def fetch_servers(self, model, num_blocks):
        return list(self.servers)


def test_reroute_raises_the_refusal_when_only_refusing_nodes_remain():
    async def scenario():
        config = ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1",), max_wait=30.0)
        router = Router(MadeUpSwarm([server("a", 0, 3), server("b", 3, 6), server("b2", 3, 6)]), "m", 6, config)
        tries = router.attempts()
        refusal = error(INVALID, "b")
        await tries.failed(hop("b", 3, 6), refusal)
        assert [h.server.node_id for h in await router.reroute(tries, Span(3, 6))] == ["b2"]
        await tries.failed(hop("b2", 3, 6), error(grpc.StatusCode.RESOURCE_EXHAUSTED, "b2"))
        started = asyncio.get_running_loop().time()
        with pytest.raises(RemoteCallError, match="RESOURCE_EXHAUSTED"):  # at once, not after max_wait
            await router.reroute(tries, Span(3, 6))
        assert asyncio.get_running_loop().time() - started < 5
        with pytest.raises(NoRouteError):
            await router.route(Span(0, 6), exclude=frozenset({"a"}), wait=False)

    asyncio.run(scenario())


@pytest.mark.parametrize("liar", [RefusingServicer, NaNServicer], ids=["says-your-fault", "answers-nan"])
def test_a_lying_node_gets_banned_not_the_honest_one(liar, start_nodes, open_client, tiny_path, bootstrap,
                                                      local_model):
    """A node announcing a huge throughput (so routes pick it first, as far as the client's cap on claims
    lets them) that answers every call with INVALID_ARGUMENT, or with NaN: the client routes around it and
    bans it; results equal local."""
    bad = start_nodes("0:3", throughput=1e9, wrap_servicer=liar)[0]
    start_nodes("0:6")
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), ban_seconds=60))
    ids = torch.randint(3, 256, (2, 7))
    liar_id = next(s.node_id for s in model.chain.servers() if s.address == bad.address)
    for _ in range(10):  # a claim is believed only up to twice its peers': the liar is drawn 2 times in 3
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, local_model(ids).logits, atol=1e-4)
        if liar_id in model.chain.router.banned():
            break
    assert liar_id in model.chain.router.banned()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))
    assert all(h.server.address != bad.address for h in model.chain.last_route)


def test_an_oversized_answer_is_refused_unread_and_its_node_banned(start_nodes, open_client, tiny_path, bootstrap,
                                                                   local_model):
    """Issue 21: a node answering with far more bytes than the request can produce (here 48 MiB for a few
    positions) is refused by gRPC from the declared length, before the answer is read or allocated; the node
    is blamed (banned), and batch forward and generation go elsewhere."""
    bad = start_nodes("0:3", throughput=1e9, wrap_servicer=huge(48 << 20), max_message_mb=1024)[0]
    start_nodes("0:3", "3:6")  # every route needs a node for blocks 0:3, where the liar is the fastest

    async def direct():
        connections = Connections(max_message_mb=1024)
        hidden = torch.randn(2, 5, 64)
        try:
            await call_forward(connections, bad.address, forward_request(bad.node.model_key, Span(0, 3), hidden,
                                                                         None, None), hidden, 30.0)
        finally:
            await connections.close()

    with pytest.raises(RemoteCallError) as raised:
        asyncio.run(direct())
    assert raised.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not raised.value.client_fault
    assert "larger than the request can produce" in str(raised.value) and len(str(raised.value)) < 500

    ids = torch.randint(3, 256, (2, 7))
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), ban_seconds=60))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))  # the stream's answer
    liar_id = next(s.node_id for s in model.chain.servers() if s.address == bad.address)
    assert liar_id in model.chain.router.banned()
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), ban_seconds=60))
    with torch.no_grad():
        for _ in range(10):  # batch forward spreads over replicas by throughput: until the liar is drawn
            assert torch.allclose(model(ids).logits, local_model(ids).logits, atol=1e-4)
            if liar_id in model.chain.router.banned():
                break
    assert liar_id in model.chain.router.banned()
