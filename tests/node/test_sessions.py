"""Inference sessions on a real node over raw gRPC: admission, waiting, refusal, reclaim."""
import queue
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import pytest
import torch

from node.blocks import forward_span, load_span
from swarm.checkpoint import load_config
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import FLOAT_DTYPES, deserialize, serialize
from tests.helpers.launch import wait_for
from swarm.spans import Span

CAPACITY = 100


class Stream:
    """A raw Inference stream fed from a queue, so a test decides when each message goes."""

    def __init__(self, stub, model, batch, max_length, start=0, end=6):
        self.requests: queue.Queue = queue.Queue()
        self.requests.put(pb.InferenceRequest(open=pb.SessionOptions(
            model=model, start=start, end=end, batch_size=batch, max_length=max_length)))
        self.responses = stub.Inference(iter(self.requests.get, None))

    def ack(self):
        return next(self.responses)

    def step(self, hidden):
        self.requests.put(pb.InferenceRequest(hidden_states=serialize(hidden)))
        response = next(self.responses)
        return deserialize(response.hidden_states, name="out", allowed=FLOAT_DTYPES, max_bytes=1 << 24)

    def close(self):
        self.requests.put(None)


@pytest.fixture
def node(start_nodes):
    (node,) = start_nodes("0:6", cache_tokens=CAPACITY, alloc_timeout=1.0, step_timeout=1.5)
    channel = grpc.insecure_channel(node.address)
    stub = pb_grpc.NodeStub(channel)
    try:
        yield node, stub, stub.Info(pb.InfoRequest()).model
    finally:
        channel.close()


def free(stub):
    return stub.Info(pb.InfoRequest()).cache_tokens_free


def test_admit_refuse_and_return_memory(node):
    _, stub, model = node
    a = Stream(stub, model, batch=2, max_length=40)  # 80 slots
    assert a.ack().cache_length == 0 and free(stub) == CAPACITY - 80
    small = Stream(stub, model, batch=1, max_length=20)  # fits beside a
    small.ack()
    t0 = time.monotonic()
    big = Stream(stub, model, batch=1, max_length=30)  # does not fit: waits the alloc timeout, then refused
    with pytest.raises(grpc.RpcError) as err:
        big.ack()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no room for 30 cache tokens" in err.value.details()
    assert time.monotonic() - t0 >= 0.9
    never = Stream(stub, model, batch=4, max_length=40)
    with pytest.raises(grpc.RpcError, match="can never fit"):
        never.ack()
    for s in (a, small):
        s.close()
    assert wait_for(lambda: free(stub) == CAPACITY, timeout=5)


def test_waiting_session_gets_in_when_another_ends(node):
    _, stub, model = node
    a = Stream(stub, model, batch=1, max_length=90)
    a.ack()
    b = Stream(stub, model, batch=1, max_length=50)
    threading.Timer(0.4, a.close).start()  # frees room while b waits (alloc timeout 1 s)
    assert b.ack().cache_length == 0
    b.close()


def test_concurrent_sessions_compute_correctly(node, tiny_path):
    handle, stub, model = node
    blocks = load_span(tiny_path, load_config(tiny_path), Span(0, 6), torch.float32)
    results, errors = {}, []

    def client(i):
        try:
            torch.manual_seed(i)
            x = torch.randn(1, 6, 64)
            s = Stream(stub, model, batch=1, max_length=20)
            s.ack()
            out = torch.cat([s.step(x[:, :3]), s.step(x[:, 3:5]), s.step(x[:, 5:])], dim=1)
            s.close()
            with torch.no_grad():
                results[i] = (out - forward_span(blocks, Span(0, 6), x)).abs().max().item()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 4 and max(results.values()) < 1e-5
    assert wait_for(lambda: free(stub) == CAPACITY, timeout=5)


def test_step_errors_and_limits(node):
    _, stub, model = node
    s = Stream(stub, model, batch=1, max_length=4)
    s.ack()
    s.step(torch.randn(1, 3, 64))
    with pytest.raises(grpc.RpcError) as err:
        s.step(torch.randn(1, 2, 64))  # 3 + 2 > max_length 4
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE and "max_length 4" in err.value.details()
    bad = Stream(stub, model, batch=2, max_length=4)
    bad.ack()
    with pytest.raises(grpc.RpcError, match="step batch 1 != session batch_size 2"):
        bad.step(torch.randn(1, 1, 64))
    assert wait_for(lambda: free(stub) == CAPACITY, timeout=5)


def test_idle_session_is_reclaimed_after_step_timeout(node):
    _, stub, model = node
    s = Stream(stub, model, batch=1, max_length=50)
    s.ack()
    assert free(stub) == CAPACITY - 50
    with pytest.raises(grpc.RpcError) as err:
        next(s.responses)  # we send nothing more: the node closes the session after 1.5 s
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle" in err.value.details()
    assert free(stub) == CAPACITY


def test_killed_client_session_is_reclaimed(node):
    handle, stub, model = node
    script = textwrap.dedent(f"""
        import grpc, queue, time
        from proto import swarmlm_pb2 as pb, swarmlm_pb2_grpc as pb_grpc
        q = queue.Queue()
        q.put(pb.InferenceRequest(open=pb.SessionOptions(model={model!r}, start=0, end=6, batch_size=1, max_length=60)))
        responses = pb_grpc.NodeStub(grpc.insecure_channel({handle.address!r})).Inference(iter(q.get, None))
        next(responses)
        print("open", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "open"
        assert free(stub) == CAPACITY - 60
        proc.kill()
        assert wait_for(lambda: free(stub) == CAPACITY, timeout=5)
    finally:
        proc.kill()
        proc.wait(10)
