"""`swarm api` as a real process over a real swarm of `node serve` processes on 127.0.0.1, used through the
official `openai` package (sync and async, streamed and not) and raw HTTP: text equals local transformers
generate() with the same chat template, logprobs equal local ones, errors are OpenAI error objects with the
right status, a disconnected client's sessions close at once, a SIGKILLed node is invisible to a stream.

One swarm and one API process serve every test here (module fixtures); the tests that kill nodes come last.
"""
from __future__ import annotations

import asyncio
import copy
import json
import shutil
import signal
import threading
import time

import grpc
import httpx
import openai
import pytest
import torch
from peft import LoraConfig, PeftModel
from peft import get_peft_model as local_get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.api.engine import Sampling, logits_processors
from proto import swarmlm_pb2 as pb
from proto import swarmlm_pb2_grpc as pb_grpc
from tests.helpers.launch import LocalSwarm, Proc, command, wait_for

KEY = "test-key-0123456789"
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant:{% endif %}")
SPANS = ["0:3", "0:3", "0:3", "3:6"]  # three replicas of the first span: the failover tests kill two
CACHE_TOKENS = 8192
NODE_ARGS = ("--ttl", "3", "--shutdown-grace", "1", "--cache-tokens", str(CACHE_TOKENS), "--alloc-timeout", "1")
NAME = "tiny-chat"
MESSAGES = [{"role": "system", "content": "the swarm runs"}, {"role": "user", "content": "each node hosts a span"}]


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chat_path(tiny_path, tmp_path_factory):
    """The shared tiny checkpoint (same weights as ``local_model``) with a simple chat template."""
    path = tmp_path_factory.mktemp("api") / NAME
    shutil.copytree(tiny_path, path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(chat_path):
    return AutoTokenizer.from_pretrained(chat_path)


@pytest.fixture(scope="module")
def adapters_dir(chat_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-adapters")
    torch.manual_seed(9)
    model = local_get_peft_model(AutoModelForCausalLM.from_pretrained(chat_path, dtype=torch.float32),
                                 LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(root / "style")
    return root


@pytest.fixture(scope="module")
def served(chat_path, adapters_dir, tmp_path_factory):
    """(swarm, base URL): a bootstrap peer, the nodes of SPANS and one `swarm api` process, started together."""
    key_file = tmp_path_factory.mktemp("api-key") / "keys"
    key_file.write_text(f"# API keys\n{KEY}\n")
    with LocalSwarm(chat_path, ready_timeout=180) as swarm:
        swarm.start_bootstrap()
        api = Proc([*command("swarm"), "api", "--model", str(chat_path), "--initial-peers", *swarm.peers,
                    "--port", "0", "--api-key-file", str(key_file), "--max-wait", "3"])
        url = None
        try:
            swarm.start_nodes(SPANS, *NODE_ARGS, "--adapters", str(adapters_dir))
            url = api.read_line(180)
            assert url.startswith("http://127.0.0.1:")
            yield swarm, url
        finally:
            code = api.stop()
            assert url is None or code == 0, api.stderr_tail(20)  # a clean exit on SIGTERM once serving


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def aclient(served):
    return lambda: openai.AsyncOpenAI(base_url=served[1] + "/v1", api_key=KEY, max_retries=0, timeout=60)


# ---- helpers ----------------------------------------------------------------------------------------
def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def local_generate(model, tokenizer, ids: list[int], max_tokens: int, n: int = 1, eos: bool = True,
                   sampling: Sampling | None = None, **kwargs) -> list[str]:
    """Local transformers generate() of each choice, decoded as the API decodes."""
    prompt = torch.tensor([ids]).expand(n, -1)
    processors = logits_processors(sampling, None) if sampling is not None else None
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=2 if eos else None, logits_processor=processors, **kwargs)
    return [tokenizer.decode(row[len(ids):], skip_special_tokens=True) for row in out]


def info(address: str) -> pb.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.NodeStub(channel).Info(pb.InfoRequest(), timeout=10)


def busy_nodes(swarm) -> list[str]:
    """Addresses of live nodes holding an open session (cache room reserved)."""
    out = []
    for proc, address in zip(swarm.nodes, swarm.addresses):
        if proc.popen.poll() is None:
            i = info(address)
            if i.cache_tokens_free < i.cache_tokens:
                out.append(address)
    return out


def all_idle(swarm) -> bool:
    return not busy_nodes(swarm)


# ---- models, text and logprobs equal local transformers ---------------------------------------------
def test_models_lists_the_model_and_its_node_hosted_adapter(client, local_model, tokenizer, adapters_dir):
    assert [m.id for m in client.models.list().data] == [NAME, f"{NAME}:style"]
    ids = tokenizer("the swarm runs")["input_ids"]
    reference = PeftModel.from_pretrained(copy.deepcopy(local_model), adapters_dir / "style").eval()
    want = local_generate(reference, tokenizer, ids, 12, eos=False)
    got = client.completions.create(model=f"{NAME}:style", prompt="the swarm runs", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == want[0]
    assert got.choices[0].text != local_generate(local_model, tokenizer, ids, 12, eos=False)[0]  # the adapter matters


def test_chat_completion_equals_local_generate_with_the_chat_template(client, local_model, tokenizer):
    ids = chat_ids(tokenizer, MESSAGES)
    want = local_generate(local_model, tokenizer, ids, 24)
    got = client.chat.completions.create(model=NAME, messages=MESSAGES, max_completion_tokens=24, temperature=0)
    choice = got.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want[0]
    assert got.object == "chat.completion" and got.usage.prompt_tokens == len(ids)
    assert choice.finish_reason == ("length" if got.usage.completion_tokens == 24 else "stop")


def test_streamed_async_chat_equals_local_and_reports_usage(aclient, local_model, tokenizer):
    ids = chat_ids(tokenizer, MESSAGES)
    want = local_generate(local_model, tokenizer, ids, 20, eos=False)[0]

    async def run():
        async with aclient() as c:
            stream = await c.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=20, temperature=0,
                                                     stream=True, stream_options={"include_usage": True},
                                                     extra_body={"ignore_eos": True})
            return [chunk async for chunk in stream]

    chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_logprobs_equal_local_log_softmax_of_the_logits(client, local_model, tokenizer):
    prompt = "a node may leave"
    ids = tokenizer(prompt)["input_ids"]
    local = local_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    tokens = local.sequences[0, len(ids):].tolist()
    logprobs = [torch.log_softmax(step[0], -1) for step in local.logits]
    text = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True}).choices[0]
    assert len(text.logprobs.token_logprobs) == 8
    for got, want, token in zip(text.logprobs.token_logprobs, logprobs, tokens):
        assert got == pytest.approx(want[token].item(), abs=1e-4)
    for top, want in zip(text.logprobs.top_logprobs, logprobs):  # keyed by text: same-text tokens keep the likeliest
        best = torch.topk(want, 3).values.tolist()
        assert max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert all(any(v == pytest.approx(b, abs=1e-4) for b in best) for v in top.values())
    chat = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True}).choices[0]
    ids = chat_ids(tokenizer, MESSAGES)
    local = local_model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    for entry, step, token in zip(chat.logprobs.content, local.logits, local.sequences[0, len(ids):].tolist()):
        want = torch.log_softmax(step[0], -1)
        assert entry.logprob == pytest.approx(want[token].item(), abs=1e-4) and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(want.max().item(), abs=1e-4)


def printable_only(tokenizer, vocab_size: int = 256) -> dict[str, float]:
    """A logit_bias banning every token whose text is not printable ASCII (the random model's bytes)."""
    bad = [i for i in range(vocab_size) if not (t := tokenizer.decode([i])).isascii() or not t.isprintable()]
    return {str(i): -100.0 for i in bad}


def test_stop_strings_are_cut_as_openai_does_also_across_tokens_in_a_stream(client, local_model, tokenizer):
    prompt = "the client keeps the embeddings"
    ids, bias = tokenizer(prompt)["input_ids"], printable_only(tokenizer)
    sampling = Sampling(max_tokens=40, temperature=0, logit_bias=tuple((int(k), v) for k, v in bias.items()))
    out = local_model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                               eos_token_id=None, logits_processor=logits_processors(sampling, None))
    out = out[0, len(ids):].tolist()
    full = tokenizer.decode(out, skip_special_tokens=True)
    # a stop string of 3 characters spanning a token boundary past the first token
    ends = [len(tokenizer.decode(out[:k], skip_special_tokens=True)) for k in range(1, len(out))]
    stop = next(full[e - 1:e + 2] for e in ends if 2 < e < len(full) - 2)
    want = full[:full.find(stop)]
    kwargs = dict(model=NAME, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never-there"],
                  logit_bias=bias, extra_body={"ignore_eos": True})
    unstopped = client.completions.create(**{**kwargs, "stop": None}).choices[0]
    assert unstopped.text == full and unstopped.finish_reason == "length"  # logit_bias as local
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text == want and whole.finish_reason == "stop"
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(stop not in c.choices[0].text for c in chunks)


def test_end_of_sequence_stops_a_choice_unless_ignore_eos(client):
    forced = dict(model=NAME, prompt="the swarm", max_tokens=5, temperature=0, logit_bias={"2": 100})
    stopped = client.completions.create(**forced)
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == ""
    assert stopped.usage.completion_tokens == 1
    going = client.completions.create(**forced, extra_body={"ignore_eos": True})
    assert going.choices[0].finish_reason == "length" and going.usage.completion_tokens == 5


def test_seeded_sampling_with_n_choices_is_reproducible_and_equals_local(client, local_model, tokenizer):
    ids = chat_ids(tokenizer, MESSAGES)
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=16, temperature=0.9, top_p=0.95, n=2, seed=1234)
    first = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    again = [c.message.content for c in client.chat.completions.create(**kwargs).choices]
    other = [c.message.content for c in client.chat.completions.create(**{**kwargs, "seed": 99}).choices]
    assert first == again and first != other and first[0] != first[1]
    sampling = Sampling(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, n=2)
    assert first == local_generate(local_model, tokenizer, ids, 16, n=2, sampling=sampling)


# ---- errors -----------------------------------------------------------------------------------------
def test_errors_are_openai_error_objects_with_the_right_status(served, client):
    url = served[1]
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong-key-000", max_retries=0).models.list()
    r = httpx.post(url + "/v1/chat/completions", json=chat)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=chat["messages"])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{NAME}:nope", messages=chat["messages"])

    def status(body, path="/v1/chat/completions", headers=None, **kw):
        r = httpx.post(url + path, headers={**auth, **(headers or {})}, timeout=60,
                       **({"json": body} if body is not None else kw))
        if r.status_code != 200:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        return r.status_code, r.json().get("error", {})

    code, error = status({**chat, "max_tokens": "2"})
    assert code == 400 and error["param"] == "max_tokens"
    assert status({**chat, "temperature": 3})[0] == 400
    assert status({**chat, "stream": "yes"})[0] == 400
    assert status({**chat, "messages": [{"role": "robot", "content": "x"}]})[0] == 400
    assert status({**chat, "messages": []})[0] == 400
    assert status({**chat, "frequency_penalty": 0.5})[1]["param"] == "frequency_penalty"
    assert status({**chat, "stop": ["a", "b", "c", "d", "e"]})[0] == 400
    assert status({**chat, "logit_bias": {"99999": 1}})[0] == 400
    assert status({**chat, "an_unknown_field": {"x": 1}})[0] == 200  # ignored, as OpenAI does
    code, error = status({"model": NAME, "prompt": [5] * 4000, "max_tokens": 200}, "/v1/completions")
    assert code == 400 and error["code"] == "context_length_exceeded"
    assert status({"model": NAME, "prompt": [1, 300], "max_tokens": 2}, "/v1/completions")[0] == 400
    assert status(None, content=b"{not json", headers={"content-type": "application/json"})[0] == 400
    assert status(None, content=b"x" * (9 << 20))[0] == 413


def test_429_with_retry_after_when_the_nodes_have_no_cache_room(served, client, chat_path):
    from client import AutoDistributedModelForCausalLM

    swarm, _ = served
    filler = AutoDistributedModelForCausalLM.from_pretrained(str(chat_path), initial_peers=swarm.peers)
    try:
        with filler.inference_session(max_length=CACHE_TOKENS // 2) as session:
            session.step(torch.zeros(2, 1, 64))  # batch 2 x 4096: the 3:6 node's whole cache
            with pytest.raises(openai.RateLimitError) as e:
                client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0)
            assert int(e.value.response.headers["retry-after"]) > 0
            assert "RESOURCE_EXHAUSTED" in e.value.message
    finally:
        filler.close()
    assert wait_for(lambda: all_idle(swarm), 15)
    assert client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0).choices


# ---- concurrency and cleanup ------------------------------------------------------------------------
def test_concurrent_streams_run_at_once_each_equal_to_local(aclient, local_model, tokenizer):
    conversations = [[{"role": "user", "content": text}] for text in
                     ("the swarm runs", "each node hosts", "gradients flow back", "a node may leave")]
    wants = [local_generate(local_model, tokenizer, chat_ids(tokenizer, m), 40, eos=False)[0] for m in conversations]

    async def one(c, messages):
        stream = await c.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0,
                                                 stream=True, extra_body={"ignore_eos": True})
        times, text = [], ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                times.append(time.monotonic())
        return text, times

    async def run():
        async with aclient() as c:
            return await asyncio.gather(*(one(c, m) for m in conversations))

    results = asyncio.run(run())
    assert [text for text, _ in results] == wants
    # all four were being generated at one moment: none finished before the last one's first text arrived
    assert max(times[0] for _, times in results) < min(times[-1] for _, times in results)


def test_a_disconnected_client_closes_its_sessions_at_once(served):
    swarm, url = served
    auth = {"Authorization": f"Bearer {KEY}"}
    long = {"model": NAME, "messages": MESSAGES, "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    assert all_idle(swarm)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**long, "stream": True}, headers=auth,
                      timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert sum(1 for _, line in zip(range(12), lines) if line.startswith("data: ")) >= 5
        assert len(busy_nodes(swarm)) == 2  # one node per span holds the session
    # 3000 tokens take far longer than this; the nodes' idle timeout is 60 s
    assert wait_for(lambda: all_idle(swarm), 10)

    failed = {}

    def post():
        try:
            httpx.post(url + "/v1/chat/completions", json=long, headers=auth, timeout=httpx.Timeout(60, read=4))
        except httpx.ReadTimeout as e:
            failed["error"] = e

    thread = threading.Thread(target=post)
    thread.start()
    assert wait_for(lambda: len(busy_nodes(swarm)) == 2, 10)  # the non-streamed request is being generated
    thread.join(30)
    assert "error" in failed  # the client gave up waiting and closed the connection
    assert wait_for(lambda: all_idle(swarm), 10)


def test_sse_framing_on_the_wire(served):
    url = served[1]
    body = {"model": NAME, "prompt": "the swarm", "max_tokens": 5, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e.strip() and not e.startswith(":")]
    assert raw.endswith("data: [DONE]\n\n") and events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert event.startswith("data: ") and "\n" not in event
        chunk = json.loads(event.removeprefix("data: "))
        assert chunk["object"] == "text_completion" and chunk["id"].startswith("cmpl-")
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"


# ---- failover (these kill nodes: keep them last) ----------------------------------------------------
def stream_with_kill(client, swarm, kill_after: int, **kwargs) -> tuple[str, int]:
    """Stream a chat completion; after ``kill_after`` content chunks SIGKILL the first-span node serving it.
    Returns the whole text and how many chunks arrived after the kill."""
    first_span = [a for a, span in zip(swarm.addresses, SPANS) if span == "0:3"]
    text, seen, after = "", 0, -1
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        content = chunk.choices[0].delta.content if chunk.choices else None
        if not content:
            continue
        text, seen = text + content, seen + 1
        after += after >= 0
        if seen == kill_after:
            victims = [a for a in busy_nodes(swarm) if a in first_span]
            assert len(victims) == 1, victims
            swarm.nodes[swarm.addresses.index(victims[0])].stop(signal.SIGKILL)
            after = 0
    return text, after


def test_a_sigkilled_node_is_invisible_to_a_greedy_stream(served, client, local_model, tokenizer):
    swarm, _ = served
    want = local_generate(local_model, tokenizer, chat_ids(tokenizer, MESSAGES), 96, eos=False)[0]
    text, after = stream_with_kill(client, swarm, 5, model=NAME, messages=MESSAGES, max_tokens=96, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert text == want and after > 0


def test_a_sigkilled_node_is_invisible_to_a_seeded_sampled_stream(served, client):
    swarm, _ = served
    kwargs = dict(model=NAME, messages=MESSAGES, max_tokens=96, temperature=1.0, seed=77,
                  extra_body={"ignore_eos": True})
    want = client.chat.completions.create(**kwargs).choices[0].message.content
    text, after = stream_with_kill(client, swarm, 5, **kwargs)
    assert text == want and after > 0


def test_503_when_some_blocks_have_no_node(served, client):
    swarm, _ = served
    last = swarm.nodes[SPANS.index("3:6")]
    assert last.stop(signal.SIGTERM) == 0
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4, temperature=0)
    assert e.value.status_code == 503 and "3:6" in e.value.message
