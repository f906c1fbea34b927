"""OpenAI's ``n`` on /v1/chat/completions and /v1/completions (TGI ignores it): ``n``
generations of one prompt under ``n`` permits taken at once, each choice with its own
``index``, ``finish_reason`` and seed; stream chunks interleaved; usage summed; limits;
metrics; and the real ``openai`` SDK reading both shapes."""

from __future__ import annotations

import re

import httpx
import openai

from tests.unit.conftest import metric_values, sse_events
from tests.unit.scripted_engine import LENGTH, STOP, Script

ASK = [{"role": "user", "content": "Hi"}]


def ids(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


def choice_of(req) -> int:
    """Choice j's engine request id ends with -j."""
    return int(req.request_id.rsplit("-", 1)[1])


def by_choice(h, texts: dict[int, str], finishes: dict[int, str] | None = None):
    """Script each choice by its index: ``texts[j]`` then the finish (EOS for STOP)."""
    eos = h.engine.tokenizer.eos_token_id

    def script(req):
        j = choice_of(req)
        finish = (finishes or {}).get(j, LENGTH)
        toks = ids(h, texts[j]) + ([eos] if finish == STOP else [])
        return Script.tokens(toks, finish)

    return script


# --- chat, non-stream ---

async def test_chat_n_choices(h):
    h.engine.script_for = by_choice(h, {0: " a b", 1: " y"}, {1: STOP})
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "max_tokens": 5, "seed": 7,
                                                           "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [c["message"] for c in body["choices"]] == [{"role": "assistant", "content": " a b"},
                                                      {"role": "assistant", "content": " y"}]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert [len(c["logprobs"]["content"]) for c in body["choices"]] == [2, 2]
    reqs = h.engine.requests
    assert len(reqs) == 2 and reqs[0].prompt_ids == reqs[1].prompt_ids
    assert len({q.request_id for q in reqs}) == 2
    # vLLM's rule for n with a seed: choice j samples with seed + j.
    assert sorted((choice_of(q), q.sampling.seed) for q in reqs) == [(0, 7), (1, 8)]
    prompt = len(reqs[0].prompt_ids)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 4, "total_tokens": prompt + 4}
    assert r.headers["x-generated-tokens"] == "4"


async def test_chat_n_seeds_and_greedy(h):
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "max_tokens": 2})
    assert r.status_code == 200
    seeds = [q.sampling.seed for q in h.engine.requests]
    assert None not in seeds and len(set(seeds)) == 2  # sampling without a seed: distinct seeds
    h.engine.requests.clear()
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200
    # Greedy (as OpenAI allows; vLLM refuses n > 1 greedy): identical choices.
    assert [(q.sampling.temperature, q.sampling.seed) for q in h.engine.requests] == [(0.0, None)] * 2
    assert len(r.json()["choices"]) == 2


async def test_n_one_or_absent_is_unchanged(h):
    """n: 1 answers byte for byte as no n (TGI's single choice), stream and not."""
    def strip(content: bytes) -> bytes:
        return re.sub(rb'"created":\d+', b"", content)

    for body in ({"messages": ASK, "max_tokens": 3}, {"messages": ASK, "max_tokens": 3, "stream": True,
                                                      "stream_options": {"include_usage": True}}):
        a = await h.client.post("/v1/chat/completions", json=body)
        b = await h.client.post("/v1/chat/completions", json={**body, "n": 1})
        assert strip(a.content) == strip(b.content) and a.status_code == 200
    for body in ({"prompt": ["x", "y"], "max_tokens": 2}, {"prompt": "x", "max_tokens": 2, "stream": True}):
        a = await h.client.post("/v1/completions", json=body)
        b = await h.client.post("/v1/completions", json={**body, "n": 1})
        assert strip(a.content) == strip(b.content) and a.status_code == 200
    assert all(re.fullmatch(r"tgi-\d+", q.request_id) for q in h.engine.requests)  # no choice suffix


# --- limits and permits ---

async def test_n_limits(h):
    """n: 1..--max-best-of (2 by default), refused before anything reaches the engine."""
    for n in (0, 3):
        for path, body in (("/v1/chat/completions", {"messages": ASK}), ("/v1/completions", {"prompt": "x"})):
            r = await h.client.post(path, json={**body, "n": n})
            assert r.status_code == 422
            assert r.json() == {"error": f"Input validation error: `n` must be > 0 and <= 2. Given: {n}",
                                "error_type": "validation"}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "tools": [tool]})
    assert r.status_code == 422
    assert r.json() == {"error": "Input validation error: `n` must be 1 when tools are used", "error_type": "validation"}
    assert h.engine.requests == []
    # tool_choice "none": no tool is used, so n is fine.
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "tools": [tool],
                                                           "tool_choice": "none", "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


async def test_n_takes_n_permits_at_once(app_factory):
    h = await app_factory("--max-best-of", "3", "--max-concurrent-requests", "3")
    h.engine.push(Script(steps=[ids(h, " a")], block=True))
    holder = h.open_stream("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 5}})
    await h.engine.wait_live(1)
    # 2 free permits: n=3 is overloaded, stream or not, and nothing reaches the engine.
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 3, "max_tokens": 2})
    assert r.status_code == 429
    assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 3, "max_tokens": 2, "stream": True})
    assert sse_events(r.content) == [{"error": {"message": "Model is overloaded", "http_status_code": 422}}, "[DONE]"]
    r = await h.client.post("/v1/completions", json={"prompt": "x", "n": 3, "max_tokens": 2})
    assert r.status_code == 429
    assert len(h.engine.requests) == 1
    assert await h.metric("tgi_compat_permits_in_use") == 1
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    await holder.disconnect()
    assert await h.metric("tgi_compat_permits_in_use") == 0


async def test_n_holds_its_permits_until_every_choice_ends(app_factory):
    h = await app_factory("--max-best-of", "3")
    h.engine.script_for = lambda req: Script(steps=[ids(h, " a")], block=True)
    s = h.open_stream("/v1/chat/completions", {"messages": ASK, "n": 3, "max_tokens": 4, "stream": True})
    await h.engine.wait_live(3)
    assert await h.metric("tgi_compat_permits_in_use") == 3
    assert await h.metric("tgi_compat_engine_requests") == 3
    await s.disconnect()  # the client leaves: every choice is aborted, every permit back
    assert sorted(h.engine.aborts) == sorted(q.request_id for q in h.engine.requests)
    assert await h.metric("tgi_compat_permits_in_use") == 0
    m = await h.metrics()
    assert metric_values(m, "tgi_request_count") == {"": 3}
    assert metric_values(m, "tgi_request_failure") == {'{err="dropped"}': 3}


# --- chat, stream ---

async def test_chat_n_stream(h):
    h.engine.script_for = by_choice(h, {0: " a b c", 1: " y c"}, {1: STOP})
    r = await h.client.post("/v1/chat/completions", json={
        "messages": ASK, "n": 2, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert all(len(c["choices"]) == 1 and c["usage"] is None for c in chunks)
    order = [c["choices"][0]["index"] for c in chunks]
    assert sorted(order) == [0, 0, 0, 1, 1, 1]
    assert order != sorted(order)  # interleaved as they come, not one choice after the other
    for j, text, finish in ((0, " a b c", "length"), (1, " y c", "stop")):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == j]
        assert "".join(c["delta"]["content"] for c in mine) == text  # EOS is sent as ""
        assert [c["finish_reason"] for c in mine] == [None, None, finish]
    prompt = len(h.engine.requests[0].prompt_ids)
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": 6,
                                                         "total_tokens": prompt + 6}


async def test_chat_n_stream_failing_choice(h):
    """A choice that fails sends its error event; the other ends normally; no usage chunk."""
    def script(req):
        if choice_of(req) == 1:
            return Script(steps=[ids(h, " x")], fail=RuntimeError("boom"), fail_after=1)
        return Script.tokens(ids(h, " a b"), LENGTH)

    h.engine.script_for = script
    r = await h.client.post("/v1/chat/completions", json={
        "messages": ASK, "n": 2, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    errors = [e for e in events[:-1] if "error" in e]
    assert errors == [{"error": {"message": "Request failed during generation: boom", "http_status_code": 422}}]
    ok = [e["choices"][0] for e in events[:-1] if "choices" in e and e["choices"]]
    assert [c["finish_reason"] for c in ok if c["index"] == 0] == [None, "length"]
    assert all(e.get("usage") is None for e in events[:-1] if "choices" in e)
    m = await h.metrics()
    assert metric_values(m, "tgi_request_success") == {"": 1}
    assert metric_values(m, "tgi_request_failure") == {'{err="generation"}': 1}


async def test_chat_n_non_stream_failure_ends_all(h):
    def script(req):
        if choice_of(req) == 1:
            return Script(steps=[ids(h, " x")], fail=RuntimeError("boom"), fail_after=1)
        return Script(steps=[ids(h, " a")], block=True)

    h.engine.script_for = script
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "n": 2, "max_tokens": 4})
    assert r.status_code == 424
    assert r.json() == {"error": "Request failed during generation: boom", "error_type": "generation"}
    assert h.engine.requests[0].request_id in h.engine.aborts  # the other choice is stopped
    m = await h.metrics()
    assert metric_values(m, "tgi_request_count") == {"": 2}
    assert metric_values(m, "tgi_request_failure") == {'{err="generation"}': 2}
    assert await h.metric("tgi_compat_permits_in_use") == 0


# --- completions ---

async def test_completions_n_indices(h):
    """Prompt i, choice j -> index i * n + j (OpenAI's rule), stream and not."""
    def script(req):
        prompt = h.engine.tokenizer.decode(req.prompt_ids, skip_special_tokens=True).strip()
        return Script.tokens(ids(h, f" {prompt}{choice_of(req)}"), LENGTH)

    h.engine.script_for = script
    r = await h.client.post("/v1/completions", json={"prompt": ["p", "q"], "n": 2, "max_tokens": 8})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, " p0"), (1, " p1"), (2, " q0"), (3, " q1")]
    reqs = h.engine.requests
    assert len(reqs) == 4
    lengths = {q.request_id.rsplit("-", 1)[0]: len(q.prompt_ids) for q in reqs}
    assert len(lengths) == 2  # two prompts, two choices each
    completion = sum(len(ids(h, t)) for t in (" p0", " p1", " q0", " q1"))
    assert body["usage"]["prompt_tokens"] == sum(lengths.values())  # each prompt once
    assert body["usage"]["completion_tokens"] == completion
    r = await h.client.post("/v1/completions", json={"prompt": ["p", "q"], "n": 2, "max_tokens": 8, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    texts: dict[int, str] = {}
    finals = {}
    for e in events[:-1]:
        (c,) = e["choices"]
        texts[c["index"]] = texts.get(c["index"], "") + c["text"]
        if c["finish_reason"]:
            finals[c["index"]] = e["usage"]["completion_tokens"]
    assert texts == {0: " p0", 1: " p1", 2: " q0", 3: " q1"}
    assert finals == {j: len(ids(h, t)) for j, t in enumerate((" p0", " p1", " q0", " q1"))}


async def test_completions_n_metrics(h):
    r = await h.client.post("/v1/completions", json={"prompt": "x", "n": 2, "max_tokens": 3})
    assert r.status_code == 200
    m = await h.metrics()
    # Each choice is a generation: counted, timed and its tokens observed.
    assert metric_values(m, "tgi_request_count") == {"": 2}
    assert metric_values(m, "tgi_request_success") == {"": 2}
    assert metric_values(m, "tgi_request_generated_tokens_count") == {"": 2}
    assert metric_values(m, "tgi_request_generated_tokens_sum") == {"": 6}


# --- the openai SDK ---

async def test_openai_sdk_reads_n_choices(h):
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=h.app), base_url="http://test/v1", timeout=30)
    async with http:
        client = openai.AsyncOpenAI(api_key="-", base_url="http://test/v1", http_client=http, max_retries=0)
        out = await client.chat.completions.create(model="tgi", messages=ASK, n=2, max_tokens=3)
        assert [c.index for c in out.choices] == [0, 1]
        assert all(c.message.content and c.finish_reason == "length" for c in out.choices)
        stream = await client.chat.completions.create(model="tgi", messages=ASK, n=2, max_tokens=3, stream=True,
                                                      stream_options={"include_usage": True})
        seen: dict[int, str] = {}
        usage = None
        async for chunk in stream:
            for c in chunk.choices:
                seen[c.index] = seen.get(c.index, "") + (c.delta.content or "")
            usage = chunk.usage or usage
        assert sorted(seen) == [0, 1] and all(seen.values())
        assert usage.completion_tokens == 6
        done = await client.completions.create(model="tgi", prompt=["a", "b"], n=2, max_tokens=2)
        assert [c.index for c in done.choices] == [0, 1, 2, 3]
