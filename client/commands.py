"""Client-side commands behind the `swarm` CLI: `swarm generate` streams text from the swarm.

Light at import (no torch): the CLI checks the options (``GenerateOptions.check``) before anything heavy
is imported or any peer is contacted."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, TextIO

SAMPLING_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}  # with --sample, unless given


@dataclass(frozen=True)
class GenerateOptions:
    """How `swarm generate` decodes; ``None`` means "not given" (so a sampling flag without --sample is caught)."""

    max_new_tokens: int = 32  # tokens to generate
    do_sample: bool = False  # sample instead of greedy / beam search
    temperature: float | None = None  # sampling temperature (only with do_sample)
    top_p: float | None = None  # nucleus sampling mass, in (0, 1] (only with do_sample)
    top_k: int | None = None  # sample among the k most likely tokens (only with do_sample)
    num_beams: int = 1  # beam search with this many beams (1: none)
    repetition_penalty: float | None = None  # > 1 discourages repeating tokens (transformers' meaning)
    seed: int | None = None  # random seed for sampling
    chat: bool = False  # wrap the prompt as a user message in the tokenizer's chat template

    def check(self) -> None:
        """ValueError (one line, for the CLI) for options that would be ignored or are out of range."""
        if self.max_new_tokens < 1:
            raise ValueError("--max-new-tokens must be positive")
        given = [f"--{n.replace('_', '-')}" for n in SAMPLING_DEFAULTS if getattr(self, n) is not None]
        if given and not self.do_sample:
            raise ValueError(f"{', '.join(given)} only apply with --sample (greedy decoding would ignore them)")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0 (0: no top-k filtering), got {self.top_k}")
        if self.num_beams < 1:
            raise ValueError(f"--num-beams must be >= 1, got {self.num_beams}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")

    def generate_kwargs(self) -> dict:
        """The keyword arguments of transformers' ``generate()`` these options mean."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update({n: d if getattr(self, n) is None else getattr(self, n) for n, d in SAMPLING_DEFAULTS.items()})
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs


class IncrementalPrinter:
    """A ``generate(streamer=...)`` that prints text as each token arrives, decoded by the tokenizer itself:
    the ids so far are decoded with special tokens skipped and only what is new is written. Nothing waits
    for a space (transformers' TextStreamer holds words back); only a trailing incomplete character (a
    byte-level token that ends inside a UTF-8 sequence decodes to U+FFFD) waits for the next token."""

    def __init__(self, tokenizer, out: TextIO | None = None, skip_prompt: bool = False):
        self.tokenizer, self.out, self.skip_prompt = tokenizer, out or sys.stdout, skip_prompt
        self.ids: list[int] = []
        self.shown = ""
        self._prompt_seen = False

    def put(self, value) -> None:
        """Called by generate() with the prompt's ids first, then with each new token."""
        if value.dim() > 1:
            if value.shape[0] != 1:
                raise ValueError("IncrementalPrinter prints one sequence (batch size 1, one beam)")
            value = value[0]
        first, self._prompt_seen = not self._prompt_seen, True
        if first and self.skip_prompt:
            return
        self.ids.extend(int(i) for i in value.tolist())
        self._show(final=False)

    def end(self) -> None:
        self._show(final=True)
        self.out.write("\n")
        self.out.flush()

    def _show(self, final: bool) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if (text.endswith("\ufffd") and not final) or not text.startswith(self.shown):
            return  # an incomplete character, or the tokenizer re-spelled earlier text: wait for more
        self.out.write(text[len(self.shown):])
        self.out.flush()
        self.shown = text


def load_tokenizer(model_path: str):
    """The checkpoint's own tokenizer; CheckpointError (one line) if it has none."""
    from transformers import AutoTokenizer

    from swarm.checkpoint import CheckpointError, no_weights, resolve_checkpoint

    folder = resolve_checkpoint(model_path, need_weights=no_weights, tokenizer=True)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise CheckpointError(f"{model_path} has no usable tokenizer: {str(e).splitlines()[0]}") from None


def encode_prompt(tokenizer, prompt: str, chat: bool):
    """``input_ids`` and ``attention_mask`` of the prompt; with ``chat``, a user message in the chat template."""
    import torch

    if not chat:
        encoded = tokenizer(prompt, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"]
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("--chat: this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    return ids, torch.ones_like(ids)


def open_model(model_path: str, initial_peers: Sequence[str], adapter: str | None, model_name: str | None,
               swarm_key: str | None, lan: bool, tls_ca: str | None, quantization: str = "none"):
    """The distributed model; ``adapter`` is a PEFT adapter folder (held here, e.g. `swarm finetune`'s output)
    or else the name of an adapter the nodes host (routes then use only nodes hosting it); ``quantization``:
    ClientConfig.quantization (which nodes routes use)."""
    from client.config import ClientConfig
    from client.model import AutoDistributedModelForCausalLM
    from client.peft import DistributedPeftModel

    local = adapter is not None and (Path(adapter) / "adapter_config.json").is_file()
    config = ClientConfig(adapter=None if local or adapter is None else adapter, quantization=quantization)
    model = AutoDistributedModelForCausalLM.from_pretrained(model_path, initial_peers=initial_peers,
                                                            model_name=model_name, swarm_key=swarm_key, lan=lan,
                                                            tls_ca=tls_ca, client_config=config)
    if not local:
        return model
    try:
        return DistributedPeftModel.from_pretrained(model, adapter)
    except BaseException:
        model.close()
        raise


def generate_text(model_path: str, initial_peers: Sequence[str], prompt: str, options: GenerateOptions, *,
                  adapter: str | None = None, model_name: str | None = None, swarm_key: str | None = None,
                  lan: bool = False, tls_ca: str | None = None, quantization: str = "none") -> str:
    """Generate from ``prompt`` through the swarm, printing text to stdout as tokens arrive (beam search
    prints it once done: beams are only settled at the end). The prompt is echoed, unless ``options.chat``."""
    import torch

    options.check()
    tokenizer = load_tokenizer(model_path)
    ids, mask = encode_prompt(tokenizer, prompt, options.chat)
    model = open_model(model_path, initial_peers, adapter, model_name, swarm_key, lan, tls_ca, quantization)
    with model:
        if options.seed is not None:
            torch.manual_seed(options.seed)
        streaming = options.num_beams == 1
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        streamer = IncrementalPrinter(tokenizer, skip_prompt=options.chat) if streaming else None
        out = model.generate(ids, attention_mask=mask, pad_token_id=pad, streamer=streamer,
                             **options.generate_kwargs())
        shown = out[0, ids.shape[1]:] if options.chat else out[0]
        if not streaming:
            printer = IncrementalPrinter(tokenizer)
            printer.put(shown.unsqueeze(0))
            printer.end()
        return tokenizer.decode(shown, skip_special_tokens=True)
