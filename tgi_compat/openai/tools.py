"""TGI's tool calling: a JSON-schema grammar over the offered functions
(router/src/infer/tool_grammar.rs) and the parsing of what the model generated
(router/src/chat.rs).

The model is made to write ``{"function": {"_name": <tool>, <arguments>...}}``; with
``tool_choice: "auto"`` a ``no_tool`` function is offered too, and choosing it makes
TGI generate again without tools (an ordinary answer). ``ToolCallState`` is the stream's
state machine (TGI's ``ChatState::push``): it returns what each token means as a value.
"""

from __future__ import annotations

import json
import re
from typing import Any, NamedTuple

from tgi_compat.chat_template import compact_json
from tgi_compat.errors import ToolError
from tgi_compat.openai.protocol import Tool

NO_TOOL = "no_tool"

DEFAULT_TOOL_PROMPT = (
    "\nGiven the functions available, please respond with a JSON for a function call with its proper "
    "arguments that best answers the given prompt. Respond in the format {name: function name, parameters: "
    "dictionary of argument name and its value}.Do not use variables.\n"
)

_NO_TOOL_FUNCTION = {
    "name": NO_TOOL,
    "description": "Open ended response with no specific tool selected",
    "arguments": {"type": "object"},
}


def tool_dict(name: str, description: str | None, arguments: Any) -> dict:
    """A tool as TGI serializes it (to templates and prompts): ``arguments`` as JSON text."""
    return {"type": "function", "function": {"description": description, "name": name,
                                             "arguments": compact_json(arguments)}}


def tool_grammar(tools: list[Tool], choice: str | tuple[str, str]) -> tuple[list[dict], dict] | None:
    """(tools as the template sees them, JSON schema) or None when no tool may be used."""
    offered = [(t.function.name, t.function.description, t.function.arguments) for t in tools]
    if isinstance(choice, tuple):
        name = choice[1]
        found = [t for t in offered if t[0] == name]
        if not found:
            raise ToolError(f"Tool with name {name} not found")
        use = found[:1]
    elif choice == "required":
        use = offered
    elif choice == "auto":
        use = [*offered, (NO_TOOL, _NO_TOOL_FUNCTION["description"], _NO_TOOL_FUNCTION["arguments"])]
    else:  # "none"
        use = []
    if not use:
        return None
    functions = {}
    for name, description, arguments in use:
        properties: dict[str, Any] = {"_name": {"type": "string", "const": name}}
        required: list[Any] = ["_name"]
        params: dict[str, Any] = {"description": description or ""}
        if isinstance(arguments, dict):
            if isinstance(arguments.get("properties"), dict):
                properties.update(arguments["properties"])
            if isinstance(arguments.get("required"), list):
                required.extend(arguments["required"])
            # TGI's test: only the *string* "true" allows additional properties.
            params["additionalProperties"] = arguments.get("additionalProperties") == "true"
        params["properties"] = properties
        params["required"] = required
        functions[name] = params
    schema = {
        "$functions": functions,
        "properties": {"function": {"anyOf": [{"$ref": f"#/$functions/{n}"} for n, _, _ in use]}},
        # Not in TGI's schema, where `{}` is a valid answer that then fails to parse.
        "required": ["function"],
    }
    return [tool_dict(n, d, a) for n, d, a in use], schema


def engine_schema(schema: dict) -> dict:
    """The same schema with its definitions under ``$defs``, where every JSON-schema
    grammar compiler looks for ``$ref`` targets."""
    text = json.dumps(schema).replace('"#/$functions/', '"#/$defs/')
    out = json.loads(text)
    out["$defs"] = out.pop("$functions")
    return out


def parse_call(text: str) -> tuple[str, dict] | None:
    """``(name, arguments)`` if ``text`` is a complete call object, else None."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    function = value.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("_name"), str):
        return None
    args = {k: v for k, v in function.items() if k != "_name"}
    return function["_name"], args


def parse_output(text: str) -> tuple[str, dict]:
    call = parse_call(text)
    if call is None:
        raise ToolError(f"Failed to parse generated text: {text!r}")
    return call


def next_tool_call_id(messages) -> str:
    """TGI's stream tool-call id: one more than the largest integer id in the
    conversation's tool calls, "0" when there are none."""
    best = 0
    for m in messages:
        for call in m.tool_calls or ():
            try:
                best = max(best, int(call.id) + 1)
            except ValueError:
                import uuid

                return str(uuid.uuid4())
    return str(best)


class ToolDelta(NamedTuple):
    """A piece of the streamed call: the function's name (first delta only) and a piece
    of its arguments' JSON text."""

    name: str | None
    arguments: str


class NoTool:
    """The model chose ``no_tool``: the route generates again without tools."""

    def __repr__(self) -> str:
        return "NO_TOOL_CHOSEN"


NO_TOOL_CHOSEN = NoTool()


# The call's head up to the end of the function's name (the grammar puts `_name` first).
_NAME_HEAD = re.compile(r'\s*\{\s*"function"\s*:\s*\{\s*"_name"\s*:\s*"((?:[^"\\]|\\.)*)"')


class ToolCallState:
    """The tool-call JSON of a chat stream, token by token (TGI's ``ChatState`` states
    Buffering and Tool, router/src/chat.rs).

    ``push(text)`` returns None while the function's name is not known yet (nothing to
    send), ``NO_TOOL_CHOSEN`` when that name is ``no_tool``, else a ``ToolDelta``: first
    ``(name, "{" + what the token holds past the name and its comma)``, then each token's
    text as an arguments piece. When the call object is complete, its closing ``}`` (the
    wrapper's) is cut and buffering starts again (TGI's state), in which nothing more is
    sent (the EOS token after the call included).

    TGI knows the name once the text, cut of trailing whitespace, commas and braces and
    closed with ``}}``, parses. A byte-level BPE tokenizer with compact JSON (SmolLM2's)
    emits ``","`` as one token, so that never holds before the call is complete and TGI's
    stream would carry ``{`` and ``}`` with the arguments lost; the name is taken as soon
    as its string closes instead, which is the same token whenever TGI's rule works.
    """

    __slots__ = ("buffering", "text", "complete")

    def __init__(self):
        self.buffering = True
        self.text = ""
        self.complete = False

    def push(self, text: str) -> ToolDelta | NoTool | None:
        self.text += text
        if self.buffering:
            if self.complete:
                return None
            head = _NAME_HEAD.match(self.text)
            if head is None:
                return None
            name = json.loads(f'"{head.group(1)}"')
            if name == NO_TOOL:
                return NO_TOOL_CHOSEN
            self.buffering = False
            rest = self.text[head.end():].lstrip()
            rest = rest[1:] if rest.startswith(",") else rest
            return ToolDelta(name, "{" + self._closing(rest))
        return ToolDelta(None, self._closing(text))

    def _closing(self, piece: str) -> str:
        """``piece``, without the wrapper's closing brace when it completes the call."""
        if parse_call(self.text) is None:
            return piece
        self.buffering = self.complete = True
        piece = piece.rstrip()
        return piece[:-1] if piece.endswith("}") else piece
