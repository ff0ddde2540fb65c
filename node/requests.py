"""Translate and check incoming protobuf requests into tensors; every limit is checked before
anything is allocated. Raises RequestError carrying the gRPC status to answer with."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import grpc
import torch

from proto import swarmlm_pb2 as pb
from proto.tensors import (ENCODINGS, FLOAT_DTYPES, INDEX_DTYPES, MASK_DTYPES, MODULE_FIELDS, TensorError, deserialize,
                           lora_digest, shape_text)
from node.lora import MAX_RANK, Lora, LoraCache
from swarm.spans import Span


MAX_ERROR_CHARS = 1000  # an error message never echoes more of a (possibly huge) input than this


def capped(message: str) -> str:
    """``message``, cut to MAX_ERROR_CHARS characters."""
    return message if len(message) <= MAX_ERROR_CHARS else f"{message[:MAX_ERROR_CHARS]}... ({len(message)} characters)"


class RequestError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "invalid"):
        super().__init__(capped(message))
        self.code = code
        self.reason = reason  # why a session was refused, for the metrics (swarmlm_node_sessions_refused_total)


@dataclass(frozen=True)
class Limits:
    model: str  # model key this node serves
    hosted: Span  # blocks this node hosts
    hidden_size: int  # the model's hidden size
    max_batch_tokens: int  # batch * seq per request
    max_position: int  # positions must be in [0, max_position)
    kv_heads: int = 0  # key/value heads per block (shape of prefix-tuning prefixes)
    head_dim: int = 0  # size of one attention head
    max_prefix: int = 512  # most prefix-tuning virtual tokens accepted


@dataclass
class SpanInputs:
    span: Span
    hidden: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None
    lora: Lora | None = None
    prefix: torch.Tensor | None = None  # [blocks, 2, batch, kv_heads, virtual, head_dim]


METHODS = ("", "dora", "ia3")  # LoraAdapter.method values a node applies


def parse_lora(msg: pb.LoraAdapter, span: Span, shapes: dict[str, tuple[int, int]], cache: LoraCache) -> Lora:
    """Check a client's adapter against the blocks it targets, or find its unchanged copy in ``cache``."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not 0 < len(msg.id) <= 128:
        raise RequestError(bad, "lora.id must be 1..128 characters")
    if not math.isfinite(msg.scaling) or not 0 <= msg.dropout < 1:
        raise RequestError(bad, "lora.scaling must be finite and lora.dropout in [0, 1)")
    if msg.method not in METHODS:
        raise RequestError(bad, f"lora.method {msg.method[:40]!r} is not one of {list(METHODS)}")
    if msg.method == "ia3" and msg.dropout:
        raise RequestError(bad, "an IA3 adapter has no dropout")
    if not msg.modules:  # the weights named by their hash; scaling, dropout and seed are this request's
        cached = cache.get(msg.digest) if len(msg.digest) == 64 else None
        if cached is None or not set(range(span.start, span.end)) <= cached.blocks or cached.method != msg.method:
            cache.misses += 1
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"adapter {msg.id!r} version {msg.version} is not cached here for blocks {span}; "
                               "send its weights")
        cache.hits += 1
        return replace(cached, id=msg.id, version=msg.version, scaling=msg.scaling, dropout=msg.dropout,
                       seed=msg.dropout_seed)
    weights, inputs = {}, set()
    for m in msg.modules:
        if m.block not in span or m.module not in shapes:
            raise RequestError(bad, f"lora module {m.module!r} of block {m.block} is not a projection of blocks {span}")
        if (m.block, m.module) in weights:
            raise RequestError(bad, f"lora module {m.module!r} of block {m.block} given twice")
        weights[(m.block, m.module)] = _module_tensors(m, msg.method, shapes[m.module])
        if m.ia3_input:
            inputs.add((m.block, m.module))
    lora = Lora(msg.id, msg.version, msg.scaling, msg.dropout, msg.dropout_seed, weights,
                frozenset(range(span.start, span.end)), msg.method, frozenset(inputs))
    return cache.put(lora_digest(msg.modules), lora)  # the hash we computed, never one the sender claims


def _module_tensors(m: pb.LoraModule, method: str, shape: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """One module's tensors for ``method`` (proto.tensors.MODULE_FIELDS), each checked for shape and finiteness;
    a field of another method present is refused (the digest must name one meaning)."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    fan_in, fan_out = shape
    fields = MODULE_FIELDS[method]
    vector_budget = 8 * max(fan_in, fan_out)  # room for a wrong size to be named (INVALID_ARGUMENT), no more
    extra = [f for f in ("a", "b", "magnitude", "ia3") if f not in fields and m.HasField(f)]
    if extra or (m.ia3_input and method != "ia3"):
        raise RequestError(bad, f"lora {m.module} of block {m.block}: {extra or ['ia3_input']} do not belong to "
                                f"method {method or 'lora'!r}")
    missing = [f for f in fields if not m.HasField(f)]
    if missing:
        raise RequestError(bad, f"lora {m.module} of block {m.block} lacks {missing} (method {method or 'lora'!r})")
    if method == "ia3":
        size = fan_in if m.ia3_input else fan_out
        scale = _tensor(m.ia3, f"ia3 {m.module}", FLOAT_DTYPES, vector_budget, 1).float()
        if tuple(scale.shape) != (size,):
            raise RequestError(bad, f"ia3 {m.module} has shape {list(scale.shape)}, not [{size}] "
                                    f"({'input' if m.ia3_input else 'output'} features)")
        tensors: tuple[torch.Tensor, ...] = (scale,)
    else:
        budget = MAX_RANK * max(fan_in, fan_out) * 4
        a = _tensor(m.a, f"lora {m.module} A", FLOAT_DTYPES, budget, 2).float()
        b = _tensor(m.b, f"lora {m.module} B", FLOAT_DTYPES, budget, 2).float()
        rank = a.shape[0]
        if not 0 < rank <= MAX_RANK or tuple(a.shape) != (rank, fan_in) or tuple(b.shape) != (fan_out, rank):
            raise RequestError(bad, f"lora {m.module} shapes A {list(a.shape)}, B {list(b.shape)} do not fit "
                                    f"[r, {fan_in}] and [{fan_out}, r] with 0 < r <= {MAX_RANK}")
        tensors = (a, b)
        if method == "dora":
            magnitude = _tensor(m.magnitude, f"dora {m.module} magnitude", FLOAT_DTYPES, vector_budget, 1).float()
            if tuple(magnitude.shape) != (fan_out,):
                raise RequestError(bad, f"dora {m.module} magnitude has shape {list(magnitude.shape)}, not [{fan_out}]")
            tensors = (a, b, magnitude)
    if not all(torch.isfinite(t).all() for t in tensors):
        raise RequestError(bad, f"lora {m.module} of block {m.block} contains NaN or infinity")
    return tensors


def _tensor(msg: pb.Tensor, name: str, allowed, max_bytes: int, ndim: int, encodings=()) -> torch.Tensor:
    try:
        return deserialize(msg, name=name, allowed=allowed, max_bytes=max_bytes, ndim=ndim, encodings=encodings)
    except TensorError as e:
        code = grpc.StatusCode.RESOURCE_EXHAUSTED if "over the limit" in str(e) else grpc.StatusCode.INVALID_ARGUMENT
        raise RequestError(code, str(e)) from None


def _check_shape_budget(msg: pb.Tensor, limits: Limits, name: str) -> None:
    shape = list(msg.shape)
    if len(shape) != 3:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: expected [batch, seq, hidden], got {shape_text(shape)}")
    batch, seq, hidden = shape
    if batch < 1 or seq < 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: empty batch or sequence in shape {shape_text(shape)}")
    if hidden != limits.hidden_size:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{name}: hidden size {hidden} does not match the model's {limits.hidden_size}")
    if batch * seq > limits.max_batch_tokens:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"{name}: batch x seq = {batch * seq} tokens is over this node's limit of "
                           f"{limits.max_batch_tokens}")


check_activations_shape = _check_shape_budget  # (node.chain checks pushed hidden states' headers with it)


def _check_model_and_span(model: str, start: int, end: int, limits: Limits) -> Span:
    if model != limits.model:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"this node serves model {limits.model!r}, not {model!r}")
    if not limits.hosted.start <= start < end <= limits.hosted.end:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"blocks {start}:{end} are not inside the hosted span {limits.hosted}")
    return Span(start, end)


def _parse_activations(msg: pb.Tensor, limits: Limits, name: str = "hidden_states", encodings=()) -> torch.Tensor:
    """``encodings``: accepted besides plain (training traffic may be blockwise8; inference steps are plain).
    The budget bounds the decoded tensor, so an encoded one is never allowed more values than a plain one."""
    _check_shape_budget(msg, limits, name)
    hidden = _tensor(msg, name, FLOAT_DTYPES, limits.max_batch_tokens * limits.hidden_size * 4, 3, encodings)
    if not torch.isfinite(hidden).all():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{name} contains NaN or infinity")
    return hidden


def _parse_mask(msg: pb.Tensor, limits: Limits, batch: int, seq: int) -> torch.Tensor:
    mask = _tensor(msg, "attention_mask", MASK_DTYPES, limits.max_batch_tokens * 8, 2)
    if tuple(mask.shape) != (batch, seq):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"attention_mask shape {list(mask.shape)} does not match [batch, seq] = [{batch}, {seq}]")
    if not ((mask == 0) | (mask == 1)).all():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "attention_mask values must be 0 or 1")
    return mask.to(torch.int64)


def _parse_positions(msg: pb.Tensor, limits: Limits, batch: int, seq: int) -> torch.Tensor:
    positions = _tensor(msg, "position_ids", INDEX_DTYPES, limits.max_batch_tokens * 8, 2)
    if positions.shape[0] not in (1, batch) or positions.shape[1] != seq:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"position_ids shape {list(positions.shape)} does not match [batch or 1, {seq}]")
    if positions.numel() and (positions.min() < 0 or positions.max() >= limits.max_position):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"position_ids must be in [0, {limits.max_position})")
    return positions.to(torch.int64)


def parse_forward(req: pb.ForwardRequest, limits: Limits, adapters: "Adapters | None" = None) -> SpanInputs:
    span = _check_model_and_span(req.model, req.start, req.end, limits)
    if not req.HasField("hidden_states"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "hidden_states is required")
    hidden = _parse_activations(req.hidden_states, limits, encodings=ENCODINGS)
    batch, seq = hidden.shape[:2]
    prefix = _parse_prefix(req.prefix, limits, span, batch) if req.HasField("prefix") else None
    virtual = prefix.shape[4] if prefix is not None else 0
    mask = _parse_mask(req.attention_mask, limits, batch, virtual + seq) if req.HasField("attention_mask") else None
    positions = _parse_positions(req.position_ids, limits, batch, seq) if req.HasField("position_ids") else None
    lora = _lora(req, "lora", span, adapters)
    return SpanInputs(span, hidden, mask, positions, lora, prefix)


def _parse_prefix(msg: pb.Tensor, limits: Limits, span: Span, batch: int) -> torch.Tensor:
    shape = list(msg.shape)
    expected = [len(span), 2, batch, limits.kv_heads, None, limits.head_dim]
    if len(shape) != 6 or any(e is not None and s != e for s, e in zip(shape, expected)) \
            or not 0 < shape[4] <= limits.max_prefix:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"prefix shape {shape_text(shape)} does not fit [blocks={len(span)}, 2, batch={batch}, "
                           f"kv_heads={limits.kv_heads}, 1..{limits.max_prefix}, head_dim={limits.head_dim}]")
    budget = len(span) * 2 * batch * limits.kv_heads * limits.max_prefix * limits.head_dim * 4
    prefix = _tensor(msg, "prefix", FLOAT_DTYPES, budget, 6)
    if not torch.isfinite(prefix).all():
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "prefix contains NaN or infinity")
    return prefix


@dataclass
class Adapters:
    shapes: dict[str, tuple[int, int]]  # projection name -> (in, out) features, the same in every block
    cache: LoraCache  # recently used client adapters
    hosted: dict[str, Lora]  # adapters this node serves by name (node serve --adapters)


def _lora(req, field: str, span: Span, adapters: Adapters | None) -> Lora | None:
    name = req.adapter_name
    if name and req.HasField(field):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "give either a client adapter or adapter_name, not both")
    if name:
        if adapters is None or name not in adapters.hosted:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"this node hosts no adapter named {name!r}")
        return adapters.hosted[name]
    if not req.HasField(field):
        return None
    if adapters is None:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "this node does not apply LoRA adapters")
    return parse_lora(getattr(req, field), span, adapters.shapes, adapters.cache)


def parse_open(req: pb.InferenceRequest, limits: Limits, max_session_length: int, adapters: Adapters | None = None
               ) -> tuple[Span, int, int, Lora | None, torch.Tensor | None]:
    """The first message of an inference stream -> (span, batch_size, max_length, LoRA, prefix)."""
    if not req.HasField("open"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the first inference message must carry `open`")
    opts = req.open
    span = _check_model_and_span(opts.model, opts.start, opts.end, limits)
    if opts.batch_size < 1 or opts.max_length < 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "batch_size and max_length must be positive")
    if opts.max_length > max_session_length:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"max_length {opts.max_length} is over this node's limit of {max_session_length}")
    if opts.batch_size > limits.max_batch_tokens:  # every step carries batch x (at least 1) positions
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"batch_size {opts.batch_size} is over this node's limit of {limits.max_batch_tokens} "
                           "tokens per request")
    prefix = _parse_prefix(opts.prefix, limits, span, opts.batch_size) if opts.HasField("prefix") else None
    if prefix is not None and prefix.shape[4] >= opts.max_length:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"a prefix of {prefix.shape[4]} positions leaves no room in max_length {opts.max_length}")
    return span, opts.batch_size, opts.max_length, _lora(opts, "lora", span, adapters), prefix


DRAFT_FACTOR = 32  # a session computes at most this many times its max_length positions, rejected drafts included


@dataclass(frozen=True)
class Step:
    """One step of an inference session, as parsed from its stream message."""

    hidden: torch.Tensor  # [batch, new, hidden] states of the new positions
    mask: torch.Tensor  # [batch, new] their attention mask
    positions: torch.Tensor  # [batch or 1, new] their position ids
    drop: int = 0  # assisted decoding: cached positions to forget first (the latest ones)
    reorder: torch.Tensor | None = None  # beam search: row i continues from old cache row reorder[i]


def parse_step(req: pb.InferenceRequest, limits: Limits, batch_size: int, length: int, max_length: int,
               fixed: int = 0, computed: int = 0) -> Step:
    """A step of an open session holding ``length`` positions, the first ``fixed`` of which (a prefix
    tuning prefix) can never be dropped, that has computed ``computed`` positions so far.

    A stream cannot run forever: every accepted step computes at least one position, positions held
    are capped by the session's max_length (itself capped by the node) and positions computed, dropped
    drafts included, by DRAFT_FACTOR x max_length; any other message ends the stream with an error
    status; every message is also capped by the gRPC message size limit."""
    if req.HasField("open"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "this session is already open")
    hidden = _parse_activations(req.hidden_states, limits)
    batch, new = hidden.shape[:2]
    if batch != batch_size:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"step batch {batch} != session batch_size {batch_size}")
    if req.drop > length - fixed:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"cannot drop {req.drop} positions: the session holds {length - fixed} that may be dropped")
    length -= req.drop
    if length + new > max_length:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"{length} + {new} positions exceed the session's max_length {max_length}")
    if computed + new > DRAFT_FACTOR * max_length:
        raise RequestError(grpc.StatusCode.OUT_OF_RANGE,
                           f"this session has computed {computed} positions; {new} more exceed {DRAFT_FACTOR} x its "
                           f"max_length {max_length} (dropped drafts count too); open a new session")
    mask = (_parse_mask(req.attention_mask, limits, batch, new) if req.HasField("attention_mask")
            else torch.ones(batch, new, dtype=torch.int64))
    positions = (_parse_positions(req.position_ids, limits, batch, new) if req.HasField("position_ids")
                 else torch.arange(length, length + new).unsqueeze(0))
    reorder = None
    if len(req.reorder):
        if len(req.reorder) != batch or max(req.reorder) >= batch:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"reorder needs {batch} row numbers below {batch}, got {len(req.reorder)} "
                               f"entries up to {max(req.reorder)}")
        reorder = torch.tensor(list(req.reorder), dtype=torch.int64)
    return Step(hidden, mask, positions, req.drop, reorder)


def parse_backward(req: pb.BackwardRequest, limits: Limits, adapters: Adapters | None = None
                   ) -> tuple[SpanInputs, torch.Tensor]:
    if not req.HasField("inputs") or not req.HasField("grad_outputs"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "inputs and grad_outputs are required")
    inputs = parse_forward(req.inputs, limits, adapters)
    grad = _parse_activations(req.grad_outputs, limits, "grad_outputs", encodings=ENCODINGS)
    if grad.shape != inputs.hidden.shape:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"grad_outputs shape {list(grad.shape)} does not match hidden_states {list(inputs.hidden.shape)}")
    return inputs, grad


BY_TOKEN_FIELDS = ("model", "start", "end")  # all a Backward by token carries in its inputs


def by_token(req: pb.BackwardRequest) -> bool:
    """Whether ``req`` names kept activations instead of carrying its inputs (no hidden states)."""
    return req.HasField("inputs") and not req.inputs.HasField("hidden_states")


def parse_backward_by_token(req: pb.BackwardRequest, limits: Limits) -> tuple[Span, torch.Tensor]:
    """A Backward without inputs -> (span, grad_outputs). Its inputs name only the model and blocks (whatever
    else the Forward had, mask, LoRA, prefix, is in the kept pass), and it must carry a token."""
    span = _check_model_and_span(req.inputs.model, req.inputs.start, req.inputs.end, limits)
    extra = [f.name for f, _ in req.inputs.ListFields() if f.name not in BY_TOKEN_FIELDS]
    if extra:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"a Backward without hidden_states carries only {', '.join(BY_TOKEN_FIELDS)} in its inputs "
                           f"(the rest is in the kept pass), not {extra}")
    if not req.backward_token:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "a Backward without hidden_states needs a backward_token")
    if not req.HasField("grad_outputs"):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "grad_outputs is required")
    return span, _parse_activations(req.grad_outputs, limits, "grad_outputs", encodings=ENCODINGS)


def max_message_bytes(limits: Limits) -> int:
    """gRPC receive limit: two float32 activations at the token budget (backward) plus masks and slack."""
    return 2 * limits.max_batch_tokens * limits.hidden_size * 4 + 16 * limits.max_batch_tokens + (1 << 20)
