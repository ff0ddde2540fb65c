"""The OpenAI-compatible HTTP API (FastAPI; streams as server-sent events by sse-starlette).

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (and ``GET /health``).
Every error is OpenAI's error object with a fitting status: 400 bad request, 401 API key, 404 model,
413 body too large, 429 busy (no cache room on the nodes, or too many requests here; with
``Retry-After``), 503 the swarm cannot serve it (blocks without a node, nodes failing). 500 only for a
bug of ours. A streamed request's status is decided when its first token is there (so an error
opening the session is still a proper status); a later failure ends the stream with an error event.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, TypeVar

import grpc
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from client.api.engine import Busy, ChoiceDelta, Engine, Generation, TokenLogprob, Usage
from client.api.models import Models, TooManyAdapters, UnknownModel
from client.api.schemas import ChatRequest, CompletionRequest, RequestInvalid

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_BODY_BYTES = 8 << 20  # larger request bodies get 413
DISCONNECT_POLL = 0.25  # seconds between checks whether a client still waits for a non-streamed answer
RETRY_AFTER = "2"  # seconds, with 429


@dataclass
class ApiState:
    """What the routes need; built by client.api.cli (or a test)."""

    models: Models
    engine: Engine
    tokenizer: object
    context_length: int  # positions the model takes (prompt + completion)
    default_max_tokens: int  # chat completions without max_tokens: at most this many (and the context's rest)
    api_keys: frozenset[str] = frozenset()  # empty: no key needed
    # a fast tokenizer's encode changes its (Rust) state: one at a time ("Already borrowed" otherwise)
    encode_lock: threading.Lock = field(default_factory=threading.Lock)


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def error_of(exc: BaseException) -> ApiError:
    """The HTTP error for what a generation (or its set-up) raised."""
    from client.transport import RemoteCallError, TLSHandshakeError
    from swarm.dht import DHTStartError
    from swarm.routing import NoRouteError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestInvalid):
        return ApiError(400, str(exc), "invalid_request_error", exc.code, exc.param)
    if isinstance(exc, UnknownModel):
        return ApiError(404, str(exc), "invalid_request_error", "model_not_found", "model")
    if isinstance(exc, Busy):
        return ApiError(429, str(exc), "rate_limit_error", "rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER})
    if isinstance(exc, NoRouteError):
        return ApiError(503, f"the swarm cannot serve this model now: {exc}", "server_error", "no_route")
    if isinstance(exc, TLSHandshakeError) or isinstance(exc, (TooManyAdapters, DHTStartError)):
        return ApiError(503, str(exc), "server_error", "swarm_unavailable")
    if isinstance(exc, RemoteCallError):
        if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" not in exc.message:
            return ApiError(429, f"the nodes have no room for this request now: {exc}", "rate_limit_error",
                            "rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER})
        if exc.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE,
                        grpc.StatusCode.RESOURCE_EXHAUSTED):
            return ApiError(400, f"a node refused this request: {exc}", "invalid_request_error")
        return ApiError(503, f"the swarm failed to serve this request: {exc}", "server_error", "swarm_error")
    log.error("internal error", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error")


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """``await awaitable``, unless the HTTP client goes away first (ClientGone)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


# ---- response bodies ----------------------------------------------------------------------------
def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(items: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> dict:
    return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                         "top_logprobs": [{"token": s, "logprob": v, "bytes": _bytes(s)} for _, s, v in t.top]}
                        for t in items], "refusal": None}


def _top_by_text(top) -> dict[str, float]:
    """The completions API's top_logprobs: keyed by text, so tokens with the same text keep the likeliest."""
    out: dict[str, float] = {}
    for _, text, value in top:
        out.setdefault(text, value)
    return out


def completion_logprobs(items, offsets, with_top: bool) -> dict:
    return {"tokens": [t.text for t in items], "token_logprobs": [t.logprob for t in items],
            "top_logprobs": [_top_by_text(t.top) for t in items] if with_top else None,
            "text_offset": list(offsets)}


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


# ---- the app ------------------------------------------------------------------------------------
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before any route reads it."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # disconnected while sending the body
            size += len(message.get("body", b""))
            if size > self.limit:
                error = ApiError(413, f"request body over {self.limit >> 20} MiB", "invalid_request_error")
                return await error.response()(scope, receive, send)
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then the real channel: the app notices a disconnect

        return await self.app(scope, replay, send)


def create_app(state: ApiState) -> "BodyLimit":
    """The ASGI app (FastAPI behind the body size limit)."""
    app = FastAPI(title="swarmlm OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = state

    _errors_as_openai_objects(app)
    authorize = _authorizer(state)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        ids = await asyncio.to_thread(state.models.ids)
        return {"object": "list", "data": [_model_card(i) for i in ids]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        await asyncio.to_thread(_resolve, state, model_id)
        return _model_card(model_id)

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request):
        body.refusals()
        texts = body.prompts()
        prompts = await asyncio.to_thread(lambda: [_encode_text(state, p) for p in texts])  # off the event loop
        max_tokens = _check_length(state, prompts, body.max_tokens, "max_tokens")
        return await _serve(state, request, body, prompts, body.sampling(state.engine.vocab_size, max_tokens),
                            chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(body: ChatRequest, request: Request):
        body.refusals()
        prompt = await asyncio.to_thread(_encode_chat, state, body)
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = _check_length(state, [prompt], body.requested_tokens, field)
        return await _serve(state, request, body, [prompt], body.sampling(state.engine.vocab_size, max_tokens),
                            chat=True)

    return BodyLimit(app)


def _errors_as_openai_objects(app: FastAPI) -> None:
    """Every error leaves as OpenAI's error object with its HTTP status."""
    @app.exception_handler(ApiError)
    @app.exception_handler(RequestInvalid)
    @app.exception_handler(UnknownModel)
    @app.exception_handler(Exception)
    async def _error(request: Request, exc: Exception):
        return error_of(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}",
                            "invalid_request_error").response()
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else first["msg"]
        return ApiError(400, message, "invalid_request_error", None, param).response()

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        return ApiError(exc.status_code, str(exc.detail), "invalid_request_error").response()


def _authorizer(state: ApiState):
    """The dependency that checks ``Authorization: Bearer KEY`` against the API keys (none: open)."""

    async def authorize(request: Request) -> None:  # async: no thread hop per request
        if not state.api_keys:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise ApiError(401, "no API key given (send 'Authorization: Bearer KEY')", "invalid_request_error",
                           "invalid_api_key")
        if not any(hmac.compare_digest(key.strip().encode(), k.encode()) for k in state.api_keys):
            raise ApiError(401, "incorrect API key", "invalid_request_error", "invalid_api_key")

    return authorize


def _model_card(model_id: str) -> dict:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "swarmlm"}


def _resolve(state: ApiState, model_id: str) -> str | None:
    try:
        return state.models.adapter_of(model_id)
    except UnknownModel as e:
        raise error_of(e) from None


def _encode_text(state: ApiState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        with state.encode_lock:
            return list(state.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for t in prompt):
        raise RequestInvalid(f"prompt token ids must be in [0, {vocab})", "prompt")
    return list(prompt)


def _encode_chat(state: ApiState, body: ChatRequest) -> list[int]:
    """The conversation through the checkpoint tokenizer's own chat template, ready for the assistant's turn."""
    from jinja2 import TemplateError

    tokenizer = state.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise RequestInvalid("this model's tokenizer has no chat template, so chat completions cannot be formatted; "
                             "use /v1/completions with a prompt", "messages", "no_chat_template")
    with state.encode_lock:
        try:
            text = tokenizer.apply_chat_template([m.for_template() for m in body.messages], tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as e:
            raise RequestInvalid(f"the chat template refused these messages: {e}", "messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_length(state: ApiState, prompts: list[list[int]], requested: int | None, field: str) -> int:
    """max_tokens for these prompts; 400 when they and the completion do not fit the model's context."""
    longest, context = max(len(p) for p in prompts), state.context_length
    if any(not p for p in prompts):
        raise RequestInvalid("the prompt is empty (no tokens)", "prompt" if field == "max_tokens" else "messages")
    if requested is None:
        requested = min(state.default_max_tokens, context - longest)
    if longest + max(requested, 1) > context:
        raise RequestInvalid(
            f"this model's maximum context length is {context} tokens; you requested {longest + requested} "
            f"({longest} in the prompt, {requested} for the completion)", field, "context_length_exceeded")
    return requested


async def _serve(state: ApiState, request: Request, body, prompts: list[list[int]], sampling, chat: bool):
    adapter = await asyncio.to_thread(_resolve, state, body.model)
    try:
        model = await asyncio.to_thread(state.models.get, adapter)
        generation = state.engine.start(model, prompts, sampling)
    except Exception as e:  # noqa: BLE001 - answered as an error object
        raise error_of(e) from None
    try:
        first = await until_disconnected(
            request, generation.next() if body.stream else generation.collect())
    except ClientGone:
        generation.cancel()
        return Response(status_code=499)
    except Exception as e:  # noqa: BLE001
        generation.cancel()
        raise error_of(e) from None
    except BaseException:
        generation.cancel()
        raise
    reply = Reply(body.model, chat, sampling.logprobs, len(prompts) * sampling.n)
    if not body.stream:
        choices, usage = first
        return JSONResponse(reply.whole(choices, usage))
    return EventSourceResponse(reply.stream(generation, first, body.include_usage), sep="\n", ping=15)


class Reply:
    """Builds the answer bodies of one request (OpenAI's shapes for chat and for text completions)."""

    def __init__(self, model: str, chat: bool, logprobs: int | None, choices: int):
        self.model, self.chat, self.logprobs, self.choices = model, chat, logprobs, choices
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, chunk: bool) -> dict:
        obj = f"{self.object}.chunk" if chunk and self.chat else self.object
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, items, offsets):
        if self.logprobs is None:
            return None
        return chat_logprobs(items) if self.chat else completion_logprobs(items, offsets, self.logprobs > 0)

    def whole(self, choices, usage: Usage) -> dict:
        out = []
        for i, c in enumerate(choices):
            item = {"index": i, "logprobs": self._logprobs(c.logprobs, c.offsets), "finish_reason": c.finish_reason}
            if self.chat:
                item["message"] = {"role": "assistant", "content": c.text, "refusal": None}
            else:
                item["text"] = c.text
            out.append(item)
        return {**self._head(False), "choices": out, "usage": usage_body(usage)}

    def _chunk(self, delta: ChoiceDelta | None, index: int, include_usage: bool, role: bool = False) -> str:
        item = {"index": index, "logprobs": None, "finish_reason": None}
        if delta is not None:
            item["logprobs"] = self._logprobs(delta.logprobs, delta.offsets) if delta.logprobs else None
            item["finish_reason"] = delta.finish_reason
        text = delta.text if delta is not None else ""
        if self.chat:
            item["delta"] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        else:
            item["text"] = text
        chunk = {**self._head(True), "choices": [item]}
        if include_usage:
            chunk["usage"] = None
        return json.dumps(chunk)

    async def stream(self, generation: Generation, first: list[ChoiceDelta], include_usage: bool
                     ) -> AsyncIterator[dict]:
        """SSE events: (chat: a role chunk per choice), a chunk per choice delta, (the usage), ``[DONE]``.
        Leaving early (the client disconnected) cancels the generation: its session closes at once."""
        try:
            if self.chat:
                for index in range(self.choices):
                    yield {"data": self._chunk(None, index, include_usage, role=True)}
            deltas = first
            while deltas is not None:
                for d in deltas:
                    yield {"data": self._chunk(d, d.index, include_usage)}
                try:
                    deltas = await generation.next()
                except Exception as e:  # noqa: BLE001 - the status is sent already: an error event ends the stream
                    yield {"data": json.dumps(error_of(e).body())}
                    return
            if include_usage:
                yield {"data": json.dumps({**self._head(True), "choices": [], "usage": usage_body(generation.usage)})}
            yield {"data": "[DONE]"}
        finally:
            generation.cancel()

