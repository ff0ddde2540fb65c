"""LoRA on the MLP, DoRA and IA3 held by the client, applied by the nodes: == local PEFT from the same saved
initialisation (four AdamW steps: losses and adapter), saved in PEFT's format (plain PeftModel.from_pretrained
gives the same logits and generate()), and nodes refuse malformed adapters."""
import contextlib
import copy

import grpc
import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model_state_dict
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import DistributedPeftModel, get_peft_model
from node.config import NodeConfig
from node.server import NodeThread
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize
from swarm.spans import Span

NAME = "peft-methods"  # a model name of its own: other tests' nodes are not on these routes
METHODS = {
    "lora-mlp": LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
    "dora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "ia3": IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


@pytest.fixture(scope="module")
def swarm(tiny_path, bootstrap):
    """Two nodes, blocks [0, 4) and [3, 6), for the whole module."""
    nodes = []
    try:
        for text in ("0:4", "3:6"):
            config = NodeConfig(model=str(tiny_path), blocks=Span.parse(text), model_name=NAME,
                                initial_peers=tuple(bootstrap))
            nodes.append(NodeThread(config).start())
        yield nodes
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)


@pytest.fixture
def client(swarm, open_client, tiny_path):
    return lambda: open_client(tiny_path, model_name=NAME)


def batch():
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


def local_model(tiny_path):
    return AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)


def adamw_steps_agree(ours, opt_ours, local, opt_local, ids, mask, labels, steps: int = 4) -> list[float]:
    """``steps`` optimizer steps of both models on one batch; each step's losses agree within 1e-5. Our losses."""
    losses = []
    for _ in range(steps):
        step = []
        for model, opt in ((ours, opt_ours), (local, opt_local)):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            step.append(loss.item())
        assert step[0] == pytest.approx(step[1], abs=1e-5)
        losses.append(step[0])
    return losses


def saved_initialisation(tiny_path, config, folder):
    """A local PEFT adapter with every trainable tensor moved off its start (so each one matters), saved."""
    torch.manual_seed(5)
    local = local_get_peft_model(local_model(tiny_path), copy.deepcopy(config))
    with torch.no_grad():
        for name, p in local.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.1 if "lora_" in name else 0.2))
    local.save_pretrained(folder)
    return folder


def adapters_equal(ours, local, atol=1e-5):
    state = ours.adapter.peft_state_dict()
    expected = get_peft_model_state_dict(local)
    assert set(state) == set(expected) and state
    for name, value in expected.items():
        assert torch.allclose(state[name], value, atol=atol), name


@pytest.mark.parametrize("method", METHODS)
def test_four_adamw_steps_equal_local_peft_from_the_same_saved_start(method, client, tiny_path, tmp_path):
    folder = saved_initialisation(tiny_path, METHODS[method], tmp_path / "start")
    ours = DistributedPeftModel.from_pretrained(client(), folder, is_trainable=True)
    local = PeftModel.from_pretrained(local_model(tiny_path), folder, is_trainable=True)
    adapters_equal(ours, local)
    ids, mask, labels = batch()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_local = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=1e-2)
    assert sum(p.numel() for p in opt_ours.param_groups[0]["params"]) == \
        sum(p.numel() for p in opt_local.param_groups[0]["params"])
    losses = adamw_steps_agree(ours, opt_ours, local, opt_local, ids, mask, labels)
    assert losses[-1] < losses[0]
    adapters_equal(ours, local)


@pytest.mark.parametrize("method", METHODS)
def test_saved_adapter_gives_plain_peft_the_same_logits_and_generation(method, client, tiny_path, tmp_path):
    folder = saved_initialisation(tiny_path, METHODS[method], tmp_path / "start")
    ours = DistributedPeftModel.from_pretrained(client(), folder, is_trainable=True)
    ids, mask, labels = batch()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    opt.step()  # what is saved is what was trained here
    ours.save_pretrained(tmp_path / "trained")
    loaded = PeftModel.from_pretrained(local_model(tiny_path), tmp_path / "trained").eval()
    base = local_model(tiny_path).eval()
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(logits, loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
        assert not torch.allclose(logits, base(input_ids=ids, attention_mask=mask).logits, atol=1e-2)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours.generate(ids, **kwargs), loaded.generate(input_ids=ids, **kwargs))


@pytest.mark.parametrize("init", [True, False])
def test_fresh_dora_starts_as_peft_does(init, client, tiny_path):
    """DoRA's magnitudes start at the row norms of W + scaling B A, read once from the checkpoint."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], use_dora=True, init_lora_weights=init)
    torch.manual_seed(0)
    local = local_get_peft_model(local_model(tiny_path), copy.deepcopy(config))
    ours = get_peft_model(client(), copy.deepcopy(config))
    with torch.no_grad():  # A and B as local PEFT drew them; then the magnitudes as PEFT computes them
        for name, p in ours.adapter.peft_state_dict().items():
            p.copy_(get_peft_model_state_dict(local)[name])
        from client.dora import init_magnitudes

        init_magnitudes(ours.adapter, ours.base_model.config)
    adapters_equal(ours, local)
    ids, mask, _ = batch()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits,
                              local(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


def test_ia3_defaults_are_peft_s(client):
    ours = get_peft_model(client(), IA3Config(task_type="CAUSAL_LM"))
    assert ours.adapter.paths == ["mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"]
    assert ours.adapter.inputs == {"mlp.down_proj"} and all(torch.equal(v, torch.ones_like(v)) for v in ours.adapter.ia3_l)
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        get_peft_model(client(), IA3Config(target_modules=["k_proj"], feedforward_modules=[], fan_in_fan_out=True))


def _module(**fields):
    return pb.LoraModule(block=0, module="self_attn.q_proj", **fields)


@pytest.mark.parametrize("method, module, match", [
    ("dora", _module(a=serialize(torch.zeros(4, 64)), b=serialize(torch.zeros(64, 4))), "lacks"),
    ("dora", _module(a=serialize(torch.zeros(4, 64)), b=serialize(torch.zeros(64, 4)),
                     magnitude=serialize(torch.ones(63))), "magnitude has shape"),
    ("dora", _module(a=serialize(torch.zeros(4, 64)), b=serialize(torch.zeros(64, 4)),
                     magnitude=serialize(torch.full((64,), float("nan")))), "NaN"),
    ("", _module(a=serialize(torch.zeros(4, 64)), b=serialize(torch.zeros(64, 4)),
                 magnitude=serialize(torch.ones(64))), "do not belong"),
    ("ia3", _module(ia3=serialize(torch.ones(65))), "not \\[64\\]"),
    ("ia3", _module(ia3=serialize(torch.ones(64)), a=serialize(torch.zeros(4, 64))), "do not belong"),
    ("ia3", _module(ia3=serialize(torch.ones(64, 1))), "expected 1 dim|ndim|dimension"),
    ("bottleneck", _module(a=serialize(torch.zeros(4, 64)), b=serialize(torch.zeros(64, 4))), "lora.method"),
])
def test_nodes_refuse_malformed_adapters(method, module, match, swarm):
    node = swarm[0]
    lora = pb.LoraAdapter(id="x", version=1, scaling=1.0, method=method, modules=[module])
    req = pb.ForwardRequest(model=node.node.model_key, start=0, end=1, lora=lora,
                            hidden_states=serialize(torch.randn(1, 2, 64)))
    with grpc.insecure_channel(node.address) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.NodeStub(channel).Forward(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert __import__("re").search(match, err.value.details()), err.value.details()
    with grpc.insecure_channel(node.address) as channel:  # and keeps serving
        assert pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=30).model == node.node.model_key


@pytest.mark.parametrize("projection", [False, True], ids=["deep-prompts", "deep-prompts-projection"])
def test_p_tuning_v2_trains_and_generates_like_local_peft(projection, client, tiny_path, tmp_path):
    """p-tuning v2 (deep prompts at every layer) is PEFT's prefix tuning, with and without prefix_projection:
    four AdamW steps equal local PEFT from the same start; the saved adapter gives plain PEFT the same logits;
    generate() equals PEFT's greedy continuation (its forward() re-run: tests/peft_reference.py)."""
    from peft import PrefixTuningConfig

    from tests.peft_reference import greedy_by_forward, peft_generate_is_sound

    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16)
    torch.manual_seed(3)
    local = local_get_peft_model(local_model(tiny_path), copy.deepcopy(config))
    ours = get_peft_model(client(), copy.deepcopy(config))
    local_params = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters()
                    if "prompt_encoder" in k}
    with torch.no_grad():  # large enough prefixes to change what the model says
        for p in local_params.values():
            p.mul_(8.0)
    ours.adapter.encoder.load_state_dict(local_params)
    ids, mask, labels = batch()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt_local = torch.optim.AdamW(list(local_params.values()), lr=1e-2)
    adamw_steps_agree(ours, opt_ours, local, opt_local, ids, mask, labels)
    for name, p in ours.adapter.encoder.named_parameters():
        assert torch.allclose(p, local_params[name], atol=1e-5), name
    ours.save_pretrained(tmp_path / "prefix")
    loaded = PeftModel.from_pretrained(local_model(tiny_path), tmp_path / "prefix").eval()
    ours.eval(), local.eval()
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids, attention_mask=mask).logits,
                              loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = greedy_by_forward(local, ids, mask, 10, position_offset=0)
    with torch.no_grad():
        assert not torch.equal(ref, local.get_base_model().generate(input_ids=ids, attention_mask=mask, **kwargs))
        if peft_generate_is_sound():
            assert torch.equal(local.generate(input_ids=ids, attention_mask=mask, **kwargs), ref)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), ref)


def test_nodes_do_not_serve_a_dora_adapter_as_plain_lora(tiny_path, tmp_path):
    from node.lora import load_peft_adapter
    from swarm.arch import projection_shapes

    folder = saved_initialisation(tiny_path, METHODS["dora"], tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA adapter"):
        load_peft_adapter(folder, 0, 6, projection_shapes(local_model(tiny_path).config))


ADALORA = dict(task_type="CAUSAL_LM", init_r=6, target_r=2, tinit=1, tfinal=1, deltaT=1, total_step=5, lora_alpha=8, orth_reg_weight=0.5,
               target_modules=["q_proj", "v_proj", "down_proj"])


def test_adalora_with_its_rank_allocator_equals_local_peft(client, tiny_path, tmp_path):
    """Five AdamW steps with update_and_allocate(step) after each: warm-up, two budgeting steps, the final
    allocation, one step at the final budget. Losses (orthogonal regularisation included), the rank pattern and
    the adapter equal local PEFT's; after the final allocation masked ranks are not sent; the saved adapter (resized
    by its rank pattern, as PEFT saves it) gives plain PEFT the same logits and generate()."""
    from peft import AdaLoraConfig

    folder = saved_initialisation(tiny_path, AdaLoraConfig(**ADALORA), tmp_path / "start")
    ours = DistributedPeftModel.from_pretrained(client(), folder, is_trainable=True)
    local = PeftModel.from_pretrained(local_model(tiny_path), folder, is_trainable=True)
    adapters_equal(ours, local)
    ids, mask, labels = batch()
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_local = torch.optim.AdamW([p for p in local.parameters() if p.requires_grad], lr=2e-2)
    for step in range(1, 6):
        losses = []
        for model, opt, allocate in ((ours, opt_ours, ours.update_and_allocate),
                                     (local, opt_local, local.base_model.update_and_allocate)):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            allocate(step)
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], abs=1e-5), step
    pattern = local.peft_config["default"].rank_pattern
    assert ours.peft_config.rank_pattern == pattern and pattern
    kept = sum(sum(v) for v in pattern.values())
    assert kept == 2 * len(pattern) < 6 * len(pattern)  # the budget: target_r per module
    message = ours.adapter.message(Span(0, 6), with_weights=True)
    assert sum(m.a.shape[0] for m in message.modules) == kept  # masked ranks cost no wire bytes
    adapters_equal(ours, local)

    ours.save_pretrained(tmp_path / "trained")
    loaded = PeftModel.from_pretrained(local_model(tiny_path), tmp_path / "trained").eval()
    again = DistributedPeftModel.from_pretrained(client(), tmp_path / "trained").eval()
    ours.eval()
    with torch.no_grad():
        logits = ours(input_ids=ids, attention_mask=mask).logits
        assert torch.allclose(logits, loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
        assert torch.allclose(logits, again(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(again.generate(ids, **kwargs), loaded.generate(input_ids=ids, **kwargs))


def test_dora_on_gpt2_conv1d_is_refused_by_name():
    from peft import LoraConfig
    from transformers import GPT2Config

    from client.adapters import RemoteLora

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64)
    RemoteLora(config, LoraConfig(r=2, target_modules=["c_attn"]))  # plain LoRA on Conv1D is fine
    with pytest.raises(ValueError, match=r"DoRA .* nn.Linear projections only.*c_attn.*Conv1D"):
        RemoteLora(config, LoraConfig(r=2, target_modules=["c_attn"], use_dora=True))
