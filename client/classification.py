"""Sequence classification over the swarm: a client-side score head on the last real token."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast

from client import compat
from client.chain import RemoteChain
from client.config import ClientConfig, merge_client_config
from client.model import DistributedBaseModel, LeavesSwarm, load_distributed
from client.verify import Suspicion


class DistributedModelForSequenceClassification(LeavesSwarm, PreTrainedModel):
    """Like transformers' *ForSequenceClassification: pooled logits of the rightmost non-pad token."""

    config_class = PretrainedConfig
    base_model_prefix = "model"

    def __init__(self, config: PretrainedConfig, chain: RemoteChain):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = DistributedBaseModel(config, chain)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)

    @property
    def chain(self) -> RemoteChain:
        return self.model.layers.chain

    @property
    def suspicious_nodes(self) -> list[Suspicion]:
        """Nodes caught computing differently from others (with ``ClientConfig.verify_fraction``), oldest
        first; ``self.chain.verifier`` also counts the checks made."""
        return list(self.chain.verifier.suspicious)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                labels=None) -> SequenceClassifierOutputWithPast:
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds)
        logits = self.score(hidden)
        batch = logits.shape[0]
        pad = self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("batches of more than one need a pad_token_id in the config")
        if pad is None or input_ids is None:
            last = torch.full((batch,), -1)
        else:  # the rightmost token that is not padding: works with left and right padding
            real = (input_ids != pad).to(torch.int32)
            last = (torch.arange(input_ids.shape[-1], dtype=torch.int32) * real).argmax(-1)
        pooled = logits[torch.arange(batch), last]
        loss = None
        if labels is not None:
            loss = compat.sequence_classification_loss(self, logits, labels, pooled)
        return SequenceClassifierOutputWithPast(loss=loss, logits=pooled)


class AutoDistributedModelForSequenceClassification:
    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        num_labels: int = 2,
        initial_peers: Sequence[str] = (),
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        swarm_key: str | None = None,
        lan: bool = False,
        tls_ca: str | None = None,
    ) -> DistributedModelForSequenceClassification:
        """Client-side embeddings, norm and a ``num_labels`` score head (from the checkpoint if it has
        one, else freshly initialised as transformers does); blocks run in the swarm.
        ``swarm_key``: path of the key file of a private swarm; ``lan``: with no ``initial_peers``,
        find the swarm by listening for LAN announcements (opt-in); ``tls_ca``: the CA certificate of
        the swarm's TLS nodes; ``client_config``: every client setting, merged with those given here
        (a setting with two different values is a ValueError)."""
        config = merge_client_config(client_config, initial_peers=initial_peers, model_name=model_name,
                                     swarm_key=swarm_key, lan=lan, tls_ca=tls_ca)
        return load_distributed(
            DistributedModelForSequenceClassification, model, config, dtype,
            config_changes={"num_labels": num_labels},
            fresh={"score.weight": lambda w: nn.init.normal_(w, std=0.02)},
        )
