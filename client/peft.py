"""PEFT-style fine-tuning of a distributed model: the client owns every trainable parameter.

``get_peft_model(model, LoraConfig(...))`` accepts PEFT's own config objects and returns a model
whose ``save_pretrained`` writes an adapter in PEFT's own format (``adapter_config.json`` +
``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(local_model, dir)`` loads.
"""
from __future__ import annotations

from pathlib import Path

import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig
from safetensors.torch import load_file, save_file
from torch import nn

from client import compat
from client.adapters import ClientAdapter, RemoteLora
from client.adalora import RemoteAdaLora
from client.ia3 import RemoteIA3
from client.classification import DistributedModelForSequenceClassification
from client.model import DistributedModelForCausalLM
from client.prompts import RemotePrefix, RemotePrompt

ADAPTER_WEIGHTS = "adapter_model.safetensors"
SCORE_KEY = "base_model.model.score.weight"  # where PEFT saves a SEQ_CLS head (modules_to_save)


DistributedModel = DistributedModelForCausalLM | DistributedModelForSequenceClassification


class DistributedPeftModel(nn.Module):
    """A distributed causal LM with a client-held adapter; frozen everywhere else."""

    def __init__(self, model: DistributedModel, peft_config: PeftConfig, init_weights: bool = True):
        """``init_weights=False``: weights that need the base model to start (DoRA's magnitudes) are left unset,
        for ``from_pretrained`` to load."""
        super().__init__()
        self.base_model = model
        self.peft_config = peft_config
        model.requires_grad_(False)
        if isinstance(model, DistributedModelForSequenceClassification):
            model.score.requires_grad_(True)  # the head trains with the adapter, as PEFT's SEQ_CLS task does
        self.prompt: RemotePrompt | None = None
        if isinstance(peft_config, AdaLoraConfig):  # before LoraConfig: AdaLoraConfig is one
            model.model.layers.lora = RemoteAdaLora(model.config, peft_config, loaded=not init_weights)
        elif isinstance(peft_config, LoraConfig):
            model.model.layers.lora = RemoteLora(model.config, peft_config)
            if peft_config.use_dora and init_weights:
                from client.dora import init_magnitudes

                init_magnitudes(model.model.layers.lora, model.config)
        elif isinstance(peft_config, IA3Config):
            model.model.layers.lora = RemoteIA3(model.config, peft_config)
        elif isinstance(peft_config, (PromptTuningConfig, PromptEncoderConfig)):
            self.prompt = RemotePrompt(model.config, peft_config, model.get_input_embeddings())
        elif isinstance(peft_config, PrefixTuningConfig):
            model.model.layers.prefix = RemotePrefix(model.config, peft_config)
        else:
            raise TypeError(f"{type(peft_config).__name__} is not supported over the swarm; use LoraConfig, "
                            "AdaLoraConfig, IA3Config, PromptTuningConfig, PromptEncoderConfig or PrefixTuningConfig")

    @property
    def chain(self):
        """The base model's connection to the swarm."""
        return self.base_model.chain

    @property
    def suspicious_nodes(self):
        return self.base_model.suspicious_nodes

    def close(self) -> None:
        """Leave the swarm (the base model's connection); a second close() does nothing."""
        self.base_model.close()

    def __enter__(self) -> "DistributedPeftModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def adapter(self) -> ClientAdapter | RemotePrompt | RemotePrefix:
        layers = self.base_model.model.layers
        return self.prompt or layers.prefix or layers.lora

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, labels=None,
                logits_to_keep: int = 0):
        if self.prompt is not None:  # logits include the virtual positions, as PEFT's do
            if inputs_embeds is None:
                inputs_embeds = self.base_model.get_input_embeddings()(input_ids)
            inputs_embeds, attention_mask, labels = self.prompt.extend(inputs_embeds, attention_mask, labels)
            input_ids = position_ids = None
        extra = {"logits_to_keep": logits_to_keep} if isinstance(self.base_model, DistributedModelForCausalLM) else {}
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              inputs_embeds=inputs_embeds, labels=labels, **extra)
        if isinstance(self.adapter, RemoteAdaLora) and out.loss is not None and self.peft_config.task_type:
            # AdaLoRA's orthogonal regularisation joins the loss as PEFT's task models (PeftModelForCausalLM, ...)
            # add it; PEFT's plain PeftModel (no task_type) calls the transformers model directly and adds none
            out.loss = out.loss + self.peft_config.orth_reg_weight * self.adapter.orthogonal_regularization()
        return out

    def update_and_allocate(self, global_step: int) -> None:
        """AdaLoRA: update importances and the rank budget (PEFT's ``model.base_model.update_and_allocate``);
        call after optimizer.step() and before zero_grad()."""
        if not isinstance(self.adapter, RemoteAdaLora):
            raise TypeError("update_and_allocate is AdaLoRA's; this model's adapter is another method")
        self.adapter.update_and_allocate(global_step)

    def generate(self, *args, **kwargs):
        """generate() with the adapter, giving the tokens PEFT's generate() gives: LoRA (DoRA, IA3) weights go to every
        node of the session; prompt-tuning and p-tuning prompts are prepended when a session starts (their
        keys and values then stay in the nodes' caches); prefix-tuning keys/values start every node's cache."""
        if isinstance(self.adapter, ClientAdapter):
            return self.base_model.generate(*args, **kwargs)
        if kwargs.get("use_cache") is False:
            raise ValueError("prompt and prefix adapters generate with the nodes' caches only (use_cache=True)")
        base = self.base_model
        original = base.prepare_inputs_for_generation

        def prepare(*args, **kwargs):  # named **kwargs: generate() inspects this signature
            return self._peft_inputs(original(*args, **kwargs))

        base.prepare_inputs_for_generation = prepare
        try:
            if kwargs.get("session") is not None:
                return base.generate(*args, **kwargs)
            ids = args[0] if args else kwargs.get("input_ids")
            if ids is None:
                raise ValueError("generate() over the swarm needs input_ids")
            with self.inference_session(base._session_length(ids.shape[1], kwargs)) as session:
                return base.generate(*args, session=session, **kwargs)
        finally:
            del base.prepare_inputs_for_generation  # back to the class's method

    def _peft_inputs(self, inputs: dict) -> dict:
        """One generation step's model inputs, changed as PEFT changes them for prompt and prefix methods."""
        compat.drop_cache_position(inputs)
        if self.prompt is None:  # prefix tuning: positions continue after the prefix, as PEFT shifts them
            if inputs.get("position_ids") is not None:
                inputs["position_ids"] = inputs["position_ids"] + self.adapter.num_virtual_tokens
            return inputs
        inputs["position_ids"] = None  # PEFT drops them: positions run on from the cache, padding or not
        session = compat.model_inputs_cache(inputs).session
        if session.position == 0:  # the session starts: its first positions are the virtual tokens
            ids, mask = inputs.pop("input_ids"), inputs.get("attention_mask")
            embeds = self.base_model.get_input_embeddings()(ids)
            inputs["inputs_embeds"], inputs["attention_mask"], _ = self.prompt.extend(embeds, mask, None)
            inputs["input_ids"], session.virtual = None, self.prompt.num_virtual_tokens
        return inputs

    def inference_session(self, max_length: int):
        """A session for ``max_length`` tokens (room for the adapter's virtual positions is added)."""
        extra = self.prompt.num_virtual_tokens if self.prompt is not None else 0  # the base adds a prefix's own
        return self.base_model.inference_session(max_length + extra)

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        """Like PEFT's; 'all params' counts what the client holds (the blocks live on the nodes)."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params (client-side): {total:,d} "
              f"|| trainable%: {100 * trainable / total:.4f}")

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the adapter in PEFT's own format."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.peft_config.base_model_name_or_path = self.base_model.config.name_or_path or None
        self.peft_config.save_pretrained(str(directory))
        save_file(self._state_dict_to_save(), str(directory / ADAPTER_WEIGHTS))

    def _state_dict_to_save(self) -> dict[str, torch.Tensor]:
        state = self.adapter.peft_state_dict()
        if isinstance(self.base_model, DistributedModelForSequenceClassification):
            state[SCORE_KEY] = self.base_model.score.weight.detach().contiguous()
        return state

    @classmethod
    def from_pretrained(cls, model: DistributedModel, directory: str | Path,
                        is_trainable: bool = False) -> "DistributedPeftModel":
        """Load a PEFT adapter (trained here or locally with PEFT) onto a distributed model."""
        directory = Path(directory)
        config = PeftConfig.from_pretrained(str(directory))
        if isinstance(config, AdaLoraConfig):  # as PEFT loads it: the rank allocator only for a trainable adapter
            config.inference_mode = not is_trainable
        peft = cls(model, config, init_weights=False)
        state = load_file(str(directory / ADAPTER_WEIGHTS))
        if isinstance(model, DistributedModelForSequenceClassification) and SCORE_KEY in state:
            with torch.no_grad():
                model.score.weight.copy_(state.pop(SCORE_KEY))
            model.score.requires_grad_(is_trainable)
        if not isinstance(peft.adapter, ClientAdapter):
            peft.adapter.load_peft_state_dict(state, is_trainable)
        else:
            peft.adapter.load_peft_state_dict(state)
            peft.adapter.requires_grad_(is_trainable)
        return peft.train(is_trainable)


def get_peft_model(model: DistributedModel, peft_config: PeftConfig) -> DistributedPeftModel:
    """Attach a fresh, trainable client-held adapter described by a PEFT config."""
    if not isinstance(model, (DistributedModelForCausalLM, DistributedModelForSequenceClassification)):
        raise TypeError("get_peft_model here takes a model from AutoDistributedModelFor*.from_pretrained")
    return DistributedPeftModel(model, peft_config)
