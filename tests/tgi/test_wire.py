"""TGI's wire format read byte by byte over raw HTTP: SSE framing, headers, bodies, errors."""

from __future__ import annotations

import json

import httpx
import pytest
from packaging import version

import tgi_compat
from tests.conftest import MAX_CONCURRENT_REQUESTS, MAX_TOTAL_TOKENS, generated_tokens, wait_idle
from tests.helpers import post, raw_socket

pytestmark = pytest.mark.engine

PROMPT = "What is Deep Learning?"
# Greedy decoding of this prompt runs to max_new_tokens on the tiny model (no EOS).
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000}}


def sse_events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n"), raw[-50:]
    return raw[:-2].split(b"\n\n")


def stream_raw(http: httpx.Client, path: str, body: dict) -> tuple[httpx.Response, bytes]:
    with http.stream("POST", path, json=body) as r:
        raw = r.read()
    return r, raw


@pytest.mark.parametrize("path", ["/generate_stream", "/"])
def test_sse_framing_byte_for_byte(http, path):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 20, "details": True}}
    if path == "/":
        body["stream"] = True
    r, raw = stream_raw(http, path, body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-accel-buffering"] == "no"
    assert r.headers["cache-control"] == "no-cache"
    assert r.headers["x-compute-characters"] == str(len(PROMPT))
    assert "x-compute-type" in r.headers
    assert "content-length" not in r.headers
    assert b"\r" not in raw
    events = sse_events(raw)
    assert len(events) == 20
    for e in events:
        assert e.startswith(b"data:{") and b"\n" not in e  # one line, no space after the colon
        assert not e.startswith((b"event:", b"id:", b"retry:"))
    assert b"[DONE]" not in raw
    parsed = [json.loads(e[5:]) for e in events]
    assert [p["index"] for p in parsed] == list(range(1, 21))
    for p in parsed[:-1]:
        assert list(p) == ["index", "token", "generated_text", "details"]
        assert p["generated_text"] is None and p["details"] is None
        assert list(p["token"]) == ["id", "text", "logprob", "special"]
    last = parsed[-1]
    assert list(last["details"]) == ["finish_reason", "generated_tokens", "seed", "input_length"]
    assert last["details"]["generated_tokens"] == len(events)
    text = "".join(p["token"]["text"] for p in parsed)
    generated = last["generated_text"]
    if path == "/":
        assert generated.startswith(PROMPT)
        generated = generated[len(PROMPT):]
    # Token texts concatenate to the text; a multi-byte character cut off by the length
    # limit shows as U+FFFD in generated_text only (as in TGI).
    assert generated.startswith(text) and set(generated[len(text):]) <= {"\ufffd"}


def test_stream_without_details_has_null_details(http):
    _, raw = stream_raw(http, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    last = json.loads(sse_events(raw)[-1][5:])
    assert last["details"] is None and isinstance(last["generated_text"], str)


def test_multibyte_characters_split_across_tokens(http):
    """Sampled output of the byte-level tokenizer splits characters across tokens; the
    per-token texts must still add up to the decoded text."""
    checked = 0
    for seed in range(6):
        body = {"inputs": "Grüße 日本語 🙂", "parameters": {"max_new_tokens": 40, "do_sample": True, "seed": seed, "details": True}}
        parsed = [json.loads(e[5:]) for e in sse_events(stream_raw(http, "/generate_stream", body)[1])]
        text = "".join(p["token"]["text"] for p in parsed)
        generated = parsed[-1]["generated_text"]
        assert generated.startswith(text) and set(generated[len(text):]) <= {"\ufffd"}
        checked += any(p["token"]["text"] == "" for p in parsed)
    assert checked, "expected some token whose text waits for the next one"


def test_generate_response_shape_and_headers(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4}})
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert list(r.json()) == ["generated_text"]
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4, "details": True}})
    body = r.json()
    assert list(body["details"]) == ["finish_reason", "generated_tokens", "seed", "prefill", "tokens"]
    h = r.headers
    assert h["x-compute-characters"] == str(len(PROMPT))
    assert h["x-generated-tokens"] == "4"
    assert int(h["x-prompt-tokens"]) > 0
    assert float(h["x-compute-time"]) > 0
    for name in ("x-total-time", "x-validation-time", "x-queue-time", "x-inference-time", "x-time-per-token"):
        assert h[name].isdigit(), name
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])


def test_compat_route_non_stream_is_a_list(http):
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    body = r.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"].startswith(PROMPT)  # return_full_text defaults to true on `/`
    r = http.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "return_full_text": False}})
    assert not r.json()[0]["generated_text"].startswith(PROMPT)


def test_absent_parameters_generate_and_details_default_off(http):
    # That absent `parameters` means sampling is checked on what reaches the engine
    # (tests/unit/test_tgi_generation.py); here the real engine serves such requests.
    absent = http.post("/generate", json={"inputs": PROMPT}, headers={}).headers
    _, raw = stream_raw(http, "/generate_stream", {"inputs": PROMPT})
    last = json.loads(sse_events(raw)[-1][5:])
    assert last["details"] is None  # details default to false
    assert int(absent["x-generated-tokens"]) > 0
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True}})
    assert r.json()["details"]["seed"] is None  # `{}`-style parameters: greedy


def test_validation_error_non_stream(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"temperature": 0}})
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/json"
    assert "content-length" in r.headers and "transfer-encoding" not in r.headers
    assert r.json() == {"error": "Input validation error: `temperature` must be strictly positive", "error_type": "validation"}


def test_validation_error_in_stream_is_an_event(http):
    r, raw = stream_raw(http, "/generate_stream", {"inputs": PROMPT, "parameters": {"stop": ["a"] * 5}})
    assert r.status_code == 200
    assert raw == b'data:{"error":"Input validation error: `stop` supports up to 4 stop sequences. Given: 5","error_type":"validation"}\n\n'


def test_empty_inputs_and_length_limits(http):
    r = http.post("/generate", json={"inputs": "", "parameters": {}})
    assert r.json()["error"] == "Input validation error: `inputs` cannot be empty"
    r = http.post("/generate", json={"inputs": "hello " * 400, "parameters": {"max_new_tokens": MAX_TOTAL_TOKENS - 124}})
    assert r.status_code == 422
    assert f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL_TOKENS}. Given:" in r.json()["error"]
    r = http.post("/generate", json={"inputs": "hello", "parameters": {"truncate": 5000}})
    assert r.json()["error"] == ("Input validation error: `truncate` must be strictly positive and less than "
                                 f"{MAX_TOTAL_TOKENS - 1}. Given: 5000")


@pytest.mark.parametrize(
    "headers, content, status, prefix",
    [
        ({}, b'{"inputs":"a"}', 415, "Expected request with `Content-Type: application/json`"),
        ({"content-type": "text/plain"}, b'{"inputs":"a"}', 415, "Expected request with `Content-Type: application/json`"),
        ({"content-type": "application/json"}, b'{"inputs":', 400, "Failed to parse the request body as JSON: "),
        ({"content-type": "application/json"}, b'\xff\xfe{"inputs":"a"}', 400, "Failed to parse the request body as JSON: "),
        ({"content-type": "application/json"}, b"[" * 5000 + b"]" * 5000, 400, "Failed to parse the request body as JSON: "),
        ({"content-type": "application/json"}, b'{"parameters":{}}', 422, "Failed to deserialize the JSON body into the target type: "),
        ({"content-type": "application/json"}, b'{"inputs":1}', 422, "Failed to deserialize the JSON body into the target type: "),
        ({"content-type": "application/json"}, b'{"inputs":"a","parameters":{"max_new_tokens":-1}}', 422, "Failed to deserialize"),
        ({"content-type": "application/json"}, b'{"inputs":"a","parameters":{"stop":null}}', 422, "Failed to deserialize"),
        ({"content-type": "application/json"}, b'{"inputs":"a","parameters":{"seed":1e400}}', 422, "Failed to deserialize"),
        ({"content-type": "application/json"}, b'{"inputs":"a","parameters":{"max_new_tokens":99999999999999999999999}}', 422, "Failed to deserialize"),
    ],
)
def test_body_failures_are_plain_text(http, headers, content, status, prefix):
    r = http.post("/generate", content=content, headers=headers)
    assert r.status_code == status, r.text
    assert r.text.startswith(prefix), r.text
    assert r.headers["content-type"].startswith("text/plain")


def test_unknown_fields_ignored_and_nulls_accepted(http):
    r = http.post("/generate", json={"inputs": "a", "foo": 1, "parameters": {"bar": [], "seed": None, "top_k": None, "max_new_tokens": 2}})
    assert r.status_code == 200


def test_payload_limit(http):
    big = b'{"inputs":"' + b"a" * 2_100_000 + b'"}'
    r = http.post("/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():
        yield b'{"inputs":"'
        for _ in range(300):
            yield b"a" * 10_000
        yield b'"}'

    r = http.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert http.post("/generate", json={"inputs": "ok", "parameters": {"max_new_tokens": 1}}).status_code == 200


def test_info_and_health(http):
    assert http.get("/health").status_code == 200
    assert http.get("/health").content == b""
    info = http.get("/info").json()
    assert list(info) == [
        "model_id", "model_sha", "model_pipeline_tag", "max_concurrent_requests", "max_best_of",
        "max_stop_sequences", "max_input_tokens", "max_total_tokens", "validation_workers",
        "max_client_batch_size", "router", "version", "sha", "docker_label", "tgi_compat_version",
    ]
    assert info["max_total_tokens"] == MAX_TOTAL_TOKENS and info["max_input_tokens"] == MAX_TOTAL_TOKENS - 1
    assert info["router"] == "text-generation-router"
    assert info["max_concurrent_requests"] == MAX_CONCURRENT_REQUESTS
    assert (info["version"], info["tgi_compat_version"]) == (tgi_compat.TGI_VERSION, tgi_compat.__version__)
    assert "server" not in http.get("/info").headers  # TGI (axum) sends none


def test_info_version_passes_client_gates(http):
    """LlamaIndex's TextGenerationInference reads /info.version as TGI's release
    (llama_index/llms/text_generation_inference/utils.py)."""
    info = http.get("/info").json()
    tgi = version.parse(info["version"])
    assert tgi >= version.parse("2.0.1")  # resolve_tgi_function_call: native tool calling
    assert tgi >= version.parse("2.1.0")  # get_max_input_tokens reads `max_input_tokens`, which we send
    assert info["max_input_tokens"] == MAX_TOTAL_TOKENS - 1


def test_openapi_documents_routes(http):
    doc = http.get("/api-doc/openapi.json").json()
    for path in ("/generate", "/generate_stream", "/", "/health", "/info", "/tokenize", "/metrics"):
        assert path in doc["paths"], path
    gen = doc["paths"]["/generate"]["post"]
    assert {"200", "400", "413", "415", "422", "424", "429"} <= set(gen["responses"])
    params = doc["components"]["schemas"]["GenerateParameters"]["properties"]
    assert params["max_new_tokens"]["anyOf"][0]["minimum"] == 0
    assert http.get("/docs").status_code == 200


def _aborted(http, before: float, requests: int) -> bool:
    # Never a leak, aborted or not. Idle means the engine holds no request: one that was
    # not aborted would still be generating (its max_new_tokens take seconds), so the
    # permits would not all be back; the tokens of the step that raced the abort are few.
    assert wait_idle(http, timeout=30) == (0, 0)
    produced = generated_tokens(http) - before
    return produced < requests * LONG["parameters"]["max_new_tokens"] / 2


# Up to 3 rounds: on this shared 2-core box the test client can be descheduled long
# enough for the ~2 s generations to finish before it closes its sockets (seen once in
# CI); an abort in any round shows the disconnect reached the engine.
ROUNDS = 3


def test_disconnect_mid_stream_aborts_engine_request(http, server_url):
    """vLLM stops generating for a request we abort (our abort plumbing on every route is
    tests/socket/test_disconnect.py's, exactly, on the scripted engine)."""
    port = int(server_url.rsplit(":", 1)[1])
    for _ in range(ROUNDS):
        before = generated_tokens(http)
        socks = [raw_socket(port) for _ in range(4)]
        for s in socks:
            post(s, "/generate_stream", LONG)
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")  # streaming has begun
        for s in socks:
            s.close()
        if _aborted(http, before, 4):
            return
    pytest.fail("closing the streams never stopped their generation")


def test_text_model_keeps_markdown_images_as_text(http):
    """The text-only model: `![](...)` in `inputs` stays text, as TGI (the VLM's side is
    tests/test_vlm.py)."""
    prompt = "Describe ![](data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAA) briefly."
    r = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 2}})
    assert r.status_code == 200, r.text
    assert int(r.headers["x-prompt-tokens"]) == len(http.post("/tokenize", json={"inputs": prompt}).json())


def test_tokenize_gives_byte_offsets(http):
    text = "Köln ok"
    r = http.post("/tokenize", json={"inputs": text})
    assert r.status_code == 200
    tokens = r.json()
    assert tokens[0] == {"id": 0, "text": "", "start": 0, "stop": 0}  # the added BOS covers no input bytes
    raw = text.encode()
    assert all(list(t) == ["id", "text", "start", "stop"] for t in tokens)
    assert tokens[-1]["stop"] == len(raw)  # bytes, not characters
    # Offsets move forward; a character split over two byte-level tokens is covered by both.
    starts = [t["start"] for t in tokens[1:]]
    assert starts == sorted(starts) and tokens[1]["start"] == 0
    assert all(raw[t["start"]:t["stop"]].decode() == t["text"] for t in tokens)


def test_v1_models(http):
    body = http.get("/v1/models").json()
    model_id = http.get("/info").json()["model_id"]
    assert body == {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": model_id}]}
