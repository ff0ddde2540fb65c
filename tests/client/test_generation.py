"""generate() over the swarm == local generate(): greedy, sampling, beams, drafts, sessions, streaming."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import ClientConfig
from tests.helpers.checkpoints import build_checkpoint

PAD = 0


def prompts(seed: int = 3):
    """3 prompts of different lengths, left-padded."""
    torch.manual_seed(seed)
    lengths = [9, 4, 13]
    ids = torch.full((3, max(lengths)), PAD)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, -n:] = torch.randint(3, 256, (n,))
        mask[row, -n:] = 1
    return ids, mask


@pytest.mark.parametrize("spans", [("0:4", "4:6"), ("0:3", "2:5", "4:6")], ids=["2-nodes", "3-nodes"])
def test_greedy_64_tokens_equal_local(spans, start_nodes, open_client, tiny_path, local_model):
    start_nodes(*spans)
    model = open_client(tiny_path)
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    out = model.generate(ids, **kwargs)
    ref = local_model.generate(ids, **kwargs)
    assert out.shape == (3, ids.shape[1] + 64)
    assert torch.equal(out, ref)


def test_seeded_sampling_equals_local(start_nodes, open_client, tiny_path, local_model):
    start_nodes("0:6")
    model = open_client(tiny_path)
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=24, do_sample=True, top_k=50, top_p=0.9, temperature=0.7,
                  repetition_penalty=1.3, pad_token_id=PAD, eos_token_id=None)
    torch.manual_seed(11)
    out = model.generate(ids, **kwargs)
    torch.manual_seed(11)
    ref = local_model.generate(ids, **kwargs)
    assert torch.equal(out, ref)


def test_beam_search_equals_local(start_nodes, open_client, tiny_path, local_model):
    """Beam search: at every step the nodes' cache rows follow the beams transformers chose."""
    start_nodes("0:4", "4:6")
    model = open_client(tiny_path)
    ids, mask = prompts()
    kwargs = dict(attention_mask=mask, max_new_tokens=16, num_beams=4, num_return_sequences=2, do_sample=False,
                  pad_token_id=PAD, eos_token_id=None)
    out = model.generate(ids, **kwargs)
    ref = local_model.generate(ids, **kwargs)
    assert out.shape == (6, ids.shape[1] + 16)
    assert torch.equal(out, ref)
    greedy = local_model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=PAD,
                                  eos_token_id=None)
    assert not torch.equal(ref[::2], greedy)  # the beams matter here
    with pytest.raises(ValueError, match="beam search inside an inference_session"):
        with model.inference_session(max_length=64) as sess:
            model.generate(ids, session=sess, **kwargs)


def test_reordered_rows_survive_a_lost_node(start_nodes, open_client, tiny_path, local_model):
    """After a beam reorder, a replacement node is rebuilt from the reordered history: its outputs are
    those of the token sequences the rows now hold."""
    nodes = start_nodes("0:6", "0:6")
    model = open_client(tiny_path)
    torch.manual_seed(4)
    past, new = torch.randint(3, 256, (3, 6)), torch.randint(3, 256, (3, 1))
    rows = torch.tensor([2, 2, 0])
    with torch.no_grad(), model.inference_session(max_length=16) as sess:
        sess.step(model.model.embed_tokens(past))
        sess.reorder(rows)
        serving = sess._streams[0].hop.server.address
        next(n for n in nodes if n.address == serving).stop(grace=0)
        logits = model.lm_head(model.model.norm(sess.step(model.model.embed_tokens(new))))[:, -1]
        assert sess._streams[0].hop.server.address != serving
        with pytest.raises(ValueError, match="reorder needs 3 row numbers"):
            sess.reorder(torch.tensor([0, 3, 1]))
    with torch.no_grad():
        ref = local_model(torch.cat([past[rows], new], dim=1)).logits[:, -1]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_prompt_lookup_decoding_equals_local(start_nodes, open_client, tiny_path, local_model, monkeypatch):
    """Assisted decoding (prompt lookup, then a draft model): several draft tokens go through the nodes in
    one step, and the rejected ones are dropped from the nodes' caches with the next step."""
    from client.session import InferenceSession

    drops = []
    crop = InferenceSession.crop
    monkeypatch.setattr(InferenceSession, "crop", lambda self, n: (drops.append(n), crop(self, n))[1])
    start_nodes("0:4", "4:6")
    model = open_client(tiny_path)
    torch.manual_seed(0)
    ids = torch.randint(3, 256, (1, 6)).repeat(1, 3)  # repetitive: the lookup finds drafts
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None, prompt_lookup_num_tokens=4)
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))
    assert max(drops) > 0  # drafts were rejected and dropped
    # a local draft model (here one that drafts with perturbed weights, so some drafts are wrong)
    draft = copy.deepcopy(local_model)
    with torch.no_grad():
        for p in draft.model.layers[-1].parameters():
            p.add_(torch.randn_like(p) * 0.5)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=PAD, eos_token_id=None, assistant_model=draft)
    drops.clear()
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))
    assert max(drops) > 0


def test_dropped_positions_stay_dropped_on_a_replacement_node(start_nodes, open_client, tiny_path, local_model):
    nodes = start_nodes("0:6", "0:6")
    model = open_client(tiny_path)
    torch.manual_seed(4)
    past, new = torch.randint(3, 256, (1, 9)), torch.randint(3, 256, (1, 1))
    with torch.no_grad(), model.inference_session(max_length=16) as sess:
        sess.step(model.model.embed_tokens(past))
        sess.crop(3)  # e.g. three rejected drafts
        serving = sess._streams[0].hop.server.address
        next(n for n in nodes if n.address == serving).stop(grace=0)
        logits = model.lm_head(model.model.norm(sess.step(model.model.embed_tokens(new))))[:, -1]
        assert sess._streams[0].hop.server.address != serving
        with pytest.raises(ValueError, match="cannot crop 8 positions: the session holds 7"):
            sess.crop(8)
    with torch.no_grad():
        ref = local_model(torch.cat([past[:, :6], new], dim=1)).logits[:, -1]
    assert torch.allclose(logits, ref, atol=1e-4)


def test_sliding_window_generation_and_drafts_equal_local(start_nodes, open_client, tmp_path, bootstrap):
    """A Mistral checkpoint with a 6-token attention window: sessions run far past the window (greedy and
    prompt lookup, whose rejected drafts are dropped after the window is full) and equal local."""
    path = build_checkpoint(tmp_path / "mistral", family="mistral", num_layers=4, sliding_window=6, seed=1)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert local.config.sliding_window == 6
    start_nodes("0:2", "2:4", model=path)
    no_retries = ClientConfig(initial_peers=tuple(bootstrap), max_retries=0)  # a node failing fails the test
    model = open_client(path, client_config=no_retries)
    ids, mask = prompts()
    greedy = dict(max_new_tokens=20, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with torch.no_grad():
        assert torch.allclose(model(ids, attention_mask=mask).logits, local(ids, attention_mask=mask).logits,
                              atol=1e-4)
    assert torch.equal(model.generate(ids, attention_mask=mask, **greedy),
                       local.generate(ids, attention_mask=mask, **greedy))
    repetitive = ids[2:, -5:].repeat(1, 3)
    lookup = dict(greedy, prompt_lookup_num_tokens=3)
    assert torch.equal(model.generate(repetitive, **lookup), local.generate(repetitive, **lookup))


def test_eos_stops_like_local(start_nodes, open_client, tiny_path, local_model):
    start_nodes("0:6")
    model = open_client(tiny_path)
    ids, mask = prompts()
    free = local_model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    eos = int(free[0, ids.shape[1] + 3])  # a token row 0 emits: generation must stop there for that row
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))


def test_two_turn_session_equals_generating_the_concatenation(start_nodes, open_client, tiny_path, local_model):
    start_nodes("0:2", "2:6")
    model = open_client(tiny_path)
    turn1 = torch.randint(3, 256, (1, 7))
    turn2 = torch.randint(3, 256, (1, 5))
    kwargs = dict(do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with model.inference_session(max_length=64) as session:
        a = model.generate(turn1, max_new_tokens=8, session=session, **kwargs)
        position_after_turn1 = session.position
        b = model.generate(turn2, max_new_tokens=8, session=session, **kwargs)
    ref_a = local_model.generate(turn1, max_new_tokens=8, **kwargs)
    ref_b = local_model.generate(torch.cat([ref_a, turn2], dim=1), max_new_tokens=8, **kwargs)
    assert torch.equal(a, ref_a) and torch.equal(b, ref_b)
    assert position_after_turn1 == 7 + 8 - 1  # the last sampled token is sent with the next turn only


def test_streamer_receives_tokens_as_they_come(start_nodes, open_client, tiny_path, local_model):
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    start_nodes("0:6")
    model = open_client(tiny_path)
    ids = torch.randint(3, 256, (1, 6))
    streamer = Collect()
    out = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=PAD, eos_token_id=None, streamer=streamer)
    assert streamer.chunks[-1] is None and len(streamer.chunks) == 1 + 10 + 1  # prompt, each token, end
    assert torch.equal(torch.cat([c.view(1, -1) for c in streamer.chunks[1:-1]], dim=1), out[:, 6:])


def test_long_prompt_is_prefilled_in_pieces_and_chunks(start_nodes, open_client, tiny_path, local_model, bootstrap):
    """2,000 prompt tokens: the client sends pieces of 700, each node computes chunks of 256."""
    from client import ClientConfig

    start_nodes("0:3", "3:6", max_chunk_tokens=256)
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), max_step_tokens=700))
    ids = torch.randint(3, 256, (1, 2000))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kwargs), local_model.generate(ids, **kwargs))


def test_a_full_node_sends_the_session_to_a_replica_with_room(start_nodes, open_client, tiny_path, local_model,
                                                             bootstrap):
    """A node out of cache room answers RESOURCE_EXHAUSTED: the client opens on another replica at
    once (no ban: the node is fine, just busy); only when every replica is full does that clear error
    reach the user, without waiting max_wait for some other node."""
    import time

    from client import ClientConfig

    start_nodes("0:6", "0:6", cache_tokens=40, alloc_timeout=0.2)
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), max_wait=30.0))
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    ref = local_model.generate(ids, **kwargs)
    with model.inference_session(max_length=30) as first, model.inference_session(max_length=30) as second:
        assert torch.equal(model.generate(ids, session=first, **kwargs), ref)
        router, busy = model.chain.router, first._streams[0].hop.server.node_id
        for server in router._servers:  # make the full node look fastest, so the route tries it first
            router.rtt[server.node_id] = 0.0 if server.node_id == busy else 1.0
        assert torch.equal(model.generate(ids, session=second, **kwargs), ref)  # 30 + 30 > 40: the other node
        nodes = {first._streams[0].hop.server.node_id, second._streams[0].hop.server.node_id}
        assert len(nodes) == 2
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED.*no room for 30 cache tokens"):
            with model.inference_session(max_length=30) as third:
                model.generate(ids, session=third, **kwargs)
        assert time.monotonic() - started < 10  # not max_wait
    assert not model.chain.router.banned()


def test_a_session_over_the_per_client_limit_gets_the_nodes_reason(start_nodes, open_client, tiny_path, bootstrap):
    """The node refuses a stream over its per-client limit as soon as it starts, often before the client
    has written its opening message; the client must report the node's RESOURCE_EXHAUSTED reason (not the
    local INTERNAL write failure, which would look like a broken node), at once and without a ban."""
    import time

    from client import ClientConfig

    start_nodes("0:6", max_sessions_per_client=1)
    model = open_client(tiny_path, client_config=ClientConfig(initial_peers=tuple(bootstrap), max_wait=30.0))
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=2, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    with model.inference_session(max_length=16) as held:
        model.generate(ids, session=held, **kwargs)
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED.*already has 1 inference sessions open"):
                model.generate(ids, **kwargs)
            assert time.monotonic() - started < 10
    assert not model.chain.router.banned()


def test_pad_tokens_without_attention_mask_are_masked_like_local(start_nodes, open_client, tiny_path, local_model):
    """input_ids holding the pad id and no attention_mask: generate() infers the mask from the pad tokens
    (issue 20, item 4); with the pad id equal to the end token it cannot, and keeps every position."""
    start_nodes("0:6")
    model = open_client(tiny_path)
    ids, mask = prompts(seed=5)
    greedy = dict(max_new_tokens=12, do_sample=False)
    out = model.generate(ids, **greedy)
    assert torch.equal(out, local_model.generate(ids, **greedy))
    assert torch.equal(out, local_model.generate(ids, attention_mask=mask, **greedy))  # inferred == the real mask
    same_as_eos = dict(greedy, pad_token_id=2, eos_token_id=2)
    tail = ids.masked_fill(mask == 0, 2)
    assert torch.equal(model.generate(tail, **same_as_eos), local_model.generate(tail, **same_as_eos))
