"""LoRA held by the client, applied by the nodes: == local PEFT (gradients, training, save/load)."""
import copy

import grpc
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import DistributedPeftModel, get_peft_model
from client.chain import LoraUse
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize

CONFIG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])


def batch():
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def local_peft(tiny_path, ours, config=CONFIG):
    """Local transformers + PEFT with exactly our adapter's weights."""
    model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    state = ours.adapter.peft_state_dict()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(state[name.replace(".default", "")])
    return model


def lora_grads_local(model):
    return {n.replace(".default", ""): p.grad for n, p in model.named_parameters() if "lora_" in n}


def lora_grads_ours(model):
    grads = {}
    for (block, path), a, b in zip(model.adapter.keys, model.adapter.lora_A, model.adapter.lora_B):
        grads[f"base_model.model.model.layers.{block}.{path}.lora_A.weight"] = a.grad
        grads[f"base_model.model.model.layers.{block}.{path}.lora_B.weight"] = b.grad
    return grads


@pytest.fixture
def peft_pair(start_nodes, open_client, tiny_path):
    start_nodes("0:4", "2:6")
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(CONFIG))
    with torch.no_grad():
        for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
            b.normal_(0, 0.1)
    return ours, local_peft(tiny_path, ours)


def test_one_step_gradients_equal_local_peft(peft_pair):
    ours, local = peft_pair
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    expected, got = lora_grads_local(local), lora_grads_ours(ours)
    assert set(got) == set(expected) and len(got) == 6 * 3 * 2
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert max(g.abs().max() for g in got.values()) > 0


def test_twenty_adamw_steps_equal_local_peft(peft_pair):
    ours, local = peft_pair
    ids, mask, labels = batch()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_local = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for g in opt_ours.param_groups for p in g["params"]) == \
        sum(p.numel() for g in opt_local.param_groups for p in g["params"])
    losses = []
    for _ in range(20):
        for model, opt in ((ours, opt_ours), (local, opt_local)):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    state = ours.adapter.peft_state_dict()
    for name, p in local.named_parameters():
        if "lora_" in name:
            assert torch.allclose(state[name.replace(".default", "")], p, atol=1e-5), name


def test_saved_adapter_loads_in_peft_with_same_logits_and_generation(peft_pair, tiny_path, tmp_path):
    ours, _ = peft_pair
    ours.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits,
                              loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, **kwargs), loaded.generate(input_ids=ids, **kwargs))


def test_locally_trained_peft_adapter_loads_into_the_distributed_model(start_nodes, open_client, tiny_path, tmp_path):
    start_nodes("0:6")
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(CONFIG))
    with torch.no_grad():
        for name, p in local.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    local.save_pretrained(tmp_path / "local-adapter")
    ours = DistributedPeftModel.from_pretrained(open_client(tiny_path), tmp_path / "local-adapter", is_trainable=True)
    ids, mask, labels = batch()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits,
                              local(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()  # further training works
    assert all(a.grad is not None for a in ours.adapter.lora_A)


def test_rslora_scaling_and_unknown_targets(start_nodes, open_client, tiny_path):
    start_nodes("0:6")
    model = open_client(tiny_path)
    rs = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["o_proj", "gate_proj"])
    peft = get_peft_model(model, rs)
    assert peft.adapter.scaling == pytest.approx(8 / 2) and peft.adapter.paths == ["mlp.gate_proj", "self_attn.o_proj"]
    with pytest.raises(ValueError, match="match no projection"):
        get_peft_model(model, LoraConfig(r=4, target_modules=["nonexistent"]))


def test_unchanged_adapter_is_not_resent(peft_pair):
    ours, _ = peft_pair
    ids, mask, labels = batch()
    chain = ours.base_model.chain
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    version = ours.adapter.version()
    assert chain._lora_sent and set(chain._lora_sent.values()) == {version}
    address = next(iter(chain._lora_sent))[0]
    message = chain._lora_message(address, chain.last_route[0].span, LoraUse(ours.adapter, 1, version), resend=False)
    assert len(message.modules) == 0  # the node already holds this version: only id + version travel
    opt = torch.optim.AdamW(ours.adapter.parameters(), lr=0.1, fused=True)  # fused steps bump no version counter
    opt.step()
    assert ours.adapter.version() != version


def test_another_client_cannot_change_or_break_a_victims_cached_adapter(start_nodes, open_client, tiny_path):
    """Issue 21: nodes cached adapters by the client-chosen id and version and merged in weights anyone sent.
    An attacker sending extra mlp.down_proj weights under the victim's id and version changed the victim's
    logits; pre-seeding the victim's next version made the honest node return gradients the victim never asked
    for, and the victim banned it. Cached by content hash, neither has any effect."""
    (node,) = start_nodes("0:6")
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    victim = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    with torch.no_grad():
        for b in victim.adapter.lora_B:
            b.normal_(0, 0.1)
    ids, mask, labels = batch()
    with torch.no_grad():
        victim(input_ids=ids, attention_mask=mask)  # the node now holds the victim's weights

    shapes = node.node.servicer.adapters.shapes
    torch.manual_seed(7)

    def attack(version: int) -> None:
        lora = pb.LoraAdapter(id=victim.adapter.id, version=version, scaling=2.0, modules=[
            pb.LoraModule(block=block, module="mlp.down_proj", a=serialize(torch.randn(4, shapes["mlp.down_proj"][0])),
                          b=serialize(torch.randn(shapes["mlp.down_proj"][1], 4))) for block in range(6)])
        req = pb.ForwardRequest(model=node.node.model_key, start=0, end=6, lora=lora,
                                hidden_states=serialize(torch.randn(1, 3, shapes["mlp.down_proj"][1])))
        with grpc.insecure_channel(node.address) as channel:
            assert pb_grpc.NodeStub(channel).Forward(req, timeout=30).hidden_states.shape

    attack(victim.adapter.version())
    with torch.no_grad():  # the victim's next call names its cached weights only
        out = victim(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(out, local_peft(tiny_path, victim, config)(input_ids=ids, attention_mask=mask).logits,
                              atol=1e-4)

    opt = torch.optim.SGD(victim.adapter.parameters(), lr=0.1)
    victim(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()
    opt.zero_grad()
    attack(victim.adapter.version())  # the new version, before the victim's next step sends it
    local = local_peft(tiny_path, victim, config)
    out = victim(input_ids=ids, attention_mask=mask, labels=labels)
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    expected, got = lora_grads_local(local), lora_grads_ours(victim)
    assert set(got) == set(expected)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert not victim.base_model.chain.router.banned()


def test_lora_gradients_larger_than_the_request_are_accepted(start_nodes, open_client, tiny_path):
    """A Backward that names cached LoRA weights (no weights in the request) gets their gradients back:
    6 MiB here for a request of a few KB. The client's receive limit counts them (issue 21: answers are held
    to what the request can produce), so an honest node is not refused and banned."""
    start_nodes("0:6", max_message_mb=64)  # the weights travel once, with the Forward
    config = LoraConfig(r=256, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    assert sum(p.numel() for p in ours.adapter.parameters()) * 4 > 5 << 20
    with torch.no_grad():
        for b in ours.adapter.lora_B:
            b.normal_(0, 0.01)
    local = local_peft(tiny_path, ours, config)
    ids, mask, labels = batch()
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    local(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    expected, got = lora_grads_local(local), lora_grads_ours(ours)
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert not ours.base_model.chain.router.banned()
