"""int8 nodes (`node serve --quantize int8`, torchao weight-only) == local transformers quantized the same
way; QLoRA and prompt tuning through them == the same adapter trained locally on that quantized model;
clients route through quantized nodes only when they ask; bfloat16 nodes train LoRA like local PEFT on a
bfloat16 model."""
import contextlib
import copy
import importlib.util
import subprocess
from dataclasses import replace

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, ClientConfig, get_peft_model
from client.verify import relative_difference
from node.config import NodeConfig
from node.quantize import QuantizationUnavailable, check_available, quantize_linears
from node.server import NodeThread
from swarm.routing import NoRouteError
from swarm.spans import Span
from tests.client.test_lora import lora_grads_local, lora_grads_ours
from tests.helpers.launch import command

MODEL = "tiny-quantized"  # a model name of its own: these nodes' records never meet other tests' clients
INT8_VS_FLOAT32 = 0.05  # stated tolerance: relative L2 difference of each real position's logits, int8 blocks vs
# float32 (measured about 0.02 on this model; client.verify.relative_difference)
# bfloat16 tolerances: logits within about one bfloat16 rounding step of values ~1-3 (adding the LoRA product
# after rounding it to bfloat16, not in float32 as PEFT does, is 0.03 off); relative L2 of each LoRA gradient;
# loss and float32 adapter weights after four AdamW steps at lr 1e-2
BF16_LOGITS, BF16_GRADS, BF16_LOSS, BF16_WEIGHTS = 1e-2, 1e-2, 1e-3, 1e-4
LORA = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
PROMPT = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)


def batch():
    torch.manual_seed(2)
    ids = torch.randint(3, 256, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.fixture(scope="module")
def swarm(tiny_path, bootstrap):
    """int8 nodes 0:3 + 3:6 and a float32 node 0:6, all announcing the same model."""
    nodes = []
    try:
        for span, quantize in (("0:3", "int8"), ("3:6", "int8"), ("0:6", "none")):
            nodes.append(NodeThread(NodeConfig(model=str(tiny_path), blocks=Span.parse(span), quantize=quantize,
                                               model_name=MODEL, initial_peers=tuple(bootstrap), throughput=100.0)))
            nodes[-1].start()
        yield nodes
    finally:
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)


@contextlib.contextmanager
def client(tiny_path, bootstrap, quantization: str, dtype=torch.float32, **config):
    model = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), dtype=dtype, client_config=ClientConfig(
        initial_peers=tuple(bootstrap), quantization=quantization, **{"model_name": MODEL, **config}))
    try:
        yield model
    finally:
        model.close()


@pytest.fixture(scope="module")
def int8_client(swarm, tiny_path, bootstrap):
    with client(tiny_path, bootstrap, "int8") as model:
        yield model


def local_int8(tiny_path, method: str = "int8"):
    """Local transformers with every Linear of its blocks quantized as the nodes do (node.quantize)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32).eval()
    quantize_linears(model.model.layers, method)
    return model


def used_quantizations(model) -> set[str]:
    return {hop.server.quantization for hop in model.model.layers.chain.last_route}


def test_int8_logits_equal_local_int8_and_stay_near_float32(int8_client, tiny_path, local_model):
    ids, mask, _ = batch()
    with torch.no_grad():
        ours = int8_client(input_ids=ids, attention_mask=mask).logits
        same_way = local_int8(tiny_path)(input_ids=ids, attention_mask=mask).logits
        float32 = local_model(input_ids=ids, attention_mask=mask).logits
    assert used_quantizations(int8_client) == {"int8"}
    assert torch.allclose(ours, same_way, atol=1e-5)  # same library, same settings: float noise
    difference = relative_difference(ours, float32, mask)
    assert 1e-3 < difference < INT8_VS_FLOAT32  # quantized for real, yet close to the float model
    assert torch.equal(ours.argmax(-1)[mask.bool()], float32.argmax(-1)[mask.bool()])


def test_int8_generation_equals_local_int8(int8_client, tiny_path):
    ids, mask, _ = batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(int8_client.generate(ids, **kwargs), local_int8(tiny_path).generate(ids, **kwargs))


def test_clients_route_only_through_the_quantization_they_ask_for(swarm, tiny_path, bootstrap, local_model):
    ids, mask, _ = batch()
    with client(tiny_path, bootstrap, "none") as plain:
        for _ in range(3):
            with torch.no_grad():
                logits = plain(input_ids=ids, attention_mask=mask).logits
            assert used_quantizations(plain) == {"none"}
            assert [hop.span for hop in plain.model.layers.chain.last_route] == [Span(0, 6)]
        assert torch.allclose(logits, local_model(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    assert ClientConfig().quantization == "none"  # the default: unquantized routes unless asked
    with client(tiny_path, bootstrap, "nf4", max_wait=0.5) as nf4, pytest.raises(NoRouteError):
        with torch.no_grad():
            nf4(input_ids=ids, attention_mask=mask)  # no nf4 node: no route, never another node


def test_the_cli_quantization_flag_reaches_the_routes(swarm, tiny_path, bootstrap):
    """`swarm generate / finetune / api --quantization`: parsed (bad values refused), and what the commands
    open (client.commands.open_model, client.finetune.build_model) routes through that quantization only."""
    from client.cli import build_parser
    from client.commands import open_model
    from client.finetune import FinetuneOptions, build_model

    gen = build_parser().parse_args(["generate", "hi", "--model", "m", "--quantization", "int8"])
    ft = build_parser().parse_args(["finetune", "--model", "m", "--data", "d", "--output", "o", "--quantization", "int8"])
    api = build_parser(["api"]).parse_args(["api", "--model", "m", "--quantization", "any"])
    assert (gen.quantization, ft.quantization, api.quantization) == ("int8", "int8", "any")
    assert build_parser().parse_args(["generate", "hi", "--model", "m"]).quantization == "none"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "hi", "--model", "m", "--quantization", "int4"])
    ids, mask, _ = batch()
    with open_model(str(tiny_path), bootstrap, None, MODEL, None, False, None, gen.quantization) as model, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        assert used_quantizations(model) == {"int8"}
    opts = FinetuneOptions.from_namespace(ft, tuple(bootstrap))
    with build_model(replace(opts, model=str(tiny_path), model_name=MODEL), None) as peft, torch.no_grad():
        peft(input_ids=ids, attention_mask=mask)
        assert used_quantizations(peft.base_model) == {"int8"}


def local_qlora(tiny_path, config, method: str = "int8"):
    """Local PEFT on the int8 model: the adapter's own Linears (lora_A / lora_B) stay float32."""
    model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    quantize_linears(model.base_model.model.model.layers, method, skip=("lora_",))
    return model


def train_both(ours, local, steps: int = 4, tolerance: float = 1e-5) -> list[float]:
    ids, mask, labels = batch()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, local)]
    losses = []
    for _ in range(steps):
        pair = []
        for model, opt in zip((ours, local), opts):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            pair.append(loss.item())
        assert pair[0] == pytest.approx(pair[1], abs=tolerance)
        losses.append(pair[0])
    return losses


@pytest.fixture
def fresh_int8_client(swarm, tiny_path, bootstrap):
    with client(tiny_path, bootstrap, "int8") as model:
        yield model


def test_qlora_through_int8_nodes_equals_local_qlora(fresh_int8_client, tiny_path):
    ours = get_peft_model(fresh_int8_client, copy.deepcopy(LORA))
    local = local_qlora(tiny_path, LORA)
    with torch.no_grad():
        for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter from the first step
            b.normal_(0, 0.1)
        state = ours.adapter.peft_state_dict()
        for name, p in local.named_parameters():
            if "lora_" in name:
                p.copy_(state[name.replace(".default", "")])
    assert type(local.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight).__name__ == "Int8Tensor"
    losses = train_both(ours, local)
    assert losses[-1] < losses[0]
    state = ours.adapter.peft_state_dict()
    trained = [name for name, _ in local.named_parameters() if "lora_" in name]
    assert len(trained) == 6 * 3 * 2
    for name, p in local.named_parameters():
        if "lora_" in name:
            assert torch.allclose(state[name.replace(".default", "")], p, atol=1e-5), name


def test_prompt_tuning_through_int8_nodes_equals_local(fresh_int8_client, tiny_path):
    ours = get_peft_model(fresh_int8_client, copy.deepcopy(PROMPT))
    local = local_get_peft_model(local_int8(tiny_path), copy.deepcopy(PROMPT))
    weights = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    ours.prompt.encoder.load_state_dict(weights)
    losses = train_both(ours, local)
    assert losses[-1] < losses[0]
    assert torch.allclose(ours.prompt.encoder.embedding.weight, weights["embedding.weight"], atol=1e-5)


def test_prefix_tuning_through_int8_nodes_equals_local(fresh_int8_client, tiny_path):
    """p-tuning v2's deep prompts (prefix keys/values at every block) through int8 nodes: four AdamW steps
    equal PEFT's prefix tuning on the local torchao-int8 model, and the prefixes train."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(3)
    local = local_get_peft_model(local_int8(tiny_path), copy.deepcopy(config))
    ours = get_peft_model(fresh_int8_client, copy.deepcopy(config))
    weights = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    with torch.no_grad():  # prefixes large enough to matter
        for p in weights.values():
            p.mul_(8.0)
    ours.adapter.encoder.load_state_dict(weights)
    losses = train_both(ours, local)
    assert losses[-1] < losses[0]
    assert used_quantizations(fresh_int8_client) == {"int8"}
    for name, p in ours.adapter.encoder.named_parameters():
        assert torch.allclose(p, weights[name], atol=1e-5), name


def test_nf4_is_refused_on_a_machine_without_cuda_and_bitsandbytes():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(QuantizationUnavailable, match="nf4 needs a CUDA GPU"):
        check_available("nf4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        NodeConfig(model="m", blocks=Span(0, 1), quantize="int4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        ClientConfig(quantization="int4")


def test_node_serve_quantize_nf4_refuses_in_one_line(tiny_path):
    """A real `node serve --quantize nf4` on a machine without a GPU and bitsandbytes: one line, exit 1."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = subprocess.run([*command("node", use_scripts=True), "serve", "--model", str(tiny_path), "--blocks", "0:6",
                             "--quantize", "nf4"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith("node: error: --quantize nf4 needs a CUDA GPU"), lines
    assert not result.stdout


@pytest.fixture(scope="module")
def bf16_node(tiny_path, bootstrap):
    node = NodeThread(NodeConfig(model=str(tiny_path), blocks=Span(0, 6), dtype="bfloat16", model_name=MODEL + "-bf16",
                                 initial_peers=tuple(bootstrap), throughput=100.0))
    node.start()
    try:
        yield node
    finally:
        node.stop(grace=0.5)


def test_lora_through_bfloat16_nodes_equals_local_peft_on_a_bfloat16_model(bf16_node, tiny_path, bootstrap):
    """Client and local model in bfloat16, LoRA weights float32 on both (PEFT's autocast_adapter_dtype): the
    adapter's product is added to the bfloat16 output in float32, then rounded, as PEFT does."""
    base = AutoDistributedModelForCausalLM.from_pretrained(str(tiny_path), dtype=torch.bfloat16, client_config=ClientConfig(
        initial_peers=tuple(bootstrap), model_name=MODEL + "-bf16"))
    try:
        ours = get_peft_model(base, copy.deepcopy(LORA))
        local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16),
                                     copy.deepcopy(LORA))
        with torch.no_grad():
            for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
                b.normal_(0, 0.1)
            state = ours.adapter.peft_state_dict()
            for name, p in local.named_parameters():
                if "lora_" in name:
                    assert p.dtype == torch.float32
                    p.copy_(state[name.replace(".default", "")])
        ids, mask, labels = batch()
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        ref = local(input_ids=ids, attention_mask=mask, labels=labels)
        assert {hop.server.dtype for hop in base.model.layers.chain.last_route} == {"bfloat16"}
        assert out.logits.dtype == ref.logits.dtype == torch.bfloat16
        assert (out.logits.float() - ref.logits.float()).abs().max() <= BF16_LOGITS
        out.loss.backward()
        ref.loss.backward()
        expected, got = lora_grads_local(local), lora_grads_ours(ours)
        assert set(got) == set(expected) and all(g.dtype == torch.float32 for g in got.values())
        for name in expected:
            assert relative_difference(got[name].reshape(1, 1, -1), expected[name].reshape(1, 1, -1)) <= BF16_GRADS, name
        ours.zero_grad(), local.zero_grad()
        losses = train_both(ours, local, tolerance=BF16_LOSS)
        assert losses[-1] < losses[0]
        state = ours.adapter.peft_state_dict()
        for name, p in local.named_parameters():
            if "lora_" in name:
                assert torch.allclose(state[name.replace(".default", "")], p, atol=BF16_WEIGHTS), name
    finally:
        base.close()


def _nf4_runs_here() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.mark.skipif(not _nf4_runs_here(), reason="nf4 needs a CUDA GPU and bitsandbytes (never run on CPU CI)")
def test_nf4_node_equals_local_nf4_and_trains_lora(tiny_path, bootstrap):
    """On a CUDA machine with bitsandbytes: an nf4 node's logits equal local transformers quantized by the same
    function (same bitsandbytes kernels), stay near float32, and LoRA trains through it like local QLoRA."""
    name = MODEL + "-nf4"
    node = NodeThread(NodeConfig(model=str(tiny_path), blocks=Span(0, 6), quantize="nf4", model_name=name,
                                 initial_peers=tuple(bootstrap), throughput=100.0))
    node.start()
    try:
        with client(tiny_path, bootstrap, "nf4", model_name=name) as model:
            ids, mask, _ = batch()
            with torch.no_grad():
                ours = model(input_ids=ids, attention_mask=mask).logits
                same_way = local_int8(tiny_path, "nf4")(input_ids=ids, attention_mask=mask).logits
                float32 = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)(
                    input_ids=ids, attention_mask=mask).logits
            assert used_quantizations(model) == {"nf4"}
            assert torch.allclose(ours, same_way, atol=1e-4)
            assert 1e-3 < relative_difference(ours, float32, mask) < 0.5  # 4-bit: quantized for real, still near
            ours_peft, local = get_peft_model(model, copy.deepcopy(LORA)), local_qlora(tiny_path, LORA, "nf4")
            with torch.no_grad():
                state = ours_peft.adapter.peft_state_dict()
                for n, p in local.named_parameters():
                    if "lora_" in n:
                        p.copy_(state[n.replace(".default", "")])
            losses = train_both(ours_peft, local, tolerance=1e-4)
            assert losses[-1] < losses[0]
    finally:
        node.stop(grace=0.5)


@pytest.mark.skipif(torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes (not in the lock) on a machine without CUDA")
def test_nf4_path_on_the_bitsandbytes_cpu_backend(monkeypatch, tiny_path, bootstrap):
    """Where bitsandbytes is installed but there is no GPU (bitsandbytes >= 0.46 also quantizes and multiplies
    NF4 on the CPU): the nf4 node path, run with the CPU standing in for the CUDA device, against the same
    checks as on a GPU. Checks our use of bitsandbytes; not the host <-> GPU copies. Run by hand:
    `pip install --target DIR bitsandbytes`, then PYTHONPATH=DIR pytest -k bitsandbytes_cpu."""
    import node.quantize
    import node.server

    real = node.quantize.check_available
    allow = lambda method: None if method == "nf4" else real(method)  # noqa: E731
    monkeypatch.setattr(node.quantize, "nf4_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(node.quantize, "check_available", allow)
    monkeypatch.setattr(node.server, "check_quantization", allow)
    model = local_int8(tiny_path, "nf4")
    projection = model.model.layers[0].self_attn.q_proj
    assert type(projection.weight).__name__ == "Params4bit"
    assert node.quantize.float_weight(projection).shape == (projection.out_features, projection.in_features)
    test_nf4_node_equals_local_nf4_and_trains_lora(tiny_path, bootstrap)
