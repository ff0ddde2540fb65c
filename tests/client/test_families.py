"""Every family of swarm/arch.py, through three real nodes with uneven,
overlapping spans, == local transformers (+ PEFT) in float32: logits of a left-padded batch, greedy
batched generate(), a LoRA step on the family's attention projections, prompt tuning. Each family's
checkpoint is tiny (hidden 64, 4 blocks) with the config quirks that make it differ from Llama
(tests/helpers/checkpoints.py FAMILY_QUIRKS); one swarm per family serves all of its tests."""
import asyncio
import contextlib
import copy

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, ClientConfig, get_peft_model
from node.cli import serve
from node.config import NodeConfig
from node.server import NodeThread
from swarm.arch import FAMILIES, get_family
from swarm.spans import Span
from tests.client.test_generation import prompts
from tests.helpers.checkpoints import FAMILY_QUIRKS, build_checkpoint, family_of
from tests.peft_reference import greedy_by_forward

ATOL = 1e-4
PAD = 0
SPANS = ("0:3", "1:2", "2:4")  # uneven and overlapping: routes mix them
# PEFT's names of the attention projections (default: q_proj, v_proj)
ATTENTION = {"phi3": ["qkv_proj"], "gpt_neox": ["query_key_value"], "gpt2": ["c_attn"], "falcon": ["query_key_value"],
             "bloom": ["query_key_value"]}


@pytest.fixture(scope="module", params=sorted(FAMILY_QUIRKS))
def family_swarm(request, tmp_path_factory, bootstrap):
    """(family, checkpoint path, local transformers model, a new client joined to the three nodes serving it:
    each test gets its own, so adapters attached by one test never reach another)."""
    case = request.param
    family = family_of(case)
    path = build_checkpoint(tmp_path_factory.mktemp(family) / f"tiny-{family}", family=family, num_layers=4,
                            seed=1, overrides=FAMILY_QUIRKS[case])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nodes = [NodeThread(NodeConfig(model=str(path), blocks=Span.parse(s), initial_peers=tuple(bootstrap)))
             for s in SPANS]
    clients = []
    no_retries = ClientConfig(initial_peers=tuple(bootstrap), max_retries=0)  # a failing node fails the test

    def client():
        clients.append(AutoDistributedModelForCausalLM.from_pretrained(str(path), client_config=no_retries))
        return clients[-1]

    try:
        for node in nodes:
            node.start()
        yield family, path, local, client
    finally:
        for model in clients:
            model.close()
        for node in reversed(nodes):
            with contextlib.suppress(Exception):
                node.stop(grace=0.5)


def left_padded(seed: int = 3):
    """3 prompts of different lengths (longer than the tiny sliding windows), left-padded, with their labels."""
    ids, mask = prompts(seed)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def test_logits_and_loss_equal_local(family_swarm):
    _, _, local, client = family_swarm
    model = client()
    ids, mask, labels = left_padded()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=ATOL), (out.logits - ref.logits).abs().max()
    assert torch.allclose(out.loss, ref.loss, atol=ATOL)


def test_greedy_32_tokens_batched_padded_equal_local(family_swarm):
    _, _, local, client = family_swarm
    model = client()
    ids, mask, _ = left_padded(seed=5)
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = model.generate(ids, **kwargs)
    assert out.shape == (3, ids.shape[1] + 32)
    assert torch.equal(out, local.generate(ids, **kwargs))


def test_beam_search_and_prompt_lookup_equal_local(family_swarm):
    """Beam search reorders the nodes' cache rows; prompt lookup crops rejected drafts (past the tiny
    sliding windows for the families that have them)."""
    _, _, local, client = family_swarm
    model = client()
    ids, mask, _ = left_padded(seed=13)
    beams = dict(attention_mask=mask, max_new_tokens=12, num_beams=3, num_return_sequences=2, do_sample=False,
                 pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(model.generate(ids, **beams), local.generate(ids, **beams))
    repetitive = ids[2:, -5:].repeat(1, 3)
    lookup = dict(max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=None, prompt_lookup_num_tokens=3)
    assert torch.equal(model.generate(repetitive, **lookup), local.generate(repetitive, **lookup))


def test_lora_on_attention_equals_local_peft(family_swarm):
    family, path, _, client = family_swarm
    model = client()
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=ATTENTION.get(family, ["q_proj", "v_proj"]))
    ours = get_peft_model(model, copy.deepcopy(config))
    with torch.no_grad():
        for b in ours.adapter.lora_B:  # PEFT starts B at zero; make the adapter matter
            b.normal_(0, 0.1)
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), copy.deepcopy(config))
    state = ours.adapter.peft_state_dict()
    with torch.no_grad():
        for name, p in local.named_parameters():
            if "lora_" in name:
                p.copy_(state[name.replace(".default", "")])
    ids, mask, labels = left_padded(seed=7)
    out, ref = ours(input_ids=ids, attention_mask=mask, labels=labels), local(input_ids=ids, attention_mask=mask,
                                                                              labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=ATOL) and torch.allclose(out.loss, ref.loss, atol=ATOL)
    out.loss.backward()
    ref.loss.backward()
    expected = {n.replace(".default", ""): p.grad for n, p in local.named_parameters() if "lora_" in n}
    got, prefix = {}, FAMILIES[family].layer_prefix
    for (block, proj), a, b in zip(ours.adapter.keys, ours.adapter.lora_A, ours.adapter.lora_B):
        got[f"base_model.model.{prefix}{block}.{proj}.lora_A.weight"] = a.grad
        got[f"base_model.model.{prefix}{block}.{proj}.lora_B.weight"] = b.grad
    assert set(got) == set(expected) and len(got) == 4 * len(config.target_modules) * 2
    for name in expected:
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def test_prompt_tuning_equals_local_peft(family_swarm):
    _, path, _, client = family_swarm
    model = client()
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    ours = get_peft_model(model, copy.deepcopy(config))
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), copy.deepcopy(config))
    weights = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    ours.prompt.encoder.load_state_dict(weights)
    ids, mask, labels = left_padded(seed=9)
    out, ref = ours(input_ids=ids, attention_mask=mask, labels=labels), local(input_ids=ids, attention_mask=mask,
                                                                              labels=labels)
    assert out.logits.shape == ref.logits.shape == (3, 4 + ids.shape[1], 256)
    assert torch.allclose(out.logits, ref.logits, atol=ATOL)
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.prompt.encoder.named_parameters():
        assert torch.allclose(p.grad, weights[name].grad, atol=1e-5), name


def prefix_tuning_equals_local_peft(model, path) -> None:
    """Prefix tuning through ``model`` (a client of checkpoint ``path``) == local PEFT: logits, loss, prefix
    gradients, and greedy generate() (the prefix's keys and values start every node's cache)."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    ours = get_peft_model(model, copy.deepcopy(config))
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), copy.deepcopy(config))
    weights = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    with torch.no_grad():
        for p in weights.values():
            p.mul_(8.0)  # big enough to change what the model says
    ours.adapter.encoder.load_state_dict(weights)
    ids, mask, labels = left_padded(seed=9)
    out, ref = ours(input_ids=ids, attention_mask=mask, labels=labels), local(input_ids=ids, attention_mask=mask,
                                                                              labels=labels)
    assert torch.allclose(out.logits, ref.logits, atol=ATOL) and torch.allclose(out.loss, ref.loss, atol=ATOL)
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.adapter.encoder.named_parameters():
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad, weights[name].grad, atol=1e-5), name
    ours.eval(), local.eval()
    greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    expected = greedy_by_forward(local, ids, mask, greedy["max_new_tokens"], 0)
    assert torch.equal(ours.generate(ids, attention_mask=mask, **greedy), expected)


def test_prefix_tuning_equals_local_peft(family_swarm):
    """Prefix tuning for the other layouts, whose caches differ most (BLOOM: tests/client/test_layouts.py;
    old multi-query Falcon refuses it, see below)."""
    family, path, local, client = family_swarm
    old_falcon = family == "falcon" and not local.config.new_decoder_architecture
    if family not in ("gpt_neox", "gpt2", "falcon") or old_falcon:
        pytest.skip("prefix tuning of this layout is tested elsewhere (or refused)")
    prefix_tuning_equals_local_peft(client(), path)


def test_every_family_of_the_table_is_tested():
    assert set(FAMILIES) == {family_of(case) for case in FAMILY_QUIRKS}


@pytest.fixture(scope="module")
def opt_path(tmp_path_factory):
    """A family outside the table (OPT's layout: model.decoder.layers.N, learned positions with an offset)."""
    return build_checkpoint(tmp_path_factory.mktemp("opt") / "tiny-opt", family="opt", num_layers=2,
                            tokenizer=False, overrides=dict(ffn_dim=128, word_embed_proj_dim=64))


def test_unsupported_family_is_refused_by_the_client(opt_path, bootstrap):
    with pytest.raises(ValueError, match="model family 'opt' is not supported .*swarm/arch.py"):
        AutoDistributedModelForCausalLM.from_pretrained(str(opt_path), initial_peers=bootstrap)


def test_unsupported_family_is_one_line_at_node_serve(opt_path, capsys):
    """What `node serve` does with the parsed flags (in-process: the same path as the console script's)."""
    code = asyncio.run(serve(NodeConfig(model=str(opt_path), blocks=Span(0, 1))))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert "model family 'opt' is not supported" in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1, err


def test_unsupported_config_of_a_family_is_refused():
    """A family config the nodes cannot run exactly (ALiBi Falcon) is refused by name, not approximated."""
    from transformers import AutoConfig

    config = AutoConfig.for_model("falcon", num_hidden_layers=2, alibi=True)
    with pytest.raises(ValueError, match="'falcon' with alibi=True is not supported: ALiBi Falcon"):
        get_family(config)


def test_unsupported_layer_type_is_refused():
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen3", num_hidden_layers=2, layer_types=["full_attention", "linear_attention"])
    with pytest.raises(ValueError, match="block 1 of 'qwen3' has attention type 'linear_attention'"):
        get_family(config)


def test_prefix_tuning_that_cannot_fit_the_cache_is_refused():
    """Old-architecture multi-query Falcon caches one key/value head; PEFT's prefixes have every head."""
    from peft import PrefixTuningConfig
    from transformers import AutoConfig

    from client.prompts import RemotePrefix

    config = AutoConfig.for_model("falcon", num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                  new_decoder_architecture=False, multi_query=True)
    with pytest.raises(ValueError, match="prefix tuning is not supported for this 'falcon' model: its old decoder"):
        RemotePrefix(config, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    config.new_decoder_architecture, config.num_kv_heads = True, 2  # the new one caches every head: accepted
    assert RemotePrefix(config, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).heads == 4


class StopServingNode:
    """A streamer that stops the node serving the session's first hop when the ``at``-th new token arrives."""

    def __init__(self, at: int, session, nodes):
        self.at, self.session, self.nodes, self.calls, self.stopped = at, session, nodes, 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == self.at + 1:  # the first call carries the prompt
            serving = self.session._streams[0].hop.server.address
            self.stopped = next(n for n in self.nodes if n.address == serving)
            self.stopped.stop(grace=0)

    def end(self):
        pass


@pytest.mark.parametrize("family", ["mixtral", "bloom"])  # MoE; other layouts (ALiBi over the replayed mask)
def test_node_lost_mid_generation_gives_identical_tokens(family, start_nodes, open_client, tmp_path):
    """A layout's failover: the node serving the first hop stops at token 5; its replacement rebuilds
    the cache by replaying the session and the tokens equal local generate()."""
    path = build_checkpoint(tmp_path / f"tiny-{family}", family=family, num_layers=4, seed=2,
                            overrides=FAMILY_QUIRKS[family])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nodes = start_nodes("0:2", "0:3", "2:4", model=path)
    model = open_client(path)
    ids, mask, _ = left_padded(seed=11)
    kwargs = dict(attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with model.inference_session(max_length=ids.shape[1] + 16) as session:
        streamer = StopServingNode(5, session, nodes)
        out = model.generate(ids, session=session, streamer=streamer, **kwargs)
        assert streamer.stopped is not None and session._streams[0].hop.server.address != streamer.stopped.address
    assert torch.equal(out, local.generate(ids, **kwargs))
