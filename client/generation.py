"""Hugging Face ``generate()`` over the swarm: the KV cache lives on the nodes, inside a session.

``RemoteCache`` is a transformers ``Cache`` that holds no tensors: it stands for the session's
server-side caches, so generate() sends only the new positions each step. Positions and masks come
from transformers' own generation code, exactly as for a local model.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache

from client import compat
from client.session import InferenceSession


class RemoteCache(Cache):
    """The cache of an InferenceSession, as transformers' generation code sees it.

    It holds no layers, so every property generate() consults is declared here rather than inherited
    (the base class would answer from an empty layer list: ``all([])`` is True, so a cache "of linear
    layers only" would make generate() re-send a whole conversation). ``tests/test_contract.py`` fails
    when a transformers release consults anything this class does not declare itself."""

    # what the nodes' caches are: full attention key/value caches, one per block, that can be cropped
    # (rejected drafts) and reordered (beams), never compiled or initialised ahead of time
    is_compileable = False
    supports_early_init = False

    def __init__(self, session: InferenceSession):
        compat.init_layerless_cache(self)
        self.session = session

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # attention layers: generate() slices the prompt by get_seq_length()

    @property
    def is_sliding(self) -> list[bool]:
        return [False]  # the nodes keep every position (masks apply any window)

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def is_croppable(self) -> bool:
        return True  # crop() drops positions on every node with the next step

    @property
    def is_initialized(self) -> bool:
        return self.session.batch_size is not None

    @property
    def batch_size(self) -> int:
        return self.session.batch_size if self.session.batch_size is not None else -1

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """Tokens the nodes hold: generate() slices input_ids with it (virtual prompt positions excluded)."""
        return self.session.position - self.session.virtual

    def __len__(self) -> int:
        return 0

    def crop(self, tokens_to_remove: int) -> None:
        """Assisted decoding: forget rejected draft tokens (negative: that many latest tokens; positive:
        keep that many tokens, transformers' older meaning)."""
        held = self.get_seq_length()
        self.session.crop(-tokens_to_remove if tokens_to_remove <= 0 else max(0, held - tokens_to_remove))

    def activate_past_recording(self) -> None:
        """Assisted decoding asks windowed layers to keep what a crop may need: the nodes keep every
        position anyway (node.blocks.new_cache), so there is nothing to switch on."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the nodes' cache rows follow the chosen beams (sent with the next step)."""
        self.session.reorder(beam_idx)


class RemoteGenerationMixin:
    """``inference_session()`` and a session-aware ``generate()`` for the distributed models."""

    def inference_session(self, max_length: int) -> InferenceSession:
        """Open a session holding up to ``max_length`` tokens on every node of its route.

        Pass it to ``generate(..., session=sess)`` to continue a conversation: each call sends only
        the tokens the nodes have not seen yet."""
        prefix = self.model.layers.prefix  # a prefix-tuning adapter's keys/values start every node's cache
        virtual = prefix.num_virtual_tokens if prefix is not None else 0
        return InferenceSession(self.chain.link, max_length + virtual, lora=self.model.layers.lora, prefix=prefix)

    def generate(self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None,
                 **kwargs):
        """transformers' generate(), with the key/value cache kept by the nodes.

        With ``session``, ``inputs`` are the NEW tokens of the next turn; the result is the whole
        conversation so far (what generating from the concatenation locally would return)."""
        if kwargs.get("use_cache") is False or any(kwargs.get(name) is not None for name in compat.CACHE_NAMES):
            return super().generate(inputs, **kwargs)  # stateless (every step recomputes), or the caller's cache
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is None:
            raise ValueError("generate() over the swarm needs input_ids (inputs_embeds prompts are not supported yet)")
        mask = kwargs.pop("attention_mask", None)
        config = kwargs.get("generation_config") or self.generation_config
        if mask is None:  # what generate() infers: pad tokens masked out (and its warnings)
            mask = compat.generation_attention_mask(self, ids, config, kwargs)
        if session is not None and max(kwargs.get("num_beams", config.num_beams) or 1, 1) > 1:
            raise ValueError("beam search inside an inference_session() is not supported: its caches would keep "
                             "num_beams rows per prompt; call generate(..., num_beams=N) without session=")
        if session is not None and session.token_ids is not None:
            ids = torch.cat([session.token_ids, ids], dim=1)
            mask = torch.cat([session.attention_mask, mask], dim=1)
        owner = nullcontext(session) if session is not None else self.inference_session(
            self._session_length(ids.shape[1], kwargs))
        with owner as sess:
            out = super().generate(ids, attention_mask=mask, **compat.cache_kwargs(RemoteCache(sess)), **kwargs)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            sess.token_ids = sequences
            sess.attention_mask = torch.cat(
                [mask, mask.new_ones(mask.shape[0], sequences.shape[1] - mask.shape[1])], dim=1)
        return out

    def _session_length(self, prompt_length: int, kwargs: dict) -> int:
        """Positions a generate() call may need: the prompt, the new tokens and, with assisted decoding
        (drafts checked in one step, rejected ones dropped), room for a last draft past the end."""
        config = kwargs.get("generation_config") or self.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        length = max(kwargs.get("max_length", config.max_length), prompt_length + 1) if new is None \
            else prompt_length + new
        lookup = kwargs.get("prompt_lookup_num_tokens", config.prompt_lookup_num_tokens)
        if lookup:
            length += lookup + 1
        elif kwargs.get("assistant_model") is not None:
            length += int(kwargs.get("num_assistant_tokens", config.num_assistant_tokens) or 0) + 1
        return length
