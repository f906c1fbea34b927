"""huggingface_hub's client on the real engine, for what only vLLM can prove: seeded sampling
reproduces, greedy is deterministic, stop sequences on real text. The client's shapes, errors
and streaming are the socket tier's (tests/socket/test_clients.py)."""

from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient

pytestmark = pytest.mark.engine

PROMPT = "How do you make cheese?"


@pytest.fixture(scope="module")
def client(server_url):
    return InferenceClient(server_url, timeout=120)


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
