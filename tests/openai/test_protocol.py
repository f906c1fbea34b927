"""Unit tests of the OpenAI request shapes TGI refuses: each is honoured whole, or refused
with the extractor's 422 (a constraint is never dropped)."""

from __future__ import annotations

import json

import pydantic
import pytest

from tgi_compat.body import _body_error
from tgi_compat.openai.protocol import ChatRequest
from tgi_compat.tgi.protocol import GenerateRequest

S = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def chat(**fields) -> ChatRequest:
    return ChatRequest.model_validate_json(json.dumps({"messages": [], **fields}))


def refusal(**fields) -> str:
    with pytest.raises(pydantic.ValidationError) as e:
        chat(**fields)
    error = _body_error(e.value)
    assert error.status_code == 422
    return error.message


@pytest.mark.parametrize("fmt, expected", [
    ({"type": "json_object", "schema": S}, ("json_object", S)),  # LangChain's with_structured_output
    ({"type": "json", "schema": S}, ("json", S)),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": S, "strict": True}},  # OpenAI's
     ("json_schema", {"name": "x", "schema": S, "strict": True})),
    ({"type": "json_object", "value": S, "name": "x"}, ("json_object", S)),  # TGI's shape: other keys ignored, as TGI
    ({"type": "json_object"}, ("json_object", None)),  # any JSON object
])
def test_response_format_shapes_become_tgi_grammars(fmt, expected):
    grammar = chat(response_format=fmt).response_format.grammar()
    assert (grammar.type, grammar.value) == expected
    assert ("value" in grammar.model_fields_set) == (expected[1] is not None)


def test_text_response_format_means_no_grammar():
    assert chat(response_format={"type": "text"}).response_format.grammar() is None


@pytest.mark.parametrize("fmt, message", [
    ({"type": "json_object", "schema": S, "strict": True}, "unknown field `strict` in a `json_object` grammar; expected `value` or `schema`"),
    ({"type": "json_object", "value": S, "schema": S}, "both `value` and `schema` given"),
    ({"type": "json_schema", "value": {"schema": S}, "json_schema": {"schema": S}}, "both `value` and `json_schema` given"),
    ({"type": "json_schema", "schema": S}, "unknown field `schema` in a `json_schema` grammar; expected `value` or `json_schema`"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "missing field `schema`"),
    ({"type": "regex", "pattern": "a+"}, "unknown field `pattern` in a `regex` grammar; expected `value`"),
    ({"type": "regex"}, "missing field `value`"),
    ({"type": "text", "value": "x"}, "unknown field `value` in a `text` response format"),
])
def test_response_format_keys_that_would_be_dropped_are_refused(fmt, message):
    got = refusal(response_format=fmt)
    assert got.startswith("Failed to deserialize the JSON body into the target type: response_format: ")
    assert message in got


def test_native_grammar_takes_the_same_shapes():
    req = GenerateRequest.model_validate_json(json.dumps(
        {"inputs": "x", "parameters": {"grammar": {"type": "json_object", "schema": S}}}))
    assert (req.parameters.grammar.type, req.parameters.grammar.value) == ("json_object", S)
    with pytest.raises(pydantic.ValidationError) as e:
        GenerateRequest.model_validate_json(json.dumps(
            {"inputs": "x", "parameters": {"grammar": {"type": "json_object", "schemas": S}}}))
    assert "unknown field `schemas`" in _body_error(e.value).message


def test_other_leniencies():
    assert chat(stop="END").stop == ["END"]  # TGI wants a list
    assert chat(stream_options=None).stream_options is None  # TGI wants an object
    for bias in (None, [], [0.5], {}):  # TGI's (ignored) list, or an empty map
        chat(logit_bias=bias)
    assert "a `logit_bias` map is not supported" in refusal(logit_bias={"42": 100})
    assert refusal(logit_bias="x").startswith("Failed to deserialize the JSON body")
    tool = {"type": "function", "function": {"name": "now"}}  # no `parameters`: takes no arguments
    assert chat(tools=[tool]).tools[0].function.arguments is None
