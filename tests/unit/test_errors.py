"""Every error path through HTTP: status, body, in-band stream event, and what the engine
saw (refusals, failures mid-stream, incomplete streams, overload, drain, engine death,
templates, adapters, body errors), plus client disconnects and the request metrics."""

from __future__ import annotations

import json

import pytest

from tests.unit.conftest import metric_values, sse_events
from tests.unit.scripted_engine import LENGTH, Script

GEN = {"inputs": "Hi", "parameters": {"max_new_tokens": 3}}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def err(message: str, error_type: str) -> dict:
    return {"error": message, "error_type": error_type}


def tok(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


async def post_stream(h, path: str, body: dict) -> list:
    r = await h.client.post(path, json=body)
    assert r.status_code == 200, r.text  # stream errors are in-band
    assert r.headers["content-type"] == "text/event-stream"
    return sse_events(r.content)


# --- validation, per route family ---

async def test_validation_errors_each_route(h):
    bad = {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "temperature": 0}}
    expected = err("Input validation error: `temperature` must be strictly positive", "validation")
    r = await h.client.post("/generate", json=bad)
    assert (r.status_code, r.json()) == (422, expected)
    assert (await h.client.post("/", json=bad)).json() == expected
    assert await post_stream(h, "/generate_stream", bad) == [expected]
    chat = {**CHAT, "top_p": 1.5}
    r = await h.client.post("/v1/chat/completions", json=chat)
    assert (r.status_code, r.json()) == (422, err("Input validation error: `top_p` must be > 0.0 and < 1.0", "validation"))
    # OpenAI streams carry OpenAI's error event (always 422 inside), then [DONE].
    assert await post_stream(h, "/v1/chat/completions", {**chat, "stream": True}) == [
        {"error": {"message": "Input validation error: `top_p` must be > 0.0 and < 1.0", "http_status_code": 422}},
        "[DONE]"]
    r = await h.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert (r.status_code, r.json()) == (422, err("Input validation error: `max_new_tokens` must be strictly positive", "validation"))
    assert h.engine.requests == []  # nothing reached the engine


async def test_best_of_on_stream_and_decoder_details(h):
    events = await post_stream(h, "/generate_stream", {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}})
    assert events == [err("Input validation error: `best_of` != 1 is not supported when streaming tokens", "validation")]
    events = await post_stream(h, "/generate_stream", {"inputs": "x", "parameters": {"decoder_input_details": True}})
    assert events == [err("Input validation error: `decoder_input_details` == true is not supported when streaming tokens",
                          "validation")]


async def test_unknown_adapter(h):
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {"adapter_id": "nope"}})
    assert r.status_code == 422
    assert r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("Input validation error: `adapter_id` nope is not a loaded adapter")
    # OpenAI's `model` naming no adapter means the base model (TGI's fallback).
    r = await h.client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4"})
    assert r.status_code == 200 and h.engine.requests[-1].adapter is None


async def test_adapter_reaches_engine(app_factory, tokenizer):
    from tests.unit.scripted_engine import ScriptedEngine

    h = await app_factory(engine=ScriptedEngine(tokenizer, adapters={"mine": object()}))
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1, "adapter_id": "mine"}})
    assert r.status_code == 200 and h.engine.requests[-1].adapter == "mine"
    r = await h.client.post("/v1/chat/completions", json={**CHAT, "model": "mine"})
    assert r.status_code == 200 and h.engine.requests[-1].adapter == "mine"


async def test_body_errors_plain_text(h):
    r = await h.client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.text.startswith("Failed to parse the request body as JSON")
    r = await h.client.post("/generate", json={"parameters": {}})
    assert r.status_code == 422
    assert r.text.startswith("Failed to deserialize the JSON body into the target type: ")
    assert r.headers["content-type"].startswith("text/plain")
    r = await h.client.post("/generate", content=b"{}", headers={"content-type": "text/plain"})
    assert r.status_code == 415


async def test_template_error(app_factory, tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": "{{ raise_exception('system messages only') }}",
                                  "bos_token": "<s>", "eos_token": "</s>"}))
    h = await app_factory("--tokenizer-config-path", str(config))
    r = await h.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 422
    assert r.json()["error_type"] == "template_error"
    assert r.json()["error"].startswith("Template error: ") and "system messages only" in r.json()["error"]
    r = await h.client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 422 and r.json()["error_type"] == "template_error"  # before the stream starts
    assert h.engine.requests == []
    m = await h.metrics()
    assert metric_values(m, "tgi_request_failure") == {'{err="template"}': 2}
    assert metric_values(m, "tgi_request_count") == {"": 2}


# --- the engine refusing or failing ---

@pytest.mark.parametrize("at_call", [False, True])
async def test_engine_refuses_request(h, at_call):
    h.engine.push(Script(refuse=ValueError("max_tokens too large"), refuse_at_call=at_call))
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (422, err("Input validation error: max_tokens too large", "validation"))
    h.engine.push(Script(refuse=ValueError("max_tokens too large"), refuse_at_call=at_call))
    assert await post_stream(h, "/generate_stream", GEN) == [err("Input validation error: max_tokens too large", "validation")]
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_engine_refuses_grammar(h):
    h.engine.push(Script(refuse=ValueError("unsupported regex feature")))
    r = await h.client.post("/generate", json={"inputs": "x", "parameters": {
        "max_new_tokens": 3, "grammar": {"type": "regex", "value": "a+"}}})
    assert (r.status_code, r.json()) == (
        422, err("Input validation error: grammar is not valid: unsupported regex feature", "validation"))
    assert h.engine.requests[-1].structured == ("regex", "a+")


async def test_engine_fails_mid_stream(h):
    from vllm.v1.engine.exceptions import EngineDeadError

    a = tok(h, " a")
    h.engine.push(Script(steps=[a, a, a], fail=RuntimeError("boom"), fail_after=1))
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (424, err("Request failed during generation: boom", "generation"))
    h.engine.push(Script(steps=[a, a, a], fail=EngineDeadError(), fail_after=2))
    events = await post_stream(h, "/generate_stream", GEN)
    assert [e["index"] for e in events[:2]] == [1, 2]
    assert events[2]["error_type"] == "generation" and len(events) == 3
    assert events[2]["error"].startswith("Request failed during generation: ")
    h.engine.push(Script(steps=[a, a], fail=RuntimeError("boom"), fail_after=1))
    events = await post_stream(h, "/v1/chat/completions", {**CHAT, "stream": True})
    assert events[0]["choices"][0]["delta"]["content"] == " a"
    assert events[1:] == [{"error": {"message": "Request failed during generation: boom", "http_status_code": 422}},
                          "[DONE]"]
    # After a failed generation /health runs a real 1-token generation before answering 200.
    n = len(h.engine.requests)
    r = await h.client.get("/health")
    assert r.status_code == 200
    probe = h.engine.requests[n]
    assert probe.request_id.startswith("health-") and probe.sampling.max_tokens == 1
    assert await h.metric("tgi_request_failure", '{err="generation"}') == 3
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_health_probe_failing(h):
    h.engine.push(Script(steps=[tok(h, " a")], fail=RuntimeError("boom"), fail_after=1))
    assert (await h.client.post("/generate", json=GEN)).status_code == 424
    h.engine.push(Script(fail=RuntimeError("still broken")))
    r = await h.client.get("/health")
    assert (r.status_code, r.json()) == (503, err("unhealthy", "healthcheck"))
    assert r.headers["x-health-problem"] == "health probe failed"
    assert (await h.client.get("/health")).status_code == 200  # the next probe succeeds


async def test_incomplete_generation(h):
    h.engine.push(Script.tokens(tok(h, " a b"), finish=None))
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (500, err("Incomplete generation", "incomplete_generation"))
    h.engine.push(Script.tokens(tok(h, " a b"), finish=None))
    events = await post_stream(h, "/generate_stream", GEN)
    assert [e.get("index") for e in events[:-1]] == [1, 2]
    assert events[-1] == err("Incomplete generation stream", "incomplete_generation_stream")
    assert await h.metric("tgi_request_failure", '{err="incomplete"}') == 2


async def test_engine_dead(app_factory):
    h = await app_factory("--stay-up-on-engine-failure")
    h.engine.errored = True
    r = await h.client.get("/health")
    assert (r.status_code, r.json()) == (503, err("unhealthy", "healthcheck"))
    assert r.headers["x-health-problem"] == "engine dead"
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (424, err("Request failed during generation: the engine is not running", "generation"))
    assert await post_stream(h, "/generate_stream", GEN) == [
        err("Request failed during generation: the engine is not running", "generation")]
    r = await h.client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
    assert h.engine.requests == [] and h.engine.aborts == []


# --- overload, drain, disconnect ---

async def test_overloaded_when_permits_held(app_factory):
    h = await app_factory("--max-concurrent-requests", "2")
    a = tok(h, " a")
    h.engine.push(Script(steps=[a], block=True), Script(steps=[a], block=True))
    held = [h.open_stream("/generate_stream", GEN), h.open_stream("/generate", GEN)]
    await h.engine.wait_live(2)
    assert await h.metric("tgi_compat_permits_in_use") == 2
    overloaded = err("Model is overloaded", "overloaded")
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (429, overloaded)
    assert await post_stream(h, "/generate_stream", GEN) == [overloaded]
    r = await h.client.post("/v1/chat/completions", json=CHAT)
    assert (r.status_code, r.json()) == (429, overloaded)
    r = await h.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    assert r.status_code == 429
    assert len(h.engine.requests) == 2
    for s in held:
        await s.disconnect()
    assert await h.metric("tgi_compat_permits_in_use") == 0
    assert sorted(h.engine.aborts) == sorted(q.request_id for q in h.engine.requests)
    assert (await h.client.post("/generate", json=GEN)).status_code == 200


async def test_drain_refuses_new_and_ends_in_flight(app_factory):
    h = await app_factory("--shutdown-timeout", "0.3")
    h.engine.push(Script(steps=[tok(h, " a")], block=True))
    s = h.open_stream("/generate_stream", GEN)
    await h.engine.wait_live(1)
    h.app.state.lifecycle.begin_drain()
    r = await h.client.get("/health")
    assert (r.status_code, r.headers["x-health-problem"]) == (503, "draining")
    r = await h.client.post("/generate", json=GEN)
    assert (r.status_code, r.json()) == (503, err("Server is shutting down", "overloaded"))
    # After --shutdown-timeout the in-flight stream is aborted and ends with an error event.
    events = sse_events(b"".join(await s.read_all()))
    assert events[0]["index"] == 1
    assert events[-1] == err("Request failed during generation: the server is shutting down", "generation")
    assert h.engine.requests[0].request_id in h.engine.aborts
    assert await h.metric("tgi_compat_permits_in_use") == 0


@pytest.mark.parametrize("path", ["/generate_stream", "/v1/chat/completions", "/generate", "/v1/completions"])
async def test_client_disconnect_aborts(h, path):
    stream = path in ("/generate_stream", "/v1/chat/completions")
    body = {**CHAT, "stream": True} if path == "/v1/chat/completions" else (
        {"prompt": ["x", "y"], "max_tokens": 3, "stream": True} if path == "/v1/completions" else GEN)
    n = 2 if path == "/v1/completions" else 1
    h.engine.push(*[Script(steps=[tok(h, " a")], block=True) for _ in range(n)])
    s = h.open_stream(path, body)
    await h.engine.wait_live(n)
    if stream:
        first = sse_events(await s.next_write())
        assert len(first) == 1
    assert await h.metric("tgi_compat_permits_in_use") == n
    await s.disconnect()
    ids = [q.request_id for q in h.engine.requests]
    assert len(ids) == n
    assert sorted(h.engine.aborts) == sorted(ids)  # aborted in the engine ...
    assert sorted(h.engine.closed) == sorted(ids)  # ... and its output stream closed
    assert await h.metric("tgi_compat_permits_in_use") == 0
    assert await h.metric("tgi_compat_engine_requests") == 0
    assert await h.metric("tgi_request_failure", '{err="dropped"}') == n


# --- metrics: every request counted once, as a success or a failure ---

def request_totals(text: str) -> tuple[float, float, float]:
    count = metric_values(text, "tgi_request_count").get("", 0.0)
    success = metric_values(text, "tgi_request_success").get("", 0.0)
    failures = sum(metric_values(text, "tgi_request_failure").values())
    return count, success, failures


async def test_request_count_is_success_plus_failures(app_factory):
    h = await app_factory("--max-concurrent-requests", "1")
    a = tok(h, " a")
    h.engine.push(Script.tokens(a * 3, LENGTH))                       # success
    await h.client.post("/generate", json=GEN)
    await h.client.post("/generate", json={"inputs": "", "parameters": {}})  # validation
    h.engine.push(Script(steps=[a, a], fail=RuntimeError("x"), fail_after=1))
    await h.client.post("/generate_stream", json=GEN)                 # generation
    h.engine.push(Script.tokens(a, finish=None))
    await h.client.post("/generate", json=GEN)                        # incomplete
    h.engine.push(Script(steps=[a], block=True))
    held = h.open_stream("/generate_stream", GEN)
    await h.engine.wait_live(1)
    await h.client.post("/v1/chat/completions", json=CHAT)            # overloaded
    await held.disconnect()                                           # dropped
    await h.client.post("/v1/chat/completions", json={**CHAT, "stream": True})  # success
    r = await h.client.post("/v1/completions", json={"prompt": ["x"], "max_tokens": 2})  # success
    assert r.status_code == 200
    count, success, failures = request_totals(await h.metrics())
    assert (count, success, failures) == (8, 3, 5)
    assert count == success + failures
    assert metric_values(await h.metrics(), "tgi_request_failure") == {
        '{err="validation"}': 1, '{err="generation"}': 1, '{err="incomplete"}': 1,
        '{err="overloaded"}': 1, '{err="dropped"}': 1}
