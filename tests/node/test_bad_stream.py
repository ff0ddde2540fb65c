"""Hostile Inference streams and oversized messages against a real node: each gets an error status
with a message, the session's cache (and its client's session count) is freed, and the node keeps
serving (a good session works afterwards)."""
import asyncio
import itertools
import queue
import time

import grpc
import pytest
import torch

from client.transport import Connections, RemoteCallError, call_forward, forward_request
from node.requests import DRAFT_FACTOR
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import quantize_blockwise, serialize
from tests.helpers.launch import wait_for
from swarm.spans import Span

HIDDEN = 64
CACHE = 200
STEP_TIMEOUT = 1.5
OK, BAD, BIG, RANGE = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.OUT_OF_RANGE)


@pytest.fixture
def node(start_nodes):
    (node,) = start_nodes("1:4", max_batch_tokens=64, cache_tokens=CACHE, alloc_timeout=0.5,
                          step_timeout=STEP_TIMEOUT, max_message_mb=1)
    channel = grpc.insecure_channel(node.address)
    stub = pb_grpc.NodeStub(channel)
    try:
        yield node, stub, stub.Info(pb.InfoRequest()).model
    finally:
        channel.close()


def raw(dtype, shape, nbytes):
    return pb.Tensor(dtype=dtype, shape=shape, data=b"\0" * nbytes)


def opening(model, batch=2, max_length=8, **fields):
    return message(open=pb.SessionOptions(model=model, start=1, end=3, batch_size=batch, max_length=max_length),
                   **fields)


def message(**fields) -> pb.InferenceRequest:
    req = pb.InferenceRequest()
    for name, value in fields.items():
        if isinstance(value, int):
            setattr(req, name, value)
        else:
            getattr(req, name).CopyFrom(value)
    return req


def step(batch=2, new=1, **fields):
    return message(**{"hidden_states": serialize(torch.randn(batch, new, HIDDEN)), **fields})


class Stream:
    """A raw Inference stream fed from a queue, so the test decides when each message goes."""

    def __init__(self, stub, first=None):
        self.requests: queue.Queue = queue.Queue()
        if first is not None:
            self.requests.put(first)
        self.responses = stub.Inference(iter(self.requests.get, None), timeout=30)

    def send(self, request) -> pb.InferenceResponse:
        self.requests.put(request)
        return next(self.responses)

    def close(self):
        self.requests.put(None)


def assert_freed_and_serving(handle, stub, model):
    """Nothing of the failed stream is left, and a good session still works."""
    assert wait_for(lambda: stub.Info(pb.InfoRequest()).cache_tokens_free == CACHE, timeout=5)
    assert wait_for(lambda: len(handle.node.servicer.clients) == 0, timeout=5)
    good = Stream(stub, opening(model))
    assert next(good.responses).cache_length == 0
    out = good.send(step(new=3))
    assert list(out.hidden_states.shape) == [2, 3, HIDDEN] and out.cache_length == 3
    good.close()
    assert wait_for(lambda: stub.Info(pb.InfoRequest()).cache_tokens_free == CACHE, timeout=5)


STEP_CASES = [  # sent after the open acknowledgement and one good step
    ("1GiB-shape", message(hidden_states=raw("float32", [2, 1 << 21, HIDDEN], 0)), BIG, "over this node's limit"),
    ("bytes-vs-shape", message(hidden_states=raw("float32", [2, 1, HIDDEN], 17)), BAD, "needs 512 bytes, got 17"),
    ("unknown-dtype", message(hidden_states=raw("float128", [2, 1, HIDDEN], 2 * HIDDEN * 16)), BAD,
     "unknown dtype 'float128'"),
    ("nan", message(hidden_states=serialize(torch.full((2, 1, HIDDEN), float("nan")))), BAD, "NaN or infinity"),
    ("inf", message(hidden_states=serialize(torch.full((2, 1, HIDDEN), float("-inf")))), BAD, "NaN or infinity"),
    ("negative-position", step(position_ids=serialize(torch.tensor([[-1]]))), BAD, "position_ids must be in"),
    ("huge-position", step(position_ids=serialize(torch.tensor([[1 << 40]]))), BAD, "position_ids must be in"),
    ("batch-mismatch", step(batch=32), BAD, "step batch 32 != session batch_size 2"),
    ("huge-batch", message(hidden_states=raw("float32", [1 << 40, 1, HIDDEN], 0)), BIG, "over this node's limit"),
    ("bad-mask", step(attention_mask=serialize(torch.full((2, 1), 7))), BAD, "0 or 1"),
    ("empty-message", message(), BAD, "expected [batch, seq, hidden]"),
    ("second-open", opening("any"), BAD, "already open"),
    ("past-max-length", step(new=6), RANGE, "1 + 6 positions exceed the session's max_length 4"),
    ("reorder-row-out-of-range", pb.InferenceRequest(hidden_states=serialize(torch.randn(2, 1, HIDDEN)),
                                                     reorder=[0, 2]), BAD, "reorder needs 2 row numbers below 2"),
    ("drop-more-than-held", pb.InferenceRequest(hidden_states=serialize(torch.randn(2, 1, HIDDEN)), drop=2), BAD,
     "cannot drop 2 positions: the session holds 1"),
    ("reorder-too-short", pb.InferenceRequest(hidden_states=serialize(torch.randn(2, 1, HIDDEN)), reorder=[1]),
     BAD, "got 1 entries"),
    ("8-bit-step", message(hidden_states=quantize_blockwise(torch.randn(2, 1, HIDDEN))), BAD,
     "encoding 'blockwise8' is not accepted here"),  # 8-bit is for training traffic, never a session's cache
]


@pytest.mark.parametrize("request_, code, text", [c[1:] for c in STEP_CASES], ids=[c[0] for c in STEP_CASES])
def test_bad_step_ends_the_session_and_frees_its_cache(node, request_, code, text):
    handle, stub, model = node
    stream = Stream(stub, opening(model, max_length=4))
    assert next(stream.responses).cache_length == 0
    assert stream.send(step()).cache_length == 1
    assert stub.Info(pb.InfoRequest()).cache_tokens_free == CACHE - 2 * 4
    with pytest.raises(grpc.RpcError) as err:
        stream.send(request_)
    assert err.value.code() == code and text in err.value.details(), err.value.details()
    assert_freed_and_serving(handle, stub, model)


def open_cases(model):
    return [  # the first message of a stream
        (step(), BAD, "the first inference message must carry `open`"),
        (opening(model, batch=(1 << 32) - 1), BIG, "batch_size 4294967295 is over this node's limit of 64"),
        (opening(model, batch=65, max_length=1), BIG, "batch_size 65 is over"),
        (opening(model, max_length=10 ** 9), RANGE, "max_length 1000000000 is over this node's limit"),
        (opening(model, batch=4, max_length=60), BIG, "can never fit"),
        (opening(model, hidden_states=raw("float32", [2, 1 << 21, HIDDEN], 0)), BIG, "over this node's limit"),
        (opening(model, hidden_states=serialize(torch.full((2, 1, HIDDEN), float("nan")))), BAD, "NaN"),
        (opening("someone/else"), grpc.StatusCode.NOT_FOUND, "serves model"),
        (prefixed(model, torch.zeros(2, 2, 2, 3, 2, 16)), BAD, "prefix shape [2, 2, 2, 3, 2, 16] does not fit"),
        (prefixed(model, torch.full((2, 2, 2, 2, 2, 16), float("inf"))), BAD, "prefix contains NaN or infinity"),
        (prefixed(model, torch.zeros(2, 2, 2, 2, 8, 16)), BAD, "leaves no room in max_length 8"),
    ]


def prefixed(model, prefix, max_length=8):
    """An opening whose prefix-tuning keys/values (blocks 1:3, batch 2, 2 kv heads of 16) start the cache."""
    first = opening(model, max_length=max_length)
    first.open.prefix.CopyFrom(serialize(prefix))
    return first


def test_bad_open_gets_a_clear_status(node):
    handle, stub, model = node
    for first, code, text in open_cases(model):
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Inference(iter([first]), timeout=30))
        assert err.value.code() == code and text in err.value.details(), (text, err.value.details())
    assert_freed_and_serving(handle, stub, model)


def test_stream_that_never_opens_is_closed(node):
    handle, stub, model = node
    t0 = time.monotonic()
    silent = Stream(stub)  # connected, never sends a message
    assert wait_for(lambda: len(handle.node.servicer.clients) == 1, timeout=5)  # it counts for its client
    with pytest.raises(grpc.RpcError) as err:
        next(silent.responses)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.value.details()
    assert STEP_TIMEOUT - 0.1 <= time.monotonic() - t0 < STEP_TIMEOUT + 3
    assert_freed_and_serving(handle, stub, model)


def test_endless_stream_stops_at_max_length(node):
    """A client that sends one-position steps forever gets max_length answers, then OUT_OF_RANGE."""
    handle, stub, model = node
    pulled = itertools.count()

    def forever():
        yield opening(model, max_length=8)
        while True:
            next(pulled)
            yield step()

    responses = stub.Inference(forever(), timeout=30)
    answers = []
    with pytest.raises(grpc.RpcError) as err:
        for response in responses:
            answers.append(response.cache_length)
    assert answers == list(range(9))  # the open acknowledgement, then 1..8
    assert err.value.code() == RANGE and "exceed the session's max_length 8" in err.value.details()
    sent = next(pulled)  # what gRPC buffered ahead (flow control window), then the call is over:
    time.sleep(0.5)
    assert sent < 2000 and next(pulled) == sent + 1  # nothing more is read from the endless client
    assert_freed_and_serving(handle, stub, model)


def test_endless_stream_of_dropped_drafts_stops(node):
    """Dropping positions frees room in the cache, but a session's total computation stays bounded."""
    handle, stub, model = node
    stream = Stream(stub, opening(model, max_length=4))
    assert next(stream.responses).cache_length == 0
    assert stream.send(step(new=3)).cache_length == 3
    for _ in range(DRAFT_FACTOR * 4 - 3):  # drop one position, compute one: forever, if nothing stopped it
        assert stream.send(step(drop=1)).cache_length == 3
    with pytest.raises(grpc.RpcError) as err:
        stream.send(step(drop=1))
    assert err.value.code() == RANGE and f"exceed {DRAFT_FACTOR} x its max_length 4" in err.value.details()
    assert_freed_and_serving(handle, stub, model)


def test_oversized_stream_messages_are_refused(node):
    handle, stub, model = node
    huge = message(hidden_states=raw("float32", [2, 1, HIDDEN], 2 << 20))  # 2 MiB, over max_message_mb=1
    with pytest.raises(grpc.RpcError) as err:  # a huge first message
        list(stub.Inference(iter([huge]), timeout=30))
    assert err.value.code() == BIG and "larger than max" in err.value.details(), err.value.details()
    stream = Stream(stub, opening(model))  # a huge message in the middle of an open session
    next(stream.responses)
    with pytest.raises(grpc.RpcError) as err:
        stream.send(huge)
    assert err.value.code() == BIG and f"vs. {1 << 20}" in err.value.details(), err.value.details()
    assert_freed_and_serving(handle, stub, model)


def test_message_size_limit_is_configured_and_clear_on_the_client(node):
    handle, stub, model = node
    big = pb.ForwardRequest(model=model, start=1, end=2, hidden_states=raw("float32", [1, 1, HIDDEN], 2 << 20))
    with pytest.raises(grpc.RpcError) as err:  # node side: --max-message-mb 1
        stub.Forward(big, timeout=30)
    assert err.value.code() == BIG and f"vs. {1 << 20}" in err.value.details(), err.value.details()

    async def call(connections, hidden):
        try:
            return await call_forward(connections, handle.address, forward_request(model, Span(1, 2), hidden, None,
                                                                                  None), hidden, 30)
        finally:
            await connections.close()

    hidden = torch.randn(1, 5000, HIDDEN)  # 1.2 MiB: over the client's own limit of 1 MiB
    with pytest.raises(RemoteCallError) as err:
        asyncio.run(call(Connections(max_message_mb=1), hidden))
    assert err.value.code == BIG and "ClientConfig.max_message_mb" in str(err.value) and err.value.client_fault
    # the client's default limit lets it through, and the node refuses it with the same clear hint
    with pytest.raises(RemoteCallError) as err:
        asyncio.run(call(Connections(max_message_mb=8), hidden))
    assert err.value.code == BIG and "node serve --max-message-mb" in str(err.value), str(err.value)
    # an answer over the client's receive limit is the node's doing: not a client fault, so it is routed around
    oversized_answer = RemoteCallError("x", BIG, "Stream removed (CLIENT: Received message larger than max (5 vs. 4))")
    assert not oversized_answer.client_fault
    out, _ = asyncio.run(call(Connections(max_message_mb=1), torch.randn(1, 4, HIDDEN)))
    assert list(out.shape) == [1, 4, HIDDEN]
