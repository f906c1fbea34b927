"""Chat templates rendered as TGI renders them (router/src/infer/chat_template.rs).

TGI renders the model's Jinja template with minijinja; we use Jinja2's sandbox (the
engine transformers uses). What TGI does around the template is reproduced:

- every message is flattened to ``{"role", "content"}`` with ``content`` a string: text
  chunks are joined, an image chunk becomes ``![](url)``, a message carrying
  ``tool_calls`` gets them as compact JSON text;
- beyond TGI: a template that reads ``tool_calls`` (Llama 3.1, Qwen 2.5, Mistral...)
  gets an assistant message's calls as data instead, in OpenAI's shape with
  ``arguments`` parsed to a mapping (as vLLM and transformers hand them over), and one
  that reads ``tool_call_id`` gets it on tool messages (``ChatTemplate.message``). Both
  are found in the template's AST, as ``tools`` is;
- the template sees ``messages``, ``bos_token``, ``eos_token``,
  ``add_generation_prompt=True`` and ``tools``, plus ``raise_exception`` and
  ``strftime_now``;
- with tools, ``"\\n---\\n" + tools JSON + "\\n" + tool prompt`` is appended to the last
  message when the template does not read ``tools`` itself (only the prompt otherwise);
- a conversation ending with an assistant message is continued: the output is cut
  right after that message's content (as the transformers pipeline does);
- TGI's template rewrites (gemma3's ``messages[0]['content'][0]['text']``, dropping
  ``{% generation %}`` markers) are applied.

Which template (``load_chat_template``) follows TGI's ``router/src/server.rs`` and
``infer/mod.rs``: a ``chat_template.json`` beside the tokenizer wins; otherwise the tokenizer
config's template (``--tokenizer-config-path``'s file replaces the model's); otherwise
``processor_config.json``'s.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tgi_compat.errors import TemplateError, ToolError

logger = logging.getLogger("tgi_compat")

CHAT_TEMPLATE_JSON = "chat_template.json"  # {"chat_template": "..." | [{"name", "template"}]}
PROCESSOR_CONFIG_JSON = "processor_config.json"  # a multimodal model's processor; may carry a template


def compact_json(value: Any) -> str:
    """serde_json's ``to_string``: no spaces, non-ASCII kept."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _RaisedError(Exception):
    pass


def _raise_exception(message: str):
    raise _RaisedError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None):
        source = source.replace("messages[0]['content'][0]['text']", "messages[0]['content']")
        source = source.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.template = env.from_string(source)
        ast = env.parse(source)
        # A template that does not read `tools` gets them appended to the last message.
        self.reads_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)
        # One that reads these gets them as data; others keep TGI's flattened text.
        names = _names_read(ast)
        self.reads_tool_calls = "tool_calls" in names
        self.reads_tool_call_id = "tool_call_id" in names
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def from_tokenizer(cls, hf_tokenizer) -> ChatTemplate | None:
        """The tokenizer's default template (tokenizer_config.json or chat_template.jinja)."""
        source = getattr(hf_tokenizer, "chat_template", None)
        if isinstance(source, dict):  # named templates: TGI uses "default"
            source = source.get("default")
        elif isinstance(source, list):
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not source:
            return None
        return cls(source, _token_str(hf_tokenizer.bos_token), _token_str(hf_tokenizer.eos_token))

    @classmethod
    def from_tokenizer_config(cls, path: str) -> ChatTemplate | None:
        """TGI's --tokenizer-config-path: a tokenizer_config.json's template and special tokens."""
        return cls.from_tokenizer(_TokenizerConfig(_read_json(path) or {}))

    def message(self, role: str, content: Any, tool_calls: list[ToolCallIn] | None = None,
                tool_call_id: str | None = None) -> dict[str, Any]:
        """One request message as this template gets it: TGI's flattened text, with
        ``tool_calls`` / ``tool_call_id`` as data when the template reads them."""
        if tool_calls is not None and self.reads_tool_calls:
            # vLLM's shape: content "" when absent (templates concatenate it), the key
            # only when there are calls (Llama 3.1 tests `'tool_calls' in message`).
            m = flatten_message(role, "" if content is None else content, None)
            m["tool_calls"] = [_structured_call(c) for c in tool_calls]
            m["_tool_calls"] = "structured"
        else:
            m = flatten_message(role, content, None if tool_calls is None else [_flat_call(c) for c in tool_calls])
        if tool_call_id is not None and self.reads_tool_call_id:
            m["tool_call_id"] = tool_call_id
        return m

    def render(self, messages: list[dict[str, str]], tools: list[dict] | None = None, tool_prompt: str = "") -> str:
        """``messages`` already flattened (``message`` / ``flatten_message``); ``tools`` as TGI
        serializes them (``Tool`` with ``arguments`` as a JSON string)."""
        messages = [dict(m) for m in messages]
        if tools is not None:
            if self.reads_tools:
                extra = f"\n---\n{tool_prompt}"
            else:
                try:
                    extra = f"\n---\n{compact_json(tools)}\n{tool_prompt}"
                except (TypeError, ValueError) as e:
                    raise ToolError(str(e)) from e
            if messages and not messages[-1].get("_tool_calls"):
                messages[-1]["content"] += extra
        final = messages[-1] if messages else None
        # A final assistant message is continued after its content; one whose calls the
        # template renders itself has no content of ours to cut after.
        continue_final = final is not None and final["role"] == "assistant" and final.get("_tool_calls") != "structured"
        for m in messages:
            m.pop("_tool_calls", None)
        try:
            rendered = self.template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=True,
                tools=tools,
            )
        except _RaisedError as e:
            raise TemplateError(f"syntax error: {e}") from None
        except jinja2.TemplateError as e:
            raise TemplateError(str(e)) from None
        except Exception as e:  # a template can fail in many ways at render time
            raise TemplateError(f"{type(e).__name__}: {e}") from None
        if continue_final:
            cut = rendered.rfind(final["content"])
            if cut >= 0:
                rendered = rendered[: cut + len(final["content"])].rstrip()
        return rendered


class _TokenizerConfig:
    """The attributes ``from_tokenizer`` reads, from a tokenizer_config.json's contents."""

    def __init__(self, data: dict, chat_template=None):
        self.chat_template = chat_template if chat_template is not None else data.get("chat_template")
        self.bos_token = _json_token(data.get("bos_token"))
        self.eos_token = _json_token(data.get("eos_token"))


def _read_json(path: str | Path) -> dict | None:
    """A JSON object from a file, or None (logged) when it cannot be read, as TGI skips it."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        logger.warning("could not read %s: %s", path, e)
        return None
    if not isinstance(data, dict):
        logger.warning("could not read %s: not a JSON object", path)
        return None
    return data


def find_model_file(name_or_path: str, filename: str, revision: str | None = None,
                    cache_dir: str | None = None) -> Path | None:
    """One of the model's files, as TGI looks for chat_template.json: beside the tokenizer in a
    local directory, else in the Hub repository (the cache first; absent, offline or gated: None)."""
    if not name_or_path:
        return None
    local = Path(name_or_path)
    if local.is_dir():
        path = local / filename
        return path if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(name_or_path, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache knows the repository has no such file
            return None
        return Path(hf_hub_download(name_or_path, filename, revision=revision, cache_dir=cache_dir))
    except Exception:  # no such file, offline, gated, not a repository id: TGI's `.ok()`
        return None


def load_chat_template(hf_tokenizer, tokenizer_config_path: str | None = None, *, revision: str | None = None,
                       cache_dir: str | None = None) -> tuple[ChatTemplate | None, str]:
    """(template, where it came from) by TGI's precedence (``router/src/server.rs``):
    chat_template.json beside the tokenizer overrides the template of the tokenizer config,
    which is ``--tokenizer-config-path``'s file when given (bos/eos tokens too), else the
    tokenizer's own (tokenizer_config.json or chat_template.jinja)."""
    if tokenizer_config_path:
        config = _TokenizerConfig(_read_json(tokenizer_config_path) or {})
        origin = f"--tokenizer-config-path {tokenizer_config_path}"
    else:
        config = hf_tokenizer
        origin = "the tokenizer's config (tokenizer_config.json / chat_template.jinja)"
    model = getattr(hf_tokenizer, "name_or_path", "") or ""
    standalone = find_model_file(model, CHAT_TEMPLATE_JSON, revision, cache_dir)
    if standalone is not None:
        data = _read_json(standalone)
        if data is not None and isinstance(data.get("chat_template"), (str, list)):
            config = _TokenizerConfig({"bos_token": _token_str(config.bos_token), "eos_token": _token_str(config.eos_token)},
                                      chat_template=data["chat_template"])
            origin = f"{CHAT_TEMPLATE_JSON} ({standalone})"
        elif data is not None:
            logger.warning("could not read %s: no `chat_template` string or list", standalone)
    if not getattr(config, "chat_template", None):  # TGI's last resort: processor_config.json's template
        processor = find_model_file(model, PROCESSOR_CONFIG_JSON, revision, cache_dir)
        data = _read_json(processor) if processor is not None else None
        if data and isinstance(data.get("chat_template"), (str, list)):
            config = _TokenizerConfig({"bos_token": _token_str(config.bos_token), "eos_token": _token_str(config.eos_token)},
                                      chat_template=data["chat_template"])
            origin = f"{PROCESSOR_CONFIG_JSON} ({processor})"
    try:
        template = ChatTemplate.from_tokenizer(config)
    except jinja2.TemplateError as e:  # TGI fails to start on a template minijinja cannot compile
        from tgi_compat.config import ConfigError

        raise ConfigError(f"the chat template from {origin} does not compile: {e}") from None
    return template, origin if template is not None else "none: chat requests answer 422 `template not found`"


class ToolCallIn(NamedTuple):
    """A tool call of an assistant message, as the request gave it."""

    id: str
    type: str
    name: str
    description: str | None
    arguments: Any


def _flat_call(call: ToolCallIn) -> dict[str, Any]:
    """TGI's ``ToolCall`` as serialized into flattened text: ``arguments`` as JSON text."""
    return {"id": call.id, "type": call.type,
            "function": {"description": call.description, "name": call.name, "arguments": compact_json(call.arguments)}}


def _structured_call(call: ToolCallIn) -> dict[str, Any]:
    """OpenAI's tool-call shape, ``arguments`` a mapping as vLLM hands it to templates
    (``_postprocess_messages``): a JSON string is parsed; anything that is not an object
    (empty, invalid JSON, a list...) becomes ``{}`` so the conversation can go on."""
    args = call.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args else {}
        except ValueError:
            args = {}
    if not isinstance(args, dict):
        args = {}
    return {"id": call.id, "type": call.type, "function": {"name": call.name, "arguments": args}}


def _names_read(ast: nodes.Template) -> set[str]:
    """Every attribute a template reads (``m.x``) and every string constant in it, which
    covers ``m['x']``, ``'x' in m`` and ``selectattr('x')``."""
    names = set()
    for node in ast.find_all((nodes.Getattr, nodes.Const)):
        if isinstance(node, nodes.Getattr):
            names.add(node.attr)
        elif isinstance(node.value, str):
            names.add(node.value)
    return names


def _json_token(token) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _token_str(token) -> str | None:
    if token is None:
        return None
    return token if isinstance(token, str) else str(getattr(token, "content", token))


def flatten_message(role: str, content: Any, tool_calls: list[dict] | None) -> dict[str, Any]:
    """TGI's ``Message`` → ``TextMessage``: content as one string."""
    if content is None and tool_calls is not None:
        return {"role": role, "content": compact_json(tool_calls), "_tool_calls": True}
    if isinstance(content, str):
        return {"role": role, "content": content}
    parts = []
    for chunk in content:
        if chunk["type"] == "text":
            parts.append(chunk["text"])
        else:
            parts.append(f"![]({chunk['image_url']['url']})")
    return {"role": role, "content": "".join(parts)}
