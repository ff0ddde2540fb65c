"""Untrusted-node checks (ClientConfig.verify_fraction) against a deliberately faulty node.

The faulty node is a real in-process node whose servicer is wrapped to perturb its answers
(tests/helpers/faults.py); it announces a high throughput and the clients believe claims
(ClientConfig.believe_claims), so routes for both batch forward and inference go through it.
"""
import copy
from dataclasses import replace

import pytest
import torch
from peft import PrefixTuningConfig

from client import ClientConfig, VerificationError, get_peft_model
from client.verify import independent, relative_difference, result_difference
from hivemind.utils import get_dht_time
from swarm.dht import SwarmDHT
from swarm.records import make_record, servers_key
from swarm.spans import NodeState, ServerInfo, Span
from tests.helpers.dht import store_raw
from tests.client.test_generation import PAD, prompts
from tests.helpers.faults import faulty as lying_node
from tests.peft_reference import greedy_by_forward
from tests.client.test_lora import CONFIG as LORA, batch as lora_batch, local_peft, lora_grads_local, lora_grads_ours
from tests.client.test_prompts_and_classification import local_with_scaled_prompts

ATOL = 1e-4
GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)


def batch():
    """3 left-padded prompts of different lengths."""
    return prompts(seed=5)


def start_faulty(start_nodes, monkeypatch, span: str = "0:3", std: float = 0.1, backward_only: bool = False):
    """A node perturbing its outputs; it announces a high throughput to attract routes."""
    return start_nodes(span, throughput=1e6, wrap_servicer=lying_node(std, backward_only))[0]


def client(open_client, tiny_path, bootstrap, **fields):
    return open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), believe_claims=True,
                                                             **fields))


def run(model, local_model):
    """Forward logits and greedy tokens, remote and local."""
    ids, mask = batch()
    with torch.no_grad():
        logits, ref_logits = model(ids, attention_mask=mask).logits, local_model(ids, attention_mask=mask).logits
    return logits, ref_logits, model.generate(ids, attention_mask=mask, **GREEDY), \
        local_model.generate(ids, attention_mask=mask, **GREEDY)


def test_without_verification_the_faulty_node_corrupts_results(start_nodes, monkeypatch, open_client, tiny_path,
                                                               bootstrap, local_model):
    faulty = start_faulty(start_nodes, monkeypatch)
    start_nodes("0:6", "0:6", throughput=10.0)
    # per-hop steps: the liar perturbs what it answers the client, not what its node would push on a chain
    model = client(open_client, tiny_path, bootstrap, chained_steps=False)
    logits, ref_logits, tokens, ref_tokens = run(model, local_model)
    assert model.chain.last_route[0].server.address == faulty.address
    assert (logits - ref_logits).abs().max() > 1e-2
    assert not torch.equal(tokens, ref_tokens)
    assert model.suspicious_nodes == [] and model.chain.verifier.checks == 0


def test_verification_bans_and_reports_the_faulty_node(start_nodes, monkeypatch, open_client, tiny_path, bootstrap,
                                                       local_model):
    faulty = start_faulty(start_nodes, monkeypatch)
    start_nodes("0:6", "0:6", throughput=10.0)
    ids, mask = batch()

    # batch forward: the faulty hop is re-run on two honest replicas, which agree and outvote it
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.allclose(logits, local_model(ids, attention_mask=mask).logits, atol=ATOL)
    [suspect] = model.suspicious_nodes
    assert (suspect.address, suspect.span.start, suspect.span.end, suspect.banned) == (faulty.address, 0, 3, True)
    assert suspect.difference > 1e-3
    assert faulty.node.dht.node_id in model.chain.router.banned()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert faulty.address not in {hop.server.address for hop in model.chain.last_route}
    assert len(model.suspicious_nodes) == 1  # banned for good: never asked again

    # inference: a fresh client's session goes through the faulty node first and moves off it
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    tokens = model.generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(tokens, local_model.generate(ids, attention_mask=mask, **GREEDY))
    assert [(s.address, s.banned) for s in model.suspicious_nodes] == [(faulty.address, True)]
    assert model.chain.verifier.checks > GREEDY["max_new_tokens"]  # every step of every hop was checked


def test_two_disagreeing_nodes_and_no_third_refuse_the_result(start_nodes, monkeypatch, open_client, tiny_path,
                                                              bootstrap):
    faulty = start_faulty(start_nodes, monkeypatch)
    honest = start_nodes("0:6", throughput=10.0)[0]
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    ids, mask = batch()
    with pytest.raises(VerificationError) as raised, torch.no_grad():
        model(ids, attention_mask=mask)
    assert set(raised.value.addresses) == {faulty.address, honest.address}
    assert {(s.address, s.banned) for s in model.suspicious_nodes} == {(faulty.address, False), (honest.address, False)}
    assert not model.chain.router.banned()  # who is wrong is unknown: nobody is banned
    with pytest.raises(VerificationError):
        model.generate(ids, attention_mask=mask, **GREEDY)


def test_no_false_positives_among_honest_replicas(start_nodes, open_client, tiny_path, bootstrap, local_model):
    start_nodes("0:6", "0:6", "0:3")
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    logits, ref_logits, tokens, ref_tokens = run(model, local_model)
    assert torch.allclose(logits, ref_logits, atol=ATOL)
    assert torch.equal(tokens, ref_tokens)
    assert model.suspicious_nodes == [] and not model.chain.router.banned()
    assert model.chain.verifier.checks > GREEDY["max_new_tokens"]

    # training: Backward results (input, LoRA and prefix gradients) compared between honest nodes, one of
    # which may use its kept activations while the other recomputes
    checks = model.chain.verifier.checks
    ours, got, expected = lora_step(model, tiny_path)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    prefix = get_peft_model(client(open_client, tiny_path, bootstrap, verify_fraction=1.0),
                            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    ids, mask, labels = lora_batch()
    prefix(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in prefix.parameters() if p.requires_grad)
    for m in (model, prefix.base_model):
        assert m.suspicious_nodes == [] and not m.chain.router.banned()
    assert model.chain.verifier.checks >= checks + 2 and prefix.base_model.chain.verifier.checks >= 2


def test_bfloat16_and_float32_replicas_agree_within_the_default_tolerance(start_nodes, open_client, tiny_path,
                                                                          bootstrap, local_model):
    start_nodes("0:6")
    start_nodes("0:6", dtype="bfloat16")
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    run(model, local_model)
    assert model.suspicious_nodes == [] and model.chain.verifier.checks > 0


def test_relative_difference_and_settings(monkeypatch):
    a = torch.ones(2, 3, 4)
    b = a.clone()
    b[0, 0] += 1.0  # a padding position
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert relative_difference(a, b, mask) == 0.0 and relative_difference(a, b) == pytest.approx(0.5)
    b[1, 2, 0] = float("nan")
    assert relative_difference(a, b, mask) == float("inf")
    grads = (a, {(0, "q"): (a[0], a[1])}, None)
    assert result_difference(grads, (a, {(0, "q"): (a[0], a[1])}, None)) == 0.0
    assert result_difference(grads, (a, {(0, "q"): (a[0], 2 * a[1])}, None)) == pytest.approx(0.5)
    assert result_difference(grads, (a, {(1, "q"): (a[0], a[1])}, None)) == float("inf")  # other modules
    assert result_difference(grads, (a, {(0, "q"): (a[0], a[1])}, a)) == float("inf")  # a prefix gradient more
    assert result_difference((a, {}, a), (a, {}, 3 * a)) == pytest.approx(2 / 3)
    for bad in (dict(verify_fraction=1.5), dict(verify_fraction=-0.1), dict(verify_tolerance=-1.0)):
        with pytest.raises(ValueError):
            ClientConfig(initial_peers=("/ip4/127.0.0.1/tcp/1",), **bad)


def test_checks_of_prefix_tuning_steps_carry_the_prefix(start_nodes, monkeypatch, open_client, tiny_path, bootstrap):
    """A checked inference step is re-run as a stateless Forward that must carry the session's prefix-tuning
    keys/values: then the honest replicas outvote only the faulty node, and generation with the adapter
    equals the local PEFT model's greedy continuation (without the prefix the check would trust wrong outputs)."""
    faulty = start_faulty(start_nodes, monkeypatch)
    start_nodes("0:6", "0:6", throughput=10.0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ours = get_peft_model(client(open_client, tiny_path, bootstrap, verify_fraction=1.0), copy.deepcopy(config))
    local = local_with_scaled_prompts(ours, tiny_path, config, scale=8.0)
    ids, mask = batch()
    ref = greedy_by_forward(local.eval(), ids, mask, GREEDY["max_new_tokens"], position_offset=0)
    with torch.no_grad():
        assert not torch.equal(ref, local.get_base_model().generate(input_ids=ids, attention_mask=mask, **GREEDY))
    assert torch.equal(ours.eval().generate(ids, attention_mask=mask, **GREEDY), ref)
    assert [(s.address, s.banned) for s in ours.base_model.suspicious_nodes] == [(faulty.address, True)]


def lora_step(model, tiny_path):
    """One LoRA training step through ``model`` and through local PEFT with the same adapter weights:
    (peft model, our gradients, local gradients) of every LoRA weight."""
    ours = get_peft_model(model, copy.deepcopy(LORA))
    with torch.no_grad():
        for b in ours.adapter.lora_B:  # PEFT starts B at zero; make every gradient nonzero
            b.normal_(0, 0.1)
    local = local_peft(tiny_path, ours)
    ids, mask, labels = lora_batch()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    local(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    return ours, lora_grads_ours(ours), lora_grads_local(local)


def test_backward_checks_outvote_a_node_that_lies_only_in_its_gradients(start_nodes, monkeypatch, open_client,
                                                                         tiny_path, bootstrap):
    """A node whose Forward outputs are right but whose Backward results are not passes every forward check;
    only re-running Backward elsewhere catches it (and a wrong gradient would otherwise train the adapter)."""
    faulty = start_faulty(start_nodes, monkeypatch, backward_only=True)
    start_nodes("0:6", "0:6", throughput=10.0)

    ours, got, expected = lora_step(client(open_client, tiny_path, bootstrap, verify_fraction=0.0), tiny_path)
    assert ours.base_model.chain.last_route[0].server.address == faulty.address
    assert max((got[n] - expected[n]).abs().max() for n in expected) > 1e-3  # unchecked: wrong gradients

    ours, got, expected = lora_step(client(open_client, tiny_path, bootstrap, verify_fraction=1.0), tiny_path)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert ours.base_model.chain.last_route[0].server.address == faulty.address  # its forward passed the check
    [suspect] = ours.base_model.suspicious_nodes  # honest replicas agreed with each other: no false positive
    assert (suspect.address, suspect.span.start, suspect.span.end, suspect.banned) == (faulty.address, 0, 3, True)
    assert faulty.node.dht.node_id in ours.base_model.chain.router.banned()


@pytest.fixture
def sybil_ids(dht_loop, bootstrap):
    """``sybil_ids(liar, n)``: a second DHT peer of the liar announces ``n`` more node ids (signed by its own
    key) pointing at the liar's address, as one attacker can; the records stay fresh during the test."""
    peers = []

    def announce(liar, n: int) -> list[str]:
        dht = dht_loop.run(SwarmDHT.create(initial_peers=bootstrap))
        peers.append(dht)
        info = liar.node._announcer.info
        ids = [dht.owned(f"sybil-{i}") for i in range(n)]
        for node_id in ids:
            record = make_record(replace(info, node_id=node_id, state=NodeState.ONLINE))
            assert dht_loop.run(store_raw(dht, servers_key(liar.node.model_key), record, get_dht_time() + 120,
                                          subkey=node_id))
        return ids

    try:
        yield announce
    finally:
        for dht in peers:
            dht_loop.run(dht.shutdown())


def test_a_liar_with_three_ids_at_one_address_outvotes_nobody(start_nodes, monkeypatch, open_client, tiny_path,
                                                              bootstrap, local_model, sybil_ids):
    """Issue 21: one attacker announcing three node ids at one address once outvoted honest nodes, which were
    banned for good, and the text differed from local. Witnesses are counted by endpoint and owner key."""
    liar = start_nodes("0:3", throughput=1e6, wrap_servicer=lying_node(0.1, consistent=True))[0]
    liar_ids = {liar.node.dht.node_id, *sybil_ids(liar, 2)}
    honest = start_nodes("0:6", throughput=10.0)[0]
    ids, mask = batch()

    # one honest replica: the liar (one witness) and the honest node disagree; nobody is banned
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    for _ in range(3):  # the route starts at the liar or at the honest node: either way no ban
        with pytest.raises(VerificationError), torch.no_grad():
            model(ids, attention_mask=mask)
    assert honest.node.dht.node_id not in model.chain.router.banned()
    assert not model.chain.router.banned()

    # two honest replicas: they outvote the liar; only liar ids are ever banned and the text equals local
    second = start_nodes("0:6", throughput=10.0)[0]
    model = client(open_client, tiny_path, bootstrap, verify_fraction=1.0)
    tokens = model.generate(ids, attention_mask=mask, **GREEDY)
    assert torch.equal(tokens, local_model.generate(ids, attention_mask=mask, **GREEDY))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.allclose(logits, local_model(ids, attention_mask=mask).logits, atol=ATOL)
    assert model.chain.router.banned() and model.chain.router.banned() <= liar_ids
    assert {s.address for s in model.suspicious_nodes if s.banned} == {liar.address}
    assert {honest.node.dht.node_id, second.node.dht.node_id}.isdisjoint(model.chain.router.banned())


def test_witnesses_are_endpoints_and_owner_keys():
    def server(address, node_id):
        return ServerInfo(node_id, address, Span(0, 3), NodeState.ONLINE, 1.0, "v", "float32")

    a = server("203.0.113.5:31330", "peerA[owner:KEY-A]")
    assert not independent(a, server("203.0.113.5:31331", "peerB[owner:KEY-B]"))  # one public host, two ports
    assert not independent(a, server("198.51.100.7:31330", "peerC[owner:KEY-A]"))  # one key, two hosts
    assert independent(a, server("198.51.100.7:31330", "peerC[owner:KEY-C]"))
    assert independent(server("127.0.0.1:5000", "p[owner:K1]"), server("127.0.0.1:5001", "q[owner:K2]"))  # loopback
    assert not independent(server("127.0.0.1:5000", "p[owner:K1]"), server("127.0.0.1:5000", "q[owner:K2]"))
