"""Batching across sessions on a real node (node.batching): concurrent clients get the tokens they get
alone while the node's metrics show steps of several sessions computed in one call; a silent session is
waited for once, not at every step, and a session sending garbage or a bad step changes nobody else's."""
import threading

import grpc
import pytest
import torch

from client import ClientConfig
from node.blocks import forward_span, load_span
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize
from swarm.checkpoint import load_config
from swarm.spans import Span
from tests.node.test_metrics import scrape, total, value
from tests.node.test_sessions import Stream

PAD = 0
PROMPTS = ((5,), (11,), (3, 8), (7,))  # per client: its prompts' lengths (the third sends 2, left-padded)
NEW = 10


def prompt(lengths, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 256, (n,), generator=gen)
        mask[row, -n:] = 1
    return ids, mask


def generate_together(models, local_model, count) -> list[int]:
    """Each model generates from its own prompt in its own thread (in an inference session), all started at
    once; each must equal local. Returns each session's chained steps (issue 16: steps pushed node to node)."""
    barrier, results, errors, chained = threading.Barrier(count), {}, [], []
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=None)

    def run(i, model):
        try:
            ids, mask = prompt(PROMPTS[i % len(PROMPTS)], seed=i)
            barrier.wait(timeout=30)
            with model.inference_session(max_length=ids.shape[1] + NEW) as session:
                results[i] = (model.generate(ids, attention_mask=mask, session=session, **kwargs), ids, mask)
                chained.append(session.chain_steps)
        except Exception as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(models[:count])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for out, ids, mask in results.values():
        assert torch.equal(out, local_model.generate(ids, attention_mask=mask, **kwargs))
    return chained


@pytest.fixture
def swarm(start_nodes, open_client, tiny_path, bootstrap, request):
    name = f"batching-{request.node.name[:40]}"  # its own model name: no other test's nodes in view
    (node,) = start_nodes("0:6", metrics_port=0, cache_tokens=4096, model_name=name, decode_batch=16,
                          decode_batch_wait_ms=request.param)
    models = [open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), model_name=name))
              for _ in range(len(PROMPTS))]
    return node, models, name


@pytest.mark.parametrize("swarm", [200.0], indirect=True)
def test_concurrent_sessions_batched_tokens_equal_local(swarm, local_model):
    node, models, _ = swarm
    generate_together(models, local_model, len(models))
    s = scrape(node.node.metrics.server.url)
    together = sum(v for (n, labels), v in s.items()
                   if n == "swarmlm_node_decode_calls_total" and int(dict(labels)["sessions"]) > 1)
    assert together > 0  # steps of several sessions really ran as one call
    assert value(s, "swarmlm_node_decode_batch_events_total", event="fallback") == 0


def test_chained_steps_of_concurrent_sessions_are_batched(start_nodes, open_client, tiny_path, bootstrap,
                                                          local_model):
    """Two nodes: the second receives the sessions' steps pushed by the first (chained steps) and still
    computes steps of several sessions as one call; every client's tokens equal local transformers'."""
    name = "batching-chained"
    first, second = start_nodes("0:3", "3:6", metrics_port=0, cache_tokens=4096, model_name=name,
                                decode_batch=16, decode_batch_wait_ms=50.0)
    models = [open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), model_name=name))
              for _ in range(len(PROMPTS))]
    chained = generate_together(models, local_model, len(models))
    assert sum(chained) >= NEW, chained  # at least a session's worth of steps went node to node
    s = scrape(second.node.metrics.server.url)
    assert total(s, "swarmlm_node_received_bytes_total", rpc="Relay") > 0
    together = sum(v for (n, labels), v in s.items()
                   if n == "swarmlm_node_decode_calls_total" and int(dict(labels)["sessions"]) > 1)
    assert together > 0  # pushed steps of several sessions ran as one call on the second node


@pytest.mark.parametrize("swarm", [500.0], indirect=True)
def test_silent_garbage_and_bad_sessions_change_nobody_else(swarm, local_model, tiny_path):
    node, models, name = swarm
    channel = grpc.insecure_channel(node.address)  # raw streams: the misbehaving sessions are not our client's
    stub = pb_grpc.NodeStub(channel)
    model_key = stub.Info(pb.InfoRequest()).model
    blocks = load_span(tiny_path, load_config(tiny_path), Span(0, 6), torch.float32)
    gen = torch.Generator().manual_seed(7)
    history = torch.randn(1, 5, 64, generator=gen)
    silent = Stream(stub, model_key, batch=1, max_length=32)
    silent.ack()
    silent.step(history[:, :4])
    silent.step(history[:, 4:5])  # a decode step: the node now expects its next one... which does not come
    bad = Stream(stub, model_key, batch=1, max_length=32)
    bad.ack()
    bad.step(history[:, :3])
    garbage = Stream(stub, model_key, batch=1, max_length=64)
    garbage.ack()
    garbage.step(torch.full((1, 3, 64), 1e30))

    def spray():  # decode steps of huge values, decoded beside the clients' steps
        for _ in range(20):
            garbage.step(torch.full((1, 1, 64), -1e30))
        garbage.close()

    sprayer = threading.Thread(target=spray)
    sprayer.start()
    bad.requests.put(pb.InferenceRequest(hidden_states=serialize(torch.zeros(2, 1, 64))))  # a batch the session was not opened with
    with pytest.raises(grpc.RpcError) as err:
        next(bad.responses)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    generate_together(models, local_model, 2)
    sprayer.join(timeout=60)
    s = scrape(node.node.metrics.server.url)
    # the silent session missed one window and was not waited for again (else: one expiry per client step)
    assert value(s, "swarmlm_node_decode_batch_events_total", event="expired") <= 3
    # and its own cache is intact: its next step equals the blocks run locally over its whole history
    last = torch.randn(1, 1, 64, generator=gen)
    out = silent.step(last)
    with torch.no_grad():
        ref = forward_span(blocks, Span(0, 6), torch.cat([history, last], dim=1))[:, -1:]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    silent.close()
    channel.close()
