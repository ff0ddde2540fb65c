"""Remote blocks as a torch module: autograd flows through the swarm to the inputs."""
from __future__ import annotations

import torch
from torch import nn

from client.adapters import RemoteLora
from client.chain import LoraUse, RemoteChain


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask, positions, chain: RemoteChain, lora: LoraUse | None,
                *lora_params: torch.Tensor) -> torch.Tensor:
        out, trace = chain.forward(hidden.detach(), mask, positions, lora)
        ctx.chain, ctx.trace, ctx.mask, ctx.positions, ctx.lora = chain, trace, mask, positions, lora
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in, lora_grads = ctx.chain.backward(ctx.trace, ctx.mask, ctx.positions, grad.contiguous(), ctx.lora)
        params = ctx.lora.adapter.gradients(lora_grads) if ctx.lora is not None else []
        return (grad_in, None, None, None, None, *params)


class RemoteBlocks(nn.Module):
    """Every transformer block of the model, run by the swarm. Holds no weights."""

    def __init__(self, chain: RemoteChain):
        super().__init__()
        self.chain = chain
        self.lora: RemoteLora | None = None  # client-held LoRA weights the nodes apply, if any

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.lora is None:
            return _RemoteBlocksFunction.apply(hidden, attention_mask, position_ids, self.chain, None)
        use = LoraUse(self.lora, self.lora.next_dropout_seed(), self.lora.version())
        params = [*self.lora.lora_A, *self.lora.lora_B]
        return _RemoteBlocksFunction.apply(hidden, attention_mask, position_ids, self.chain, use, *params)
