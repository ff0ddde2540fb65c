"""Remote blocks as a torch module: autograd flows through the swarm to the inputs."""
from __future__ import annotations

import torch
from torch import nn

from client.adapters import ClientAdapter
from client.chain import LoraUse, RemoteChain
from client.prompts import RemotePrefix


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask, positions, chain: RemoteChain, lora: LoraUse | None,
                prefix: torch.Tensor | None, for_backward: bool, *lora_params: torch.Tensor) -> torch.Tensor:
        prefix = prefix.detach() if prefix is not None else None
        out, passed = chain.forward(hidden.detach(), mask, positions, lora, prefix, for_backward)
        ctx.chain, ctx.trace, ctx.mask, ctx.positions, ctx.lora, ctx.prefix = chain, passed, mask, positions, lora, prefix
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in, lora_grads, grad_prefix = ctx.chain.backward(ctx.trace, ctx.mask, ctx.positions, grad.contiguous(),
                                                              ctx.prefix)
        params = ctx.lora.adapter.gradients(lora_grads) if ctx.lora is not None else []
        return (grad_in, None, None, None, None, grad_prefix, None, *params)


class RemoteBlocks(nn.Module):
    """Every transformer block of the model, run by the swarm. Holds no weights."""

    def __init__(self, chain: RemoteChain):
        super().__init__()
        self.chain = chain
        self.lora: ClientAdapter | None = None  # client-held LoRA / DoRA / IA3 / AdaLoRA weights the nodes apply, if any
        self.prefix: RemotePrefix | None = None  # client-held prefix-tuning keys/values, if any

    @property
    def prefix_length(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        prefix = None
        if self.prefix is not None:  # the nodes attend over the virtual positions first, as PEFT does
            batch, seq = hidden.shape[:2]
            prefix = self.prefix.key_values(batch)
            if attention_mask is None:
                attention_mask = torch.ones(batch, seq, dtype=torch.int64)
            attention_mask = torch.cat([attention_mask.new_ones(batch, self.prefix_length), attention_mask], dim=1)
        params = self.lora.wire_tensors() if self.lora is not None else []
        # will a backward pass follow? then nodes keep this pass's activations instead of recomputing
        for_backward = torch.is_grad_enabled() and any(
            t.requires_grad for t in [hidden, *params, *([prefix] if prefix is not None else [])])
        if self.lora is None:
            return _RemoteBlocksFunction.apply(hidden, attention_mask, position_ids, self.chain, None, prefix,
                                               for_backward)
        use = LoraUse(self.lora, self.lora.next_dropout_seed(), self.lora.version())
        return _RemoteBlocksFunction.apply(hidden, attention_mask, position_ids, self.chain, use, prefix,
                                           for_backward, *params)
