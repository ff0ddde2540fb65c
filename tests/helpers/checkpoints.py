"""Small Llama-layout checkpoints built locally with a fixed seed (no model hub needed).

Used by the demo, the tests and the benchmarks; they load through the same path as real checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch

CORPUS = """\
the swarm runs a language model on machines owned by different people .
each node hosts a span of transformer blocks and announces it in the dht .
the client keeps the embeddings and the head and sends hidden states through the nodes .
gradients flow back through the remote blocks to the client's own parameters .
a node may leave at any time and the client routes around it .
small models are built here with a fixed seed so that every run sees the same weights .
"""


# Config fields that make a tiny checkpoint of a family exercise its quirks (with 4 blocks): a head
# size that fits hidden 64, windows shorter than the test prompts, soft-caps that bend the numbers.
FAMILY_QUIRKS: dict[str, dict] = {
    "llama": dict(rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                                       high_freq_factor=4.0, original_max_position_embeddings=16)),  # Llama 3 rope
    "mistral": dict(sliding_window=5),  # every layer windowed
    "qwen2": dict(use_sliding_window=True, sliding_window=5, max_window_layers=2),  # q/k/v biases, mixed layers
    "qwen3": dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=2),  # q/k norms, mixed
    "phi3": dict(partial_rotary_factor=0.5),  # fused qkv_proj / gate_up_proj, rotary on half of each head
    "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5, final_logit_softcapping=3.0,
                   attn_logit_softcapping=5.0),  # alternating sliding/full layers, embedding scale
    "gemma3_text": dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
                        layer_types=["sliding_attention", "full_attention"] * 2,
                        final_logit_softcapping=3.0),  # a rotary base per layer type, q/k norms
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),  # saved per expert, run fused
    "qwen3_moe": dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
    "gpt_oss": dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
                    layer_types=["sliding_attention", "full_attention"] * 2),
    "starcoder2": dict(sliding_window=5),
    "olmo2": dict(),
    # other layouts (a "+variant" case builds the family before the "+" with other config fields)
    "gpt_neox": dict(use_parallel_residual=True, rotary_pct=0.5),  # rotary on half of each head
    "gpt2": dict(scale_attn_by_inverse_layer_idx=True),  # Conv1D projections, learned positions
    "falcon": dict(new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=2),  # ln_attn / ln_mlp
    "falcon+old": dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True),  # one kv head
    "bloom": dict(),  # ALiBi, fused query_key_value, embedding LayerNorm
}


def family_of(case: str) -> str:
    """The model type of a FAMILY_QUIRKS case ("falcon+old" -> "falcon")."""
    return case.split("+")[0]


def build_tokenizer(dest: Path, vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on the embedded corpus, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(dest)
    return fast


def build_checkpoint(
    dest: str | Path,
    *,
    family: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 6,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    vocab_size: int = 256,
    tie_word_embeddings: bool = False,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    seed: int = 0,
    sliding_window: int | None = None,
    overrides: dict | None = None,
) -> Path:
    """Write a randomly initialised (seeded) checkpoint to ``dest`` and return its path
    (``sliding_window``: Mistral's attention window; None keeps the family's default; ``overrides``:
    more config fields, e.g. ``FAMILY_QUIRKS[family]``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dest = Path(dest)
    # only for families that have key/value heads of their own (BLOOM, GPT-2, GPT-NeoX, Falcon do not: the
    # field would only mislead PEFT, which sizes prefix-tuning prefixes by it when a config has it)
    kv = {"num_key_value_heads": num_kv_heads} if hasattr(AutoConfig.for_model(family), "num_key_value_heads") else {}
    config = AutoConfig.for_model(
        family, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, **kv,
        vocab_size=vocab_size, max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **({"sliding_window": sliding_window} if sliding_window is not None else {}), **(overrides or {}),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # default init is tiny; widen it so the blocks visibly change the stream
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
            elif name.endswith(".sinks"):  # gpt-oss attention sinks: big enough to take a share of attention
                p.normal_(0.0, 1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dest, **kwargs)
    if tokenizer:
        build_tokenizer(dest, vocab_size)
    return dest


def shard_per_block(src: str | Path, dest: str | Path) -> Path:
    """Copy checkpoint ``src`` (one model.safetensors) to ``dest`` sharded like a big hub model, but with a
    known layout: ``model-block-NN.safetensors`` per block, ``model-embed.safetensors`` (embeddings) and
    ``model-head.safetensors`` (final norm, LM head), with a safetensors index; other files copied."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for file in src.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "swarmlm-weights.json":
            shutil.copy(file, dest / file.name)
    tensors = load_file(src / "model.safetensors")
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            shard = f"model-block-{int(name.split('.')[2]):02d}.safetensors"
        else:
            shard = "model-embed.safetensors" if "embed_tokens" in name else "model-head.safetensors"
        shards.setdefault(shard, {})[name] = tensor.contiguous()
    for shard, part in shards.items():
        save_file(part, dest / shard, metadata={"format": "pt"})
    weight_map = {name: shard for shard, part in shards.items() for name in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return dest
