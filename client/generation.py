"""Hugging Face ``generate()`` over the swarm: the KV cache lives on the nodes, inside a session.

``RemoteCache`` is a transformers ``Cache`` that holds no tensors: it stands for the session's
server-side caches, so generate() sends only the new positions each step. Positions and masks come
from transformers' own generation code, exactly as for a local model.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from transformers.cache_utils import Cache

from client.session import InferenceSession


class RemoteCache(Cache):
    """The cache of an InferenceSession, as transformers' generation code sees it."""

    is_compileable = False

    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

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
        return InferenceSession(self.chain, max_length + virtual, lora=self.model.layers.lora, prefix=prefix)

    def generate(self, inputs: torch.Tensor | None = None, *, session: InferenceSession | None = None,
                 **kwargs):
        """transformers' generate(), with the key/value cache kept by the nodes.

        With ``session``, ``inputs`` are the NEW tokens of the next turn; the result is the whole
        conversation so far (what generating from the concatenation locally would return)."""
        if kwargs.get("use_cache") is False or kwargs.get("past_key_values") is not None:
            return super().generate(inputs, **kwargs)  # stateless: every step recomputes the prefix
        ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if ids is None:
            raise ValueError("generate() over the swarm needs input_ids (inputs_embeds prompts are not supported yet)")
        mask = kwargs.pop("attention_mask", None)
        if mask is None:
            mask = torch.ones_like(ids)
        config = kwargs.get("generation_config") or self.generation_config
        if session is not None and max(kwargs.get("num_beams", config.num_beams) or 1, 1) > 1:
            raise ValueError("beam search inside an inference_session() is not supported: its caches would keep "
                             "num_beams rows per prompt; call generate(..., num_beams=N) without session=")
        if session is not None and session.token_ids is not None:
            ids = torch.cat([session.token_ids, ids], dim=1)
            mask = torch.cat([session.attention_mask, mask], dim=1)
        owner = nullcontext(session) if session is not None else self.inference_session(
            self._session_length(ids.shape[1], kwargs))
        with owner as sess:
            out = super().generate(ids, attention_mask=mask, past_key_values=RemoteCache(sess), **kwargs)
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
