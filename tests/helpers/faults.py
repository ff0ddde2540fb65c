"""A deliberately lying node, for the tests of the client's result verification (client/verify.py).

``faulty(std)`` wraps a node's honest servicer (``Node(config, wrap_servicer=faulty(0.1))``): every
tensor it answers with (Forward and inference-step outputs, Backward's input, LoRA and prefix gradients;
with ``backward_only`` only the latter) gets seeded Gaussian noise of that standard deviation added
before it leaves the node; with ``consistent`` the noise depends only on the tensor's shape, so the same
question always gets the same wrong answer (a colluding liar whose node ids agree with each other).
Production code knows nothing about it.
"""
from __future__ import annotations

from typing import Callable

import grpc
import torch

from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import FLOAT_DTYPES, deserialize, serialize


class FaultyServicer(pb_grpc.NodeServicer):
    def __init__(self, inner: pb_grpc.NodeServicer, std: float, backward_only: bool = False, seed: int = 0,
                 consistent: bool = False):
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.inner, self.std, self.backward_only, self.seed, self.consistent = inner, std, backward_only, seed, consistent
        self._rng = torch.Generator().manual_seed(seed)

    def _perturb(self, msg: pb.Tensor) -> None:
        t = deserialize(msg, name="answer", allowed=FLOAT_DTYPES, max_bytes=len(msg.data))
        if self.consistent:
            self._rng.manual_seed(self.seed)
        noise = torch.randn(t.shape, generator=self._rng) * self.std
        msg.CopyFrom(serialize((t.float() + noise).to(t.dtype)))

    async def Info(self, request, context):
        return await self.inner.Info(request, context)

    async def Forward(self, request, context):
        response = await self.inner.Forward(request, context)
        if not self.backward_only:
            self._perturb(response.hidden_states)
        return response

    async def Backward(self, request, context):
        response = await self.inner.Backward(request, context)
        self._perturb(response.grad_inputs)
        for module in response.lora_grads:
            self._perturb(module.a)
            self._perturb(module.b)
        if response.HasField("grad_prefix"):
            self._perturb(response.grad_prefix)
        return response

    async def Inference(self, requests, context):
        async for response in self.inner.Inference(requests, context):
            if not self.backward_only and response.HasField("hidden_states"):
                self._perturb(response.hidden_states)
            yield response


def faulty(std: float, backward_only: bool = False, consistent: bool = False
           ) -> Callable[[pb_grpc.NodeServicer], FaultyServicer]:
    """What ``Node(..., wrap_servicer=)`` takes: a node perturbing its answers by noise of ``std``."""
    return lambda inner: FaultyServicer(inner, std, backward_only, consistent=consistent)


class RefusingServicer(pb_grpc.NodeServicer):
    """A node that claims every request is bad (a status the client would book as its own mistake)."""

    def __init__(self, inner: pb_grpc.NodeServicer):
        self.inner = inner

    async def Info(self, request, context):
        return await self.inner.Info(request, context)

    async def Forward(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states contains NaN or infinity")

    async def Backward(self, request, context):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states contains NaN or infinity")

    async def Inference(self, requests, context):
        async for _ in requests:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states contains NaN or infinity")
        yield pb.InferenceResponse()  # never reached: makes this an async generator


class NoRelayServicer:
    """A node whose Relay endpoint is unreachable (a broken link between two live nodes): pushes to it fail,
    every other call is the honest node's."""

    def __init__(self, inner: pb_grpc.NodeServicer):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    async def Relay(self, requests, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "link down (test)")
        yield pb.ChainAck()  # never reached: makes this an async generator


class NaNServicer(FaultyServicer):
    """A node whose every answer is NaN."""

    def __init__(self, inner: pb_grpc.NodeServicer):
        super().__init__(inner, std=1.0)

    def _perturb(self, msg: pb.Tensor) -> None:
        t = deserialize(msg, name="answer", allowed=FLOAT_DTYPES, max_bytes=len(msg.data))
        msg.CopyFrom(serialize(torch.full_like(t, float("nan"))))


class HugeServicer(pb_grpc.NodeServicer):
    """A node whose every Forward answer declares (and carries) ``nbytes`` of float32 outputs, far more than
    any request can produce."""

    def __init__(self, inner: pb_grpc.NodeServicer, nbytes: int):
        self.inner, self.nbytes = inner, nbytes

    async def Info(self, request, context):
        return await self.inner.Info(request, context)

    async def Forward(self, request, context):
        return pb.ForwardResponse(hidden_states=self._huge(request.hidden_states))

    async def Inference(self, requests, context):
        async for response in self.inner.Inference(requests, context):
            if response.HasField("hidden_states"):
                response.hidden_states.CopyFrom(self._huge(response.hidden_states))
            yield response

    def _huge(self, like: pb.Tensor) -> pb.Tensor:
        width = like.shape[-1]
        rows = self.nbytes // (4 * width)
        return pb.Tensor(dtype="float32", shape=[1, rows, width], data=bytes(rows * width * 4))


def huge(nbytes: int) -> Callable[[pb_grpc.NodeServicer], HugeServicer]:
    """What ``Node(..., wrap_servicer=)`` takes: a node answering Forward with ``nbytes`` of outputs."""
    return lambda inner: HugeServicer(inner, nbytes)
