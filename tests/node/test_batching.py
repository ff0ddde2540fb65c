"""node.batching without the network: several sessions' decode steps in one block call give each
session what it gets alone (outputs, and the cache its next steps read), for every batched family;
a failing batched call is re-run per session, so one broken session fails alone."""
import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from node.batching import BATCHED_FAMILIES, StepBatcher, run_together
from node.blocks import load_span, new_cache
from node.compat import cached_keys_values
from node.requests import Step
from node.sessions import Session, run_step
from swarm.arch import FAMILIES
from swarm.checkpoint import load_config
from swarm.spans import Span
from tests.helpers.checkpoints import FAMILY_QUIRKS, build_checkpoint

SPAN = Span(0, 4)
PASTS = (3, 9, 6)  # past lengths of the sessions batched together: longer and shorter than the windows (5)
BATCHES = (1, 2, 1)  # rows per session; the second's first row is left-padded (mask zeros)


def test_batched_families_are_supported_families():
    assert BATCHED_FAMILIES <= set(FAMILIES)


@pytest.fixture(scope="module", params=sorted(BATCHED_FAMILIES & set(FAMILY_QUIRKS)))
def family_blocks(request, tmp_path_factory):
    family = request.param
    path = build_checkpoint(tmp_path_factory.mktemp(family) / f"tiny-{family}", family=family, num_layers=4,
                            seed=1, overrides=FAMILY_QUIRKS[family], tokenizer=False)
    return load_span(path, load_config(path), SPAN, torch.float32)


def prefilled(blocks, seed: int) -> list[Session]:
    """Sessions with PASTS positions computed alone (one left-padded row among them)."""
    gen = torch.Generator().manual_seed(seed)
    sessions = []
    for past, batch in zip(PASTS, BATCHES):
        session = Session(SPAN, batch, 64, new_cache(blocks), torch.ones(batch, 0, dtype=torch.int64))
        mask = torch.ones(batch, past, dtype=torch.int64)
        positions = torch.arange(past).unsqueeze(0).expand(batch, past).clone()
        if batch > 1:
            mask[0, :2] = 0
            positions[0] = (torch.arange(past) - 2).clamp(min=0)
        hidden = torch.randn(batch, past, blocks.config.hidden_size, generator=gen)
        run_step(blocks, session, Step(hidden, mask, positions), 1024)
        sessions.append(session)
    return sessions


def steps_for(blocks, sessions, seed: int) -> list[Step]:
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for s in sessions:
        positions = torch.full((s.batch_size, 1), s.length)
        if s.batch_size > 1:
            positions[0] -= 2  # the left-padded row counts from its first real token
        steps.append(Step(torch.randn(s.batch_size, 1, blocks.config.hidden_size, generator=gen),
                          torch.ones(s.batch_size, 1, dtype=torch.int64), positions))
    return steps


def test_batched_decode_equals_each_session_alone(family_blocks):
    blocks = family_blocks
    together, alone = prefilled(blocks, 0), prefilled(blocks, 0)
    for round_ in range(3):  # later rounds read the keys/values the batched calls copied back
        steps = steps_for(blocks, together, 10 + round_)
        outs = run_together(blocks, SPAN, together, steps)
        for s, step, out in zip(alone, steps, outs):
            expected = run_step(blocks, s, step, 1024)
            assert out.shape == expected.shape
            torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    for a, b in zip(together, alone):
        assert torch.equal(a.mask, b.mask)
        for i in range(SPAN.start, SPAN.end):
            for x, y in zip(cached_keys_values(a.cache, i), cached_keys_values(b.cache, i)):
                torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def llama_blocks(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("llama") / "tiny-llama", num_layers=4, tokenizer=False)
    return load_span(path, load_config(path), SPAN, torch.float32)


def test_a_broken_session_fails_alone_and_changes_no_other(llama_blocks):
    blocks = llama_blocks
    sessions, reference = prefilled(blocks, 1), prefilled(blocks, 1)
    broken = copy.copy(sessions[1])
    broken.cache = new_cache(blocks)  # keys/values of the wrong head size: fails batched and alone
    for i in range(SPAN.start, SPAN.end):
        k, v = cached_keys_values(sessions[1].cache, i)
        broken.cache.update(k[..., :-1].clone(), v[..., :-1].clone(), i)
    batch = [sessions[0], broken, sessions[2]]
    steps = steps_for(blocks, batch, 5)

    async def run():
        with ThreadPoolExecutor(1) as pool:
            batcher = StepBatcher(blocks, 16, 1.0, pool, lambda s, st: run_step(blocks, s, st, 1024),
                                  lambda ss, sts: run_together(blocks, SPAN, ss, sts))
            results = await asyncio.gather(*(batcher.step(s, st) for s, st in zip(batch, steps)),
                                           return_exceptions=True)
            return results, batcher.stats

    results, stats = asyncio.run(run())
    assert stats.calls == {3: 1} and stats.fallbacks == 1 and stats.expired == 0
    assert isinstance(results[1], Exception) and not isinstance(results[0], Exception)
    for i in (0, 2):
        expected = run_step(blocks, reference[i], steps[i], 1024)
        torch.testing.assert_close(results[i], expected, atol=2e-5, rtol=1e-4)
        assert sessions[i].length == reference[i].length
