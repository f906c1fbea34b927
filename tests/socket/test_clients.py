"""Real client libraries over real sockets on the scripted engine: huggingface_hub (sync and
async, TGI's and the chat routes), the openai SDK and @huggingface/inference (node). What is
checked is ours: shapes, error mapping, streaming framing, parameter mapping (read from what
reached the engine). vLLM's sampling (seeds, grammars, stop strings on real text) stays with
the engine tier (tests/tgi/test_client_hf.py, tests/openai/test_chat.py)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import openai
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.errors import ValidationError as HFValidationError

from tests.conftest import MAX_TOTAL_TOKENS, ROOT
from tests.helpers import same_text

pytestmark = pytest.mark.socket

PROMPT = "How do you make cheese?"
HELLO = [{"role": "user", "content": "Hello, who are you?"}]
NODE_PACKAGE = "@huggingface/inference@4"


@pytest.fixture(scope="module")
def client(scripted):
    return InferenceClient(scripted.url, timeout=120)


@pytest.fixture(scope="module")
def aclient(scripted):
    return AsyncInferenceClient(scripted.url, timeout=120)


def last_request(server) -> dict:
    return server.state()["requests"][-1]


# --- huggingface_hub, TGI's routes ---


def test_seed_doc_stream_example(client):
    tokens = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert len(tokens) == 12
    assert all(isinstance(t, str) for t in tokens)


def test_seed_doc_stream_details_example(client, scripted):
    events = list(client.text_generation(PROMPT, max_new_tokens=12, details=True, stream=True))
    assert [e.index for e in events] == list(range(1, 13))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == 12
    assert last.details.seed is None  # `parameters` present without sampling knobs: greedy
    assert last_request(scripted)["temperature"] == 0.0
    assert last.details.input_length > 0
    # `/` defaults return_full_text to true for a model with no (or text-generation) tag.
    assert last.generated_text.startswith(PROMPT)


async def test_seed_doc_async_stream_example(aclient):
    tokens = [t async for t in await aclient.text_generation(PROMPT, stream=True, max_new_tokens=20)]
    assert len(tokens) == 20


async def test_async_non_stream_and_concurrency(aclient):
    outs = await asyncio.gather(*[aclient.text_generation(f"{PROMPT} {i}", max_new_tokens=8, details=True) for i in range(8)])
    assert all(o.details.generated_tokens == 8 for o in outs)


async def test_async_client_maps_validation_errors(aclient):
    with pytest.raises(HFValidationError, match="`temperature` must be strictly positive"):
        await aclient.text_generation(PROMPT, temperature=-1.0)
    with pytest.raises(HFValidationError, match="`top_p` must be > 0.0 and < 1.0"):
        async for _ in await aclient.text_generation(PROMPT, top_p=1.0, stream=True):
            pass


def test_sync_client_maps_validation_errors(client):
    with pytest.raises(HFValidationError, match="Input validation error: `top_k` must be strictly positive"):
        client.text_generation(PROMPT, top_k=-1)
    with pytest.raises(HFValidationError, match="`decoder_input_details` == true is not supported when streaming"):
        list(client.text_generation(PROMPT, decoder_input_details=True, details=True, stream=True))


def test_non_stream_details(client):
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, return_full_text=False)
    d = out.details
    assert d.finish_reason == "length"
    assert d.generated_tokens == len(d.tokens) == 6
    assert d.prefill == []
    assert d.seed is None
    assert d.top_tokens is None and d.best_of_sequences is None
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in d.tokens)
    assert not any(t.special for t in d.tokens)


def test_decoder_input_details(client):
    out = client.text_generation(PROMPT, max_new_tokens=3, details=True, decoder_input_details=True)
    prefill = out.details.prefill
    assert prefill[0].logprob is None
    assert prefill[0].text == "<s>"  # the tokenizer adds BOS to `inputs`
    assert all(isinstance(p.logprob, float) for p in prefill[1:])
    assert "".join(p.text for p in prefill[1:]) == PROMPT


def test_top_n_tokens(client):
    out = client.text_generation(PROMPT, max_new_tokens=5, details=True, top_n_tokens=3)
    top = out.details.top_tokens
    assert len(top) == 5
    for position, chosen in zip(top, out.details.tokens):
        # huggingface_hub leaves the nested lists as dicts
        position = [t if isinstance(t, dict) else vars(t) for t in position]
        assert len(position) == 3
        logprobs = [t["logprob"] for t in position]
        assert logprobs == sorted(logprobs, reverse=True)
        assert position[0]["id"] == chosen.id  # the scripted engine's chosen token is its most likely
    events = list(client.text_generation(PROMPT, max_new_tokens=4, details=True, top_n_tokens=2, stream=True))
    assert all(len(e.top_tokens) == 2 for e in events)


def test_temperature_alone_means_sampling(client, scripted):
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True, temperature=0.7, seed=3)
    assert out.details.seed == 3
    sent = last_request(scripted)
    assert (sent["temperature"], sent["seed"]) == (0.7, 3)


def test_return_full_text(client):
    plain = client.text_generation(PROMPT, max_new_tokens=5, return_full_text=False)
    full = client.text_generation(PROMPT, max_new_tokens=5, return_full_text=True)
    default = client.text_generation(PROMPT, max_new_tokens=5)  # posts to `/`
    assert full == PROMPT + plain
    assert default == full


def test_truncate_keeps_last_tokens(client, scripted):
    events = list(client.text_generation(PROMPT, max_new_tokens=2, truncate=3, details=True, stream=True))
    assert events[-1].details.input_length == 3
    assert last_request(scripted)["prompt_tokens"] == 3  # the last three reach the engine


def test_eos_token_is_special_and_not_in_text(client):
    """The engine ends on EOS (the [eos] script: three tokens, then EOS)."""
    out = client.text_generation("[eos]", max_new_tokens=300, details=True, return_full_text=False)
    assert out.details.finish_reason == "eos_token"
    last = out.details.tokens[-1]
    assert last.special and last.text == "</s>"
    assert out.details.generated_tokens == len(out.details.tokens) == 4
    assert "</s>" not in out.generated_text
    # generated_text skips special tokens; their texts stay in `tokens` (as in TGI).
    body = "".join(t.text for t in out.details.tokens if not t.special)
    assert out.generated_text == body
    events = list(client.text_generation("[eos]", max_new_tokens=300, details=True, stream=True))
    assert events[-1].token.special and events[-1].details.finish_reason == "eos_token"
    assert events[-1].details.generated_tokens == len(events)


def test_absent_max_new_tokens_fills_context(scripted):
    r = scripted.http.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True, "stop": []}})
    d = r.json()["details"]
    used = int(r.headers["x-prompt-tokens"]) + d["generated_tokens"]
    assert d["finish_reason"] == "length"  # the scripted engine runs to max_tokens
    assert used == MAX_TOTAL_TOKENS
    assert last_request(scripted)["max_tokens"] == d["generated_tokens"]


# --- huggingface_hub and openai, the OpenAI routes ---


def test_huggingface_hub_chat_completion(scripted):
    client = InferenceClient(base_url=scripted.url, timeout=120)
    out = client.chat_completion(HELLO, max_tokens=8, seed=2)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens <= 8
    chunks = list(client.chat_completion(HELLO, max_tokens=8, seed=2, stream=True))  # ends on `data: [DONE]`
    assert same_text("".join(c.choices[0].delta.content for c in chunks), out.choices[0].message.content)
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    # huggingface_hub does not map errors on chat routes; the status and TGI's body are there.
    with pytest.raises(HfHubHTTPError) as e:
        client.chat_completion(HELLO, max_tokens=8, temperature=-1.0)
    assert e.value.response.status_code == 422 and e.value.response.json()["error_type"] == "validation"
    # The schema reaches the engine as its constraint (that vLLM enforces it is the engine tier's).
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    client.chat_completion(HELLO, max_tokens=30, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    kind, constraint = last_request(scripted)["structured"]
    assert kind == "json" and (constraint if isinstance(constraint, dict) else json.loads(constraint)) == schema


def test_huggingface_hub_async_chat_completion(scripted):
    async def main():
        client = AsyncInferenceClient(base_url=scripted.url, timeout=120)
        out = await client.chat_completion(HELLO, max_tokens=8, seed=9)
        stream = await client.chat_completion(HELLO, max_tokens=8, seed=9, stream=True)
        text = "".join([c.choices[0].delta.content async for c in stream])
        return out.choices[0].message.content, text

    full, streamed = asyncio.run(main())
    assert full and same_text(streamed, full)


def test_openai_sdk_chat(scripted):
    client = openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="-", timeout=120)
    out = client.chat.completions.create(model="tgi", messages=HELLO, max_tokens=8, seed=6)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 8
    stream = client.chat.completions.create(model="tgi", messages=HELLO, max_tokens=8, seed=6, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert same_text("".join(c.choices[0].delta.content for c in chunks if c.choices), out.choices[0].message.content)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=HELLO, temperature=-1)


def test_openai_sdk_completions(scripted):
    client = openai.OpenAI(base_url=f"{scripted.url}/v1", api_key="-", timeout=120)
    out = client.completions.create(model="tgi", prompt="Once upon", max_tokens=6, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens <= 6
    chunks = list(client.completions.create(model="tgi", prompt="Once upon", max_tokens=6, temperature=0, stream=True))
    # Per-token text holds back an incomplete UTF-8 character; the whole decode shows U+FFFD.
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text.rstrip("\ufffd")
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model="tgi", prompt="a", suffix="b")


# --- @huggingface/inference (node) ---


@pytest.fixture(scope="module")
def node_client():
    """@huggingface/inference 4.x installed with npm into a cache beside the tests."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the @huggingface/inference test")
    prefix = ROOT / ".test-cache" / "node"
    if not (prefix / "node_modules" / "@huggingface" / "inference").exists():
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--prefix", str(prefix), "--no-audit", "--no-fund", NODE_PACKAGE],
                       check=True, timeout=300, capture_output=True)
    script = prefix / "hf_inference_client.mjs"
    shutil.copy(Path(__file__).parent / "hf_inference_client.mjs", script)
    return script


def test_huggingface_inference_js(node_client, scripted):
    out = subprocess.run(["node", str(node_client), scripted.url], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "NODE_NO_WARNINGS": "1"})
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert isinstance(res["textGeneration"]["generated_text"], str), res["textGeneration"]
    chunks = res["textGenerationStream"]
    assert isinstance(chunks, list) and chunks, chunks
    # Same seed: the same tokens; the stream also carries the EOS token's own text, if any.
    streamed, text = "".join(c["choices"][0]["text"] for c in chunks), res["textGeneration"]["generated_text"]
    assert text and streamed.startswith(text) and len(streamed) - len(text) <= len("</s>")
    assert res["chatCompletion"]["choices"][0]["message"]["role"] == "assistant"
    stream = res["chatCompletionStream"]
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in stream)
    assert streamed and streamed == res["chatCompletion"]["choices"][0]["message"]["content"].rstrip("\ufffd")
    assert "must be strictly positive" in res["chatCompletionError"]["error"]


# --- the transport ---


def test_idle_keep_alive_connection_outlives_uvicorns_default(scripted):
    # Clients pool connections for longer than uvicorn's default 5 s idle timeout
    # (aiohttp: 15 s); a connection idle for 6 s must still serve the next request.
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", scripted.port), timeout=30) as s:
        s.sendall(request)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(6)  # the client's idle time is the scenario, not a wait for an outcome
        s.sendall(request)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
