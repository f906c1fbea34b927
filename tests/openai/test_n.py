"""OpenAI's ``n`` on the real engine: what only vLLM can show, that choice j's seed + j
makes the choices differ and a given seed reproduces them all, and that greedy choices
are identical."""

from __future__ import annotations

import json

import pytest

from tests.conftest import wait_idle

pytestmark = pytest.mark.engine

PROMPT = "Once upon a time"


def texts(http, **body) -> list[str]:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "n": 2, "max_tokens": 16, **body})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    return [c["text"] for c in choices]


def test_n_seeds_on_the_engine(http):
    first = texts(http, seed=1234, temperature=1.0)
    assert first[0] != first[1]  # choice 1 samples with seed 1235
    assert texts(http, seed=1234, temperature=1.0) == first  # the seed reproduces every choice
    greedy = texts(http, temperature=0)
    assert greedy[0] == greedy[1]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                "max_tokens": 8, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
    events = [json.loads(f[5:]) for f in r.content.split(b"\n\n")[:-2] if f.startswith(b"data:")]
    chunks, usage = events[:-1], events[-1]["usage"]
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
    assert usage["completion_tokens"] == len(chunks)  # one chunk per token, both choices summed
    assert wait_idle(http) == (0, 0)
