"""Prometheus metrics of real nodes and a real client: known traffic goes through the swarm, the
endpoints are scraped over HTTP and parsed with prometheus_client's own text parser, and the counters
equal what was sent."""
from __future__ import annotations

import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from client import ClientConfig
from tests.helpers.launch import wait_for

BATCH, SEQ, NEW = 2, 5, 4  # the traffic: a batch of 2 prompts of 5 tokens; generate() adds 4 tokens
HIDDEN = 64  # the tiny checkpoint's hidden size (tests/conftest.py)


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, its labels) -> value, as Prometheus would read the endpoint."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples, name: str, **labels) -> float:
    """Sum over every sample of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def run_traffic(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (BATCH, SEQ))
    with torch.no_grad():
        model(ids)
    model(ids).logits.sum().backward()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                       pad_token_id=0, eos_token_id=None)


def test_node_counters_equal_the_traffic_sent(start_nodes, open_client, tiny_path, bootstrap):
    # a model name of its own: no other test's nodes (or their lingering records, which the client would probe
    # and ban) in view, so every count is this test's
    nodes = start_nodes("0:3", "3:6", metrics_port=0, cache_tokens=4096, model_name="metrics-traffic")
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), metrics_port=0,
                                                              model_name="metrics-traffic"))
    run_traffic(model)
    urls = [n.node.metrics.server.url for n in nodes]
    tokens = BATCH * SEQ
    # a stream's count lands when the node's handler finishes, just after the client closed the session
    assert wait_for(lambda: all(total(scrape(u), "swarmlm_node_requests_total", rpc="Inference") == 1 for u in urls), 10)
    received = sent = 0.0
    for url in urls:
        s = scrape(url)
        assert value(s, "swarmlm_node_requests_total", rpc="Forward", code="OK") == 2  # no-grad + for-backward
        assert value(s, "swarmlm_node_requests_total", rpc="Backward", code="OK") == 1
        # the client closes its session by cancelling the stream: the handler ends it (OK) or gRPC notes the cancel
        assert sum(value(s, "swarmlm_node_requests_total", rpc="Inference", code=c) for c in ("OK", "CANCELLED")) == 1
        assert value(s, "swarmlm_node_request_seconds_count", rpc="Forward") == 2
        # every Inference message answered: the open, the prompt, NEW - 1 decode steps
        assert value(s, "swarmlm_node_request_seconds_count", rpc="Inference") == 1 + NEW
        assert value(s, "swarmlm_node_tokens_total", kind="forward") == 2 * tokens
        assert value(s, "swarmlm_node_tokens_total", kind="backward") == tokens
        assert value(s, "swarmlm_node_tokens_total", kind="prefill") == tokens  # the prompt, one step
        assert value(s, "swarmlm_node_tokens_total", kind="decode") == BATCH * (NEW - 1)  # the last token is not fed back
        assert value(s, "swarmlm_node_activation_cache_total", result="hit") == 1  # the backward found its forward
        assert value(s, "swarmlm_node_activation_cache_total", result="miss") == 0
        assert value(s, "swarmlm_node_sessions_open") == 0
        assert value(s, "swarmlm_node_cache_tokens_used") == 0
        assert value(s, "swarmlm_node_cache_tokens_total") == 4096
        assert value(s, "swarmlm_node_online") == 1
        assert value(s, "process_resident_memory_bytes") > 0
        # a Forward carries at least its float32 hidden states each way
        assert value(s, "swarmlm_node_received_bytes_total", rpc="Forward") >= 2 * tokens * HIDDEN * 4
        assert value(s, "swarmlm_node_sent_bytes_total", rpc="Forward") >= 2 * tokens * HIDDEN * 4
        assert value(s, "swarmlm_node_received_bytes_total", rpc="Inference") > 0
        received += sum(value(s, "swarmlm_node_received_bytes_total", rpc=r) for r in ("Forward", "Backward", "Inference"))
        sent += sum(value(s, "swarmlm_node_sent_bytes_total", rpc=r) for r in ("Forward", "Backward", "Inference"))
    # the nodes' wire bytes (unary calls and session streams) are exactly the serialized messages the client counted
    assert received == model.chain.connections.bytes_sent
    assert sent == model.chain.connections.bytes_received

    c = scrape(model.chain.router.metrics.server.url)
    assert value(c, "swarmlm_client_hops_total", kind="forward") == 2 * len(nodes)
    assert value(c, "swarmlm_client_hops_total", kind="backward") == len(nodes)
    assert value(c, "swarmlm_client_hops_total", kind="inference") == NEW * len(nodes)
    for node in nodes:
        assert value(c, "swarmlm_client_round_trip_seconds_count", node=node.address) == 3 + NEW
    assert total(c, "swarmlm_client_retries_total") == total(c, "swarmlm_client_bans_total") == 0


def test_client_counts_a_failover(start_nodes, open_client, tiny_path, bootstrap):
    """A node stopped mid-session: one retry, one ban, one failover, the history's positions replayed."""
    nodes = start_nodes("0:6", "0:6", model_name="metrics-failover")  # (a key of its own, as above)
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), metrics_port=0,
                                                              model_name="metrics-failover"))
    torch.manual_seed(4)
    past, new = torch.randint(3, 256, (3, 6)), torch.randint(3, 256, (3, 1))
    with torch.no_grad(), model.inference_session(max_length=16) as sess:
        sess.step(model.model.embed_tokens(past))
        serving = sess._streams[0].hop.server.address
        next(n for n in nodes if n.address == serving).stop(grace=0)
        sess.step(model.model.embed_tokens(new))
    c = scrape(model.chain.router.metrics.server.url)
    assert value(c, "swarmlm_client_retries_total", verdict="ban") == 1
    assert value(c, "swarmlm_client_bans_total", forever="false") == 1
    assert value(c, "swarmlm_client_failovers_total") == 1
    assert value(c, "swarmlm_client_replay_positions_total") == 6
    assert value(c, "swarmlm_client_hops_total", kind="inference") == 3  # first step, replay, second step
    assert value(c, "swarmlm_client_round_trip_seconds_count", node=serving) == 1


def test_metrics_off_by_default(start_nodes):
    node, = start_nodes("0:6")
    assert node.node.metrics is None


def test_refusals_are_counted_by_status_and_reason(start_nodes):
    """A bad call counts under the status the node answered; a session over the client's limit under
    its reason; raw gRPC, as any client would send them."""
    import grpc

    from proto import swarmlm_pb2 as pb
    from proto import swarmlm_pb2_grpc as pb_grpc

    node, = start_nodes("0:6", metrics_port=0, max_sessions_per_client=1)
    with grpc.insecure_channel(node.address) as channel:
        stub = pb_grpc.NodeStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Forward(pb.ForwardRequest(model="no-such-model"), timeout=10)
        opening = pb.InferenceRequest(open=pb.SessionOptions(model=node.node.model_key, start=0, end=6,
                                                             batch_size=1, max_length=8))
        held = stub.Inference(_hold(opening), timeout=30)
        assert next(held).cache_length == 0  # the session is open and counted
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Inference(iter([opening]), timeout=30))
        held.cancel()
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    url = node.node.metrics.server.url
    assert wait_for(lambda: total(scrape(url), "swarmlm_node_requests_total", rpc="Inference") == 2, 10)
    s = scrape(url)
    assert value(s, "swarmlm_node_requests_total", rpc="Forward", code=bad.value.code().name) == 1
    assert value(s, "swarmlm_node_requests_total", rpc="Inference", code="RESOURCE_EXHAUSTED") == 1
    # the held session ends when the client cancels it (counted OK or CANCELLED, as in the test above)
    assert sum(value(s, "swarmlm_node_requests_total", rpc="Inference", code=c) for c in ("OK", "CANCELLED")) == 1
    assert value(s, "swarmlm_node_sessions_refused_total", reason="client_limit") == 1
    assert value(s, "swarmlm_node_sessions_open") == 0


def _hold(first):
    """A request stream that sends ``first`` and then stays open until the call is cancelled."""
    import threading

    yield first
    threading.Event().wait(30)


def test_calls_the_swarm_key_check_refuses_are_counted(start_nodes, key_path, private_peers):
    """The metrics interceptor runs before the swarm key check: a call without a proof counts as
    UNAUTHENTICATED, with the bytes it sent."""
    import grpc

    from proto import swarmlm_pb2 as pb
    from proto import swarmlm_pb2_grpc as pb_grpc

    node, = start_nodes("0:6", metrics_port=0, swarm_key=str(key_path), initial_peers=tuple(private_peers))
    request = pb.ForwardRequest(model=node.node.model_key, start=0, end=6)
    with grpc.insecure_channel(node.address) as channel, pytest.raises(grpc.RpcError) as refused:
        pb_grpc.NodeStub(channel).Forward(request, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

    def counted() -> float:
        return value(scrape(node.node.metrics.server.url), "swarmlm_node_requests_total", rpc="Forward",
                     code="UNAUTHENTICATED")

    wait_for(counted, timeout=5, interval=0.05)  # counted as the handler returns: the status may reach us first
    assert counted() == 1
    s = scrape(node.node.metrics.server.url)
    assert value(s, "swarmlm_node_received_bytes_total", rpc="Forward") == request.ByteSize()
