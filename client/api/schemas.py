"""Request bodies of the OpenAI API, as strict pydantic models: unknown fields are ignored (as OpenAI
does), wrong types and out-of-range values are refused (400), and fields we cannot honour exactly are
refused with a message saying so instead of being silently dropped."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from client.api.engine import Sampling

MAX_N = 16  # choices per prompt (one batch row each, in one session)
MAX_STOPS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_PROMPTS = 16  # prompts in one completions request
MAX_MESSAGES = 1024


class RequestInvalid(ValueError):
    """A request we refuse with 400; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str = Field(max_length=512)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    user: str | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens even past end-of-sequence

    def refusals(self) -> None:
        """Fields OpenAI knows that this server cannot honour exactly: refused, never approximated."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestInvalid(f"{name} is not supported by this server; leave it 0", name)

    def common_sampling(self, vocab_size: int, max_tokens: int, logprobs: int | None) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS:
            raise RequestInvalid(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}", "stop")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise RequestInvalid(f"stop sequences must have 1 to {MAX_STOP_CHARS} characters", "stop")
        bias = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise RequestInvalid(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                                     "logit_bias")
            if not -100 <= value <= 100:
                raise RequestInvalid(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
            bias.append((int(key), float(value)))
        temperature = 1.0 if self.temperature is None else self.temperature
        return Sampling(max_tokens=max_tokens, temperature=temperature, top_p=1.0 if self.top_p is None else self.top_p,
                        seed=self.seed, stop=tuple(stops), n=self.n or 1, logprobs=logprobs,
                        logit_bias=tuple(bias), ignore_eos=self.ignore_eos)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def refusals(self) -> None:
        super().refusals()
        if self.echo:
            raise RequestInvalid("echo is not supported by this server", "echo")
        if self.suffix:
            raise RequestInvalid("suffix (insertion) is not supported by this server", "suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestInvalid("best_of other than n is not supported by this server", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as texts or token id lists (a list of strings or of id lists is several prompts)."""
        p = self.prompt
        many = p if isinstance(p, list) and p and not isinstance(p[0], int) else [p]
        if not 1 <= len(many) <= MAX_PROMPTS:
            raise RequestInvalid(f"give 1 to {MAX_PROMPTS} prompts", "prompt")
        return many

    def sampling(self, vocab_size: int, max_tokens: int) -> Sampling:
        return self.common_sampling(vocab_size, max_tokens, self.logprobs)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict:
        """The message as a chat template takes it: text parts joined into one string."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        out = {"role": self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        return out


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    functions: list[dict] | None = None
    response_format: dict | None = None

    def refusals(self) -> None:
        super().refusals()
        if self.tools or self.functions:
            raise RequestInvalid("tools / function calling are not supported by this server",
                                 "tools" if self.tools else "functions")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestInvalid("response_format other than text is not supported by this server",
                                 "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestInvalid("top_logprobs needs logprobs set to true", "top_logprobs")

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def sampling(self, vocab_size: int, max_tokens: int) -> Sampling:
        return self.common_sampling(vocab_size, max_tokens, (self.top_logprobs or 0) if self.logprobs else None)
