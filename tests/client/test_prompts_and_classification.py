"""Prompt tuning, p-tuning and sequence classification over the swarm == local transformers + PEFT;
training with a plain loop and with transformers.Trainer."""
import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptEncoderConfig, PromptTuningConfig
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainingArguments

from client import AutoDistributedModelForSequenceClassification, get_peft_model
from tests.peft_reference import greedy_by_forward, peft_generate_is_sound

PROMPT_CONFIGS = {
    "prompt-tuning": PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p-tuning-mlp": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32),
    "p-tuning-lstm": PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=32,
                                         encoder_reparameterization_type="LSTM"),
}


def batch():
    torch.manual_seed(4)
    ids = torch.randint(3, 256, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def local_with_scaled_prompts(ours, tiny_path, config, scale: float):
    """Local transformers + PEFT with ``config``, whose prompt-encoder weights, times ``scale`` (large
    enough to change what the model says), are loaded into ``ours`` too."""
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    weights = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    with torch.no_grad():
        for p in weights.values():
            p.mul_(scale)
    ours.adapter.encoder.load_state_dict(weights)
    return local


def same_prompt_weights(ours, local):
    state = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}
    ours.prompt.encoder.load_state_dict(state)
    return {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters() if "prompt_encoder" in k}


@pytest.mark.parametrize("method", list(PROMPT_CONFIGS))
def test_prompt_methods_gradients_and_saved_adapter_equal_local_peft(method, start_nodes, open_client, tiny_path,
                                                                   tmp_path):
    start_nodes("0:3", "3:6")
    config = PROMPT_CONFIGS[method]
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    local_params = same_prompt_weights(ours, local)
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ref.logits.shape == (3, 4 + 9, 256)  # virtual positions included, as PEFT
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.prompt.encoder.named_parameters():
        assert torch.allclose(p.grad, local_params[name].grad, atol=1e-5), name
    ours.save_pretrained(tmp_path / method)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                       tmp_path / method).eval()
    with torch.no_grad():
        assert torch.allclose(ours.eval()(input_ids=ids, attention_mask=mask).logits,
                              loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


def test_prompt_tuning_twenty_adamw_steps_equal_local(start_nodes, open_client, tiny_path):
    start_nodes("0:6")
    config = PROMPT_CONFIGS["prompt-tuning"]
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    local_params = same_prompt_weights(ours, local)
    ids, mask, labels = batch()
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, local)]
    losses = []
    for _ in range(20):
        for model, opt in zip((ours, local), opts):
            opt.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.allclose(ours.prompt.encoder.embedding.weight, local_params["embedding.weight"], atol=1e-5)


@pytest.fixture
def cls_client(bootstrap):
    from client import ClientConfig

    made = []

    def make(tiny_path, num_labels=3):
        ours = AutoDistributedModelForSequenceClassification.from_pretrained(
            str(tiny_path), num_labels=num_labels, client_config=ClientConfig(initial_peers=tuple(bootstrap)))
        made.append(ours)
        local = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=num_labels,
                                                                   dtype=torch.float32)
        with torch.no_grad():
            ours.score.weight.copy_(local.score.weight)  # the head is new in both: start them equal
        return ours, local

    yield make
    for m in made:
        m.close()


def test_sequence_classification_equals_local(start_nodes, cls_client, tiny_path):
    start_nodes("0:2", "2:6")
    ours, local = cls_client(tiny_path)
    ids, mask, _ = batch()
    labels = torch.tensor([0, 2, 1])
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (3, 3)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4) and torch.allclose(out.loss, ref.loss, atol=1e-5)


def test_classification_with_lora_trains_head_and_adapter_like_local_peft(start_nodes, cls_client, tiny_path):
    start_nodes("0:6")
    ours, local = cls_client(tiny_path)
    config = LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    ours = get_peft_model(ours, copy.deepcopy(config))
    local = local_get_peft_model(local, copy.deepcopy(config))
    with torch.no_grad():
        for b in ours.adapter.lora_B:
            b.normal_(0, 0.1)
        state = ours.adapter.peft_state_dict()
        for name, p in local.named_parameters():
            if "lora_" in name:
                p.copy_(state[name.replace(".default", "")])
    ids, mask, _ = batch()
    labels = torch.tensor([1, 0, 2])
    ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    local(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    head = dict(local.named_parameters())["base_model.model.score.modules_to_save.default.weight"]
    assert torch.allclose(ours.base_model.score.weight.grad, head.grad, atol=1e-5)
    local_a = {n.replace(".default", ""): p.grad for n, p in local.named_parameters() if "lora_A" in n}
    for (block, path), a in zip(ours.adapter.keys, ours.adapter.lora_A):
        assert torch.allclose(a.grad, local_a[f"base_model.model.model.layers.{block}.{path}.lora_A.weight"], atol=1e-5)


def test_trainer_trains_a_lora_adapter_through_the_swarm(start_nodes, open_client, tiny_path, tmp_path):
    start_nodes("0:3", "3:6")
    model = get_peft_model(open_client(tiny_path), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    ids, mask, labels = batch()
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(3)]  # one batch
    before = [b.detach().clone() for b in model.adapter.lora_B]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=3,
                             learning_rate=2e-2, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 8 and losses[-1] < losses[0] and result.global_step == 8
    assert all(not torch.equal(b0, b) for b0, b in zip(before, model.adapter.lora_B))


@pytest.mark.parametrize("projection", [False, True], ids=["prefix", "prefix-projection"])
def test_prefix_tuning_gradients_and_saved_adapter_equal_local_peft(projection, start_nodes, open_client, tiny_path,
                                                                  tmp_path):
    """Per-block key/value prefixes travel to the nodes; their gradients come back (GQA model)."""
    from peft import PrefixTuningConfig

    start_nodes("0:4", "3:6")
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                encoder_hidden_size=16)
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    local = local_get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                 copy.deepcopy(config))
    local_params = {k.replace("prompt_encoder.default.", ""): v for k, v in local.named_parameters()
                    if "prompt_encoder" in k}
    ours.adapter.encoder.load_state_dict(local_params)
    ids, mask, labels = batch()
    out = ours(input_ids=ids, attention_mask=mask, labels=labels)
    ref = local(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == ref.logits.shape == (3, 9, 256)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    out.loss.backward()
    ref.loss.backward()
    for name, p in ours.adapter.encoder.named_parameters():
        assert p.grad.abs().max() > 0 and torch.allclose(p.grad, local_params[name].grad, atol=1e-5), name
    ours.save_pretrained(tmp_path / "prefix")
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32),
                                       tmp_path / "prefix").eval()
    with torch.no_grad():
        assert torch.allclose(ours.eval()(input_ids=ids, attention_mask=mask).logits,
                              loaded(input_ids=ids, attention_mask=mask).logits, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning-mlp", "prefix"])
def test_prompt_adapters_generate_like_local_peft(method, start_nodes, open_client, tiny_path):
    """generate() with a prompt-tuning / p-tuning / prefix-tuning adapter == the local PEFT model's greedy
    continuation (its forward() re-run each step: tests/peft_reference.py says why not its generate()): a
    left-padded batch, then a two-turn session == continuing the concatenation locally."""
    from peft import PrefixTuningConfig

    start_nodes("0:3", "3:6")
    config = PROMPT_CONFIGS.get(method) or PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    torch.manual_seed(11)
    ours = get_peft_model(open_client(tiny_path), copy.deepcopy(config))
    local = local_with_scaled_prompts(ours, tiny_path, config, scale=8.0)
    ours.eval(), local.eval()
    offset = 0 if method == "prefix" else None  # prefix tuning: positions as generate() makes them from the mask
    ids, mask, _ = batch()
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = greedy_by_forward(local, ids, mask, 12, offset)
    with torch.no_grad():
        plain = local.get_base_model().generate(input_ids=ids, attention_mask=mask, **kwargs)
        if peft_generate_is_sound():
            assert torch.equal(local.generate(input_ids=ids, attention_mask=mask, **kwargs), ref)
    assert not torch.equal(ref, plain)  # the prompt matters, so this test can fail
    assert torch.equal(ours.generate(ids, attention_mask=mask, **kwargs), ref)

    first, second = ids[1:2, 3:], torch.tensor([[17, 23, 5]])
    turn1 = greedy_by_forward(local, first, None, 5, offset)
    both = greedy_by_forward(local, torch.cat([turn1, second], 1), None, 12, offset)
    with ours.inference_session(max_length=64) as session:
        assert torch.equal(ours.generate(first, session=session, max_new_tokens=5, do_sample=False, pad_token_id=0,
                                         eos_token_id=None), turn1)
        assert torch.equal(ours.generate(second, session=session, **kwargs), both)
