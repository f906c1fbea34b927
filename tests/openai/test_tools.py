"""Tool calling (TGI's grammar-constrained calls): unit tests of the schema and parser,
and calls through the real engine."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tgi_compat.errors import ToolError
from tgi_compat.openai import tools as tooling
from tgi_compat.openai.protocol import Tool

pytestmark = pytest.mark.engine

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather",
    "parameters": {"type": "object", "properties": {"location": {"type": "string", "maxLength": 12},
                                                    "unit": {"type": "string", "enum": ["c", "f"]}},
                   "required": ["location", "unit"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_tool_grammar_matches_tgi():
    tools = [Tool.model_validate(WEATHER)]
    used, schema = tooling.tool_grammar(tools, "auto")
    assert [t["function"]["name"] for t in used] == ["get_weather", "no_tool"]
    assert json.loads(used[0]["function"]["arguments"]) == WEATHER["function"]["parameters"]
    fn = schema["$functions"]["get_weather"]
    assert fn["properties"]["_name"] == {"type": "string", "const": "get_weather"}
    assert fn["required"] == ["_name", "location", "unit"] and fn["additionalProperties"] is False
    assert schema["properties"]["function"]["anyOf"] == [{"$ref": "#/$functions/get_weather"},
                                                         {"$ref": "#/$functions/no_tool"}]
    # The engine's copy resolves the same calls.
    engine = tooling.engine_schema(schema)
    call = {"function": {"_name": "get_weather", "location": "Paris", "unit": "c"}}
    jsonschema.validate(call, engine)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"function": {"_name": "get_weather", "unit": "c"}}, engine)
    assert tooling.tool_grammar(tools, "none") is None
    assert [t["function"]["name"] for t in tooling.tool_grammar(tools, "required")[0]] == ["get_weather"]
    with pytest.raises(ToolError, match="Tool with name nope not found"):
        tooling.tool_grammar(tools, ("function", "nope"))


def test_parse_output():
    assert tooling.parse_output('{"function": {"_name": "f", "b": 1, "a": 2}}') == ("f", {"b": 1, "a": 2})
    with pytest.raises(ToolError):
        tooling.parse_output("{}")


def test_tool_call_non_stream(http):
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": choice,
                                                     "max_tokens": 100, "seed": 1})
        assert r.status_code == 200, r.text
        message = r.json()["choices"][0]["message"]
        assert list(message) == ["role", "tool_calls"]
        (call,) = message["tool_calls"]
        assert call["id"] == "0" and call["type"] == "function" and call["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    # "none": an ordinary answer.
    body = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                                                    "max_tokens": 5}).json()
    assert isinstance(body["choices"][0]["message"]["content"], str)
    r = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "nope"})
    assert r.status_code == 422 and r.json()["error_type"] == "tool_error"


def test_tool_call_stream_deltas_rebuild_the_call(http):
    with http.stream("POST", "/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                                           "max_tokens": 100, "seed": 1, "stream": True}) as r:
        raw = r.read()
    events = raw[:-2].split(b"\n\n")
    assert events[-1] == b"data: [DONE]"
    deltas = [json.loads(e.removeprefix(b"data:"))["choices"][0]["delta"] for e in events[:-1]]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["function"]["arguments"] == "{"
    assert all(c["function"]["name"] is None for c in calls[1:])
    arguments = "".join(c["function"]["arguments"] for c in calls)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_openai_sdk_tool_call(server_url):
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="-", timeout=120)
    out = client.chat.completions.create(model="tgi", messages=ASK, tools=[WEATHER], tool_choice="required",
                                         max_tokens=100, seed=2)
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
