"""TGI's OpenAI routes over scripted engine outputs: chat shapes, tool calls (stream and
not), ``no_tool``'s second generation, completions streams, and their request metrics."""

from __future__ import annotations

import json

from tests.unit.conftest import metric_values, sse_events
from tests.unit.scripted_engine import LENGTH, STOP, Script

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["location", "unit"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
# What TGI's tool grammar makes the model write (compact: vLLM's JSON has no free whitespace).
CALL_TEXT = '{"function":{"_name":"get_weather","location":"Paris","unit":"c"}}'
NO_TOOL_TEXT = '{"function":{"_name":"no_tool","content":"x"}}'


def ids(h, text: str) -> list[int]:
    return h.engine.tokenizer.encode_no_special(text)


def with_eos(h, text: str) -> Script:
    """The grammar's JSON then EOS, as vLLM ends a constrained generation."""
    return Script.tokens(ids(h, text) + [h.engine.tokenizer.eos_token_id], STOP)


async def test_chat_non_stream_shape(h):
    h.engine.push(Script.tokens(ids(h, " hello there"), LENGTH))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, "logprobs": True,
                                                           "top_logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    req = h.engine.requests[-1]
    assert req.sampling.temperature == 0.0 and req.sampling.max_tokens == 4 and req.sampling.logprobs == 2
    assert set(body) == {"object", "id", "created", "model", "system_fingerprint", "choices", "usage"}
    assert (body["object"], body["id"], body["model"]) == ("chat.completion", "", "scripted/tiny")
    assert body["system_fingerprint"].endswith("-native")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " hello there"}
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [c["token"] for c in content] == [h.engine.tokenizer.token_text(i) for i in ids(h, " hello there")]
    assert all(c["logprob"] == -1.0 and len(c["top_logprobs"]) == 2 for c in content)
    assert body["usage"] == {"prompt_tokens": len(req.prompt_ids), "completion_tokens": 4,
                             "total_tokens": len(req.prompt_ids) + 4}
    # The chat template's prompt reached the engine without a second BOS.
    prompt = h.engine.tokenizer.decode(req.prompt_ids, skip_special_tokens=False)
    assert prompt == "<s><|user|>\nWhat is the weather in Paris?</s>\n<|assistant|>\n"


async def test_chat_stream_shape_and_usage(h):
    toks = ids(h, " hello there")
    h.engine.push(Script(steps=[toks[:1], toks[1:]], finish=LENGTH))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 4, "stream": True,
                                                           "stream_options": {"include_usage": True}})
    assert r.content.endswith(b"data: [DONE]\n\n")  # with a space, as huggingface_hub wants it
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    chunks, usage = events[:-2], events[-2]
    assert len(chunks) == len(toks)
    for c in chunks:
        assert c["object"] == "chat.completion.chunk" and c["usage"] is None
        assert list(c["choices"][0]) == ["index", "delta", "logprobs", "finish_reason"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == " hello there"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(toks) - 1) + ["length"]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(toks)


async def test_completions_stream_and_list(h):
    toks = ids(h, " a b")
    h.engine.script_for = lambda req: Script.tokens(toks, STOP if req.sampling.max_tokens == 2 else LENGTH)
    r = await h.client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    assert [e["choices"][0]["text"] for e in events[:-1]] == [" a", " b"]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == ["", "length"]
    assert "usage" not in events[0] and events[-2]["usage"]["completion_tokens"] == 2
    r = await h.client.post("/v1/completions", json={"prompt": ["x", "y", "z"], "max_tokens": 5})
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["finish_reason"] for c in body["choices"]] == ["length"] * 3
    assert body["usage"]["completion_tokens"] == 6
    assert r.headers["x-generated-tokens"] == "6"


# --- tool calls ---

async def test_tool_call_stream_deltas(h):
    h.engine.push(with_eos(h, CALL_TEXT))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER],
                                                           "tool_choice": "required", "max_tokens": 60, "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    req = h.engine.requests[-1]
    kind, schema = req.structured
    assert kind == "json" and schema["properties"]["function"]["anyOf"] == [{"$ref": "#/$defs/get_weather"}]
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    # The name first (with "{" as TGI sends it), then the argument text piece by piece.
    assert calls[0]["function"] == {"name": "get_weather", "arguments": "{"}
    assert (calls[0]["id"], calls[0]["type"], calls[0]["index"]) == ("0", "function", 0)
    assert all(c["function"]["name"] is None for c in calls[1:]) and len(calls) > 3
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"location": "Paris", "unit": "c"}
    # The last brace closes the call object and is trimmed, as TGI does.
    assert calls[-1]["function"]["arguments"] == ""
    # TGI's ChatState sends nothing for a token after the call closes (back to buffering):
    # the EOS token, which carries the finish reason, gets no event, here as in TGI.
    assert {e["choices"][0]["finish_reason"] for e in events[:-1]} == {None}


async def test_tool_call_non_stream(h):
    h.engine.push(with_eos(h, CALL_TEXT))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 60})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "tool_calls": [{
        "id": "0", "type": "function",
        "function": {"description": None, "name": "get_weather", "arguments": '{"location":"Paris","unit":"c"}'}}]}
    assert choice["finish_reason"] == "stop"
    # tool_choice auto (the default) offers no_tool too.
    refs = h.engine.requests[-1].structured[1]["properties"]["function"]["anyOf"]
    assert refs == [{"$ref": "#/$defs/get_weather"}, {"$ref": "#/$defs/no_tool"}]


async def test_no_tool_generates_again_non_stream(h):
    h.engine.push(with_eos(h, NO_TOOL_TEXT), Script.tokens(ids(h, " Sunny") + [h.engine.tokenizer.eos_token_id], STOP))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 60})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == {"role": "assistant", "content": " Sunny"}
    first, second = h.engine.requests
    assert first.structured is not None and second.structured is None
    assert first.prompt_ids != second.prompt_ids  # the second prompt has no tools in it
    m = await h.metrics()
    assert metric_values(m, "tgi_request_count") == {"": 2} and metric_values(m, "tgi_request_success") == {"": 2}


async def test_no_tool_generates_again_stream(h):
    eos = h.engine.tokenizer.eos_token_id
    h.engine.push(with_eos(h, NO_TOOL_TEXT), Script.tokens(ids(h, " Sunny day") + [eos], STOP))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 60,
                                                           "stream": True})
    events = sse_events(r.content)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert all("tool_calls" not in d for d in deltas)  # nothing of the no_tool call is sent
    assert "".join(d["content"] for d in deltas) == " Sunny day"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    first, second = h.engine.requests
    assert first.structured is not None and second.structured is None
    assert first.request_id in h.engine.aborts  # the tool generation was stopped at the name
    assert second.request_id not in h.engine.aborts


async def test_no_tool_stream_records_both_outcomes(h):
    eos = h.engine.tokenizer.eos_token_id
    h.engine.push(with_eos(h, NO_TOOL_TEXT), Script.tokens(ids(h, " Sunny") + [eos], STOP))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 60,
                                                           "stream": True})
    assert sse_events(r.content)[-1] == "[DONE]"
    m = await h.metrics()
    count = metric_values(m, "tgi_request_count").get("", 0)
    done = metric_values(m, "tgi_request_success").get("", 0) + sum(metric_values(m, "tgi_request_failure").values())
    assert count == 2
    assert count == done
    # The tool generation is a success that ended by the route's choice, and says so in the log.
    assert metric_values(m, "tgi_request_success").get("", 0) == 2


async def test_tool_errors(h):
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 5,
                                                           "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert (r.status_code, r.json()) == (422, {"error": "Tool error: Tool with name nope not found", "error_type": "tool_error"})
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 5,
                                                           "response_format": {"type": "json", "value": {"type": "object"}}})
    assert r.status_code == 422 and r.json()["error"] == "Tool error: Grammar and tools are mutually exclusive"
    # The model's text is not a call (no grammar could make that happen; a truncated one can).
    h.engine.push(Script.tokens(ids(h, '{"function":{"_na'), LENGTH))
    r = await h.client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 6})
    assert r.status_code == 422 and r.json()["error_type"] == "tool_error"
    assert r.json()["error"].startswith("Tool error: Failed to parse generated text:")
    assert h.engine.requests[-1].structured is not None
    assert len(h.engine.requests) == 1
