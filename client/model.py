"""The user's model: embeddings, final norm and LM head held locally; every block runs in the swarm."""
from __future__ import annotations

import copy
import logging
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from client import compat
from client.chain import RemoteChain
from client.config import ClientConfig, merge_client_config
from client.generation import RemoteCache, RemoteGenerationMixin
from client.remote import RemoteBlocks
from client.verify import Suspicion
from swarm.arch import LEARNED, get_family, is_block_weight
from swarm.checkpoint import CheckpointError, load_config, read_tensors, resolve_checkpoint
from swarm.identity import MANIFEST, weights_check
from swarm.spans import Span
from swarm.records import default_model_name, model_key

log = logging.getLogger(__name__)


def client_modules(config: PretrainedConfig) -> dict[str, nn.Module | None]:
    """The family's own client-side modules, made by transformers' base model class of the family built
    with no decoder layers: ``embed_tokens`` (input embeddings with their scaling, e.g. Gemma's
    sqrt(hidden_size)), ``positions`` (learned position embeddings, GPT-2) and ``embed_norm`` (a norm
    over the embeddings, BLOOM), or None, and ``norm``. Built on the CPU even inside a meta-device
    context (non-persistent buffers such as an embedding scale are not in the checkpoint), without
    random init (the weights are loaded next)."""
    family = get_family(config)
    layerless = copy.deepcopy(config)
    layerless.num_hidden_layers = 0
    with torch.device("cpu"), compat.no_init_weights():
        base = family.base_model_cls(layerless)
    part = lambda name: getattr(base, name) if name else None  # noqa: E731
    return {"embed_tokens": part(family.embed), "positions": part(family.learned_positions),
            "embed_norm": part(family.embed_norm), "norm": part(family.norm)}


class DistributedBaseModel(nn.Module):
    """Embeddings (with learned positions and an embedding norm, for the families that have them) ->
    remote blocks -> final norm."""

    def __init__(self, config: PretrainedConfig, chain: RemoteChain):
        super().__init__()
        parts = client_modules(config)
        self.embed_tokens, self.norm = parts["embed_tokens"], parts["norm"]
        self.positions, self.embed_norm = parts["positions"], parts["embed_norm"]
        self.learned = get_family(config).positions == LEARNED
        self.layers = RemoteBlocks(chain)

    def embed(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """What the family's base model does to the input embeddings before its first block (GPT-2 adds
        learned positions, BLOOM normalises); nothing for most families."""
        if self.positions is not None:
            inputs_embeds = inputs_embeds + self.positions(position_ids)
        return self.embed_norm(inputs_embeds) if self.embed_norm is not None else inputs_embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                cache: RemoteCache | None = None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if cache is not None:  # a generation step: only new positions; the nodes hold the past
            new = inputs_embeds.shape[1]
            mask = attention_mask[:, -new:] if attention_mask is not None else None
            if position_ids is None and self.learned:  # what the session would send: after the cached positions
                position_ids = torch.arange(cache.session.position, cache.session.position + new).unsqueeze(0)
            hidden = self.embed(inputs_embeds, position_ids)
            return self.norm(cache.session.step(hidden, mask, position_ids))
        if position_ids is None:  # what local transformers does: after the cache (a prefix-tuning prefix)
            offset = self.layers.prefix_length
            position_ids = torch.arange(offset, offset + inputs_embeds.shape[1]).unsqueeze(0)
        hidden = self.layers(self.embed(inputs_embeds, position_ids), attention_mask, position_ids)
        return self.norm(hidden)


class LeavesSwarm:
    """``close()`` and ``with model:`` for every model wrapper holding a swarm connection (``self.chain``)."""

    def close(self) -> None:
        """Leave the swarm: close connections and the client's DHT peer. A second close() does nothing."""
        self.chain.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DistributedModelForCausalLM(LeavesSwarm, RemoteGenerationMixin, PreTrainedModel, GenerationMixin):
    """A causal LM whose transformer blocks are served by the swarm."""

    config_class = PretrainedConfig
    base_model_prefix = "model"
    _tied_weights_keys = compat.TIED_WEIGHTS_KEYS

    def __init__(self, config: PretrainedConfig, chain: RemoteChain):
        super().__init__(config)
        self.model = DistributedBaseModel(config, chain)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

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

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        cache: RemoteCache | None = None,
        past_key_values: RemoteCache | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
    ) -> CausalLMOutputWithPast:
        """Like a transformers causal LM. During generate() the cache is a RemoteCache, passed as
        ``cache`` (transformers >= 5.24) or ``past_key_values`` (older; either name is accepted);
        ``use_cache`` and ``return_dict`` are accepted for API compatibility (outputs are always dicts)."""
        remote = compat.pop_cache({"cache": cache, "past_key_values": past_key_values})
        if remote is not None and not isinstance(remote, RemoteCache):
            raise TypeError("the cache must be a RemoteCache (the nodes hold the keys and values)")
        hidden = self.model(input_ids, attention_mask, position_ids, inputs_embeds, remote)
        keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        logits = self.logits(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = compat.causal_lm_loss(self, logits, labels, self.config.vocab_size)
        return compat.causal_lm_output(loss, logits, remote)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head and what the family's causal LM does after it (Gemma's final-logit soft-cap)."""
        logits = self.lm_head(hidden)
        field = get_family(self.config).logit_softcap
        cap = getattr(self.config, field, None) if field else None
        return compat.soft_cap(logits, cap) if cap is not None else logits


def load_distributed(
    model_cls: type[PreTrainedModel],
    model: str,
    client_config: ClientConfig,
    dtype: torch.dtype,
    config_changes: dict | None = None,
    fresh: dict[str, Callable[[torch.Tensor], None]] | None = None,
    revision: str | None = None,
) -> PreTrainedModel:
    """Build ``model_cls`` holding only the client-side weights of checkpoint ``model`` and join the swarm.

    ``fresh`` names weights a checkpoint may lack (e.g. a classification head) and how to initialise them.
    From the hub (``revision``: a branch, tag or commit) only the shards holding those weights come, with
    the config and the tokenizer's files.
    """
    folder = resolve_checkpoint(model, need_weights=_client_side, revision=revision, tokenizer=True)
    shell = build_client_model(model_cls, folder, dtype, config_changes, fresh)
    key = model_key(client_config.model_name or default_model_name(model), shell.config)
    num_blocks = shell.config.num_hidden_layers
    weights = weights_check(folder, Span(0, num_blocks), get_family(shell.config).layer_prefix)
    if weights is None:
        log.warning("%s holds neither the block weights nor their hashes (%s, or the hashes the hub published): "
                    "nodes serving other weights under this model's name cannot be told apart", folder, MANIFEST)
    shell.model.layers.chain = RemoteChain(client_config, key, num_blocks, weights)
    return shell


def _client_side(name: str) -> bool:
    return not is_block_weight(name)


def build_client_model(
    model_cls: type[PreTrainedModel],
    folder,
    dtype: torch.dtype,
    config_changes: dict | None = None,
    fresh: dict[str, Callable[[torch.Tensor], None]] | None = None,
) -> PreTrainedModel:
    """``model_cls`` from checkpoint ``folder`` with its client-side weights loaded and no chain yet
    (``model.model.layers.chain`` is set by the caller: the swarm's RemoteChain)."""
    model_config = load_config(folder)
    for name, value in (config_changes or {}).items():
        setattr(model_config, name, value)
    names = get_family(model_config).client_names()
    with torch.device("meta"):
        shell = model_cls(model_config, chain=None)
    wanted = set(shell.state_dict())
    read = read_tensors(folder, _client_side, dtype)
    tensors = {name: v for name, v in ((_client_name(k, names), v) for k, v in read.items()) if name in wanted}
    tied = getattr(model_config, "tie_word_embeddings", False) and "lm_head.weight" in wanted
    if tied:
        tensors.setdefault("lm_head.weight", tensors.get("model.embed_tokens.weight"))
    for name, init in (fresh or {}).items():
        if tensors.get(name) is None:
            tensors[name] = torch.empty(shell.state_dict()[name].shape, dtype=dtype)
            init(tensors[name])
    missing = sorted(k for k in wanted if tensors.get(k) is None)
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {missing}")
    shell.load_state_dict(tensors, assign=True, strict=True)
    if tied:
        shell.lm_head.weight = shell.model.embed_tokens.weight
    return shell.eval()


def _client_name(name: str, names: dict[str, str]) -> str:
    """The client model's name of checkpoint tensor ``name`` (``transformer.wte.weight`` ->
    ``model.embed_tokens.weight``); other names (a classification head) unchanged."""
    for checkpoint, ours in names.items():
        if name.startswith(checkpoint):
            return ours + name[len(checkpoint):]
    return name


class AutoDistributedModelForCausalLM:
    """Entry point, like transformers' Auto classes: picks the family from the checkpoint's config."""

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        initial_peers: Sequence[str] = (),
        model_name: str | None = None,
        dtype: torch.dtype = torch.float32,
        client_config: ClientConfig | None = None,
        swarm_key: str | None = None,
        lan: bool = False,
        tls_ca: str | None = None,
        revision: str | None = None,
    ) -> DistributedModelForCausalLM:
        """Load embeddings, final norm and LM head of ``model`` (never block weights) and join the swarm.

        ``client_config``: every client setting; ``initial_peers``, ``model_name``, ``swarm_key`` and ``tls_ca``
        given here as well are merged into it (the same setting with two different values is a ValueError).
        ``swarm_key``: path of the key file of a private swarm.
        ``lan``: with no ``initial_peers``, find the swarm by listening for LAN announcements (opt-in).
        ``tls_ca``: path of the CA certificate of the swarm's TLS nodes (``swarm tls-cert``).
        ``revision``: with a hub id, the branch, tag or commit to download (None: the default branch).
        """
        config = merge_client_config(client_config, initial_peers=initial_peers, model_name=model_name,
                                     swarm_key=swarm_key, lan=lan, tls_ca=tls_ca)
        return load_distributed(DistributedModelForCausalLM, model, config, dtype, revision=revision)
