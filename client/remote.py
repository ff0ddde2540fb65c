"""Remote blocks as a torch module: autograd flows through the swarm to the inputs."""
from __future__ import annotations

import torch
from torch import nn

from client.chain import RemoteChain


class _RemoteBlocksFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, mask, positions, chain: RemoteChain) -> torch.Tensor:
        out, trace = chain.forward(hidden.detach(), mask, positions)
        ctx.chain, ctx.trace, ctx.mask, ctx.positions = chain, trace, mask, positions
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in = ctx.chain.backward(ctx.trace, ctx.mask, ctx.positions, grad.contiguous())
        return grad_in, None, None, None


class RemoteBlocks(nn.Module):
    """Every transformer block of the model, run by the swarm. Holds no weights."""

    def __init__(self, chain: RemoteChain):
        super().__init__()
        self.chain = chain

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return _RemoteBlocksFunction.apply(hidden, attention_mask, position_ids, self.chain)
