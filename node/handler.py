"""The gRPC servicer: protobuf <-> tensors only. Block math lives in node.blocks."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from node.blocks import SpanBlocks, backward_span, forward_span
from node.requests import Limits, RequestError, parse_backward, parse_forward
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import serialize
from swarm import __version__

log = logging.getLogger(__name__)


class NodeServicer(pb_grpc.NodeServicer):
    def __init__(self, blocks: SpanBlocks, limits: Limits, pool: ThreadPoolExecutor, throughput: float = 0.0):
        self.blocks, self.limits, self.pool = blocks, limits, pool
        self.throughput = throughput

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        return pb.InfoResponse(
            model=self.limits.model, start=self.limits.hosted.start, end=self.limits.hosted.end,
            dtype=str(self.blocks.dtype).removeprefix("torch."), version=__version__,
            hidden_size=self.limits.hidden_size, max_batch_tokens=self.limits.max_batch_tokens,
            throughput=self.throughput,
        )

    async def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardResponse:
        try:
            x = parse_forward(request, self.limits)
        except RequestError as e:
            await context.abort(e.code, str(e))
        out = await self._compute(context, self._forward, x)
        return pb.ForwardResponse(hidden_states=serialize(out))

    async def Backward(self, request: pb.BackwardRequest, context) -> pb.BackwardResponse:
        try:
            x, grad = parse_backward(request, self.limits)
        except RequestError as e:
            await context.abort(e.code, str(e))
        out = await self._compute(context, self._backward, x, grad)
        return pb.BackwardResponse(grad_inputs=serialize(out))

    def _forward(self, x) -> torch.Tensor:
        with torch.no_grad():
            out = forward_span(self.blocks, x.span, x.hidden, x.attention_mask, x.position_ids)
        return out.to(x.hidden.dtype)

    def _backward(self, x, grad) -> torch.Tensor:
        out = backward_span(self.blocks, x.span, x.hidden, grad, x.attention_mask, x.position_ids)
        return out.to(x.hidden.dtype)

    async def _compute(self, context, fn, *args) -> torch.Tensor:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        except Exception as e:  # a bug or an OOM in one request must not take the node down
            log.exception("request failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
