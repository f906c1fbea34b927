"""/v1/chat/completions against the real engine: raw SSE, and huggingface_hub's structured
output as LangChain sends it. The clients' plumbing and disconnect aborts are the socket
tier's (tests/socket/test_clients.py, tests/socket/test_disconnect.py)."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from huggingface_hub import InferenceClient

from tests.conftest import metric, wait_idle
from tests.helpers import same_text

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
CHUNK_KEYS = ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]


def chat_stream_raw(http: httpx.Client, body: dict) -> tuple[httpx.Response, list[bytes]]:
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        raw = r.read()
    assert raw.endswith(b"\n\n"), raw[-80:]
    return r, raw[:-2].split(b"\n\n")


def test_non_stream_shape_and_usage(http):
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 12, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert list(body) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["object"] == "chat.completion" and body["id"] == ""
    info = http.get("/info").json()
    assert body["model"] == info["model_id"]  # no model given
    assert body["system_fingerprint"] == f"{info['version']}-native"  # TGI's rule, from TGI's release
    choice = body["choices"][0]
    assert list(choice) == ["index", "message", "logprobs", "finish_reason"]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("length", "stop")
    prompt = http.post("/chat_tokenize", json={"messages": HELLO}).json()
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(prompt["tokenize_response"])
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] <= 12
    assert r.headers["x-prompt-tokens"] == str(usage["prompt_tokens"])
    assert r.headers["x-generated-tokens"] == str(usage["completion_tokens"])


def test_model_is_echoed(http):
    for model, expected in (("tgi", None), ("my-model", "my-model"), ("dummy", "dummy")):
        body = http.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 2}).json()
        assert body["model"] == (expected or http.get("/info").json()["model_id"])


def test_stream_frames_usage_and_done(http):
    r, events = chat_stream_raw(http, {"messages": HELLO, "max_tokens": 10, "seed": 5, "temperature": 0.7,
                                        "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert events[-1] == b"data: [DONE]"  # with the space: huggingface_hub compares it literally
    chunks = [json.loads(e.removeprefix(b"data:")) for e in events[:-1]]
    assert all(e.startswith(b"data:{") for e in events[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == len(chunks) - 1
    tokens = chunks[:-1]
    for c in tokens:
        assert list(c) == CHUNK_KEYS and c["object"] == "chat.completion.chunk" and c["usage"] is None
        assert list(c["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
        assert c["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in tokens[:-1]] == [None] * (len(tokens) - 1)
    assert tokens[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # The same seed without streaming gives the same text.
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    body = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 10, "seed": 5,
                                                     "temperature": 0.7}).json()
    assert same_text(text, body["choices"][0]["message"]["content"])


def test_eos_is_stop_with_empty_delta(http):
    # Greedy, long enough for the tiny model to end on EOS for some prompt.
    for prompt in ("a", "b", "Hello", "x y z", "The end"):
        r, events = chat_stream_raw(http, {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                                            "max_tokens": 200})
        last = json.loads(events[-2].removeprefix(b"data:"))["choices"][0]
        if last["finish_reason"] == "stop":
            assert last["delta"]["content"] == ""  # the EOS token's text is not sent
            return
    pytest.fail("no greedy chat ended with EOS")


def test_logprobs(http):
    body = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4, "logprobs": True,
                                                     "top_logprobs": 2, "seed": 1}).json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert list(entry) == ["token", "logprob", "top_logprobs"]
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    _, events = chat_stream_raw(http, {"messages": HELLO, "max_tokens": 3, "logprobs": True})
    for e in events[:-1]:
        lp = json.loads(e.removeprefix(b"data:"))["choices"][0]["logprobs"]["content"]
        assert len(lp) == 1 and lp[0]["top_logprobs"] == []
    body = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}).json()
    assert body["choices"][0]["logprobs"] is None


def test_greedy_temperature_zero_is_deterministic(http):
    bodies = [http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 16, "temperature": 0}).json()
              for _ in range(2)]
    assert bodies[0]["choices"][0]["message"] == bodies[1]["choices"][0]["message"]


def test_errors(http):
    # Validation after templating: TGI's message, JSON 422; in a stream, OpenAI's error event then [DONE].
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "temperature": -1})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}
    r, events = chat_stream_raw(http, {"messages": HELLO, "top_p": 1.0})
    assert r.status_code == 200
    assert [json.loads(events[0].removeprefix(b"data:")), events[1]] == [
        {"error": {"message": "Input validation error: `top_p` must be > 0.0 and < 1.0", "http_status_code": 422}},
        b"data: [DONE]",
    ]
    # Body shape errors are the extractor's plain text.
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user"}]})
    assert r.status_code == 422 and r.text.startswith("Failed to deserialize the JSON body into the target type")
    r = http.post("/v1/chat/completions", json={"max_tokens": 3})
    assert r.status_code == 422
    r = http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400
    # Tools and a response format together.
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "response_format": {"type": "json_object"},
                                                 "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]})
    assert r.status_code == 422
    assert r.json() == {"error": "Tool error: Grammar and tools are mutually exclusive", "error_type": "tool_error"}
    assert wait_idle(http) == (0, 0)


def test_conversation_and_content_chunks(http):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "0", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]},
        {"role": "tool", "content": "42", "tool_call_id": "0"},
    ]
    text = http.post("/chat_tokenize", json={"messages": messages}).json()["templated_text"]
    assert "look ![](http://x/y.png)" in text
    assert '[{"id":"0","type":"function","function":{"description":null,"name":"f","arguments":"{\\"a\\":1}"}}]' in text
    assert text.endswith("<|assistant|>\n")
    # A final assistant message is continued, not closed.
    cont = http.post("/chat_tokenize", json={"messages": [*HELLO, {"role": "assistant", "content": "I am"}]}).json()
    assert cont["templated_text"].endswith("I am")
    assert http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 3}).status_code == 200


def test_chat_tokenize(http):
    r = http.post("/chat_tokenize", json={"messages": HELLO})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["tokenize_response", "templated_text"]
    raw = body["templated_text"].encode()
    toks = body["tokenize_response"]
    assert raw[toks[0]["start"]:toks[0]["stop"]] == b"<s>"  # the template's BOS, no second one added
    assert all(raw[t["start"]:t["stop"]].decode() == t["text"] for t in toks)


def test_response_format_json_schema(http):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    for fmt in ({"type": "json_schema", "value": {"name": "p", "schema": schema}},  # TGI's grammar shape
                {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}},  # OpenAI's
                {"type": "json_object", "value": schema}):  # what huggingface_hub sends
        body = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 100, "seed": 4,
                                                         "response_format": fmt}).json()
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)
    # OpenAI's JSON mode: any object. Unbounded strings may run past max_tokens; those
    # that end are objects.
    ended = 0
    for seed in range(8):
        body = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 100, "seed": seed,
                                                         "response_format": {"type": "json_object"}}).json()
        if body["choices"][0]["finish_reason"] == "stop":
            ended += 1
            assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)
    assert ended >= 2


def test_metrics_count_chat_requests(http):
    ok = metric(http, "tgi_request_success")
    http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    chat_stream_raw(http, {"messages": HELLO, "max_tokens": 2})
    assert metric(http, "tgi_request_success") == ok + 2


# --- real clients ---


def test_langchain_json_object_with_schema(http, server_url):
    """LangChain's ChatHuggingFace.with_structured_output(method="json_schema") sends
    `{"type": "json_object", "schema": S}` through huggingface_hub (TGI refuses it): the
    output is constrained to S, stream and non-stream."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"]}
    fmt = {"type": "json_object", "schema": schema}
    client = InferenceClient(base_url=server_url)
    for seed in (1, 2):
        out = client.chat_completion(HELLO, max_tokens=100, seed=seed, response_format=fmt)
        assert out.choices[0].finish_reason == "stop"  # the grammar let the model close the object
        jsonschema.validate(json.loads(out.choices[0].message.content), schema)
        chunks = list(client.chat_completion(HELLO, max_tokens=100, seed=seed, response_format=fmt, stream=True))
        assert chunks[-1].choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads("".join(c.choices[0].delta.content for c in chunks)), schema)
    # A key we do not understand beside it could change the output: refused, not ignored.
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5,
                                                 "response_format": {**fmt, "strict": True}})
    assert r.status_code == 422
    assert r.text.startswith("Failed to deserialize the JSON body") and "unknown field `strict`" in r.text
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5, "logit_bias": {"42": 100}})
    assert r.status_code == 422 and "`logit_bias` map is not supported" in r.text
