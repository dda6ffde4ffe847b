"""The OpenAI-compatible server as a real process on 127.0.0.1 (a free port, the built-in demo model), driven by the
official `openai` package (sync and async) and httpx: responses parse into openai's types and equal the in-process
Runner's; 64 concurrent streams; disconnects; a table of bad bodies; the API key."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

import mistralrs
from mistralrs.cli import DEMO_MODEL

KEY = "test-key"
MODEL = DEMO_MODEL.name
ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "What does the os module do?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs", "serve", "--port", str(port), "--api-key", KEY,
                             "--max-seqs", "32", "--max-body-bytes", "100000"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"the server did not start: {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def runner():
    with mistralrs.NormalLoader(mistralrs.LlamaLoader, model_id=str(DEMO_MODEL)).load(token_source="none") as r:
        yield r


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def local_chat(runner, messages=CHAT, **kw) -> dict:
    return json.loads(runner.send_chat_completion_request(mistralrs.ChatCompletionRequest(messages, "m", **kw)))


def local_completion(runner, prompt, **kw) -> dict:
    return json.loads(runner.send_completion_request(mistralrs.CompletionRequest(prompt, "m", **kw)))


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}  # no key needed


def test_chat_equals_the_in_process_runner(client, runner):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    assert isinstance(r, openai.types.chat.ChatCompletion)
    want = local_chat(runner, max_tokens=24, temperature=0)
    assert r.choices[0].message.content == want["choices"][0]["message"]["content"]
    assert r.usage.completion_tokens == want["usage"]["completion_tokens"]


def test_chat_stream_with_usage(client, runner):
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(isinstance(c, openai.types.chat.ChatCompletionChunk) for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local_chat(runner, max_tokens=24, temperature=0)["choices"][0]["message"]["content"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_and_not(client, runner):
    want = local_completion(runner, "The import statement", max_tokens=20, temperature=0)["choices"][0]["text"]
    r = client.completions.create(model=MODEL, prompt="The import statement", max_tokens=20, temperature=0)
    assert isinstance(r, openai.types.Completion) and r.choices[0].text == want
    chunks = list(client.completions.create(model=MODEL, prompt="The import statement", max_tokens=20,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


def test_n_logprobs_stop_seed(client, runner):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, seed=7, temperature=0.9,
                                       logprobs=True, top_logprobs=2)
    assert len(r.choices) == 2 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
    again = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, n=2, seed=7, temperature=0.9,
                                           logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    local = local_chat(runner, max_tokens=8, n_choices=2, seed=7, temperature=0.9, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [c["message"]["content"] for c in local["choices"]]
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[5:8]
    cut = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_response_format_json_schema(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "num", "schema": schema}})
    text = r.choices[0].message.content
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text)["n"], int)
    else:  # cut by max_tokens inside the number: still a prefix of the grammar
        assert text.startswith('{"n": ')


def test_async_client_and_64_concurrent_streams(server, runner):
    prompts = [f"Question {i}: what is a tuple?" for i in range(64)]
    want = [local_completion(runner, p, max_tokens=12, temperature=0)["choices"][0]["text"] for p in prompts]

    async def one(client, p):
        stream = await client.completions.create(model=MODEL, prompt=p, max_tokens=12, temperature=0, stream=True)
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))
    assert asyncio.run(main()) == want


def metric(server, name) -> float:
    for line in httpx.get(f"{server}/metrics", headers={"authorization": f"Bearer {KEY}"}).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def test_disconnects_abort_their_requests(server):
    """16 clients drop their streams after the first chunk: the engine's running sequences return to 0 within a
    few steps, far before the 400 tokens each asked for, and a new request is then served at idle latency."""
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "stream": True}

    def idle_latency():
        t = time.perf_counter()
        httpx.post(f"{server}/v1/completions", headers=headers, json={**body, "max_tokens": 8, "stream": False})
        return time.perf_counter() - t
    idle = min(idle_latency() for _ in range(3))

    async def drop():
        async with httpx.AsyncClient(headers=headers, timeout=60) as c:
            async def one():
                async with c.stream("POST", f"{server}/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            return  # leaving the block closes the connection
            await asyncio.gather(*(one() for _ in range(16)))
    asyncio.run(drop())
    deadline = time.time() + 10
    while metric(server, "mistralrs_running_sequences") > 0 and time.time() < deadline:
        time.sleep(0.05)
    assert metric(server, "mistralrs_running_sequences") == 0
    assert metric(server, "mistralrs_kv_cache_usage") == 0  # their blocks are free again
    # the best of 3, as `idle` was: one round trip on a shared machine can take a scheduling hiccup
    assert min(idle_latency() for _ in range(3)) < 2 * idle + 0.1


BAD = [  # (route, body: dict, or raw bytes, status, param)
    ("chat", {"model": MODEL}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": "hi there"}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "user"}]}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [1]}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "temperature"),
    ("chat", {"model": MODEL, "messages": CHAT, "top_p": 2}, 400, "top_p"),
    ("chat", {"model": MODEL, "messages": CHAT, "top_k": -3}, 400, "top_k"),
    ("chat", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": CHAT, "max_tokens": "ten"}, 400, "max_tokens"),
    ("chat", {"model": MODEL, "messages": CHAT, "n": 0}, 400, "n"),
    ("chat", {"model": MODEL, "messages": CHAT, "n": 10 ** 6}, 400, "n"),
    ("chat", {"model": MODEL, "messages": CHAT, "stream": "yes"}, 400, "stream"),
    ("chat", {"model": MODEL, "messages": CHAT, "logprobs": "yes"}, 400, "logprobs"),
    ("chat", {"model": MODEL, "messages": CHAT, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("chat", {"model": MODEL, "messages": CHAT, "logit_bias": {"a": 1}}, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": CHAT, "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": CHAT, "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": CHAT, "logit_bias": [1]}, 400, "logit_bias"),
    ("chat", {"model": MODEL, "messages": CHAT, "stop": 5}, 400, "stop"),
    ("chat", {"model": MODEL, "messages": CHAT, "stop": [""]}, 400, "stop"),
    ("chat", {"model": MODEL, "messages": CHAT, "presence_penalty": "x"}, 400, "presence_penalty"),
    ("chat", {"model": MODEL, "messages": CHAT, "seed": "x"}, 400, "seed"),
    ("chat", {"model": MODEL, "messages": CHAT, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("chat", {"model": MODEL, "messages": CHAT, "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("chat", {"model": "gpt-4", "messages": CHAT}, 404, "model"),
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("chat", b"\xff\xfe", 400, None),
    ("chat", b'{"model": "' + b"x" * 200_000 + b'"}', 413, None),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("completions", {"model": MODEL, "prompt": "x", "best_of": 0}, 400, "best_of"),
    ("completions", {"model": MODEL, "prompt": "x", "echo": 3}, 400, "echo"),
    ("completions", {"model": MODEL, "prompt": "x", "suffix": 3}, 400, "suffix"),
    ("completions", {"model": MODEL, "prompt": "x", "grammar": "a+"}, 400, "grammar"),
    ("completions", {"model": MODEL, "prompt": "x", "logprobs": 2}, 400, "logprobs"),
    ("completions", {"model": MODEL, "prompt": "x", "best_of": 3, "stream": True}, 400, "best_of"),
    ("completions", {"model": MODEL, "prompt": "x " * 5000}, 400, "prompt"),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_bodies_get_openai_errors_and_the_server_keeps_serving(server, route, body, status, param):
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server}/v1/{'chat/completions' if route == 'chat' else route}", content=content,
                   headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert httpx.get(f"{server}/health").status_code == 200


def test_unknown_route_and_fields(server):
    headers = {"authorization": f"Bearer {KEY}"}
    r = httpx.get(f"{server}/v1/nothing", headers=headers)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{server}/v1/chat/completions", headers=headers,
                   json={"model": MODEL, "messages": CHAT, "max_tokens": 2, "user": "me", "frobnicate": 1})
    assert r.status_code == 200 and r.headers["x-mistralrs-ignored-fields"] == "frobnicate,user"


def test_api_key(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2}
    assert httpx.post(f"{server}/v1/chat/completions", json=body).status_code == 401
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.post(f"{server}/v1/chat/completions", json=body,
                      headers={"authorization": f"Bearer {KEY}"}).status_code == 200
