"""The rest of TGI's parameters, each real: grammar, best_of, typical_p, watermark and
adapter_id, through huggingface_hub's text_generation against the real engine."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys

import httpx
import jsonschema
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import ValidationError as HFValidationError

from tests.conftest import wait_idle
from tgi_compat.logits import watermark_score

pytestmark = pytest.mark.engine

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"]}


@pytest.fixture(scope="module")
def client(server_url):
    return InferenceClient(base_url=server_url, timeout=120)


def generate(client: InferenceClient, prompt: str, **kw):
    """Only the generated text (huggingface_hub posts to `/`, where the prompt is
    prepended by default)."""
    return client.text_generation(prompt, return_full_text=False, **kw)


# --- grammar ---


@pytest.mark.parametrize("grammar", [
    {"type": "json", "value": PERSON},
    {"type": "json", "value": json.dumps(PERSON)},  # a schema as a JSON string
    {"type": "json_object", "value": PERSON},
    {"type": "json_schema", "value": {"name": "person", "schema": PERSON}},
    {"type": "json_object", "schema": PERSON},  # LangChain's shape (TGI refuses it)
])
def test_json_grammar_output_validates(client, grammar):
    for seed in (1, 2):
        out = generate(client, "Describe someone:", max_new_tokens=120, grammar=grammar, seed=seed,
                                     do_sample=True, details=True)
        assert out.details.finish_reason == "eos_token"  # the grammar let the model end the object
        jsonschema.validate(json.loads(out.generated_text), PERSON)
    events = list(generate(client, "Describe someone:", max_new_tokens=120, grammar=grammar, stream=True,
                                         details=True))
    jsonschema.validate(json.loads(events[-1].generated_text), PERSON)
    assert "".join(e.token.text for e in events if not e.token.special) == events[-1].generated_text


def test_regex_grammar_fully_matches(client):
    pattern = r"[a-z]{3,8}@[a-z]{2,5}\.(com|org)"
    for seed in (1, 2, 3):
        out = generate(client, "email:", max_new_tokens=40, grammar={"type": "regex", "value": pattern},
                                     seed=seed, do_sample=True)
        assert re.fullmatch(pattern, out), out
    assert re.fullmatch(pattern, generate(client, "email:", max_new_tokens=40,
                                                        grammar={"type": "regex", "value": pattern}))


@pytest.mark.parametrize("grammar, message", [
    ({"type": "json", "value": 5}, "grammar is not supported"),
    ({"type": "json", "value": {"type": "object"}}, "grammar is not valid: Grammar must have a 'properties' field"),
    ({"type": "json", "value": {"type": "foo", "properties": {}}}, "grammar is not valid: "),
    ({"type": "json", "value": "{not json"}, "grammar is not valid: "),
    ({"type": "regex", "value": "[a-"}, "grammar is not valid: "),
])
def test_grammar_validation(http, grammar, message):
    r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": grammar, "max_new_tokens": 5}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith(f"Input validation error: {message}")
    assert wait_idle(http) == (0, 0)


def test_grammar_shape_errors_are_body_errors(http):
    for grammar in ({"type": "regex"}, {"type": "regex", "value": 3}, {"type": "json_schema", "value": {"name": "x"}},
                    {"type": "yaml", "value": "x"}):
        r = http.post("/generate", json={"inputs": "x", "parameters": {"grammar": grammar}})
        assert r.status_code == 422 and r.text.startswith("Failed to deserialize the JSON body"), grammar


# --- best_of ---


def test_best_of_returns_the_best_and_the_others(client):
    out = client.text_generation("Once upon a time", max_new_tokens=12, best_of=2, do_sample=True, details=True)
    others = out.details.best_of_sequences
    assert len(others) == 1

    def mean_logprob(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert mean_logprob(out.details.tokens) >= mean_logprob(others[0].tokens)
    assert out.details.seed is not None and others[0].seed is not None and out.details.seed != others[0].seed
    assert others[0].generated_tokens == len(others[0].tokens)
    # `/` defaults return_full_text to true: every sequence carries the prompt.
    assert out.generated_text.startswith("Once upon a time") and others[0].generated_text.startswith("Once upon a time")
    # Without details: just the best text.
    assert isinstance(client.text_generation("Hi", max_new_tokens=4, best_of=2, do_sample=True), str)


@pytest.mark.parametrize("params, message", [
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
])
def test_best_of_validation(client, params, message):
    with pytest.raises(HFValidationError, match=re.escape(message)):
        client.text_generation("Hi", max_new_tokens=2, **params)
    with pytest.raises(HFValidationError, match="`best_of` != 1 is not supported when streaming tokens"):
        list(client.text_generation("Hi", max_new_tokens=2, stream=True, best_of=2, do_sample=True))


# --- typical_p ---


def test_typical_p_changes_outputs_and_is_reproducible(client):
    changed = 0
    for seed in range(4):
        plain = client.text_generation("The weather today", max_new_tokens=24, do_sample=True, seed=seed)
        typical = client.text_generation("The weather today", max_new_tokens=24, do_sample=True, seed=seed, typical_p=0.3)
        again = client.text_generation("The weather today", max_new_tokens=24, do_sample=True, seed=seed, typical_p=0.3)
        assert typical == again
        changed += typical != plain
    assert changed >= 2


def test_temperatures_above_vllms_limit(client):
    # TGI takes any positive temperature; vLLM stops at 2 (the rest is applied by our processor).
    hot = [generate(client, "The weather today", max_new_tokens=16, temperature=8.0, seed=s) for s in range(3)]
    assert hot == [generate(client, "The weather today", max_new_tokens=16, temperature=8.0, seed=s) for s in range(3)]
    warm = [generate(client, "The weather today", max_new_tokens=16, temperature=2.0, seed=s) for s in range(3)]
    assert hot != warm


# --- watermark ---


def test_watermarked_generations_score_far_above_plain_ones(server_url, http):
    prompts = [f"Story number {i}: once upon a time" for i in range(16)]
    last_prompt_token = [http.post("/tokenize", json={"inputs": p}).json()[-1]["id"] for p in prompts]
    vocab = 1024  # the tiny model's

    async def generate_all(watermark: bool):
        client = AsyncInferenceClient(base_url=server_url, timeout=120)
        return await asyncio.gather(*(
            client.text_generation(p, max_new_tokens=200, do_sample=True, seed=i, watermark=watermark,
                                   details=True, return_full_text=False)
            for i, p in enumerate(prompts)))

    def pooled_z(outputs):
        # Each distinct (previous, token) pair once: the tiny model loops, and repeats
        # of one pair would count as independent evidence otherwise.
        scores = [watermark_score([t.id for t in o.details.tokens], vocab, prefix_token=last, ignore_repeated_bigrams=True)
                  for o, last in zip(outputs, last_prompt_token)]
        green, total = sum(s.green for s in scores), sum(s.tokens for s in scores)
        return (green - 0.5 * total) / math.sqrt(total * 0.25)

    marked, plain = asyncio.run(generate_all(True)), asyncio.run(generate_all(False))
    assert pooled_z(marked) > 6, pooled_z(marked)
    assert abs(pooled_z(plain)) < 3, pooled_z(plain)

    # The detector CLI on text: it re-tokenizes, so it scores close to (not exactly) the ids.
    model_dir = http.get("/info").json()["model_id"]

    def cli(text: str, prompt: str) -> float:
        out = subprocess.run([sys.executable, "-m", "tgi_compat.watermark_detect", "--model-id", model_dir,
                              "--prompt", prompt, text], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout)["z_score"]

    best = max(range(len(prompts)), key=lambda i: len(marked[i].details.tokens))
    assert cli(marked[best].generated_text, prompts[best]) > cli(plain[best].generated_text, prompts[best])


# --- adapter_id (LoRA) ---


def test_adapter_changes_output_and_each_is_reproducible(lora_server):
    client = InferenceClient(base_url=lora_server, timeout=120)
    prompts = ["Once upon a time", "The weather today", "def main():"]
    base = [generate(client, p, max_new_tokens=16) for p in prompts]
    lora = [generate(client, p, max_new_tokens=16, adapter_id="tiny-lora") for p in prompts]
    assert base == [generate(client, p, max_new_tokens=16) for p in prompts]
    assert lora == [generate(client, p, max_new_tokens=16, adapter_id="tiny-lora") for p in prompts]
    assert all(b != a for b, a in zip(base, lora))

    # Mixed batches: each answer as when it ran alone.
    async def mixed():
        async with httpx.AsyncClient(base_url=lora_server, timeout=120) as c:
            rs = await asyncio.gather(*(
                c.post("/generate", json={"inputs": p, "parameters": {"max_new_tokens": 16, **({"adapter_id": "tiny-lora"} if a else {})}})
                for p in prompts for a in (False, True)))
        return [r.json()["generated_text"] for r in rs]

    together = asyncio.run(mixed())
    assert together == [x for pair in zip(base, lora) for x in pair]

    with pytest.raises(HFValidationError, match="`adapter_id` other is not a loaded adapter; loaded: tiny-lora"):
        client.text_generation("x", max_new_tokens=2, adapter_id="other")
    # The OpenAI routes pick an adapter by `model`; other names mean the base model.
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 12, "temperature": 0}
    with httpx.Client(base_url=lora_server, timeout=120) as h:
        a = h.post("/v1/chat/completions", json={**chat, "model": "tiny-lora"}).json()
        b = h.post("/v1/chat/completions", json={**chat, "model": "gpt-4"}).json()
        c = h.post("/v1/chat/completions", json=chat).json()
    assert a["model"] == "tiny-lora" and b["model"] == "gpt-4"
    assert b["choices"][0]["message"] == c["choices"][0]["message"] != a["choices"][0]["message"]


def test_unknown_adapter_without_lora(client):
    with pytest.raises(HFValidationError, match="loaded: none"):
        client.text_generation("x", max_new_tokens=2, adapter_id="some-lora")
