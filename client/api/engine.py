"""Generations for the HTTP API: each request runs the client's sync ``generate()`` on a thread of its own,
in an inference session of its own, and hands its text to the event loop step by step.

The event loop never waits on the swarm: a worker thread calls ``model.generate()`` with a
StoppingCriteria (``_Watcher``) that, after every step, turns the new tokens into text deltas (stop
strings held back and cut as OpenAI does, see client.api.stops), puts them on an asyncio queue via
``call_soon_threadsafe``, and ends the generation as soon as the request is cancelled (the client
went away); generate() then returns and its session closes on every node at once.

Sampling does not use torch's global random state (shared by every thread): a LogitsProcessor draws
the token with the request's own ``torch.Generator`` (seeded from ``seed``) and leaves only that
token possible, so greedy selection picks it. The same seed gives the same text, also when a node
dies mid-stream (the client replays the history on another node; the logits are the same).
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from client.api.stops import TextTracker

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """Too many generations are running in this server (``--max-concurrent-requests``)."""


@dataclass(frozen=True)
class Sampling:
    """What one request asks of every one of its choices (validated by client.api.schemas)."""

    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a random one
    stop: tuple[str, ...] = ()
    n: int = 1  # choices per prompt: rows of one batch, one session
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely alternatives
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    ignore_eos: bool = False  # generate max_tokens even past the end-of-sequence token (benchmarks)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob), most likely first


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice; ``finish_reason`` ("stop" / "length") on its last delta."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    offsets: tuple[int, ...] = ()  # where each of ``logprobs``' tokens begins in the choice's text


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Choice:
    """One choice gathered from its deltas (non-streaming answers)."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    finish_reason: str | None = None


_END = object()  # queue marker: the worker is done


# ---- logits processors (run inside generate(), on the worker thread) -------------------------------
class _Recorder(LogitsProcessor):
    """Keeps the log-softmax of the model's raw logits of the latest step (it runs first, before any change)."""

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Bias(LogitsProcessor):
    """OpenAI's ``logit_bias``: a value added to the logits of chosen tokens."""

    def __init__(self, bias: Sequence[tuple[int, float]]):
        self.ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self.values = torch.tensor([v for _, v in bias], dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.ids] += self.values.to(scores.dtype)
        return scores


class _Sampler(LogitsProcessor):
    """Draws each row's token from softmax(scores) with the request's own generator and leaves only it
    possible (greedy selection then picks it): no shared random state between concurrent requests."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        return torch.full_like(scores, -float("inf")).scatter_(1, chosen, 0.0)


def logits_processors(sampling: Sampling, recorder: _Recorder | None) -> LogitsProcessorList:
    """The processors of one request, in order: record raw logprobs, bias, temperature, top-p, draw."""
    out = LogitsProcessorList([recorder] if recorder is not None else [])
    if sampling.logit_bias:
        out.append(_Bias(sampling.logit_bias))
    if sampling.temperature > 0:
        out.append(TemperatureLogitsWarper(float(sampling.temperature)))
        if sampling.top_p < 1.0:
            out.append(TopPLogitsWarper(sampling.top_p))
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        out.append(_Sampler(torch.Generator().manual_seed(seed)))
    return out


# ---- the per-step watcher -------------------------------------------------------------------------
class _Watcher(StoppingCriteria):
    """After every step: text deltas of each row to the request's queue, rows that hit a stop string ended;
    every row ended at once when the request is cancelled."""

    def __init__(self, generation: "Generation", offset: int, rows: int, eos: frozenset[int],
                 recorder: _Recorder | None):
        self.generation, self.offset, self.eos, self.recorder = generation, offset, eos, recorder
        engine, sampling = generation.engine, generation.sampling
        self.sampling, self.token_text = sampling, engine.token_text
        self.trackers = [TextTracker(engine.decode, sampling.stop) for _ in range(rows)]
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(rows)]
        self.counts = [0] * rows  # tokens generated per row (an end-of-sequence token included)
        self.done = [False] * rows
        self.first = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor, **kwargs) -> torch.BoolTensor:
        if self.generation.cancelled.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool)
        deltas = [d for row, token in enumerate(input_ids[:, -1].tolist()) if (d := self._row(row, token))]
        if deltas or self.first:
            self.generation.emit(deltas)
        self.first = False
        return torch.tensor(self.done, dtype=torch.bool)

    def _row(self, row: int, token: int) -> ChoiceDelta | None:
        if self.done[row]:
            return None
        self.counts[row] += 1
        tracker, reason = self.trackers[row], None
        if token in self.eos:
            text, released = tracker.finish()
            reason = "stop"
        else:
            if self.recorder is not None:
                self.logprobs[row].append(self._logprob(row, token))
            text, released = tracker.add(token)
            if tracker.stopped:
                reason = "stop"
            elif self.counts[row] >= self.sampling.max_tokens:
                more, rest = tracker.finish()
                text, released, reason = text + more, range(released.start, rest.stop), "length"
        if reason is not None:
            self.done[row] = True
        return self._delta(row, text, released, reason)

    def finish(self) -> list[ChoiceDelta]:
        """generate() returned: rows still open ran out of room (finish_reason "length")."""
        out = []
        for row, done in enumerate(self.done):
            if not done:
                self.done[row] = True
                text, released = self.trackers[row].finish()
                out.append(self._delta(row, text, released, "length"))
        return out

    def _delta(self, row: int, text: str, released: range, reason: str | None) -> ChoiceDelta | None:
        if not text and not released and reason is None:
            return None
        starts = self.trackers[row].token_starts
        return ChoiceDelta(self.offset + row, text, tuple(self.logprobs[row][i] for i in released) if self.recorder
                           else (), reason, tuple(starts[i] for i in released))

    def _logprob(self, row: int, token: int) -> TokenLogprob:
        lp = self.recorder.last[row]
        top: tuple = ()
        if self.sampling.logprobs:
            values, ids = torch.topk(lp, min(self.sampling.logprobs, lp.shape[0]))
            top = tuple((i, self.token_text(i), v) for i, v in zip(ids.tolist(), values.tolist()))
        return TokenLogprob(token, self.token_text(token), float(lp[token]), top)


# ---- one request ------------------------------------------------------------------------------------
class Generation:
    """One request: its prompts generated one after another on a worker thread, ``n`` choices each (one
    batch, one inference session per prompt); events come out of ``next()`` on the event loop."""

    def __init__(self, engine: "Engine", model, prompts: list[list[int]], sampling: Sampling,
                 loop: asyncio.AbstractEventLoop):
        self.engine, self.model, self.prompts, self.sampling, self.loop = engine, model, prompts, sampling, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.usage = Usage(sum(len(p) for p in prompts), 0)  # a prompt counts once, whatever n
        self.thread = threading.Thread(target=self._run, name="swarmlm-api-generation", daemon=True)
        self._finished = False

    # ---- event loop side
    async def next(self) -> list[ChoiceDelta] | None:
        """The next step's deltas (a list, maybe empty for the first step), or None when done. Raises what
        the generation raised (e.g. NoRouteError, RemoteCallError)."""
        if self._finished:
            return None
        item = await self.queue.get()
        if item is _END:
            self._finished = True
            return None
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        return item

    async def collect(self) -> tuple[list[Choice], Usage]:
        """Wait for everything (non-streaming answers)."""
        choices = [Choice() for _ in range(len(self.prompts) * self.sampling.n)]
        while (deltas := await self.next()) is not None:
            for d in deltas:
                c = choices[d.index]
                c.text += d.text
                c.logprobs.extend(d.logprobs)
                c.offsets.extend(d.offsets)
                c.finish_reason = d.finish_reason or c.finish_reason
        return choices, self.usage

    def cancel(self) -> None:
        """Stop at the next step (the session then closes on every node); safe to call any time."""
        self.cancelled.set()

    # ---- worker thread side
    def emit(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            self.cancelled.set()

    def _run(self) -> None:
        try:
            for number, prompt in enumerate(self.prompts):
                if self.cancelled.is_set():
                    break
                self._generate(number * self.sampling.n, prompt)
            self.emit(_END)
        except BaseException as e:  # noqa: BLE001 - handed to the event loop, which answers the request
            self.emit(e)
        finally:
            self.engine.release(self)

    def _generate(self, offset: int, prompt: list[int]) -> None:
        s = self.sampling
        ids = torch.tensor([prompt], dtype=torch.long).expand(s.n, -1).contiguous()
        recorder = _Recorder() if s.logprobs is not None else None
        eos = frozenset() if s.ignore_eos else self.engine.eos_ids
        watcher = _Watcher(self, offset, s.n, eos, recorder)
        config = GenerationConfig(max_new_tokens=s.max_tokens, do_sample=False, num_beams=1,
                                  eos_token_id=sorted(eos), pad_token_id=self.engine.pad_id)  # [], not None:
        # None would be filled in from the model's generation config
        try:
            self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                logits_processor=logits_processors(s, recorder),
                                stopping_criteria=StoppingCriteriaList([watcher]))
        finally:
            self.usage = Usage(self.usage.prompt_tokens, self.usage.completion_tokens + sum(watcher.counts))
        if not self.cancelled.is_set():
            if rest := [d for d in watcher.finish() if d is not None]:
                self.emit(rest)


class Engine:
    """Starts generations, at most ``max_concurrent`` at once, and knows the tokenizer's text per token."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], pad_id: int, max_concurrent: int = 32):
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be positive, got {max_concurrent}")
        self.tokenizer, self.vocab_size, self.max_concurrent = tokenizer, vocab_size, max_concurrent
        self.eos_ids, self.pad_id = frozenset(int(i) for i in eos_ids), int(pad_id)
        self.running: set[Generation] = set()
        self._lock = threading.Lock()
        self._token_texts: dict[int, str] = {}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        """A token's own text (for logprobs; special tokens included), cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def start(self, model, prompts: list[list[int]], sampling: Sampling) -> Generation:
        """Start a generation on a thread of its own; Busy if ``max_concurrent`` are running already."""
        generation = Generation(self, model, prompts, sampling, asyncio.get_running_loop())
        with self._lock:
            if len(self.running) >= self.max_concurrent:
                raise Busy(f"{self.max_concurrent} requests are being generated already; try again shortly")
            self.running.add(generation)
        generation.thread.start()
        return generation

    def release(self, generation: Generation) -> None:
        with self._lock:
            self.running.discard(generation)

    def cancel_all(self, wait: float = 10.0) -> None:
        """Shutting down: end every generation at its next step and wait (bounded) for their threads."""
        with self._lock:
            running = list(self.running)
        for g in running:
            g.cancel()
        for g in running:
            g.thread.join(wait)


def model_eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the checkpoint's generation config, else its tokenizer's."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def neutral_generation_config(model, eos_ids: list[int], pad_id: int) -> GenerationConfig:
    """Generation defaults with nothing but the special tokens: a checkpoint's own sampling defaults
    (repetition penalty, top-k, ...) must not change what an OpenAI request asked for."""
    bos = getattr(model.generation_config, "bos_token_id", None)
    return GenerationConfig(eos_token_id=eos_ids or None, pad_token_id=pad_id, bos_token_id=bos)

