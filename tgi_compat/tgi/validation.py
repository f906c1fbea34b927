"""TGI's request validation (router/src/validation.rs), as pure functions.

The order of checks is TGI's, and the first failure wins:
1. stream-only checks (``check_stream``), 2. ``best_of`` limits (``check_best_of``),
3. the concurrency permit (taken by the caller), 4. ``validate``.
Messages are TGI's exactly; ``ValidationError`` adds the ``Input validation error: ``
prefix. ``validate`` also builds the typed ``EngineRequest`` (TGI's parameters with TGI's
semantics, in vLLM's terms) that the generation core hands to the engine.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from tgi_compat.engine import EngineRequest, Sampling
from tgi_compat.errors import ValidationError
from tgi_compat.tgi.protocol import GenerateParameters, Grammar

# TGI checks the total length against at most this many new tokens when
# `max_new_tokens` is absent (it re-queues long generations in chunks of it).
DEFAULT_GENERATION_CHUNK = 1024
# vLLM's SamplingParams refuses higher temperatures.
VLLM_MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Limits:
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    max_input_tokens: int
    max_total_tokens: int
    grammar_enabled: bool = True
    adapters: frozenset[str] = frozenset()  # loaded LoRA adapters (--lora-adapters)


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A validated generation: the engine request, and what the response reports."""

    engine: EngineRequest
    input_ids: list[int]
    input_length: int
    max_new_tokens: int  # what the engine may generate
    max_new_tokens_checked: int  # TGI's `tgi_request_max_new_tokens` (the checked chunk)
    sampling: bool
    seed: int  # always chosen; reported only when sampling
    stop: tuple[str, ...]
    top_n_tokens: int
    details: bool
    decoder_input_details: bool
    # ("json", schema) | ("json_object", True) | ("regex", pattern): vLLM structured outputs
    grammar: tuple[str, Any] | None = None
    best_of: int = 1


def check_stream(params: GenerateParameters) -> None:
    """Checks that apply to streaming routes only; TGI runs them first."""
    if params.best_of is not None and params.best_of != 1:
        raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
    if params.decoder_input_details:
        raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")


def check_best_of(params: GenerateParameters, limits: Limits) -> int:
    best_of = params.best_of or 1
    if best_of > 1:
        if limits.max_best_of == 1:
            raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
        if best_of > limits.max_best_of:
            raise ValidationError(f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    return best_of


def sampling_requested(p: GenerateParameters) -> bool:
    """TGI's test for `best_of` (router): any sampling knob was given."""
    return (
        p.do_sample
        or p.temperature is not None
        or p.top_k is not None
        or p.top_p is not None
        or p.typical_p is not None
    )


def check_parameters(inputs: str, p: GenerateParameters, limits: Limits) -> dict[str, Any]:
    """TGI's checks that come before tokenization (and image fetching); the values they
    settle, by name."""
    best_of = p.best_of or 1
    if best_of > 1 and not sampling_requested(p):
        raise ValidationError("you must use sampling when `best_of` is > 1")

    temperature = 1.0 if p.temperature is None else p.temperature
    if temperature <= 0.0:
        raise ValidationError("`temperature` must be strictly positive")
    repetition_penalty = 1.0 if p.repetition_penalty is None else p.repetition_penalty
    if repetition_penalty <= 0.0:
        raise ValidationError("`repetition_penalty` must be strictly positive")
    frequency_penalty = 0.0 if p.frequency_penalty is None else p.frequency_penalty
    if not -2.0 <= frequency_penalty <= 2.0:
        raise ValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    top_p = 1.0
    if p.top_p is not None:
        if p.top_p <= 0.0 or p.top_p >= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and < 1.0")
        top_p = p.top_p
    typical_p = 1.0
    if p.typical_p is not None:
        if p.typical_p <= 0.0 or p.typical_p >= 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and < 1.0")
        typical_p = p.typical_p
    top_k = 0
    if p.top_k is not None:
        if p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        top_k = p.top_k
    if p.max_new_tokens == 0:
        raise ValidationError("`max_new_tokens` must be strictly positive")
    if len(p.stop) > limits.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
        )
    if p.seed is not None and best_of > 1:
        raise ValidationError("`seed` must not be set when `best_of` > 1")
    top_n_tokens = 0
    if p.top_n_tokens is not None:
        if p.top_n_tokens > limits.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {p.top_n_tokens}"
            )
        top_n_tokens = p.top_n_tokens
    if inputs == "":
        raise ValidationError("`inputs` cannot be empty")
    if p.truncate is not None and (p.truncate == 0 or p.truncate > limits.max_input_tokens):
        raise ValidationError(
            f"`truncate` must be strictly positive and less than {limits.max_input_tokens}. Given: {p.truncate}"
        )

    return {
        "temperature": temperature, "repetition_penalty": repetition_penalty,
        "frequency_penalty": frequency_penalty, "top_p": top_p, "typical_p": typical_p,
        "top_k": top_k, "top_n_tokens": top_n_tokens, "best_of": best_of,
    }


def validate(
    inputs: str,
    p: GenerateParameters,
    limits: Limits,
    tokenize: Callable[[str], list[int]] | None,
    prepared: tuple[list[int], Any] | None = None,
    *,
    request_id: str = "",
    stream: bool = False,
) -> ValidRequest:
    """TGI's checks, then the request as the engine will run it (``request_id``).

    ``prepared``: (prompt ids, engine multimodal input) already built from images (and
    truncated) by the caller; ``tokenize`` is then not called."""
    c = check_parameters(inputs, p, limits)
    best_of, temperature, top_k, top_p, typical_p = c["best_of"], c["temperature"], c["top_k"], c["top_p"], c["typical_p"]
    seed = random.getrandbits(64) if p.seed is None else p.seed
    mm_input = None
    if prepared is not None:
        ids, mm_input = prepared
    else:
        try:
            ids = tokenize(inputs)
        except Exception as e:  # a tokenizer can fail on odd input; TGI reports it as validation
            raise ValidationError(f"tokenizer error {e}") from e
        if p.truncate is not None and len(ids) > p.truncate:
            ids = ids[-p.truncate :]
    input_length = len(ids)

    remaining = max(limits.max_total_tokens - input_length, 0)
    if p.max_new_tokens is not None:
        checked = min(p.max_new_tokens, DEFAULT_GENERATION_CHUNK)
        max_new_tokens = min(p.max_new_tokens, remaining)
    else:
        checked = min(remaining, DEFAULT_GENERATION_CHUNK)
        max_new_tokens = remaining
    if input_length + checked > limits.max_total_tokens:
        raise ValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {checked} `max_new_tokens`"
        )
    if input_length > limits.max_input_tokens:
        raise ValidationError(
            f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {input_length}"
        )

    grammar = None
    if p.grammar is not None:
        if not limits.grammar_enabled:
            raise ValidationError("grammar is not supported")
        grammar = check_grammar(p.grammar)

    if p.adapter_id is not None and p.adapter_id not in limits.adapters:
        # TGI silently falls back to the base model; an answer from the wrong weights is
        # worse than a clear refusal.
        loaded = ", ".join(sorted(limits.adapters)) or "none (start the server with --lora-adapters)"
        raise ValidationError(f"`adapter_id` {p.adapter_id} is not a loaded adapter; loaded: {loaded}")

    # TGI's shard samples when any knob moves away from its neutral value (§2.2).
    sampling = p.do_sample or temperature != 1.0 or top_k != 0 or top_p < 1.0 or typical_p < 1.0
    details = p.details or p.decoder_input_details
    # Streamed tokens always carry their logprob; best_of ranks its sequences by them.
    token_logprobs = stream or details or best_of > 1
    top_n_tokens = c["top_n_tokens"]
    engine = EngineRequest(
        request_id=request_id,
        prompt_ids=ids,
        sampling=engine_sampling(
            max_new_tokens, sampling, temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p,
            seed=seed, repetition_penalty=c["repetition_penalty"], frequency_penalty=c["frequency_penalty"],
            watermark=p.watermark,
            logprobs=top_n_tokens if token_logprobs or top_n_tokens else None,
            prompt_logprobs=0 if p.decoder_input_details else None,
        ),
        adapter=p.adapter_id,
        structured=grammar,
        mm_input=mm_input,
    )
    return ValidRequest(
        engine=engine,
        input_ids=ids,
        input_length=input_length,
        max_new_tokens=max_new_tokens,
        max_new_tokens_checked=checked,
        sampling=sampling,
        seed=seed,
        stop=tuple(p.stop),
        top_n_tokens=top_n_tokens,
        details=details,
        decoder_input_details=p.decoder_input_details,
        grammar=grammar,
        best_of=best_of,
    )


def check_grammar(g: Grammar) -> tuple[str, Any]:
    """TGI's grammar checks (validation.rs): a JSON schema must be an object (or a JSON
    string holding one), pass the 2020-12 meta-schema and have top-level ``properties``;
    a regex is not checked here (the engine refuses one it cannot compile)."""
    if g.type == "regex":
        return ("regex", g.value)
    if g.type == "json_object" and "value" not in g.model_fields_set:
        return ("json_object", True)
    if g.type == "json_schema":
        schema = g.value["schema"]
    else:
        schema = g.value
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValidationError(f"grammar is not valid: {e}") from e
        elif not isinstance(schema, dict):
            raise ValidationError("grammar is not supported")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise ValidationError(f"grammar is not valid: {e.message}") from e
    if not isinstance(schema, dict) or "properties" not in schema:
        raise ValidationError("grammar is not valid: Grammar must have a 'properties' field")
    return ("json", schema)


def engine_sampling(
    max_new_tokens: int, sampling: bool, *, temperature: float, top_k: int, top_p: float, typical_p: float,
    seed: int, repetition_penalty: float, frequency_penalty: float, watermark: bool,
    logprobs: int | None, prompt_logprobs: int | None,
) -> Sampling:
    """vLLM sampling settings with TGI's semantics (greedy unless sampling, TGI's warper
    order, any positive temperature)."""
    extra: dict[str, Any] = {}
    if sampling:
        if temperature > VLLM_MAX_TEMPERATURE:
            # vLLM refuses temperatures above 2; TGI takes any positive one. The rest of
            # the division happens in our logits processor, right after vLLM's.
            extra["temperature_scale"] = temperature / VLLM_MAX_TEMPERATURE
            temperature = VLLM_MAX_TEMPERATURE
        if typical_p < 1.0:
            # TGI's warper order is temperature -> top_k -> top_p -> typical_p; vLLM would
            # run its own top-k/top-p after a logits processor, so ours applies them.
            extra.update(typical_p=typical_p, typical_top_k=top_k, typical_top_p=top_p)
            top_k, top_p = 0, 1.0
    else:
        # vLLM samples at 1.0 by default; TGI decodes greedily
        temperature, top_k, top_p, seed = 0.0, 0, 1.0, None
    if watermark:
        extra["watermark"] = True
    return Sampling(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        extra_args=extra or None,
    )
