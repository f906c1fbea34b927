"""Wire types of TGI's OpenAI-compatible routes (router/src/lib.rs ``ChatRequest``,
``CompletionRequest``), as pydantic models.

They follow TGI's serde structs: unknown fields ignored, ``Option`` fields accept
``null``. Where TGI's types reject what OpenAI clients routinely send, we accept it only
where the whole request is honoured (README, "Leniencies"): ``stop`` as a single string,
``stream_options: null``, an empty ``logit_bias`` map, a tool function without
``parameters``, ``{"type": "text"}`` and the other grammar shapes of ``Grammar``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from tgi_compat.tgi.protocol import F32, U32, U64, Grammar, check_grammar_shape, other_grammar_shapes


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)


class ImageUrl(_Wire):
    url: str


class MessageChunk(_Wire):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _fields(self) -> MessageChunk:
        if self.type == "text" and self.text is None:
            raise ValueError("missing field `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("missing field `image_url`")
        return self


class FunctionDefinition(_Wire):
    description: str | None = None
    name: str
    # TGI reads `arguments`, with `parameters` (OpenAI's name) as an alias.
    arguments: Any = Field(None, validation_alias=AliasChoices("arguments", "parameters"))


class Tool(_Wire):
    type: str = Field(examples=["function"])
    function: FunctionDefinition


class ToolCall(_Wire):
    id: str
    type: str
    function: FunctionDefinition


class Message(_Wire):
    role: str = Field(examples=["user"])
    content: str | list[MessageChunk] | None = Field(None, examples=["What is Deep Learning?"])
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    tool_call_id: str | None = Field(None, description="On a tool message: the call it answers. Given to "
                                     "templates that read it (not in TGI).")

    @model_validator(mode="after")
    def _body(self) -> Message:
        # TGI's untagged MessageBody: a `content`, else `tool_calls`.
        if self.content is None and self.tool_calls is None:
            raise ValueError("data did not match any variant of untagged enum MessageBody")
        return self


class FunctionName(_Wire):
    name: str


class TypedToolChoice(_Wire):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(_Wire):
    include_usage: bool = False


class ResponseFormat(Grammar):
    """TGI's grammar (with the other shapes of ``Grammar``), or OpenAI's ``{"type": "text"}``."""

    type: Literal["json", "json_object", "json_schema", "regex", "text"]  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _other_shapes(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") == "text":
            unknown = [k for k in data if k != "type"]
            if unknown:
                raise ValueError(f"unknown field `{unknown[0]}` in a `text` response format")
            return data
        return other_grammar_shapes(data)

    @model_validator(mode="after")
    def _value_shape(self) -> ResponseFormat:
        if self.type != "text":
            check_grammar_shape(self)
        return self

    def grammar(self) -> Grammar | None:
        if self.type == "text":
            return None
        if "value" not in self.model_fields_set:
            return Grammar(type=self.type)
        return Grammar(type=self.type, value=self.value)


class ChatRequest(_Wire):
    model: str | None = Field(None, description="Echoed in the response; `tgi` or absent means the served model. "
                              "The name of a loaded LoRA adapter selects it.", examples=["tgi"])
    messages: list[Message] = Field(examples=[[{"role": "user", "content": "What is Deep Learning?"}]])
    frequency_penalty: F32 | None = Field(None, examples=[1.0])
    logit_bias: list[F32] | dict[str, Any] | None = Field(
        None, description="TGI's list is ignored (as TGI). OpenAI's token-to-bias map is refused unless empty: "
        "its biases are not applied.")
    logprobs: bool | None = Field(None, examples=[False])
    top_logprobs: U32 | None = Field(None, description="Top tokens per position, <= --max-top-n-tokens.", examples=[5])
    max_tokens: U32 | None = Field(
        None, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"), examples=[32]
    )
    n: U32 | None = Field(None, description="Choices to generate, 1 to --max-best-of (TGI ignores it); "
                          "each holds a permit. Not with tools.", examples=[1])
    presence_penalty: F32 | None = Field(None, description="Sent to the engine as repetition_penalty = presence_penalty + 2 (TGI's mapping).")
    stop: list[str] | None = Field(None, examples=[None])
    stream: bool = False
    seed: U64 | None = Field(None, examples=[42])
    temperature: F32 | None = Field(None, description="0 means greedy decoding.", examples=[1.0])
    top_p: F32 | None = Field(None, examples=[0.95])
    tools: list[Tool] | None = None
    tool_prompt: str | None = None
    tool_choice: Any = Field(None, description='"auto" (default), "none", "required", a function name, '
                             'or {"type": "function", "function": {"name"}}.')
    response_format: ResponseFormat | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v):
        if isinstance(v, dict) and v:
            raise ValueError("a `logit_bias` map is not supported: its biases would not be applied")
        return v

    def tool_choice_value(self) -> str | tuple[str, str]:
        """TGI's ``ToolChoice``: "auto", "none", "required" or ("function", name)."""
        choice = self.tool_choice
        if choice is None:
            return "auto"
        if isinstance(choice, str):
            return choice if choice in ("none", "auto", "required") else ("function", choice)
        return ("function", TypedToolChoice.model_validate(choice).function.name)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or isinstance(v, str):
            return v
        TypedToolChoice.model_validate(v)
        return v


class CompletionRequest(_Wire):
    model: str | None = Field(None, description="Unused (as TGI): the response names the served model.")
    prompt: str | list[str] = Field(description="A prompt or a non-empty list of prompts (<= --max-client-batch-size).",
                                    examples=["What is Deep Learning?"])
    max_tokens: U32 | None = Field(None, examples=[32])
    temperature: F32 | None = Field(None, description="0 means greedy decoding.", examples=[1.0])
    top_p: F32 | None = Field(None, examples=[0.95])
    stream: bool = False
    seed: U64 | None = Field(None, examples=[42])
    suffix: str | None = Field(None, description="Not supported (422, as TGI).")
    repetition_penalty: F32 | None = None
    frequency_penalty: F32 | None = Field(None, examples=[1.0])
    stop: list[str] | None = None
    n: U32 | None = Field(None, description="Choices per prompt, 1 to --max-best-of (TGI ignores it); each "
                          "holds a permit. Prompt i's choice j has index i * n + j.", examples=[1])

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v):
        return [v] if isinstance(v, str) else v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("Empty array detected. Do not use an empty array for the prompt.")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ChatTokenizeResponse(BaseModel):
    tokenize_response: list[dict[str, Any]]
    templated_text: str


# --- response shapes, for the OpenAPI document only (responses are built as dicts) ---


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    object: Literal["chat.completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[dict[str, Any]]
    usage: Usage


class ChatCompletionChunk(BaseModel):
    object: Literal["chat.completion.chunk"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[dict[str, Any]]
    usage: Usage | None


class Completion(BaseModel):
    object: Literal["text_completion"]
    id: str
    created: int
    model: str
    system_fingerprint: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None
