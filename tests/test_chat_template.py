"""Chat templates rendered as TGI renders them (pure)."""

from __future__ import annotations

import pytest

from tgi_compat.chat_template import ChatTemplate, flatten_message
from tgi_compat.errors import TemplateError

SIMPLE = "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"


def test_render_and_continue_final_assistant():
    t = ChatTemplate(SIMPLE, "<s>", "</s>")
    assert t.render([{"role": "user", "content": "hi"}]) == "<s><user>hi</s><a>"
    out = t.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I am "}])
    assert out == "<s><user>hi</s><assistant>I am"  # cut after the content, trailing space trimmed


def test_tools_appended_when_template_ignores_them():
    t = ChatTemplate(SIMPLE, "<s>", "</s>")
    tools = [{"type": "function", "function": {"description": None, "name": "f", "arguments": "{}"}}]
    out = t.render([{"role": "user", "content": "hi"}], tools, "PROMPT")
    assert out == '<s><user>hi\n---\n[{"type":"function","function":{"description":null,"name":"f","arguments":"{}"}}]\nPROMPT</s><a>'
    reads = ChatTemplate("{{ tools | length }}|{{ messages[-1].content }}", None, None)
    assert reads.render([{"role": "user", "content": "hi"}], tools, "P") == "1|hi\n---\nP"


def test_template_errors():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}", None, None)
    with pytest.raises(TemplateError, match="Template error: syntax error: roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(TemplateError):
        ChatTemplate("{{ messages[5].content.foo() }}", None, None).render([{"role": "user", "content": "x"}])


def test_flatten_message():
    chunks = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "u"}}, {"type": "text", "text": "b"}]
    assert flatten_message("user", chunks, None) == {"role": "user", "content": "a![](u)b"}
    flat = flatten_message("assistant", None, [{"id": "1"}])
    assert flat["content"] == '[{"id":"1"}]'


def test_from_tokenizer_without_template():
    class Tok:
        chat_template = None
        bos_token = eos_token = None

    assert ChatTemplate.from_tokenizer(Tok()) is None


def test_chat_without_template_is_a_template_error():
    from tgi_compat.openai.protocol import ChatRequest
    from tgi_compat.openai.serving import OpenAIServing

    serving = OpenAIServing(None, None, model_id="m", fingerprint="0-native", max_client_batch_size=4)
    chat = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]})
    with pytest.raises(TemplateError) as e:
        serving.chat_request(chat)
    assert e.value.body() == {"error": "Template error: template not found", "error_type": "template_error"}
