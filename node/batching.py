"""Decode steps of different inference sessions on the same span, computed as one block call.

Decoding reads every weight of the span once per step whatever the batch, so steps of several sessions
that arrive together cost little more than one. Each session keeps its own transformers cache, mask and
positions; for one call their caches are laid side by side, **left-padded** to the longest past, with
the padding masked out (``run_together``). Left, not right: a query and its own keys then keep their
distance, so sliding-window masks (made from cache indices) see the same window as when the session
runs alone. Masked keys get exactly zero attention weight, so each row's outputs equal its session's
alone up to float32 rounding (matrix products of another batch size; ~1e-6), and greedy tokens match.
Only the new position's keys/values are copied back into each session's cache, after the call succeeded.

Batched: steps of one new position, no dropped drafts or beam reorder, of sessions without a LoRA
adapter or a prefix-tuning prefix, on float32 nodes of the families in BATCHED_FAMILIES (checked by
tests/node/test_batching.py), at most ``max_rows`` rows (sessions x their batch) per call. Everything
else (prefills, assisted decoding, beam search, LoRA and prefix sessions, bfloat16 nodes, other families,
verification re-runs of such steps) runs alone, as before.

Waiting (``StepBatcher``): a step waits up to ``wait`` seconds for the steps of other sessions that
decoded on this span last time, never when none is expected (one active session pays no wait), and
stops as soon as all expected ones are there. A session that misses a window is no longer waited for
until its next step arrives, so a slow or silent session costs the others at most one window. Steps
arriving while a call runs join the next one without waiting. If a batched call fails, its steps are
run one by one, so a broken session fails alone; the batcher never waits on any session's I/O.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable

import torch

from node import compat
from node.blocks import SpanBlocks, forward_span, new_cache
from node.requests import Step
from node.sessions import Session
from swarm.spans import Span

log = logging.getLogger(__name__)

# families whose decoder layers are checked to give each row its session-alone outputs from a left-padded
# shared cache (tests/node/test_batching.py runs every one); a family not listed runs its sessions alone
BATCHED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text", "mixtral",
                              "qwen3_moe", "qwen2_moe", "gpt_oss", "starcoder2", "olmo2"})


def batchable_blocks(blocks: SpanBlocks) -> bool:
    """Whether ``blocks`` may run several sessions' decode steps in one call (see the module docstring)."""
    return blocks.dtype == torch.float32 and getattr(blocks.config, "model_type", None) in BATCHED_FAMILIES


def _left_padded(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    """``parts`` ([rows, heads, own length, dim] each) stacked on rows, each padded on the left to ``length``."""
    rows = sum(p.shape[0] for p in parts)
    out = parts[0].new_zeros(rows, parts[0].shape[1], length, parts[0].shape[3])
    r = 0
    for p in parts:
        out[r:r + p.shape[0], :, length - p.shape[2]:] = p
        r += p.shape[0]
    return out


def run_together(blocks: SpanBlocks, span: Span, sessions: list[Session], steps: list[Step]) -> list[torch.Tensor]:
    """One block call over the one-position ``steps`` of ``sessions`` (all on ``span``, each with a past):
    their outputs, in order; each session's cache and mask then hold its new position, as after
    ``node.sessions.run_step``. Raises (changing no session) if any cache lacks a layer of ``span``."""
    past = max(s.length for s in sessions)
    rows = [st.hidden.shape[0] for st in steps]
    layers = range(span.start, span.end)
    cached = [[compat.cached_keys_values(s.cache, i) for i in layers] for s in sessions]
    if any(kv is None or kv[0].shape[2] != s.length for s, kvs in zip(sessions, cached) for kv in kvs):
        raise ValueError("a session's cache does not hold every block of its span at its length")
    combined = new_cache(blocks)
    for j, i in enumerate(layers):
        combined.update(_left_padded([kvs[j][0] for kvs in cached], past),
                        _left_padded([kvs[j][1] for kvs in cached], past), i)
    mask = torch.cat([torch.cat([s.mask.new_zeros(b, past - s.length), s.mask, st.mask.to(s.mask.dtype)], dim=1)
                      for s, st, b in zip(sessions, steps, rows)])
    positions = torch.cat([st.positions.expand(b, 1) for st, b in zip(steps, rows)])
    hidden = torch.cat([st.hidden.to(blocks.dtype) for st in steps])
    with torch.no_grad():
        out = forward_span(blocks, span, hidden, mask, positions, combined)
    new = [compat.cached_keys_values(combined, i) for i in layers]
    outputs, r = [], 0
    for s, st, b in zip(sessions, steps, rows):  # nothing above changed a session: now copy the new position in
        for (k, v), i in zip(new, layers):
            s.cache.update(k[r:r + b, :, past:].clone(), v[r:r + b, :, past:].clone(), i)
        s.mask = torch.cat([s.mask, st.mask.to(s.mask.dtype)], dim=1)
        outputs.append(out[r:r + b].to(st.hidden.dtype))
        r += b
    return outputs


@dataclass
class BatchStats:
    """What the batcher did since the node started (node.metrics exposes it)."""

    calls: dict[int, int] = field(default_factory=dict)  # block calls by how many sessions' steps they computed
    expired: int = 0  # calls that started because the wait ran out before every expected session's step came
    fallbacks: int = 0  # batched calls that failed and were re-run one session at a time


@dataclass(eq=False)
class _Queued:
    session: Session
    step: Step
    future: asyncio.Future


@dataclass(eq=False)
class _Lane:
    """The decode steps of one (span, dtype): queued, and the sessions expected to send the next ones."""

    queue: list[_Queued] = field(default_factory=list)
    members: set[int] = field(default_factory=set)  # ids of sessions whose latest step went through this lane in time
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None


class StepBatcher:
    """Collects eligible decode steps per span and computes them in the ``pool`` as one call (see the
    module docstring). ``alone(session, step)`` and ``together(sessions, steps)`` run in the pool, except a
    lone step of at most ``inline_rows`` rows: on the event-loop thread (the pool's hand-off would cost more)."""

    def __init__(self, blocks: SpanBlocks, max_rows: int, wait: float, pool: Executor,
                 alone: Callable[[Session, Step], torch.Tensor],
                 together: Callable[[list[Session], list[Step]], list[torch.Tensor]], inline_rows: int = 0):
        if max_rows < 2 or wait < 0:
            raise ValueError(f"batching needs max_rows >= 2 and wait >= 0, got {max_rows}, {wait}")
        self.enabled = batchable_blocks(blocks)
        self.max_rows, self.wait, self.pool = max_rows, wait, pool
        self.alone, self.together, self.inline_rows = alone, together, inline_rows
        self.lanes: dict[tuple, _Lane] = {}
        self.stats = BatchStats()

    def accepts(self, session: Session, step: Step, plain: bool) -> bool:
        """Whether ``step`` of ``session`` may be batched; ``plain``: the session has no LoRA and no prefix."""
        return (self.enabled and plain and session.lora is None and session.length > 0
                and step.hidden.shape[1] == 1 and step.drop == 0 and step.reorder is None
                and step.hidden.shape[0] <= self.max_rows)

    async def step(self, session: Session, step: Step) -> torch.Tensor:
        """``step``'s outputs, computed with the steps of other sessions that come within the wait."""
        key = (session.span, step.hidden.dtype)
        lane = self.lanes.get(key)
        if lane is None:
            lane = self.lanes[key] = _Lane()
        future = asyncio.get_running_loop().create_future()
        lane.queue.append(_Queued(session, step, future))
        lane.members.add(id(session))
        lane.arrived.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._drain(key, lane))
        return await future

    def leave(self, session: Session) -> None:
        """``session`` ended or runs a step that is not batched: nobody waits for it any more."""
        for lane in self.lanes.values():
            if id(session) in lane.members:
                lane.members.discard(id(session))
                lane.arrived.set()

    async def _drain(self, key: tuple, lane: _Lane) -> None:
        try:
            while lane.queue:
                await self._gather(lane)
                batch = self._take(lane)
                if batch:
                    await self._run(batch)
        finally:
            lane.task = None
            if not lane.queue and not lane.members:
                self.lanes.pop(key, None)

    async def _gather(self, lane: _Lane) -> None:
        """Wait until every expected session's step is queued, the rows are full, or the wait ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait
        while True:
            queued = [q for q in lane.queue if not q.future.done()]
            missing = lane.members - {id(q.session) for q in queued}
            if not missing or sum(q.step.hidden.shape[0] for q in queued) >= self.max_rows:
                return
            left = deadline - loop.time()
            if left <= 0:
                self.stats.expired += 1
                lane.members -= missing  # not waited for again until their next step arrives
                return
            lane.arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lane.arrived.wait(), left)

    def _take(self, lane: _Lane) -> list[_Queued]:
        """The oldest queued steps (skipping abandoned ones) up to ``max_rows`` rows."""
        batch, rows, keep = [], 0, []
        for q in lane.queue:
            if q.future.done():
                continue
            if batch and rows + q.step.hidden.shape[0] > self.max_rows:
                keep.append(q)
                continue
            batch.append(q)
            rows += q.step.hidden.shape[0]
        lane.queue = keep
        return batch

    async def _run(self, batch: list[_Queued]) -> None:
        self.stats.calls[len(batch)] = self.stats.calls.get(len(batch), 0) + 1
        try:
            if len(batch) == 1 and batch[0].step.hidden.shape[0] <= self.inline_rows:
                results = self._compute(batch)
            else:
                results = await asyncio.get_running_loop().run_in_executor(self.pool, self._compute, batch)
        except BaseException as e:  # the pool is gone (shutdown) or this task is cancelled
            results = [e if isinstance(e, Exception) else RuntimeError("node shutting down")] * len(batch)
            if not isinstance(e, Exception):
                self._settle(batch, results)
                raise
        self._settle(batch, results)

    @staticmethod
    def _settle(batch: list[_Queued], results: list) -> None:
        for q, result in zip(batch, results):
            if q.future.done():
                continue
            if isinstance(result, BaseException):
                q.future.set_exception(result)
            else:
                q.future.set_result(result)

    def _compute(self, batch: list[_Queued]) -> list:
        """In the pool: one call for all, or (alone, or after that call failed) one call per session,
        each session's exception its own."""
        if len(batch) > 1:
            try:
                return self.together([q.session for q in batch], [q.step for q in batch])
            except Exception:
                log.exception("a batched decode call of %d sessions failed; running them one by one", len(batch))
                self.stats.fallbacks += 1
        results = []
        for q in batch:
            try:
                results.append(self.alone(q.session, q.step))
            except Exception as e:
                results.append(e)
        return results
