"""Pipelined training (issue 16, ClientConfig.micro_batches): a batch's rows go through the hops as
concurrent micro-batches; gradients (LoRA weights, prefix, inputs) equal the unsplit step's and local
PEFT's, over nodes behind emulated broadband links; a node lost between steps is routed around."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig

from client import ClientConfig, get_peft_model
from client.pipeline import row_slices
from tests.client.test_lora import CONFIG, local_peft, lora_grads_local, lora_grads_ours
from tests.conftest import FIXED_THREADS
from tests.helpers.link import PROFILES
from tests.helpers.linked import client_per_key, linked_nodes

MODEL_NAME = "tiny-pipeline"  # records of our own: other tests' nodes never mix in


@pytest.fixture(scope="module")
def linked_swarm(tiny_path, bootstrap):
    """Two nodes (blocks 0:3 and 3:6), each behind a relay emulating broadband, announcing the relay."""
    with linked_nodes(tiny_path, bootstrap, PROFILES["broadband"], MODEL_NAME, **FIXED_THREADS) as (nodes, relays):
        yield nodes


@pytest.fixture(scope="module")
def clients(linked_swarm, tiny_path, bootstrap):
    """``clients(micro_batches, use)``: a client of its own per ``use`` (an adapter attached to one stays there)."""
    with client_per_key(tiny_path, bootstrap, MODEL_NAME) as get:
        yield lambda micro_batches, use: get((micro_batches, use), micro_batches=micro_batches)


def batch():
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (5, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[3, :2] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def lora_model(base, weights_from=None):
    ours = get_peft_model(base, copy.deepcopy(CONFIG))
    with torch.no_grad():
        if weights_from is None:
            for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
                b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        else:
            for mine, theirs in zip(ours.adapter.parameters(), weights_from.adapter.parameters()):
                mine.copy_(theirs)
    return ours


def test_row_slices():
    assert row_slices(5, 3) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert row_slices(2, 4) == [slice(0, 1), slice(1, 2)]
    assert row_slices(7, 1) == [slice(0, 7)]


def test_pipelined_lora_step_equals_the_unsplit_step_and_local_peft(clients, tiny_path):
    whole = lora_model(clients(1, "lora"))
    split = lora_model(clients(3, "lora"), weights_from=whole)
    local = local_peft(tiny_path, whole)
    ids, mask, labels = batch()
    grads, sent = {}, {}
    for name, model in (("whole", whole), ("split", split), ("local", local)):
        before = model.chain.connections.bytes_sent if name != "local" else 0
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads[name] = lora_grads_local(model) if name == "local" else lora_grads_ours(model)
        grads[name]["logits"] = out.logits.detach()
        if name != "local":
            sent[name] = model.chain.connections.bytes_sent - before
    for name in grads["local"]:
        assert torch.allclose(grads["split"][name], grads["whole"][name], atol=1e-6), name
        assert torch.allclose(grads["split"][name], grads["local"][name], atol=1e-5), name
    assert max(g.abs().max() for g in grads["split"].values()) > 0
    # the adapter's weights travel to each node once, not once per micro-batch: the split step sent the
    # same activations plus a few more headers, far less than another copy of the weights
    weights = sum(p.numel() * 4 for p in whole.adapter.parameters())
    assert sent["split"] - sent["whole"] < 0.25 * weights, (sent, weights)
    hops = split.chain.router.metrics.registry.get_sample_value("swarmlm_client_hops_total", {"kind": "forward"})
    assert hops == 2 * 3  # each micro-batch through both hops


def test_pipelined_input_and_prefix_gradients_equal_the_unsplit_step(clients):
    torch.manual_seed(5)
    hidden = torch.randn(5, 10, 64)
    grad_out = torch.randn(5, 10, 64)
    _, mask, _ = batch()
    got = {}
    for micro_batches in (1, 2):
        blocks = clients(micro_batches, "plain").model.layers
        x = hidden.clone().requires_grad_(True)
        (blocks(x, attention_mask=mask) * grad_out).sum().backward()
        got[micro_batches] = x.grad
    assert torch.allclose(got[2], got[1], atol=1e-6) and got[1].abs().max() > 0

    prefix = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ids, mask, labels = batch()
    grads = {}
    for micro_batches in (1, 3):
        torch.manual_seed(6)
        model = get_peft_model(clients(micro_batches, "prefix"), copy.deepcopy(prefix))
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[micro_batches] = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads[1]) == len(grads[3]) > 0
    for a, b in zip(grads[1], grads[3]):
        assert torch.allclose(a, b, atol=1e-6) and a.abs().max() > 0


def test_a_node_lost_between_pipelined_steps_is_routed_around(start_nodes, open_client, tiny_path, bootstrap):
    nodes = start_nodes("0:3", "3:6", "0:3", "3:6")
    config = ClientConfig(initial_peers=tuple(bootstrap), micro_batches=3, ban_seconds=60)
    ours = lora_model(open_client(tiny_path, client_config=config))
    local = local_peft(tiny_path, ours)
    ids, mask, labels = batch()

    def step() -> None:
        for model in (ours, local):
            model.zero_grad()
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        expected, got = lora_grads_local(local), lora_grads_ours(ours)
        for name in expected:
            assert torch.allclose(got[name], expected[name], atol=1e-5), name

    step()
    # each micro-batch's backward went to the nodes that kept its forward (routes draw among replicas)
    activations = [n.node.servicer.activations for n in nodes]
    assert sum(a.hits for a in activations) == 3 * 2 and sum(a.misses for a in activations) == 0
    used = ours.chain.last_route[0].server.address
    next(n for n in nodes if n.address == used).stop(grace=0)
    step()
    assert used not in {hop.server.address for hop in ours.chain.last_route}


def test_bad_micro_batches_are_refused():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="micro_batches"):
            ClientConfig(micro_batches=bad)


def test_finetune_exposes_micro_batches(tmp_path):
    from client.cli import build_parser
    from client.finetune import FinetuneError, FinetuneOptions

    args = build_parser(None).parse_args(["finetune", "--model", "m", "--data", "d.txt", "--output", str(tmp_path),
                                          "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--micro-batches", "4",
                                          "--batch-size", "2"])
    options = FinetuneOptions.from_namespace(args, ["/ip4/127.0.0.1/tcp/1"])
    assert options.micro_batches == 4
    with pytest.raises(FinetuneError, match="--micro-batches 4 is more than --batch-size 2"):
        options.check()


def test_recomputed_micro_batches_draw_their_own_dropout_masks_again(start_nodes, open_client, tiny_path,
                                                                     bootstrap):
    """With LoRA dropout each micro-batch has its own masks (its own seed); a node that lost the kept pass
    recomputes it from the Backward's inputs with that micro-batch's seed, so the gradients are the kept
    pass's exactly."""
    nodes = start_nodes("0:3", "3:6")
    config = ClientConfig(initial_peers=tuple(bootstrap), micro_batches=2)
    dropout = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = get_peft_model(open_client(tiny_path, client_config=config), dropout)
    with torch.no_grad():
        for b in ours.adapter.lora_B:
            b.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    ids, mask, labels = batch()
    seed = ours.adapter.dropout_seed
    runs = []
    for evict in (False, True):
        ours.zero_grad()
        ours.adapter.dropout_seed = seed  # the same masks both times
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        if evict:
            for n in nodes:
                n.node.servicer.activations.clear()
        out.loss.backward()
        runs.append({k: g.clone() for k, g in lora_grads_ours(ours).items()})
    assert ours.chain.router.metrics.registry.get_sample_value("swarmlm_client_backward_inputs_resent_total") == 4
    for name in runs[0]:
        assert torch.allclose(runs[0][name], runs[1][name], atol=1e-6), name
