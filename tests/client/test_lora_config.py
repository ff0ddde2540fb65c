"""LoRA settings the swarm cannot run exactly are refused with their names, never approximated."""
import pytest
import torch
from peft import AdaLoraConfig, LoraConfig
from transformers import LlamaConfig

from client.adapters import RemoteLora

MODEL = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=64)
TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize("config, match", [
    (AdaLoraConfig(r=4, target_modules=TARGETS, total_step=10), "AdaLoraConfig is not supported"),
    (LoraConfig(r=4, target_modules=TARGETS, bias="all"), "bias='all'"),
    (LoraConfig(r=4, target_modules=TARGETS, rank_pattern={"q_proj": 8}), "rank_pattern"),
    (LoraConfig(r=4, target_modules=TARGETS, alpha_pattern={"q_proj": 2}), "alpha_pattern"),
    (LoraConfig(r=4, target_modules=TARGETS, layers_to_transform=[0]), "layers_to_transform"),
    (LoraConfig(r=4, target_modules=TARGETS, modules_to_save=["lm_head"]), "modules_to_save"),
    (LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"), "needs the base weights"),
])
def test_inexact_configs_are_refused(config, match):
    with pytest.raises((TypeError, ValueError), match=match):
        RemoteLora(MODEL, config)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_initialisations_as_peft_does_them(init):
    torch.manual_seed(0)
    lora = RemoteLora(MODEL, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init,
                                        use_rslora=True))
    assert lora.scaling == 8 / 2  # rsLoRA: alpha / sqrt(r)
    b_zero = all(not b.any() for b in lora.lora_B)
    assert b_zero is (init is not False)
    spread = torch.cat([a.flatten() for a in lora.lora_A]).std().item()
    fan_in = MODEL.hidden_size
    assert spread == pytest.approx(1 / 4 if init == "gaussian" else (1 / (3 * fan_in)) ** 0.5, rel=0.2)
