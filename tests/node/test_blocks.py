"""Block functions vs local transformers, and loading only a span's weights."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import node.blocks
import swarm.checkpoint as loading
from tests.helpers.checkpoints import build_checkpoint
from node.blocks import backward_span, forward_span, load_span
from swarm.checkpoint import CheckpointError, load_config
from swarm.spans import Span


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def family_ckpt(request, tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp(request.param) / "m", family=request.param,
                            num_layers=4, tokenizer=False, seed=1)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def batch(vocab=256):
    torch.manual_seed(0)
    ids = torch.randint(3, vocab, (3, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids, mask


def test_split_equals_whole_equals_local(family_ckpt):
    path, local = family_ckpt
    config = load_config(path)
    blocks = load_span(path, config, Span(0, 4), torch.float32)
    ids, mask = batch()
    emb = local.model.embed_tokens(ids)
    with torch.no_grad():
        ref = local.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
        whole = forward_span(blocks, Span(0, 4), emb, mask)
        split = forward_span(blocks, Span(1, 4), forward_span(blocks, Span(0, 1), emb, mask), mask)
    assert torch.allclose(local.model.norm(whole), ref, atol=1e-5)
    assert torch.allclose(split, whole, atol=1e-6)


def test_backward_recomputes_the_input_gradient(family_ckpt):
    path, local = family_ckpt
    blocks = load_span(path, load_config(path), Span(0, 4), torch.float32)
    ids, mask = batch()
    emb = local.model.embed_tokens(ids).detach().requires_grad_(True)
    out = local.model(inputs_embeds=emb, attention_mask=mask).last_hidden_state
    # gradient of sum(norm(blocks(x)) * w) for a fixed w, through local and through backward_span
    w = torch.randn_like(out)
    (out * w).sum().backward()
    x = emb.detach().requires_grad_(True)
    with torch.enable_grad():
        hidden = forward_span(blocks, Span(0, 4), x, mask).detach().requires_grad_(True)
        (local.model.norm(hidden) * w).sum().backward()
    grad, _, _ = backward_span(blocks, Span(0, 4), emb.detach(), hidden.grad, mask)
    assert torch.allclose(grad, emb.grad, atol=1e-5)


def spy_on_reads(monkeypatch) -> list[str]:
    """The names of every tensor node.blocks reads from the checkpoint from now on (the list fills as it reads)."""
    read: list[str] = []
    real_read = node.blocks.read_tensors

    def spy(folder, want, dtype=None):
        tensors = real_read(folder, want, dtype)
        read.extend(tensors)
        return tensors

    monkeypatch.setattr(node.blocks, "read_tensors", spy)
    return read


def test_only_the_span_is_loaded(tiny_path, local_model, monkeypatch):
    """Blocks 2:4 read only model.layers.2.* and model.layers.3.*, and hold exactly those tensors."""
    read = spy_on_reads(monkeypatch)
    blocks = load_span(tiny_path, load_config(tiny_path), Span(2, 4), torch.float32)
    assert read and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in read), read
    assert len(blocks.layers) == 2
    for got, want in zip(blocks.layers, local_model.model.layers[2:4], strict=True):
        expected = want.state_dict()
        assert got.state_dict().keys() == expected.keys()
        assert all(torch.equal(t, expected[name]) for name, t in got.state_dict().items())
    assert all(not p.requires_grad for p in blocks.layers.parameters())  # frozen


@pytest.mark.parametrize("family, prefix", [("gpt2", "transformer.h."), ("gpt_neox", "gpt_neox.layers.")])
def test_other_layouts_load_only_the_span(family, prefix, tmp_path, monkeypatch):
    """A family keeping its blocks elsewhere (transformer.h.N, gpt_neox.layers.N): blocks 1:3 read only
    theirs, and hold the local model's tensors."""
    path = build_checkpoint(tmp_path / family, family=family, num_layers=4, tokenizer=False)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    read = spy_on_reads(monkeypatch)
    blocks = load_span(path, load_config(path), Span(1, 3), torch.float32)
    assert read and all(name.startswith((f"{prefix}1.", f"{prefix}2.")) for name in read), read
    for got, want in zip(blocks.layers, local.get_submodule(prefix.rstrip("."))[1:3], strict=True):
        expected = want.state_dict()
        assert got.state_dict().keys() == expected.keys()
        assert all(torch.equal(t, expected[name]) for name, t in got.state_dict().items())


def test_sharded_checkpoint_reads_only_needed_shards(tmp_path, monkeypatch):
    path = build_checkpoint(tmp_path / "sharded", num_layers=6, tokenizer=False, max_shard_size="100KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3
    config = load_config(path)
    opened = []
    real_safe_open = loading.safe_open

    def spy(file, **kw):
        opened.append(file.name)
        return real_safe_open(file, **kw)

    monkeypatch.setattr(loading, "safe_open", spy)
    blocks = load_span(path, config, Span(5, 6), torch.float32)
    monkeypatch.undo()
    needed = {f for name, f in index["weight_map"].items() if name.startswith("model.layers.5.")}
    assert set(opened) == needed and len(needed) < len(shards)
    ids, mask = batch()
    emb = torch.randn(3, 10, 64)
    full = load_span(path, config, Span(0, 6), torch.float32)
    with torch.no_grad():
        assert torch.equal(forward_span(blocks, Span(5, 6), emb, mask), forward_span(full, Span(5, 6), emb, mask))


def test_bfloat16_blocks_stay_close(tiny_path):
    config = load_config(tiny_path)
    f32 = load_span(tiny_path, config, Span(0, 6), torch.float32)
    bf16 = load_span(tiny_path, config, Span(0, 6), torch.bfloat16)
    emb = torch.randn(2, 8, 64)
    with torch.no_grad():
        a, b = forward_span(f32, Span(0, 6), emb), forward_span(bf16, Span(0, 6), emb).float()
    assert bf16.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert (a - b).abs().max() / a.abs().max() < 0.05


def test_missing_weights_and_out_of_range_spans(tiny_path, tmp_path):
    config = load_config(tiny_path)
    with pytest.raises(CheckpointError, match="outside the model"):
        load_span(tiny_path, config, Span(4, 9), torch.float32)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path)


def test_moe_span_loads_only_its_experts_converted_as_transformers_does(tmp_path, monkeypatch):
    """Mixtral's checkpoint keeps one tensor per expert (block_sparse_moe.experts.E.w1/w2/w3); blocks 1:2
    read only block 1's, hold them fused into 3-D expert tensors exactly as local transformers does, and
    nothing of the other blocks (memory stays proportional to the span)."""
    from tests.helpers.checkpoints import FAMILY_QUIRKS

    path = build_checkpoint(tmp_path / "mixtral", family="mixtral", num_layers=4, tokenizer=False,
                            overrides=FAMILY_QUIRKS["mixtral"])
    read = spy_on_reads(monkeypatch)
    blocks = load_span(path, load_config(path), Span(1, 2), torch.float32)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in read
    assert all(name.startswith("model.layers.1.") for name in read), read
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    expected = local.model.layers[1].state_dict()
    got = blocks.layers[0].state_dict()
    assert got.keys() == expected.keys() and got["mlp.experts.gate_up_proj"].shape == (4, 256, 64)
    assert all(torch.equal(t, expected[name]) for name, t in got.items())
    hosted = sum(t.numel() for t in blocks.layers.parameters())
    assert hosted == sum(t.numel() for t in local.model.layers[1].parameters())


def test_a_block_missing_a_tensor_is_refused(tiny_path, tmp_path):
    """transformers' loader would leave the tensor random (from_pretrained warns); a node refuses to serve."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_path, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = load_config(broken)
    with pytest.raises(CheckpointError, match=r"lacks or cannot convert \['model.layers.1.mlp.up_proj.weight'\]"):
        load_span(broken, config, Span(0, 2), torch.float32)
    assert len(load_span(broken, config, Span(2, 4), torch.float32).layers) == 2  # other blocks still load
