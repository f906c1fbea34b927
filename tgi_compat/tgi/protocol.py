"""TGI's wire types in one place.

Requests are pydantic models (parsed once per request, and the source of the OpenAPI
document). They mirror TGI's serde structs (router/src/lib.rs): unknown fields are
ignored, ``Option`` fields accept ``null``, the non-``Option`` fields reject it, and
types are strict (serde does not coerce ``"1"`` into ``1``).

Responses are plain dicts built in TGI's field order and serialized with orjson: they
are built per token on streams, where a pydantic model would cost more than the rest
of the hot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
# serde reads an f32; beyond its range the value would become infinite.
F32 = Annotated[float, Field(allow_inf_nan=False, ge=-3.4028234663852886e38, le=3.4028234663852886e38)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class Grammar(_Strict):
    """TGI's ``GrammarType`` (serde adjacently tagged: ``{"type", "value"}``), and the
    shapes of ``other_grammar_shapes``."""

    type: Literal["json", "json_object", "json_schema", "regex"] = Field(
        description="`json`/`json_object` take a JSON schema (an object or a JSON string), "
        "`json_schema` takes `{name?, schema}`, `regex` a regex. Also accepted (TGI refuses them): "
        "the schema of `json`/`json_object` under `schema` instead of `value` (LangChain), OpenAI's "
        "`{\"type\": \"json_schema\", \"json_schema\": {name?, schema}}`; without `value`, other keys are refused."
    )
    value: Any = Field(
        None,
        description="The schema, or the regex string. Required except for `json_object`, where "
        "an absent value means any JSON object (OpenAI's JSON mode; TGI requires a schema).",
    )

    @model_validator(mode="before")
    @classmethod
    def _other_shapes(cls, data: Any) -> Any:
        return other_grammar_shapes(data)

    @model_validator(mode="after")
    def _value_shape(self) -> Grammar:
        check_grammar_shape(self)
        return self


# Shapes clients send that TGI's serde refuses (it wants `value`), each honoured whole:
# the key named here carries the constraint and becomes `value`.
_SCHEMA_KEY = {
    "json": "schema",
    "json_object": "schema",  # LangChain's with_structured_output(method="json_schema")
    "json_schema": "json_schema",  # OpenAI's {"type": "json_schema", "json_schema": {name, schema, strict}}
}


def other_grammar_shapes(data: Any) -> Any:
    """Map the non-TGI grammar shapes we accept onto TGI's ``{"type", "value"}``.

    Without ``value``, every key besides ``type`` and the schema key of ``_SCHEMA_KEY``
    is refused: we cannot tell whether it would change the output, and ignoring a
    constraint is worse than TGI's refusal. With ``value`` (TGI's shape) other keys are
    ignored as TGI ignores them, except a second schema, which would compete with it.
    """
    if not isinstance(data, dict):
        return data
    kind = data.get("type")
    key = _SCHEMA_KEY.get(kind) if isinstance(kind, str) else None
    if "value" in data:
        if key is not None and key in data:
            raise ValueError(f"both `value` and `{key}` given; send the schema once")
        return data
    unknown = [k for k in data if k not in ("type", key)]
    if unknown:
        expected = "`value`" + (f" or `{key}`" if key else "")
        raise ValueError(f"unknown field `{unknown[0]}` in a `{kind}` grammar; expected {expected}")
    if key is not None and key in data:
        data = {"type": kind, "value": data[key]}
    return data


def check_grammar_shape(g: Grammar) -> None:
    """What serde rejects while deserializing a grammar (a plain-text 422 in TGI);
    semantic checks (meta-schema, `properties`) are validation errors (validation.py)."""
    if "value" not in g.model_fields_set and g.type != "json_object":
        raise ValueError("missing field `value`")
    if g.type == "regex" and not isinstance(g.value, str):
        raise ValueError("invalid type: expected a string for a `regex` grammar")
    if g.type == "json_schema" and not (isinstance(g.value, dict) and "schema" in g.value):
        raise ValueError("missing field `schema` in a `json_schema` grammar")


class GenerateParameters(_Strict):
    best_of: U64 | None = Field(None, description="Generate best_of sequences and return the one with the highest mean token logprob.", examples=[1])
    temperature: F32 | None = Field(None, description="Sampling temperature; must be > 0.", examples=[0.5])
    repetition_penalty: F32 | None = Field(None, description="Repetition penalty; must be > 0 (1.0 means no penalty).", examples=[1.03])
    frequency_penalty: F32 | None = Field(None, description="Frequency penalty in [-2.0, 2.0].", examples=[0.1])
    top_k: I32 | None = Field(None, description="Top-k filtering; must be > 0.", examples=[10])
    top_p: F32 | None = Field(None, description="Nucleus sampling; must be in (0, 1).", examples=[0.95])
    typical_p: F32 | None = Field(None, description="Typical decoding mass; must be in (0, 1).", examples=[0.95])
    do_sample: bool = Field(False, description="Sample instead of greedy decoding (true when `parameters` is absent).")
    max_new_tokens: U32 | None = Field(None, description="Maximum generated tokens; > 0. Absent: fill the remaining context.", examples=[20])
    return_full_text: bool | None = Field(None, description="Prepend `inputs` to `generated_text`.")
    stop: list[str] = Field(default_factory=list, description="Stop sequences (kept in the output); at most --max-stop-sequences.", examples=[["photographer"]])
    truncate: U64 | None = Field(None, description="Keep only the last `truncate` input tokens; 0 < truncate <= max_input_tokens.")
    watermark: bool = Field(False, description="Watermark the generation (Kirchenbauer et al.).")
    details: bool = Field(False, description="Return generation details.")
    decoder_input_details: bool = Field(False, description="Return prompt tokens with logprobs (non-stream only).")
    seed: U64 | None = Field(None, description="Random seed for sampling; reported in details.", examples=[None])
    top_n_tokens: U32 | None = Field(None, description="Return the top n tokens per position; <= --max-top-n-tokens.", examples=[5])
    grammar: Grammar | None = Field(None, description="Constrain the output to a JSON schema or a regex.")
    adapter_id: str | None = Field(None, description="LoRA adapter to apply.")


def _default_parameters() -> GenerateParameters:
    # TGI's `default_parameters()`: an absent `parameters` object means sampling.
    return GenerateParameters(do_sample=True)


class GenerateRequest(_Strict):
    inputs: str = Field(description="The prompt.", examples=["My name is Olivier and I"])
    parameters: GenerateParameters = Field(default_factory=_default_parameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = Field(False, description="Stream tokens as server-sent events.")


# --- response shapes, for the OpenAPI document only (responses are built as dicts) ---


class Token(BaseModel):
    id: int = Field(examples=[0])
    text: str = Field(examples=["test"])
    logprob: float | None = Field(examples=[-0.34])
    special: bool = Field(examples=[False])


class PrefillToken(BaseModel):
    id: int
    text: str
    logprob: float | None


FinishReason = Literal["length", "eos_token", "stop_sequence"]


class BestOfSequence(BaseModel):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[PrefillToken]
    tokens: list[Token]
    top_tokens: list[list[Token]] | None = None


class Details(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int = Field(examples=[1])
    seed: int | None = Field(examples=[42])
    prefill: list[PrefillToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | None = Field(None, description="Omitted unless best_of > 1.")
    top_tokens: list[list[Token]] | None = Field(None, description="Omitted unless top_n_tokens > 0.")


class GenerateResponse(BaseModel):
    generated_text: str = Field(examples=["test"])
    details: Details | None = Field(None, description="Omitted unless details or decoder_input_details.")


class StreamDetails(BaseModel):
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    input_length: int


class StreamResponse(BaseModel):
    index: int
    token: Token
    top_tokens: list[Token] | None = Field(None, description="Omitted when top_n_tokens is 0.")
    generated_text: str | None = Field(None, description="Only on the last event.")
    details: StreamDetails | None = Field(None, description="Only on the last event, when details is true.")


class ErrorResponse(BaseModel):
    error: str
    error_type: str


class Info(BaseModel):
    model_id: str
    model_sha: str | None
    model_pipeline_tag: str | None
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str = Field(description="The TGI release whose API is served.", examples=["3.3.6-dev0"])
    sha: str | None
    docker_label: str | None
    tgi_compat_version: str = Field(description="tgi-compat's own version (`version` is the TGI release whose API is served).")
