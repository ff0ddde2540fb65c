"""What works for the Llama layout (tests/client/test_hosted_adapters.py, test_prompts_and_classification.py,
test_verification.py, tests/test_private_cli.py run it on the tiny Llama) keeps working for the other two
layouts of swarm/arch.py: one family per layout, MoE (Mixtral) and other (BLOOM: ALiBi, fused
query_key_value, an embedding LayerNorm on the client). One private swarm per family (a swarm key, so
every test here also runs through a private swarm) of three nodes with overlapping spans that host a
PEFT LoRA adapter; outputs == local transformers + PEFT in float32. (Beam search and prompt lookup run
for every family in tests/client/test_families.py.)"""
import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, ClientConfig
from node.config import NodeConfig
from node.server import NodeThread
from swarm.dht import SwarmDHT
from swarm.keys import generate_key_text, load_key
from swarm.spans import Span
from tests.client.test_families import ATOL, PAD, left_padded, prefix_tuning_equals_local_peft
from tests.helpers.checkpoints import FAMILY_QUIRKS, build_checkpoint

LAYOUTS = ("mixtral", "bloom")  # MoE, other layouts (the Llama layout: the tests named above)
SPANS = ("0:4", "0:4", "1:3")  # every hop of any route has a replica for verification to compare
HOSTED = {"mixtral": ["q_proj", "o_proj"], "bloom": ["query_key_value", "dense_h_to_4h"]}  # the hosted adapter's
GREEDY = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)


def hosted_adapter(path, root, family: str):
    """A PEFT LoRA adapter of the checkpoint at ``path``, saved under ``root / "style"``."""
    torch.manual_seed(9)
    model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                                 LoraConfig(r=4, lora_alpha=16, target_modules=HOSTED[family]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "style")
    return root


@pytest.fixture(scope="module", params=LAYOUTS)
def layout_swarm(request, tmp_path_factory, dht_loop):
    """(family, checkpoint, local model, adapters folder, client(**ClientConfig fields)) for a private swarm
    of three nodes hosting the "style" adapter."""
    family = request.param
    root = tmp_path_factory.mktemp(f"layout-{family}")
    path = build_checkpoint(root / f"tiny-{family}", family=family, num_layers=4, seed=4,
                            overrides=FAMILY_QUIRKS[family])
    adapters = hosted_adapter(path, root / "adapters", family)
    key = root / "lab.key"
    key.write_text(generate_key_text())
    dht = dht_loop.run(SwarmDHT.create(host="127.0.0.1", swarm_key=load_key(key)))
    peers = tuple(dht_loop.run(dht.visible_maddrs()))
    nodes = [NodeThread(NodeConfig(model=str(path), blocks=Span.parse(s), initial_peers=peers, swarm_key=str(key),
                                   adapters=str(adapters))) for s in SPANS]
    clients = []

    def client(**fields):
        config = ClientConfig(initial_peers=peers, swarm_key=str(key), max_retries=0, **fields)
        clients.append(AutoDistributedModelForCausalLM.from_pretrained(str(path), client_config=config))
        return clients[-1]

    try:
        for node in nodes:
            node.start()
        yield family, path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), adapters, client
    finally:
        for model in clients:
            model.close()
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)
        dht_loop.run(dht.shutdown())


def test_node_hosted_adapter_equals_local_peft(layout_swarm):
    _, _, local, adapters, client = layout_swarm
    model = client(adapter="style")
    reference = PeftModel.from_pretrained(copy.deepcopy(local), adapters / "style").eval()
    ids, mask, _ = left_padded(seed=3)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(out, reference(input_ids=ids, attention_mask=mask).logits, atol=ATOL)
        assert not torch.allclose(out, local(input_ids=ids, attention_mask=mask).logits, atol=1e-2)  # it matters
    assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY),
                       reference.generate(input_ids=ids, attention_mask=mask, **GREEDY))


def test_prefix_tuning_gradients_and_generate_equal_local_peft(layout_swarm):
    _, path, _, _, client = layout_swarm
    prefix_tuning_equals_local_peft(client(), path)


def test_verification_finds_honest_replicas_agree(layout_swarm):
    _, _, local, _, client = layout_swarm
    model = client(verify_fraction=1.0, believe_claims=True)
    ids, mask, _ = left_padded(seed=5)
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask).logits, local(ids, attention_mask=mask).logits,
                              atol=ATOL)
    assert torch.equal(model.generate(ids, attention_mask=mask, **GREEDY),
                       local.generate(ids, attention_mask=mask, **GREEDY))
    assert model.suspicious_nodes == [] and not model.chain.router.banned()
    assert model.chain.verifier.checks > GREEDY["max_new_tokens"]
