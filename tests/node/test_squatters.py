"""100 idle sessions squatting a node's cache: the node limits sessions per client (its IP address)
and reclaims idle ones after the step timeout, so an honest client on another address gets a session
within a bounded time. The honest client reaches the node through a TCP relay whose connections leave
from 127.0.0.2, so the node sees a second client host without leaving the loopback interface."""
import asyncio
import contextlib
import socket
import threading
import time

import grpc
import pytest
import torch

from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize
from tests.helpers.launch import wait_for

HIDDEN = 64
CACHE = 100
STEP_TIMEOUT = 1.5
SQUATTERS = 100


class Relay:
    """Forwards TCP connections accepted on 127.0.0.1 to ``target``, dialing out from ``source``."""

    def __init__(self, target: str, source: str = "127.0.0.2"):
        host, port = target.rsplit(":", 1)
        self.target, self.source = (host, int(port)), source
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                inbound, _ = self.listener.accept()
            except OSError:
                return
            outbound = socket.socket()
            outbound.bind((self.source, 0))
            outbound.connect(self.target)
            self.sockets += [inbound, outbound]
            for a, b in ((inbound, outbound), (outbound, inbound)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(1 << 16):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def relay_to():
    relays = []

    def make(target: str) -> Relay:
        relays.append(Relay(target))
        return relays[-1]

    try:
        yield make
    finally:
        for relay in relays:
            relay.close()


def opening(model, max_length):
    return pb.InferenceRequest(open=pb.SessionOptions(model=model, start=0, end=6, batch_size=1, max_length=max_length))


class Refusal:
    """The status a node ended a stream with: ``code()`` and ``details()``, like an RpcError's."""

    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details

    def __repr__(self):
        return f"Refusal({self._code}, {self._details!r})"


async def open_session(stub, model, max_length):
    """(call, None) once the node acknowledged the session, or (call, the status it ended the stream with)."""
    call = stub.Inference()
    try:
        await call.write(opening(model, max_length))
        await call.read()
        return call, None
    except grpc.aio.AioRpcError:
        # a refusal can arrive before our write completes; the write then fails locally (e.g. INTERNAL
        # "Failed execute_batch"), so read the status the node sent, not the local error
        return call, Refusal(await call.code(), await call.details())


async def squat_then_honest(node_address, honest_address, model, squat_length):
    """SQUATTERS idle sessions from 127.0.0.1, then one honest session from 127.0.0.2."""
    async with grpc.aio.insecure_channel(node_address) as attacker, \
            grpc.aio.insecure_channel(honest_address) as honest:
        stub = pb_grpc.NodeStub(attacker)
        squats = await asyncio.gather(*(open_session(stub, model, squat_length) for _ in range(SQUATTERS)))
        free = (await stub.Info(pb.InfoRequest())).cache_tokens_free
        t0 = time.monotonic()
        call, error = await open_session(pb_grpc.NodeStub(honest), model, 30)
        waited = time.monotonic() - t0
        assert error is None, error
        await call.write(pb.InferenceRequest(hidden_states=serialize(torch.randn(1, 3, HIDDEN))))
        answer = await call.read()
        await call.done_writing()
        idle = []  # what the admitted squatters were told when the node reclaimed them
        for squatter, refused in squats:
            if refused is None:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await squatter.read()
                idle.append((await squatter.code(), await squatter.details()))
        return squats, free, waited, answer, idle


@pytest.mark.parametrize("per_client, squat_length", [(8, 12), (SQUATTERS, 1)], ids=["limited", "reclaimed"])
def test_idle_squatters_do_not_lock_out_an_honest_client(start_nodes, relay_to, per_client, squat_length):
    (node,) = start_nodes("0:6", cache_tokens=CACHE, step_timeout=STEP_TIMEOUT, alloc_timeout=STEP_TIMEOUT + 3,
                          max_sessions_per_client=per_client)
    with grpc.insecure_channel(node.address) as channel:
        model = pb_grpc.NodeStub(channel).Info(pb.InfoRequest()).model
    relay = relay_to(node.address)
    squats, free, waited, answer, idle = asyncio.run(
        squat_then_honest(node.address, relay.address, model, squat_length))

    refused = [e for _, e in squats if e is not None]
    admitted = SQUATTERS - len(refused)
    assert admitted == per_client and free == CACHE - admitted * squat_length < 30  # the cache is squatted
    for e in refused:  # the rest were refused at once, with a clear status
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        assert f"client 127.0.0.1 already has {per_client} inference sessions open" in e.details(), e.details()
    # the honest client waited for the idle squatters to be reclaimed (step timeout), no longer
    assert waited < STEP_TIMEOUT + 1.5, waited
    assert list(answer.hidden_states.shape) == [1, 3, HIDDEN] and answer.cache_length == 3
    assert len(idle) == per_client
    # each squatter was either reclaimed for the honest session (its client is over its share of the cache)
    # or closed at the step timeout
    ends = [(grpc.StatusCode.DEADLINE_EXCEEDED, "idle"), (grpc.StatusCode.RESOURCE_EXHAUSTED, "reclaimed")]
    assert all(any(code == c and word in details for c, word in ends) for code, details in idle), idle[:3]
    with grpc.insecure_channel(node.address) as channel:
        assert wait_for(lambda: pb_grpc.NodeStub(channel).Info(pb.InfoRequest()).cache_tokens_free == CACHE, 5)
    assert len(node.node.servicer.clients) == 0  # 127.0.0.1 may open sessions again


def test_a_client_over_its_session_limit_hears_why_at_once(start_nodes):
    """Issue 21: a stream over the per-client limit that sends nothing yet was answered only when the step
    timeout ran out, with DEADLINE_EXCEEDED; it gets RESOURCE_EXHAUSTED naming the limit, without writing."""
    (node,) = start_nodes("0:6", max_sessions_per_client=1, step_timeout=60.0)

    async def scenario():
        async with grpc.aio.insecure_channel(node.address) as channel:
            stub = pb_grpc.NodeStub(channel)
            model = (await stub.Info(pb.InfoRequest())).model
            held = stub.Inference()
            await held.write(opening(model, 8))
            assert (await held.read()).cache_length == 0
            silent = stub.Inference(timeout=20)  # over the limit, and writes nothing
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await silent.read()
            held.cancel()
            return refused.value

    refused = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
    assert "already has 1 inference sessions open" in refused.details()
def test_a_client_holding_the_whole_cache_cannot_keep_another_clients_generate_out(
        start_nodes, relay_to, open_client, tiny_path, local_model, bootstrap):
    """One session of 127.0.0.1 reserves the whole cache and steps now and then. Another client's normal
    generate() (from 127.0.0.2: the node announces a relay's address) used to wait for room and fail with
    RESOURCE_EXHAUSTED. Now the squatter, over its share while another waits, gives its room back; and
    while the other client holds room, the squatter cannot take more than its share again."""
    from client import ClientConfig
    from tests.helpers.network import free_port

    port = free_port()
    relay = relay_to(f"127.0.0.1:{port}")
    (node,) = start_nodes("0:6", port=port, announce_host=relay.address, cache_tokens=CACHE, step_timeout=60,
                          alloc_timeout=5)
    direct = f"127.0.0.1:{port}"

    async def squat_during(generate):
        async with grpc.aio.insecure_channel(direct) as channel:
            stub = pb_grpc.NodeStub(channel)
            squat, error = await open_session(stub, model, CACHE)  # the whole cache
            assert error is None, error
            await squat.write(pb.InferenceRequest(hidden_states=serialize(torch.randn(1, 1, HIDDEN))))
            await squat.read()
            result = await asyncio.get_running_loop().run_in_executor(None, generate)
            with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):  # (ended already)
                await squat.write(pb.InferenceRequest(hidden_states=serialize(torch.randn(1, 1, HIDDEN))))
                await squat.read()
            ended = (await squat.code(), await squat.details())
            return result, ended

    with grpc.insecure_channel(direct) as channel:
        model = pb_grpc.NodeStub(channel).Info(pb.InfoRequest()).model
    client = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), max_wait=10.0))
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    held = {}

    def generate():
        with client.inference_session(max_length=30) as session:
            out = client.generate(ids, session=session, **kwargs)
            held["other"] = node.node.servicer.budget.held("127.0.0.2")
            again = asyncio.run(try_to_take_the_cache())
        return out, again

    async def try_to_take_the_cache():
        async with grpc.aio.insecure_channel(direct) as channel:
            _, error = await open_session(pb_grpc.NodeStub(channel), model, CACHE - 30)
            return error

    (out, again), ended = asyncio.run(squat_during(generate))
    assert torch.equal(out, local_model.generate(ids, **kwargs))
    assert held == {"other": 30}  # the session was the other client's, from the relay
    assert ended[0] == grpc.StatusCode.RESOURCE_EXHAUSTED and "reclaimed" in ended[1], ended
    assert again is not None and again.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "one client may hold 50" in again.details(), again.details()
