"""The contract with transformers and PEFT, checked in seconds with no processes and no network.

generate() (greedy, beams, prompt lookup, a 2-turn session, prompt / prefix / LoRA adapters) runs on the
client's model over a RemoteCache whose session computes the blocks in this process with the node's own
code (``node.sessions.run_step``: the decoder-layer call, the mask functions, the LoRA hooks), and must
equal local transformers / PEFT. It runs first in CI: when a transformers or PEFT release moves something
the client or the node relies on, these fail with a message naming what moved and where our seam is
(client/compat.py, node/compat.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import types
import warnings

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.cache_utils import Cache

import peft
from client import compat
from client.generation import RemoteCache
from client.chain import SwarmLink
from client.model import DistributedModelForCausalLM, build_client_model
from client.session import InferenceSession
from tests.helpers.checkpoints import build_checkpoint
from node.blocks import load_span, new_cache, prefixed_cache
from swarm.checkpoint import load_config
from node.lora import LoraCache
from swarm.arch import linear_shapes
from node.requests import Step, parse_lora
from node.sessions import Session, run_step
from swarm.spans import Span
from tests.peft_reference import greedy_by_forward, peft_generate_is_sound

PAD = 0
VERSIONS = f"transformers {transformers.__version__}, peft {peft.__version__}"
SEAMS = "client/compat.py (client side) and node/compat.py (node side)"


def in_process_link(num_blocks: int, loop: asyncio.AbstractEventLoop) -> SwarmLink:
    """What an InferenceSession needs of the swarm, here: the block count and a way to run coroutines
    (its steps never reach the router, connections or verifier)."""
    return SwarmLink(model="", num_blocks=num_blocks, router=None, connections=None, verifier=None,
                     request_timeout=60.0, max_step_tokens=2048, adapter=None, run=loop.run_until_complete,
                     call_soon=lambda fn: fn())


class InProcessSession(InferenceSession):
    """The client's own InferenceSession (positions, crops, reorders, prefixes as it tracks them), with
    its steps computed in this process by the node's code instead of over gRPC streams."""

    def __init__(self, blocks, max_length: int, lora=None, prefix=None):
        self._loop = asyncio.new_event_loop()
        super().__init__(in_process_link(blocks.config.num_hidden_layers, self._loop), max_length, lora=lora,
                         prefix=prefix)
        self.blocks = blocks
        self.node_session: Session | None = None
        self.received: list[int] = []  # positions the "node" computed, per step
        self._drop, self._rows = 0, None

    def crop(self, count: int) -> None:
        super().crop(count)
        self._drop += count

    def reorder(self, rows) -> None:
        rows = torch.as_tensor(rows, dtype=torch.int64).flatten()
        super().reorder(rows)
        if self.batch_size is not None and not torch.equal(rows, torch.arange(self.batch_size)):
            self._rows = rows if self._rows is None else self._rows.index_select(0, rows)

    async def _step(self, hidden, mask, positions) -> torch.Tensor:
        span = Span(0, self.blocks.config.num_hidden_layers)
        if self.node_session is None:
            cache, virtual = new_cache(self.blocks), 0
            if self.prefix is not None:
                prefix = self._prefix_keys_values()
                cache, virtual = prefixed_cache(self.blocks, span, prefix), prefix.shape[4]
            lora = None
            if self.lora is not None:  # the weights as the node parses them from the session's opening message
                lora = parse_lora(self.lora.message(span, with_weights=True), span,
                                  linear_shapes(self.blocks.layers[0]), LoraCache())
            self.node_session = Session(span, self.batch_size, self.max_length, cache,
                                        torch.ones(self.batch_size, virtual, dtype=torch.int64), lora)
        step = Step(hidden, mask, positions, self._drop, self._rows)
        self._drop, self._rows = 0, None
        self.received.append(hidden.shape[1])
        with torch.no_grad():
            return run_step(self.blocks, self.node_session, step, max_chunk_tokens=1024)

    def close(self) -> None:
        super().close()
        self._loop.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("contract") / "tiny", num_layers=4)


@pytest.fixture(scope="module")
def local(checkpoint):
    return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def blocks(checkpoint):
    config = load_config(checkpoint)
    return load_span(checkpoint, config, Span(0, config.num_hidden_layers), torch.float32)


@pytest.fixture
def sessions():
    return []


@pytest.fixture
def client(checkpoint, blocks, sessions):
    """The client's model with its sessions computed in-process; ``sessions`` collects them."""
    model = build_client_model(DistributedModelForCausalLM, checkpoint, torch.float32)

    def inference_session(self, max_length: int) -> InProcessSession:
        prefix, lora = self.model.layers.prefix, self.model.layers.lora
        virtual = prefix.num_virtual_tokens if prefix is not None else 0
        session = InProcessSession(blocks, max_length + virtual, lora=lora, prefix=prefix)
        sessions.append(session)
        return session

    model.inference_session = types.MethodType(inference_session, model)
    return model


@pytest.fixture(autouse=True)
def consulted(monkeypatch):
    """Every Cache method or property generate() looks up on a RemoteCache without RemoteCache
    declaring it (so it would be answered by the base class from an empty layer list)."""
    seen: set[str] = set()
    inherited = {name for klass in Cache.__mro__ if klass is not object for name in vars(klass)
                 if not name.startswith("__")} - set(vars(RemoteCache))
    original = RemoteCache.__getattribute__

    def record(self, name):
        if name in inherited:
            seen.add(name)
        return original(self, name)

    monkeypatch.setattr(RemoteCache, "__getattribute__", record)
    yield seen
    assert not seen, (f"{VERSIONS}: generate() consults Cache.{', Cache.'.join(sorted(seen))}, which RemoteCache "
                      "inherits (answered from an empty layer list); declare it in client/generation.py")


@contextlib.contextmanager
def contract(what: str):
    """Run our side of the contract with deprecation warnings as errors (our code must not use what the
    installed versions deprecate) and re-raise a failure with the versions and where the seam is."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    except (FutureWarning, DeprecationWarning) as e:
        raise AssertionError(f"{VERSIONS}: {what} uses something deprecated: {e}; fix it in {SEAMS}") from e
    except TypeError as e:
        if "keyword argument" in str(e) or "positional argument" in str(e):
            raise AssertionError(f"{VERSIONS}: {what}: a call signature moved ({e}); the client hands transformers "
                                 f"the cache as `{compat.CACHE_KWARG}=`; fix it in {SEAMS}") from e
        raise AssertionError(f"{VERSIONS}: {what} failed: {type(e).__name__}: {e}; see {SEAMS}") from e
    except (AttributeError, KeyError, ValueError, RuntimeError) as e:
        raise AssertionError(f"{VERSIONS}: {what} failed: {type(e).__name__}: {e}; see {SEAMS}") from e


def padded_prompts():
    torch.manual_seed(3)
    lengths = [7, 3, 10]
    ids = torch.full((3, max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 256, (n,))
        mask[row, -n:] = 1
    return ids, mask


def test_cache_keyword_is_what_generate_passes(client):
    """generate() hands our forward() the cache under the keyword compat names, and reads it back from the
    output field of that name."""
    passed = []
    forward = client.forward

    def spy(**kwargs):
        passed.append(sorted(k for k in compat.CACHE_NAMES if kwargs.get(k) is not None))
        return forward(**kwargs)

    client.forward = spy
    with contract("generate() with a RemoteCache"):
        client.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    assert passed and all(p == [compat.CACHE_KWARG] for p in passed), (
        f"{VERSIONS}: generate() passed the cache to forward() as {passed[0] if passed else 'nothing'}, "
        f"client/compat.py says `{compat.CACHE_KWARG}`")


@pytest.mark.parametrize("how", [
    dict(do_sample=False),
    dict(num_beams=3, num_return_sequences=2, do_sample=False),
    dict(prompt_lookup_num_tokens=3, do_sample=False),
], ids=["greedy", "beams", "prompt-lookup"])
def test_generate_equals_local(how, client, local):
    ids, mask = padded_prompts()
    if "prompt_lookup_num_tokens" in how:  # prompt lookup runs batch 1; a repetitive prompt makes drafts
        ids, mask = torch.tensor([[9, 10, 11, 12, 9, 10, 11, 12, 9, 10]]), None
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=PAD, eos_token_id=None, **how)
    with contract(f"generate({how})"):
        out = client.generate(ids, **kwargs)
    assert torch.equal(out, local.generate(ids, **kwargs)), f"{VERSIONS}: generate({how}) differs from local"


def test_mask_inferred_from_pad_tokens_like_generate(client, local):
    """Padded input_ids and no attention_mask: the client infers the mask as generate() does, through
    transformers' own helpers (compat.generation_attention_mask)."""
    ids, mask = padded_prompts()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with contract("the attention mask generate() infers from pad tokens"):
        inferred = compat.generation_attention_mask(client, ids, client.generation_config, kwargs)
        out = client.generate(ids, **kwargs)
    assert torch.equal(inferred, mask), f"{VERSIONS}: the inferred mask is not the pad positions; see {SEAMS}"
    assert torch.equal(out, local.generate(ids, **kwargs)), f"{VERSIONS}: generate() without a mask differs from local"


def test_two_turns_send_only_new_tokens(client, local, sessions):
    turn1, turn2 = torch.randint(3, 256, (1, 7)), torch.randint(3, 256, (1, 5))
    kwargs = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with contract("a 2-turn session"), client.inference_session(max_length=64) as session:
        a = client.generate(turn1, max_new_tokens=6, session=session, **kwargs)
        first = list(session.received)
        b = client.generate(turn2, max_new_tokens=6, session=session, **kwargs)
        second = session.received[len(first):]
    ref_a = local.generate(turn1, max_new_tokens=6, **kwargs)
    assert torch.equal(a, ref_a)
    assert torch.equal(b, local.generate(torch.cat([ref_a, turn2], 1), max_new_tokens=6, **kwargs))
    assert first == [7] + [1] * 5, f"{VERSIONS}: turn 1 sent {first} positions per step"
    # turn 2 starts with the last token of turn 1 (never sent yet) and the 5 new ones, not the conversation
    assert second == [6] + [1] * 5, (f"{VERSIONS}: turn 2 sent {second} positions per step (the whole conversation "
                                     "again?): check RemoteCache's is_linear / get_seq_length in client/generation.py")


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_adapters_generate_like_peft(method, client, local, checkpoint):
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model as local_peft

    from client import get_peft_model

    config = {"prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
              "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
              "lora": lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                         init_lora_weights=False)}[method]
    torch.manual_seed(0)
    ours = get_peft_model(client, config())
    theirs = local_peft(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32), config()).eval()
    with torch.no_grad():  # large enough to change what the model says, so the test can fail
        for name, p in theirs.named_parameters():
            if "prompt_encoder" in name or "lora_" in name:
                p.mul_(8.0)
    state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items()
             if "lora_" in k or "prompt_encoder" in k}
    if method == "lora":  # the same weights on both sides
        ours.adapter.load_peft_state_dict(state)
    else:
        ours.adapter.encoder.load_state_dict({k.split("prompt_encoder.")[-1].removeprefix("default."): v
                                              for k, v in theirs.state_dict().items() if "prompt_encoder" in k})
    ids, mask = padded_prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with contract(f"generate() with a {method} adapter"), torch.no_grad():
        out = ours.eval().generate(input_ids=ids, **kwargs)
    # PEFT's math, step by step (tests/peft_reference.py: its own generate() is wrong on transformers 5.24)
    ref = greedy_by_forward(theirs, ids, mask, 6, None if method == "prompt" else 0)
    assert not torch.equal(ref, local.generate(ids, **kwargs)), "the adapter must change the tokens"
    assert torch.equal(out, ref), f"{VERSIONS}: {method} adapter generates other tokens than PEFT"


@pytest.mark.xfail(not peft_generate_is_sound(), strict=True,
                   reason="PEFT <= 0.21.2 reads the cache as `past_key_values`, transformers >= 5.24 passes `cache`")
def test_peft_own_generate_with_prompt_tuning(checkpoint):
    """Upstream, not ours: PEFT's generate() with prompt tuning agrees with its forward(). Expected to fail on
    transformers 5.24 + PEFT 0.21.2 (an XPASS here means PEFT fixed it: drop the xfail)."""
    from peft import PromptTuningConfig, get_peft_model as local_peft

    torch.manual_seed(0)
    theirs = local_peft(AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32),
                        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)).eval()
    with torch.no_grad():
        for p in theirs.prompt_encoder.parameters():
            p.mul_(8)
        ids = torch.tensor([[5, 9, 33, 40, 7]])
        out = theirs.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(out, greedy_by_forward(theirs, ids, None, 6))


def test_node_blocks_equal_local_layers(blocks, local):
    """The node's decoder-layer call and masks (node/compat.py) give the local model's hidden states."""
    from node.blocks import forward_span

    ids, mask = padded_prompts()
    with torch.no_grad():
        hidden = local.model.embed_tokens(ids)
        ref = local.model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        with contract("the node's decoder-layer call"):
            out = forward_span(blocks, Span(0, blocks.config.num_hidden_layers), hidden, mask)
    keep = mask.bool()
    # hidden_states[-1] has the final norm applied; compare the last block's raw output via the norm
    assert torch.allclose(local.model.norm(out)[keep], ref[-1][keep], atol=1e-5), f"{VERSIONS}: blocks differ"
