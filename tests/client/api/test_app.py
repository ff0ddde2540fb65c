"""client.api.app in process (no swarm needed): refusals that come before any generation."""
import asyncio

import httpx
from transformers import AutoTokenizer

from client.api.app import ApiState, create_app
from client.api.engine import Engine
from client.api.models import Models


def post(app, path, body):
    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post(path, json=body)
    return asyncio.run(run())


def test_chat_without_a_chat_template_is_a_clear_400_and_unknown_routes_are_error_objects(tiny_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    assert not tokenizer.chat_template
    state = ApiState(Models("tiny-llama", base=None, open_client=None), Engine(tokenizer, 256, [2], 0), tokenizer,
                     context_length=4096, default_max_tokens=16)
    app = create_app(state)
    r = post(app, "/v1/chat/completions", {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "no_chat_template" and "/v1/completions" in error["message"]
    r = post(app, "/v1/nothing-here", {})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
