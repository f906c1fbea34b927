"""The real-model tier: one server on ``embedded:smollm2`` (SmolLM2-135M-Instruct), whose
answers are right or wrong, driven through huggingface_hub's InferenceClient and the
openai SDK. Content is asserted: facts, stop sequences, EOS on ``<|im_end|>``, token
texts against generated_text, /tokenize offsets, logprobs and ranks, seeds, grammars,
tool calls, best_of, the watermark, truncate and return_full_text.
"""

from __future__ import annotations

import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import jsonschema
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI

from tests.conftest import ServerProcess

pytestmark = [pytest.mark.model, pytest.mark.timeout(900)]

EOS_ID, EOS_TEXT = 2, "<|im_end|>"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
FACT = "The capital of France is"


def chatml(question: str) -> str:
    """The model's chat template, written out: raw /generate prompts for the chat model."""
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def server():
    external = os.environ.get("TGI_COMPAT_TEST_MODEL_URL")  # a running embedded:smollm2 server
    if external:
        yield SimpleNamespace(url=external.rstrip("/"))
        return
    # Eager: vLLM 0.32 on CPU compiles this 30-layer model again at every start (its AOT
    # cache fails to load here: 'function' object has no attribute 'finalize_loading'),
    # 60-170 s on this 2-core host; the answers do not depend on it.
    proc = ServerProcess(["--model-id", "embedded:smollm2", "--enforce-eager"], log_name="smollm2")
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


class Client(InferenceClient):
    """InferenceClient posting to `/`, which defaults return_full_text to true for this
    model (TGI's rule for text-generation models): tests ask for it explicitly."""

    def text_generation(self, prompt, **kw):
        kw.setdefault("return_full_text", False)
        return super().text_generation(prompt, **kw)


@pytest.fixture(scope="module")
def hf(server):
    return Client(server.url, timeout=120)


@pytest.fixture(scope="module")
def oai(server):
    with OpenAI(base_url=f"{server.url}/v1", api_key="-", timeout=120, max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def texts(details) -> str:
    return "".join(t.text for t in details.tokens if not t.special)


def test_info_names_the_hub_model(http):
    info = http.get("/info").json()
    assert (info["model_id"], info["model_pipeline_tag"]) == (HUB_ID, "text-generation")
    assert info["max_total_tokens"] == 8192  # the model's context length
    assert http.get("/v1/models").json()["data"][0]["id"] == HUB_ID


def test_greedy_fact_generate_and_stream(hf):
    out = hf.text_generation(FACT, max_new_tokens=3, details=True)
    assert out.generated_text.startswith(" Paris"), out.generated_text
    assert out.details.tokens[0].text == " Paris" and out.details.seed is None
    events = list(hf.text_generation(FACT, max_new_tokens=3, details=True, stream=True))
    assert [e.token.text for e in events] == [t.text for t in out.details.tokens]
    assert [e.token.id for e in events] == [t.id for t in out.details.tokens]
    assert events[-1].generated_text == out.generated_text
    assert events[-1].details.finish_reason == "length"


def test_chat_fact_openai_stream_and_non_stream(oai):
    # The first token has a clear winner here (1.6 nats; the bare question is a near tie of
    # "The" and "L", which eager and compiled bf16 break differently).
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    out = oai.chat.completions.create(model="tgi", messages=messages, max_tokens=24, temperature=0)
    answer = out.choices[0].message.content
    assert "Paris" in answer, answer
    assert out.model == HUB_ID and out.usage.completion_tokens <= 24
    chunks = list(oai.chat.completions.create(model="tgi", messages=messages, max_tokens=24, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_eos_on_im_end_generate_stream_and_chat(hf, oai):
    """TGI's rules: EOS is the last token, with its text (special tokens are kept in
    token texts) and `special: true`; it is counted in generated_tokens and left out of
    generated_text (decoded with skip_special_tokens); chat maps eos_token to `stop`."""
    prompt = chatml("What is the capital of France? Answer with one word.")
    out = hf.text_generation(prompt, max_new_tokens=24, details=True)
    last = out.details.tokens[-1]
    assert (out.details.finish_reason, last.id, last.text, last.special) == ("eos_token", EOS_ID, EOS_TEXT, True)
    assert "Paris" in out.generated_text and EOS_TEXT not in out.generated_text
    assert out.details.generated_tokens == len(out.details.tokens)
    assert texts(out.details) == out.generated_text
    events = list(hf.text_generation(prompt, max_new_tokens=24, details=True, stream=True))
    assert (events[-1].token.id, events[-1].token.text, events[-1].token.special) == (EOS_ID, EOS_TEXT, True)
    assert events[-1].generated_text == out.generated_text
    assert events[-1].details.finish_reason == "eos_token"
    assert all(e.generated_text is None for e in events[:-1])

    messages = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]
    chat = oai.chat.completions.create(model="tgi", messages=messages, max_tokens=24, temperature=0)
    assert chat.choices[0].finish_reason == "stop" and EOS_TEXT not in chat.choices[0].message.content
    chunks = [c for c in oai.chat.completions.create(model="tgi", messages=messages, max_tokens=24, temperature=0,
                                                     stream=True) if c.choices]
    # The EOS token's chunk carries no text and the finish reason.
    assert (chunks[-1].choices[0].delta.content, chunks[-1].choices[0].finish_reason) == ("", "stop")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content


def test_stop_sequence_spanning_tokens(hf):
    # " Paris" and "." are two tokens: "ris." spans them and ends at a token boundary.
    out = hf.text_generation(FACT, max_new_tokens=8, stop=["ris."], details=True)
    assert (out.generated_text, out.details.finish_reason) == (" Paris.", "stop_sequence")
    assert [t.text for t in out.details.tokens] == [" Paris", "."]
    events = list(hf.text_generation(FACT, max_new_tokens=8, stop=["ris."], details=True, stream=True))
    assert events[-1].generated_text == " Paris." and events[-1].details.finish_reason == "stop_sequence"
    # TGI matches only at token boundaries: "Par" inside the token " Paris" never fires.
    out = hf.text_generation(FACT, max_new_tokens=3, stop=["Par"], details=True)
    assert out.details.finish_reason == "length" and out.generated_text.startswith(" Paris")


def test_token_texts_join_to_generated_text(hf):
    """Leading spaces stay on their tokens; a character split over several byte-level
    tokens is carried by the token that completes it (the others carry "")."""
    out = hf.text_generation("The German word for 'greetings' is \"Gr", max_new_tokens=12, details=True)
    assert out.generated_text.startswith("üße"), out.generated_text
    assert [t.text for t in out.details.tokens[:3]] == ["ü", "ß", "e"]
    assert any(t.text.startswith(" ") and len(t.text) > 1 for t in out.details.tokens)
    assert texts(out.details) == out.generated_text
    # A 3-byte character is 3 tokens here; a regex grammar makes the model write it.
    regex = "☕☕ [a-z]{2,8}"
    out = hf.text_generation("Coffee: ", max_new_tokens=12, grammar={"type": "regex", "value": regex}, details=True)
    assert [t.text for t in out.details.tokens[:6]] == ["", "", "☕", "", "", "☕"]
    assert texts(out.details) == out.generated_text and out.generated_text.startswith("☕☕ ")
    events = list(hf.text_generation("Coffee: ", max_new_tokens=12, grammar={"type": "regex", "value": regex},
                                     details=True, stream=True))
    assert "".join(e.token.text for e in events) == events[-1].generated_text == out.generated_text


def test_tokenize_offsets_on_real_text(http):
    from transformers import AutoTokenizer

    from tgi_compat.smollm2 import build_smollm2

    text = "Grüße, 日本語 and café ☕!"
    tokens = http.post("/tokenize", json={"inputs": text}).json()
    assert [t["id"] for t in tokens] == AutoTokenizer.from_pretrained(build_smollm2())(text).input_ids
    raw = text.encode()
    for t in tokens:
        # Byte offsets; a token holding part of a character spans the whole character (TGI's
        # Rust offsets), so every span is valid UTF-8 and is the token's text.
        assert raw[t["start"]:t["stop"]].decode() == t["text"], t
    assert tokens[0] == {"id": tokens[0]["id"], "text": "Gr", "start": 0, "stop": 2}
    assert [t["text"] for t in tokens if t["text"] in (" café", "!", " and")] == [" and", " café", "!"]
    assert tokens[-1]["stop"] == len(raw)
    assert all(a["stop"] <= b["stop"] for a, b in zip(tokens, tokens[1:]))


def test_prefill_logprobs_and_top_tokens(http):
    params = {"max_new_tokens": 4, "details": True, "decoder_input_details": True, "top_n_tokens": 3}
    details = http.post("/generate", json={"inputs": FACT, "parameters": params}).json()["details"]
    prefill = details["prefill"]
    assert [t["text"] for t in prefill] == ["The", " capital", " of", " France", " is"]  # no BOS for this model
    assert prefill[0]["logprob"] is None
    assert all(math.isfinite(t["logprob"]) and t["logprob"] < 0 for t in prefill[1:])
    for token, top in zip(details["tokens"], details["top_tokens"], strict=True):
        # Greedy: the chosen token is rank 1, with the same logprob.
        assert top[0]["id"] == token["id"] and top[0]["logprob"] == pytest.approx(token["logprob"], abs=1e-4)
        assert [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert len({t["id"] for t in top}) == 3
    assert details["top_tokens"][0][0]["text"] == " Paris"


def test_seed_reproducible_under_sampling(hf):
    def sample(seed):
        return hf.text_generation(FACT, max_new_tokens=16, do_sample=True, temperature=1.0, seed=seed, details=True)

    with ThreadPoolExecutor(3) as pool:
        a, b, c = pool.map(sample, [42, 42, 43])
    assert a.details.seed == 42 and c.details.seed == 43
    assert a.generated_text == b.generated_text
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    assert c.generated_text != a.generated_text


COUNTRY = {
    "type": "object",
    "properties": {"country": {"type": "string", "maxLength": 30}, "capital": {"type": "string", "maxLength": 30}},
    "required": ["country", "capital"],
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "maxLength": 30},
    },
    "required": ["name", "age", "city"],
}


def test_grammar_json_parses_validates_and_is_right(hf, oai):
    out = hf.text_generation(
        chatml("Extract the person as JSON: John Smith is 42 years old and lives in London."),
        max_new_tokens=40, grammar={"type": "json", "value": PERSON},
    )
    person = json.loads(out)
    jsonschema.validate(person, PERSON)
    assert person == {"name": "John Smith", "age": 42, "city": "London"}

    chat = oai.chat.completions.create(
        model="tgi", max_tokens=40, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of Germany? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "country", "schema": COUNTRY}},
    )
    country = json.loads(chat.choices[0].message.content)
    jsonschema.validate(country, COUNTRY)
    assert country["capital"] == "Berlin" and country["country"] == "Germany"


WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "the city", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location", "unit"],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city", "parameters": WEATHER,
}}]


def test_tool_call_arguments_validate(oai):
    messages = [{"role": "user", "content": "What is the weather like in Paris today, in celsius?"}]
    out = oai.chat.completions.create(model="tgi", messages=messages, max_tokens=60, temperature=0,
                                      tools=TOOLS, tool_choice="required")
    (call,) = out.choices[0].message.tool_calls
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER)
    assert call.function.name == "get_weather"
    assert arguments == {"location": "Paris", "unit": "celsius"}
    chunks = list(oai.chat.completions.create(model="tgi", messages=messages, max_tokens=60, temperature=0,
                                              tools=TOOLS, tool_choice="required", stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == arguments


def test_best_of_returns_the_most_likely(hf):
    out = hf.text_generation(FACT, max_new_tokens=8, best_of=2, do_sample=True, details=True)
    (other,) = out.details.best_of_sequences

    def mean_logprob(tokens):
        return sum(t.logprob for t in tokens) / len(tokens)

    assert mean_logprob(out.details.tokens) >= mean_logprob(other.tokens)
    assert out.details.seed != other.seed
    for seq in (out.details, other):
        assert texts(seq) == (out.generated_text if seq is out.details else other.generated_text)


def test_watermark_found_in_real_text_only_when_on(http, server):
    """TGI's watermark on 200 sampled tokens of real text: the detector's z-score is far
    above its threshold of 4 with `watermark: true` and below it without."""
    from tgi_compat.logits import watermark_z_score
    from tgi_compat.watermark_detect import main as detect

    prompt = chatml("Write a long story about a dragon who learns to bake bread.")
    last_prompt_token = http.post("/tokenize", json={"inputs": prompt}).json()[-1]["id"]

    def run(watermark):
        params = {"max_new_tokens": 200, "do_sample": True, "temperature": 0.7, "seed": 1, "watermark": watermark,
                  "details": True}
        return http.post("/generate", json={"inputs": prompt, "parameters": params}).json()

    with ThreadPoolExecutor(2) as pool:
        marked, plain = pool.map(run, [True, False])
    z = {}
    for name, out in (("marked", marked), ("plain", plain)):
        ids = [t["id"] for t in out["details"]["tokens"] if not t["special"]]
        assert len(ids) >= 150, out["generated_text"]
        z[name] = watermark_z_score(ids, 49152, prefix_token=last_prompt_token)
    assert z["marked"] > 4 > z["plain"], z
    # The CLI detector, from the text alone (re-tokenized), agrees.
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert detect(["--model-id", "embedded:smollm2", "--prompt", prompt, marked["generated_text"]]) == 0
    assert json.loads(buf.getvalue())["z_score"] > 4


def test_truncate_keeps_the_last_tokens(hf):
    out = hf.text_generation("I like cheese and long walks. " + FACT, max_new_tokens=3, truncate=5,
                             details=True, decoder_input_details=True)
    assert [t.text for t in out.details.prefill] == [" The", " capital", " of", " France", " is"]
    assert out.generated_text.startswith(" Paris")


def test_return_full_text(hf, http):
    out = hf.text_generation(FACT, max_new_tokens=3, return_full_text=True)
    assert out.startswith(FACT + " Paris"), out
    # `/` defaults return_full_text to true for a text-generation model (TGI's rule).
    (compat,) = http.post("/", json={"inputs": FACT, "parameters": {"max_new_tokens": 3}}).json()
    assert compat["generated_text"] == out
    generated = http.post("/generate", json={"inputs": FACT, "parameters": {"max_new_tokens": 3}}).json()
    assert FACT + generated["generated_text"] == out
