"""Async gRPC calls to nodes. Lives entirely on the client's event loop thread."""
from __future__ import annotations

import grpc
import torch

from client.auth import auth_interceptors
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from proto.tensors import FLOAT_DTYPES, TensorError, deserialize, serialize
from swarm.keys import SwarmKey
from swarm.spans import Span

# Ping idle connections so a blackholed node is noticed in seconds, not at a long deadline.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Statuses that mean the request was wrong (or too large for the node's limits), not that the node
# failed: never ban a node for these, and do not retry the same request elsewhere.
CLIENT_FAULTS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
})


class RemoteCallError(RuntimeError):
    """A node answered with an error status (or not at all)."""

    def __init__(self, address: str, code: grpc.StatusCode | None, message: str):
        super().__init__(f"node {address}: {code.name if code else 'ERROR'}: {message}")
        self.address, self.code, self.message = address, code, message

    @property
    def client_fault(self) -> bool:
        return self.code in CLIENT_FAULTS


class Connections:
    """One channel per node address, created lazily on the running loop."""

    def __init__(self, swarm_key: SwarmKey | None = None) -> None:
        self.swarm_key = swarm_key  # with a key, every call carries a proof of it (a private swarm)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pb_grpc.NodeStub] = {}
        self.bytes_sent = 0  # serialized request bytes of successful calls (benchmarks read these)
        self.bytes_received = 0

    def stub(self, address: str) -> pb_grpc.NodeStub:
        if address not in self._stubs:
            self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS, interceptors=auth_interceptors(self.swarm_key, address))
            self._stubs[address] = pb_grpc.NodeStub(self._channels[address])
        return self._stubs[address]

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._stubs.clear()


def forward_request(model: str, span: Span, hidden: torch.Tensor, mask: torch.Tensor | None,
                    positions: torch.Tensor | None, lora: pb.LoraAdapter | None = None,
                    adapter_name: str | None = None, prefix: torch.Tensor | None = None) -> pb.ForwardRequest:
    req = pb.ForwardRequest(model=model, start=span.start, end=span.end, hidden_states=serialize(hidden),
                            adapter_name=adapter_name or "")
    if prefix is not None:  # this hop's slice of the prefix-tuning keys/values
        req.prefix.CopyFrom(serialize(prefix[span.start:span.end].detach()))
    if lora is not None:
        req.lora.CopyFrom(lora)
    if mask is not None:
        req.attention_mask.CopyFrom(serialize(mask))
    if positions is not None:
        req.position_ids.CopyFrom(serialize(positions))
    return req


def decode_tensor(address: str, msg: pb.Tensor, like: torch.Tensor) -> torch.Tensor:
    try:
        out = deserialize(msg, name="response", allowed=FLOAT_DTYPES, max_bytes=like.numel() * 4, ndim=like.dim())
    except TensorError as e:
        raise RemoteCallError(address, None, f"malformed response: {e}") from None
    if out.shape != like.shape:
        raise RemoteCallError(address, None, f"response shape {list(out.shape)} != expected {list(like.shape)}")
    return out.to(like.dtype)


async def call_forward(conns: Connections, address: str, req: pb.ForwardRequest, like: torch.Tensor,
                       timeout: float) -> tuple[torch.Tensor, str]:
    """The outputs, and the token of activations the node kept when asked to (else "")."""
    try:
        resp = await conns.stub(address).Forward(req, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise RemoteCallError(address, e.code(), e.details() or "") from None
    conns.bytes_sent += req.ByteSize()
    conns.bytes_received += resp.ByteSize()
    return decode_tensor(address, resp.hidden_states, like), resp.backward_token


async def call_backward(conns: Connections, address: str, req: pb.ForwardRequest, grad: torch.Tensor,
                        timeout: float, lora_like: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None,
                        prefix_like: torch.Tensor | None = None, token: str = ""):
    """d loss / d input, d loss / d (A, B) for the LoRA modules sent (shaped like ``lora_like``) and
    d loss / d the prefix slice sent (shaped like ``prefix_like``)."""
    try:
        request = pb.BackwardRequest(inputs=req, grad_outputs=serialize(grad), backward_token=token)
        resp = await conns.stub(address).Backward(request, timeout=timeout)
    except grpc.aio.AioRpcError as e:
        raise RemoteCallError(address, e.code(), e.details() or "") from None
    conns.bytes_sent += request.ByteSize()
    conns.bytes_received += resp.ByteSize()
    lora_grads = {}
    for m in resp.lora_grads:
        key = (m.block, m.module)
        if lora_like is None or key not in lora_like:
            raise RemoteCallError(address, None, f"unexpected LoRA gradient for {key}")
        a, b = lora_like[key]
        lora_grads[key] = (decode_tensor(address, m.a, a), decode_tensor(address, m.b, b))
    grad_prefix = None
    if prefix_like is not None:
        if not resp.HasField("grad_prefix"):
            raise RemoteCallError(address, None, "no gradient for the prefix that was sent")
        grad_prefix = decode_tensor(address, resp.grad_prefix, prefix_like)
    return decode_tensor(address, resp.grad_inputs, grad), lora_grads, grad_prefix
