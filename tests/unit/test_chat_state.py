"""The chat stream's state machine as values, no engine (TGI's router/src/chat.rs tests).

``ToolCallState.push`` says what each token of a tool-call stream means (nothing yet, the
function's name, an arguments piece, or ``no_tool``); ``ChatStreamFormat`` turns that into
``chat.completion.chunk`` frames and returns the end reason ``no_tool`` when the model chose no tool.
"""

from __future__ import annotations

from types import SimpleNamespace

import orjson

from tgi_compat.openai.serving import ChatStreamFormat
from tgi_compat.openai.tools import NO_TOOL, NO_TOOL_CHOSEN, ToolCallState, ToolDelta

NO_TOOL_TOKENS = ['{"', "function", '":', ' {"', "_", "name", '":', ' "', "no", "_tool", '",', ' "', "content",
                  '":', ' "', "I", " am", " a", " helpful", " assistant", '!"', "}", "}"]
WEATHER_TOKENS = ['{"', "function", '":', ' {"', "_", "name", '":', ' "', "get", "_current", "_weather", '",',
                  ' "', "location", '":', ' "', "San", " Francisco", ",", " CA", '",', ' "', "format", '":', ' "',
                  "c", "elsius", '"}}']


def test_no_tool_is_a_value_after_the_name():
    state = ToolCallState()
    assert [state.push(t) for t in NO_TOOL_TOKENS[:10]] == [None] * 10  # the name is not known yet
    assert state.push(NO_TOOL_TOKENS[10]) is NO_TOOL_CHOSEN


def test_no_tool_with_empty_content():
    state = ToolCallState()
    tokens = NO_TOOL_TOKENS[:12] + ["content", '":"', '"}', "}"]
    assert [state.push(t) for t in tokens[:10]] == [None] * 10
    assert state.push(tokens[10]) is NO_TOOL_CHOSEN


def test_tool_call_streams_name_then_arguments():
    state = ToolCallState()
    assert [state.push(t) for t in WEATHER_TOKENS[:11]] == [None] * 11
    deltas = [state.push(t) for t in WEATHER_TOKENS[11:]]
    assert all(isinstance(d, ToolDelta) for d in deltas)
    assert deltas[0] == ToolDelta("get_current_weather", "{")
    assert [d.name for d in deltas[1:]] == [None] * (len(deltas) - 1)
    # The wrapper's closing brace is cut from the last piece; the arguments parse as JSON.
    arguments = "".join(d.arguments for d in deltas)
    assert arguments == '{ "location": "San Francisco, CA", "format": "celsius"}'
    assert orjson.loads(arguments) == {"location": "San Francisco, CA", "format": "celsius"}
    assert state.buffering  # the call is complete (TGI's state goes back to Buffering)


def _gen(texts: list[str], *, special=(), finish_reason=None, input_length=3):
    """The fields of a ``Generation`` that the chat format reads."""
    ids = list(range(100, 100 + len(texts)))
    return SimpleNamespace(
        ids=ids, texts=texts, special=frozenset(ids[i] for i in special), logprobs=[-0.5] * len(texts),
        top=[[] for _ in texts], valid=SimpleNamespace(top_n_tokens=0, input_length=input_length),
        finish_reason=finish_reason, tok=None,
    )


def _events(frames: list[bytes]) -> list[dict]:
    out = []
    for frame in frames:
        for line in frame.split(b"\n\n"):
            if line:
                assert line.startswith(b"data:{")
                out.append(orjson.loads(line[len(b"data:"):]))
    return out


def test_chat_chunk_per_token_with_usage_after_the_last():
    fmt = ChatStreamFormat("model_id", "fingerprint", logprobs=False, include_usage=True)
    gen = _gen(["Hi", " there", "</s>"], special=(2,), finish_reason="eos_token")
    frames, ended = fmt.tokens(gen, 0, 2)
    events = _events(frames + [fmt.final(gen)])
    assert [e["choices"][0]["delta"] for e in events[:3]] == [
        {"role": "assistant", "content": "Hi"}, {"role": "assistant", "content": " there"},
        {"role": "assistant", "content": ""},  # a special token's text is not sent
    ]
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, "stop"]  # eos_token -> stop
    assert all(e["object"] == "chat.completion.chunk" and e["model"] == "model_id"
               and e["system_fingerprint"] == "fingerprint" and e["usage"] is None for e in events[:3])
    assert events[3]["choices"] == [] and events[3]["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert ended is None


def test_chat_format_tool_deltas():
    fmt = ChatStreamFormat("m", "f", logprobs=False, include_usage=False, tool_id="7")
    gen = _gen(WEATHER_TOKENS, finish_reason="length")
    frames, ended = fmt.tokens(gen, 0, len(WEATHER_TOKENS) - 1)
    events = _events(frames + [fmt.final(gen)])
    calls = [e["choices"][0]["delta"]["tool_calls"][0] for e in events]
    assert {(c["index"], c["id"], c["type"]) for c in calls} == {(0, "7", "function")}
    assert calls[0]["function"] == {"name": "get_current_weather", "arguments": "{"}
    assert "".join(c["function"]["arguments"] for c in calls) == (
        '{ "location": "San Francisco, CA", "format": "celsius"}')
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "length"
    assert ended is None


def test_chat_format_no_tool_ends_the_generation_as_a_value():
    fmt = ChatStreamFormat("m", "f", logprobs=False, include_usage=True, tool_id="0")
    gen = _gen(NO_TOOL_TOKENS)
    frames, ended = fmt.tokens(gen, 0, len(NO_TOOL_TOKENS))
    assert ended == NO_TOOL
    assert b"".join(frames) == b""  # nothing was sent for the tool generation
    assert len(frames) == 11  # and nothing after the token that named no_tool was looked at


def test_tool_call_with_tokens_spanning_the_name_and_the_next_key():
    """SmolLM2's byte-level BPE emits compact JSON's `","` and `":"` as single tokens: the
    name is known when its string closes, and what that token holds past it (`"` of the
    next key) starts the arguments. (TGI's rule, the text closable with `}}`, holds only
    once the whole call is there, which would lose the arguments.)"""
    tokens = ['{"', "function", '":{"', "_", "name", '":"', "get", "_", "weather", '","', "location", '":"',
              "Paris", '","', "unit", '":"', "c", "elsius", '"}}', "<|im_end|>"]
    state = ToolCallState()
    assert [state.push(t) for t in tokens[:9]] == [None] * 9
    deltas = [state.push(t) for t in tokens[9:]]
    assert deltas[0] == ToolDelta("get_weather", '{"')
    assert deltas[-1] is None  # nothing after the complete call (the EOS token)
    arguments = "".join(d.arguments for d in deltas[:-1])
    assert orjson.loads(arguments) == {"location": "Paris", "unit": "celsius"}
    assert state.buffering


def test_tool_call_whole_in_one_piece_and_without_arguments():
    state = ToolCallState()
    assert state.push('{"function":{"_name":"get_weather","location":"Paris"}}') == ToolDelta(
        "get_weather", '{"location":"Paris"}')
    state = ToolCallState()
    assert state.push('{"function":{"_name":"now"') == ToolDelta("now", "{")
    assert state.push("}}") == ToolDelta(None, "}")
    state = ToolCallState()
    assert [state.push(t) for t in ['{"function": {"_name": "no', '_tool",']] == [None, NO_TOOL_CHOSEN]
