"""/v1/completions and /invocations against the real engine (the openai SDK and
@huggingface/inference are the socket tier's: tests/socket/test_clients.py)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import wait_idle

pytestmark = pytest.mark.engine


def stream_events(http: httpx.Client, path: str, body: dict) -> list[bytes]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        raw = r.read()
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n\n")


def test_non_stream_one_and_several_prompts(http):
    body = http.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 6, "seed": 1}).json()
    assert list(body) == ["object", "id", "created", "model", "system_fingerprint", "choices", "usage"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["index"] == 0 and body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["finish_reason"] in ("length", "stop")
    # Same parameters through /generate give the same text (same engine path, sampling seed 1).
    tgi = http.post("/generate", json={"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "seed": 1,
                                                                             "do_sample": True}}).json()
    assert body["choices"][0]["text"] == tgi["generated_text"]

    r = http.post("/v1/completions", json={"prompt": ["a", "bb", "ccc"], "max_tokens": 5, "temperature": 0})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    for c, p in zip(body["choices"], ["a", "bb", "ccc"]):
        alone = http.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0}).json()
        assert alone["choices"][0]["text"] == c["text"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert r.headers["x-generated-tokens"] == str(body["usage"]["completion_tokens"])


def test_stream_interleaves_prompts_then_done(http):
    events = stream_events(http, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 5, "stream": True,
                                                     "temperature": 0})
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e.removeprefix(b"data:")) for e in events[:-1]]
    finals = [c for c in chunks if "usage" in c]
    assert sorted(c["choices"][0]["index"] for c in finals) == [0, 1]
    for index in (0, 1):
        mine = [c for c in chunks if c["choices"][0]["index"] == index]
        assert all(c["choices"][0]["finish_reason"] == "" for c in mine[:-1])
        assert list(mine[0]) == ["object", "id", "created", "choices", "model", "system_fingerprint"]
        assert mine[-1]["choices"][0]["finish_reason"] in ("length", "eos_token")  # TGI's raw spelling here
        assert mine[-1]["usage"]["completion_tokens"] == len(mine)


def test_errors(http):
    r = http.post("/v1/completions", json={"prompt": "a", "suffix": "b"})
    assert r.status_code == 422
    assert r.json() == {"error": "Suffix is not supported and can be achieved by preprocessing the prompt.",
                        "error_type": "suffix not supported"}
    r = http.post("/v1/completions", json={"prompt": ["a"] * 5})
    assert r.status_code == 422
    assert r.json() == {"error": "Number of prompts exceeds the maximum allowed batch size of 4",
                        "error_type": "batch size exceeded"}
    r = http.post("/v1/completions", json={"prompt": []})
    assert r.status_code == 422 and "Empty array detected" in r.text
    r = http.post("/v1/completions", json={"prompt": "a", "temperature": -2})
    assert r.json()["error_type"] == "validation"
    events = stream_events(http, "/v1/completions", {"prompt": ["a", "b"], "top_p": 1.0, "stream": True})
    assert events[-1] == b"data: [DONE]" and len(events) == 3
    assert all(json.loads(e.removeprefix(b"data:"))["error"]["http_status_code"] == 422 for e in events[:2])
    assert wait_idle(http) == (0, 0)


def test_invocations_dispatch(http):
    r = http.post("/invocations", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert isinstance(r.json(), list) and "generated_text" in r.json()[0]
    r = http.post("/invocations", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.json()["object"] == "chat.completion"
    r = http.post("/invocations", json={"prompt": "Hi", "max_tokens": 3})
    assert r.json()["object"] == "text_completion"
    events = stream_events(http, "/invocations", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                                  "stream": True})
    assert events[-1] == b"data: [DONE]"
    events = stream_events(http, "/invocations", {"inputs": "Hi", "parameters": {"max_new_tokens": 2}, "stream": True})
    assert json.loads(events[-1].removeprefix(b"data:"))["generated_text"] is not None  # TGI's own stream, no [DONE]
    r = http.post("/invocations", json={"foo": 1})
    assert r.status_code == 422 and "untagged enum SagemakerRequest" in r.text
