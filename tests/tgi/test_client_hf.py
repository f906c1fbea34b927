"""TGI's routes through huggingface_hub's real clients, against the real engine."""

from __future__ import annotations

import asyncio

import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import ValidationError as HFValidationError

from tests.conftest import MAX_TOTAL_TOKENS

pytestmark = pytest.mark.engine

PROMPT = "How do you make cheese?"


@pytest.fixture(scope="module")
def client(server_url):
    return InferenceClient(server_url, timeout=120)


@pytest.fixture(scope="module")
def aclient(server_url):
    return AsyncInferenceClient(server_url, timeout=120)


def test_seed_doc_stream_example(client):
    tokens = list(client.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert len(tokens) == 12
    assert all(isinstance(t, str) for t in tokens)


def test_seed_doc_stream_details_example(client):
    events = list(client.text_generation(PROMPT, max_new_tokens=12, details=True, stream=True))
    assert [e.index for e in events] == list(range(1, 13))
    assert all(e.generated_text is None and e.details is None for e in events[:-1])
    last = events[-1]
    assert last.details.finish_reason == "length"
    assert last.details.generated_tokens == 12
    assert last.details.seed is None  # `parameters` present without sampling knobs: greedy
    assert last.details.input_length > 0
    # `/` defaults return_full_text to true for a model with no (or text-generation) tag.
    assert last.generated_text.startswith(PROMPT)


async def test_seed_doc_async_stream_example(aclient):
    tokens = [t async for t in await aclient.text_generation(PROMPT, stream=True, max_new_tokens=20)]
    assert len(tokens) == 20


async def test_async_non_stream_and_concurrency(aclient):
    outs = await asyncio.gather(*[aclient.text_generation(f"{PROMPT} {i}", max_new_tokens=8, details=True) for i in range(8)])
    assert all(o.details.generated_tokens == 8 for o in outs)


async def test_async_client_maps_validation_errors(aclient):
    with pytest.raises(HFValidationError, match="`temperature` must be strictly positive"):
        await aclient.text_generation(PROMPT, temperature=-1.0)
    with pytest.raises(HFValidationError, match="`top_p` must be > 0.0 and < 1.0"):
        async for _ in await aclient.text_generation(PROMPT, top_p=1.0, stream=True):
            pass


def test_sync_client_maps_validation_errors(client):
    with pytest.raises(HFValidationError, match="Input validation error: `top_k` must be strictly positive"):
        client.text_generation(PROMPT, top_k=-1)
    with pytest.raises(HFValidationError, match="`decoder_input_details` == true is not supported when streaming"):
        list(client.text_generation(PROMPT, decoder_input_details=True, details=True, stream=True))


def test_non_stream_details(client):
    out = client.text_generation(PROMPT, max_new_tokens=6, details=True, return_full_text=False)
    d = out.details
    assert d.finish_reason == "length"
    assert d.generated_tokens == len(d.tokens) == 6
    assert d.prefill == []
    assert d.seed is None
    assert d.top_tokens is None and d.best_of_sequences is None
    assert all(isinstance(t.logprob, float) and t.logprob <= 0 for t in d.tokens)
    assert not any(t.special for t in d.tokens)


def test_decoder_input_details(client):
    out = client.text_generation(PROMPT, max_new_tokens=3, details=True, decoder_input_details=True)
    prefill = out.details.prefill
    assert prefill[0].logprob is None
    assert prefill[0].text == "<s>"  # the tokenizer adds BOS to `inputs`
    assert all(isinstance(p.logprob, float) for p in prefill[1:])
    assert "".join(p.text for p in prefill[1:]) == PROMPT


def test_top_n_tokens(client):
    out = client.text_generation(PROMPT, max_new_tokens=5, details=True, top_n_tokens=3)
    top = out.details.top_tokens
    assert len(top) == 5
    for position, chosen in zip(top, out.details.tokens):
        # huggingface_hub leaves the nested lists as dicts
        position = [t if isinstance(t, dict) else vars(t) for t in position]
        assert len(position) == 3
        logprobs = [t["logprob"] for t in position]
        assert logprobs == sorted(logprobs, reverse=True)
        assert position[0]["id"] == chosen.id  # greedy: the chosen token is the most likely
    events = list(client.text_generation(PROMPT, max_new_tokens=4, details=True, top_n_tokens=2, stream=True))
    assert all(len(e.top_tokens) == 2 for e in events)


def test_seed_reproducibility_and_reporting(client):
    kw = dict(max_new_tokens=16, details=True, do_sample=True, return_full_text=False)
    a = client.text_generation(PROMPT, seed=1234, **kw)
    b = client.text_generation(PROMPT, seed=1234, **kw)
    assert a.details.seed == 1234
    assert a.generated_text == b.generated_text
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    others = {client.text_generation(PROMPT, seed=s, **kw).generated_text for s in range(4)}
    assert len(others) > 1, "different seeds should give different samples"
    # No seed given: a random one is chosen, reported, and reproduces the sample.
    c = client.text_generation(PROMPT, **kw)
    assert isinstance(c.details.seed, int) and 0 <= c.details.seed < 2**64
    d = client.text_generation(PROMPT, seed=c.details.seed, **kw)
    assert d.generated_text == c.generated_text


def test_greedy_reports_no_seed_and_is_deterministic(client):
    a = client.text_generation(PROMPT, max_new_tokens=10, details=True, seed=7)
    b = client.text_generation(PROMPT, max_new_tokens=10, details=True)
    assert a.details.seed is None and b.details.seed is None
    assert a.generated_text == b.generated_text


def test_temperature_alone_means_sampling(client):
    out = client.text_generation(PROMPT, max_new_tokens=4, details=True, temperature=0.7, seed=3)
    assert out.details.seed == 3


def test_stop_sequence_kept_in_output(client):
    base = client.text_generation(PROMPT, max_new_tokens=12, details=True, return_full_text=False)
    texts = [t.text for t in base.details.tokens]
    # A stop string that ends exactly at a token boundary (TGI's matching rule).
    k = next(i for i in range(2, 10) if texts[i].strip() and texts[i] not in "".join(texts[:i]))
    stop = texts[k]
    out = client.text_generation(PROMPT, max_new_tokens=12, details=True, stop=[stop], return_full_text=False)
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text.endswith(stop)
    assert out.details.generated_tokens == k + 1
    assert [t.id for t in out.details.tokens] == [t.id for t in base.details.tokens[: k + 1]]
    events = list(client.text_generation(PROMPT, max_new_tokens=12, details=True, stop=[stop], stream=True))
    assert len(events) == k + 1
    assert events[-1].details.finish_reason == "stop_sequence"


def test_return_full_text(client):
    plain = client.text_generation(PROMPT, max_new_tokens=5, return_full_text=False)
    full = client.text_generation(PROMPT, max_new_tokens=5, return_full_text=True)
    default = client.text_generation(PROMPT, max_new_tokens=5)  # posts to `/`
    assert full == PROMPT + plain
    assert default == full


def test_truncate_keeps_last_tokens(client):
    events = list(client.text_generation(PROMPT, max_new_tokens=2, truncate=3, details=True, stream=True))
    assert events[-1].details.input_length == 3


def test_eos_token_is_special_and_not_in_text(client):
    """Greedy decoding of some prompts ends in EOS on the tiny model; find one."""
    for i in range(40):
        out = client.text_generation(f"prompt {i}", max_new_tokens=300, details=True, return_full_text=False)
        if out.details.finish_reason == "eos_token":
            break
    else:
        pytest.fail("no prompt ended with EOS")
    last = out.details.tokens[-1]
    assert last.special and last.text == "</s>"
    assert out.details.generated_tokens == len(out.details.tokens)
    assert "</s>" not in out.generated_text
    # generated_text skips special tokens; their texts stay in `tokens` (as in TGI).
    body = "".join(t.text for t in out.details.tokens if not t.special)
    assert out.generated_text == body
    events = list(client.text_generation(f"prompt {i}", max_new_tokens=300, details=True, stream=True))
    assert events[-1].token.special and events[-1].details.finish_reason == "eos_token"
    assert events[-1].details.generated_tokens == len(events)


def test_absent_max_new_tokens_fills_context(http):
    r = http.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True, "stop": []}})
    d = r.json()["details"]
    used = int(r.headers["x-prompt-tokens"]) + d["generated_tokens"]
    if d["finish_reason"] == "length":
        assert used == MAX_TOTAL_TOKENS
    else:
        assert used <= MAX_TOTAL_TOKENS
