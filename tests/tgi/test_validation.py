"""Unit tests of TGI's validation rules and of the mapping onto vLLM's SamplingParams."""

from __future__ import annotations

import pytest

from tgi_compat.errors import ValidationError
from tgi_compat.tgi.protocol import GenerateParameters, GenerateRequest
from tgi_compat.tgi.validation import Limits, check_best_of, check_stream, validate

LIMITS = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=99, max_total_tokens=100)


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]  # one token per character


def run(inputs="hello", stream=False, **params):
    return validate(inputs, GenerateParameters(**params), LIMITS, tokenize, request_id="r-1", stream=stream)


def message(**params) -> str:
    with pytest.raises(ValidationError) as e:
        inputs = params.pop("inputs", "hello")
        run(inputs, **params)
    assert e.value.error_type == "validation" and e.value.status_code == 422
    return e.value.message.removeprefix("Input validation error: ")


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"temperature": 0.0}, "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a"] * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"inputs": ""}, "`inputs` cannot be empty"),
        ({"truncate": 0}, "`truncate` must be strictly positive and less than 99. Given: 0"),
        ({"truncate": 100}, "`truncate` must be strictly positive and less than 99. Given: 100"),
        ({"inputs": "x" * 50, "max_new_tokens": 51}, "`inputs` tokens + `max_new_tokens` must be <= 100. Given: 50 `inputs` tokens and 51 `max_new_tokens`"),
        ({"inputs": "x" * 101}, "`inputs` tokens + `max_new_tokens` must be <= 100. Given: 101 `inputs` tokens and 0 `max_new_tokens`"),
        ({"inputs": "x" * 100}, "`inputs` must have less than 99 tokens. Given: 100"),
    ],
)
def test_messages(params, expected):
    assert message(**params) == expected


def test_first_failure_wins_in_tgi_order():
    # temperature is checked before top_p, which is checked before top_k, ...
    assert message(temperature=0.0, top_p=2.0, top_k=0) == "`temperature` must be strictly positive"
    assert message(top_p=2.0, top_k=0) == "`top_p` must be > 0.0 and < 1.0"
    assert message(top_k=0, max_new_tokens=0) == "`top_k` must be strictly positive"
    assert message(inputs="", truncate=0) == "`inputs` cannot be empty"


def test_input_length_limit():
    limits = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=10, max_total_tokens=100)
    with pytest.raises(ValidationError, match="`inputs` must have less than 10 tokens. Given: 11"):
        validate("x" * 11, GenerateParameters(max_new_tokens=1), limits, tokenize)


def test_stream_checks():
    with pytest.raises(ValidationError, match="`best_of` != 1 is not supported when streaming tokens"):
        check_stream(GenerateParameters(best_of=0))
    with pytest.raises(ValidationError, match="`decoder_input_details` == true is not supported when streaming tokens"):
        check_stream(GenerateParameters(decoder_input_details=True))
    check_stream(GenerateParameters(best_of=1))


def test_best_of_limits():
    with pytest.raises(ValidationError, match="`best_of` must be > 0 and <= 2. Given: 3"):
        check_best_of(GenerateParameters(best_of=3), LIMITS)
    one = Limits(max_best_of=1, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=9, max_total_tokens=10)
    with pytest.raises(ValidationError, match="`best_of` != 1 is not allowed for this endpoint"):
        check_best_of(GenerateParameters(best_of=2), one)
    assert check_best_of(GenerateParameters(best_of=0), LIMITS) == 1  # non-stream 0 behaves like 1


def test_truncate_keeps_last_tokens_and_max_new_tokens_default():
    v = run("abcdefgh", truncate=3)
    assert v.input_ids == tokenize("fgh") and v.input_length == 3
    assert v.max_new_tokens == 97  # absent: fill the remaining context
    assert run("abc", max_new_tokens=10).max_new_tokens == 10


def test_defaults_trap():
    absent = GenerateRequest.model_validate({"inputs": "a"})
    empty = GenerateRequest.model_validate({"inputs": "a", "parameters": {}})
    assert absent.parameters.do_sample is True
    assert empty.parameters.do_sample is False


@pytest.mark.parametrize(
    "params, sampling",
    [
        ({}, False),
        ({"do_sample": True}, True),
        ({"temperature": 1.0}, False),
        ({"temperature": 0.5}, True),
        ({"top_k": 5}, True),
        ({"top_p": 0.9}, True),
        ({"repetition_penalty": 1.2}, False),
    ],
)
def test_when_sampling_happens(params, sampling):
    v = run(**params)
    assert v.sampling is sampling
    s = v.engine.sampling
    if sampling:
        assert s.seed == v.seed and s.temperature == params.get("temperature", 1.0)
    else:
        assert s.temperature == 0.0 and s.seed is None and (s.top_k, s.top_p) == (0, 1.0)


def test_seed_kept_or_chosen():
    assert run(seed=2**64 - 1, do_sample=True).seed == 2**64 - 1
    seeds = {run(do_sample=True).seed for _ in range(5)}
    assert len(seeds) > 1 and all(0 <= s < 2**64 for s in seeds)


def test_engine_request_logprobs():
    v = run(top_n_tokens=3, decoder_input_details=True)
    assert v.engine.sampling.logprobs == 3 and v.engine.sampling.prompt_logprobs == 0
    assert v.engine.request_id == "r-1" and v.engine.prompt_ids == v.input_ids == tokenize("hello")
    assert run().engine.sampling.logprobs is None  # non-stream without details: no logprobs
    assert run(stream=True).engine.sampling.logprobs == 0  # every streamed token carries its logprob
    assert run(details=True).engine.sampling.logprobs == 0
    assert run(best_of=2, do_sample=True).engine.sampling.logprobs == 0  # best_of ranks by them


def test_engine_request_carries_tgi_semantics():
    e = run(temperature=3.0, typical_p=0.5, top_k=7, top_p=0.9, watermark=True, adapter_id=None,
            grammar={"type": "regex", "value": "a+"}, max_new_tokens=5).engine
    # vLLM takes temperature <= 2; the rest is divided by our logits processor.
    assert e.sampling.temperature == 2.0 and e.sampling.extra_args["temperature_scale"] == 1.5
    # typical_p: our processor applies top-k/top-p in TGI's order, vLLM's are off.
    assert (e.sampling.top_k, e.sampling.top_p) == (0, 1.0)
    assert e.sampling.extra_args["typical_top_k"] == 7 and e.sampling.extra_args["watermark"] is True
    assert e.structured == ("regex", "a+") and e.sampling.max_tokens == 5 and e.adapter is None


def test_grammar_refused_when_disabled():
    limits = Limits(max_best_of=2, max_stop_sequences=4, max_top_n_tokens=5, max_input_tokens=99,
                    max_total_tokens=100, grammar_enabled=False)
    params = GenerateParameters(grammar={"type": "regex", "value": "a+"})
    with pytest.raises(ValidationError, match="^Input validation error: grammar is not supported$"):
        validate("hello", params, limits, tokenize)


def test_tokenizer_failure_is_a_validation_error():
    def broken(text: str) -> list[int]:
        raise RuntimeError("cannot tokenize")

    with pytest.raises(ValidationError, match="^Input validation error: tokenizer error cannot tokenize$"):
        validate("hello", GenerateParameters(), LIMITS, broken)
