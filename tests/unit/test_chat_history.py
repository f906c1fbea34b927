"""Multi-turn tool use in chat history: assistant ``tool_calls`` reach templates that read
them as data (OpenAI's shape, ``arguments`` a mapping) and tool messages carry
``tool_call_id`` to templates that read it; other templates keep TGI's flattened text.

The templates below copy the tool-call handling of the Llama 3.1, Qwen 2.5 and Mistral
(v0.3) chat templates; each test serves one through ``--tokenizer-config-path`` and reads
the rendered prompt from ``/chat_tokenize``.
"""

from __future__ import annotations

import json

import pytest

from tgi_compat.chat_template import ChatTemplate

# Llama 3.1: `'tool_calls' in message` picks the branch; one call, `arguments | tojson`;
# a tool result as {"output": ...}.
LLAMA31 = """{{- bos_token }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- { "output": message.content } | tojson }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""

# Qwen 2.5: `tool_call.function` unwrapped when defined, arguments printed as they are
# when a string (the Coder / later templates' test), else `| tojson`; tool results grouped
# in one user turn.
QWEN25 = """{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system") or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {%- if tool_call.arguments is string %}
                {{- tool_call.arguments }}
            {%- else %}
                {{- tool_call.arguments | tojson }}
            {%- endif %}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}"""

# Mistral v0.3: alternation checked on messages without `tool_calls` (selectattr
# "undefined": the key must be absent, not null); calls as `function | tojson` plus the
# 9-character `id`; results with `call_id` from `tool_call_id`.
MISTRAL = """{%- set loop_messages = messages %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{%- set plain = loop_messages | selectattr("tool_calls", "undefined") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {{- "[INST] " + message["content"] + "[/INST]" }}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- endif %}
{%- endfor %}
{{- "|plain=" ~ plain | length }}"""

# A template that reads neither: TGI's flattened text.
PLAIN = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}<assistant>"

ARGS = '{"location": "Paris", "unit": "c"}'
CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "tool_call_id": "call12345", "content": "22"},
    {"role": "assistant", "content": "It is 22 C."},
    {"role": "user", "content": "Thanks"},
]


async def rendered(app_factory, tmp_path, template: str, messages=CONVERSATION) -> str:
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"}))
    h = await app_factory("--tokenizer-config-path", str(config))
    r = await h.client.post("/chat_tokenize", json={"messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["templated_text"]


async def test_llama31_gets_the_call_as_data(app_factory, tmp_path):
    text = await rendered(app_factory, tmp_path, LLAMA31)
    assert text == (
        "<s><|start_header_id|>user<|end_header_id|>\n\nWeather in Paris?<|eot_id|>"
        '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", '
        '"parameters": {"location": "Paris", "unit": "c"}}<|eot_id|>'
        '<|start_header_id|>ipython<|end_header_id|>\n\n{"output": "22"}<|eot_id|>'
        # A message without calls has no `tool_calls` key: it takes the plain branch.
        "<|start_header_id|>assistant<|end_header_id|>\n\nIt is 22 C.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nThanks<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


async def test_qwen25_gets_the_call_as_data(app_factory, tmp_path):
    messages = [*CONVERSATION[:1], {**CONVERSATION[1], "content": "Let me check."}, *CONVERSATION[2:]]
    text = await rendered(app_factory, tmp_path, QWEN25, messages)
    assert text == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\nLet me check.\n<tool_call>\n{"name": "get_weather", '
        '"arguments": {"location": "Paris", "unit": "c"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n22\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 22 C.<|im_end|>\n"
        "<|im_start|>user\nThanks<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


async def test_mistral_gets_call_ids_and_tool_call_id(app_factory, tmp_path):
    text = await rendered(app_factory, tmp_path, MISTRAL)
    assert text == (
        "<s>[INST] Weather in Paris?[/INST]"
        '[TOOL_CALLS] [{"arguments": {"location": "Paris", "unit": "c"}, "name": "get_weather", "id": "call12345"}]</s>'
        '[TOOL_RESULTS] {"content": 22, "call_id": "call12345"}[/TOOL_RESULTS]'
        " It is 22 C.</s>[INST] Thanks[/INST]"
        "|plain=4"  # every message but the one with calls lacks the `tool_calls` attribute
    )


async def test_template_reading_neither_keeps_tgis_flattened_text(app_factory, tmp_path):
    text = await rendered(app_factory, tmp_path, PLAIN)
    # TGI serializes `arguments` (here OpenAI's JSON string) once more, inside the calls' JSON.
    flat = json.dumps([{"id": "call12345", "type": "function", "function": {
        "description": None, "name": "get_weather", "arguments": json.dumps(ARGS)}}], separators=(",", ":"))
    assert text == (
        f"<user>Weather in Paris?</s><assistant>{flat}</s><tool>22</s>"
        "<assistant>It is 22 C.</s><user>Thanks</s><assistant>"
    )


async def test_tool_call_id_alone(app_factory, tmp_path):
    """A template that reads `tool_call_id` but not `tool_calls`: the id, and the calls as text."""
    template = ("{% for m in messages %}<{{ m.role }}{% if m.tool_call_id is defined %} id={{ m.tool_call_id }}"
                "{% endif %}>{{ m.content }}{% endfor %}")
    text = await rendered(app_factory, tmp_path, template)
    assert "<tool id=call12345>22" in text
    assert '<assistant>[{"id":"call12345","type":"function","function":{"description":null' in text


async def test_the_engine_gets_the_rendered_prompt(app_factory, tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": QWEN25, "bos_token": "<s>", "eos_token": "</s>"}))
    h = await app_factory("--tokenizer-config-path", str(config))
    text = (await h.client.post("/chat_tokenize", json={"messages": CONVERSATION})).json()["templated_text"]
    r = await h.client.post("/v1/chat/completions", json={"messages": CONVERSATION, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert h.engine.requests[-1].prompt_ids == h.engine.tokenizer.encode_no_special(text)
    assert '"arguments": {"location": "Paris", "unit": "c"}' in text


@pytest.mark.parametrize("arguments, shown", [
    ({"location": "Paris"}, '{"location": "Paris"}'),  # TGI's shape: already a mapping
    ('{"location": "Paris"}', '{"location": "Paris"}'),
    ("", "{}"),  # vLLM's rule: nothing, invalid JSON or a non-object -> {}
    ("not json", "{}"),
    ("[1, 2]", "{}"),
])
def test_arguments_become_a_mapping(arguments, shown):
    t = ChatTemplate(LLAMA31, "<s>", "</s>")
    from tgi_compat.chat_template import ToolCallIn

    call = ToolCallIn("c1", "function", "f", None, arguments)
    m = t.message("assistant", None, [call])
    assert m["content"] == ""  # vLLM's content for a message with calls only
    out = t.render([t.message("user", "hi"), m, t.message("user", "ok")])
    assert '{"name": "f", "parameters": ' + shown + "}" in out


@pytest.mark.parametrize("source, calls, call_id", [
    ("{{ messages[0].tool_calls }}", True, False),
    ("{{ messages[0]['tool_calls'] }}", True, False),
    ("{% if 'tool_calls' in messages[0] %}{% endif %}", True, False),
    ("{{ messages | selectattr('tool_calls', 'undefined') | list }}", True, False),
    ("{{ messages[0].tool_call_id }}", False, True),
    ("{{ messages[0].content }}", False, False),
])
def test_what_a_template_reads(source, calls, call_id):
    t = ChatTemplate(source, None, None)
    assert (t.reads_tool_calls, t.reads_tool_call_id) == (calls, call_id)


def test_final_assistant_call_is_not_cut():
    """Continuing a final assistant message cuts after its content; a structured call has
    none of ours, so the prompt is left whole."""
    t = ChatTemplate(QWEN25, None, None)
    from tgi_compat.chat_template import ToolCallIn

    call = ToolCallIn("c1", "function", "f", None, '{"a": 1}')
    out = t.render([t.message("user", "hi"), t.message("assistant", None, [call])])
    assert out.endswith('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n<|im_start|>assistant\n')
