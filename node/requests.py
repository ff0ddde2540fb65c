"""Translate and check incoming protobuf requests into tensors; every limit is checked before
anything is allocated. Raises RequestError carrying the gRPC status to answer with."""
from __future__ import annotations

from dataclasses import dataclass

import grpc
import torch

from proto import swarmlm_pb2 as pb
from proto.tensors import FLOAT_DTYPES, INDEX_DTYPES, MASK_DTYPES, TensorError, deserialize
from swarm.spans import Span


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    model: str  # model key this node serves
    hosted: Span  # blocks this node hosts
    hidden_size: int  # the model's hidden size
    max_batch_tokens: int  # batch * seq per request
    max_position: int  # positions must be in [0, max_position)


@dataclass
class SpanInputs:
    span: Span
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None


def _tensor(msg: pb.Tensor, name: str, allowed, max_bytes: int, ndim: int) -> torch.Tensor:
    try:
        return deserialize(msg, name=name, allowed=allowed, max_bytes=max_bytes, ndim=ndim)
    except TensorError as e:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if "over the limit" in str(e) else grpc.StatusCode.INVALID_ARGUMENT
        raise RequestError(code, str(e)) from None


def _check_shape_budget(msg: pb.Tensor, limits: Limits, name: str) -> None:
    shape = list(msg.shape)
    if len(shape) != 3:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: expected [batch, seq, hidden], got {shape}")
    batch, seq, hidden = shape
    if batch < 1 or seq < 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: empty batch or sequence in shape {shape}")
    if hidden != limits.hidden_size:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{name}: hidden size {hidden} does not match the model's {limits.hidden_size}")
    if batch * seq > limits.max_batch_tokens:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{name}: batch x seq = {batch * seq} tokens is over this node's limit of "
                           f"{limits.max_batch_tokens}")


def parse_forward(req: pb.ForwardRequest, limits: Limits) -> SpanInputs:
    if req.model != limits.model:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"this node serves model {limits.model!r}, not {req.model!r}")
    if not limits.hosted.start <= req.start < req.end <= limits.hosted.end:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"blocks {req.start}:{req.end} are not inside the hosted span {limits.hosted}")
    if not req.HasField("hidden_states"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states is required")
    _check_shape_budget(req.hidden_states, limits, "hidden_states")
    budget = limits.max_batch_tokens * limits.hidden_size * 4
    hidden = _tensor(req.hidden_states, "hidden_states", FLOAT_DTYPES, budget, 3)
    batch, seq = hidden.shape[:2]
    if not torch.isfinite(hidden).all():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states contains NaN or infinity")
    mask = None
    if req.HasField("attention_mask"):
        mask = _tensor(req.attention_mask, "attention_mask", MASK_DTYPES, limits.max_batch_tokens * 8, 2)
        if tuple(mask.shape) != (batch, seq):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"attention_mask shape {list(mask.shape)} does not match [batch, seq] = [{batch}, {seq}]")
        if not ((mask == 0) | (mask == 1)).all():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "attention_mask values must be 0 or 1")
        mask = mask.to(torch.int64)
    positions = None
    if req.HasField("position_ids"):
        positions = _tensor(req.position_ids, "position_ids", INDEX_DTYPES, limits.max_batch_tokens * 8, 2)
        if positions.shape[0] not in (1, batch) or positions.shape[1] != seq:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"position_ids shape {list(positions.shape)} does not match [batch or 1, {seq}]")
        if positions.numel() and (positions.min() < 0 or positions.max() >= limits.max_position):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"position_ids must be in [0, {limits.max_position})")
        positions = positions.to(torch.int64)
    return SpanInputs(Span(req.start, req.end), hidden, mask, positions)


def parse_backward(req: pb.BackwardRequest, limits: Limits) -> tuple[SpanInputs, torch.Tensor]:
    if not req.HasField("inputs") or not req.HasField("grad_outputs"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "inputs and grad_outputs are required")
    inputs = parse_forward(req.inputs, limits)
    budget = limits.max_batch_tokens * limits.hidden_size * 4
    grad = _tensor(req.grad_outputs, "grad_outputs", FLOAT_DTYPES, budget, 3)
    if grad.shape != inputs.hidden.shape:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"grad_outputs shape {list(grad.shape)} does not match hidden_states {list(inputs.hidden.shape)}")
    if not torch.isfinite(grad).all():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "grad_outputs contains NaN or infinity")
    return inputs, grad


def max_message_bytes(limits: Limits) -> int:
    """gRPC receive limit: two float32 activations at the token budget (backward) plus masks and slack."""
    return 2 * limits.max_batch_tokens * limits.hidden_size * 4 + 16 * limits.max_batch_tokens + (1 << 20)
