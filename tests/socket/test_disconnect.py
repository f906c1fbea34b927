"""A client that closes its connection mid-generation aborts its engine request, on every
route, over real TCP: the abort is read from the engine (``/_scripted/state``), exactly, for
requests that would otherwise never end (``[block]``). That an abort stops vLLM's tokens is
the engine tier's (tests/tgi/test_wire.py)."""

from __future__ import annotations

import pytest

from tests.helpers import post, raw_socket

pytestmark = pytest.mark.socket

HELLO = "Hello, who are you?"


def _close_mid_generation(server, path: str, bodies: list[dict], *, stream: bool, engine_requests: int | None = None):
    """Send each body on its own connection, wait until the engine has them all (and the
    streams have begun), close every connection; the engine ids of these requests."""
    before = len(server.state()["requests"])
    socks = []
    for body in bodies:
        s = raw_socket(server.port, timeout=30)
        post(s, path, body)
        socks.append(s)
    server.wait_metric("tgi_compat_engine_requests", engine_requests or len(bodies))
    if stream:
        for s in socks:
            assert s.recv(4096).startswith(b"HTTP/1.1 200")  # streaming has begun
    for s in socks:
        s.close()
    server.wait_idle()
    return [r["id"] for r in server.state()["requests"][before:]]


def test_disconnect_mid_stream_aborts_engine_request(scripted):
    bodies = [{"inputs": f"[block] {i}", "parameters": {"max_new_tokens": 1000}} for i in range(4)]
    ids = _close_mid_generation(scripted, "/generate_stream", bodies, stream=True)
    assert len(ids) == 4 and set(ids) <= set(scripted.state()["aborts"])


def test_disconnect_during_non_stream_aborts_engine_request(scripted):
    bodies = [{"inputs": f"[block] {i}", "parameters": {"max_new_tokens": 1000}} for i in range(4)]
    ids = _close_mid_generation(scripted, "/generate", bodies, stream=False)
    assert len(ids) == 4 and set(ids) <= set(scripted.state()["aborts"])
    # The server still serves normally afterwards.
    assert scripted.http.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_disconnect_mid_chat_stream_aborts(scripted):
    bodies = [{"messages": [{"role": "user", "content": f"[block] {HELLO} {i}"}], "max_tokens": 500,
               "stream": True, "seed": 1} for i in range(4)]
    ids = _close_mid_generation(scripted, "/v1/chat/completions", bodies, stream=True)
    assert len(ids) == 4 and set(ids) <= set(scripted.state()["aborts"])


def test_disconnect_during_non_stream_chat_aborts(scripted):
    bodies = [{"messages": [{"role": "user", "content": f"[block] {i}"}], "max_tokens": 500} for i in range(2)]
    ids = _close_mid_generation(scripted, "/v1/chat/completions", bodies, stream=False)
    assert len(ids) == 2 and set(ids) <= set(scripted.state()["aborts"])


def test_disconnect_mid_completions_stream_aborts_every_prompt(scripted):
    """Several prompts in one request are several engine requests: closing aborts them all."""
    bodies = [{"prompt": ["[block] a", "[block] b", "[block] c"], "max_tokens": 500, "stream": True}]
    ids = _close_mid_generation(scripted, "/v1/completions", bodies, stream=True, engine_requests=3)
    assert len(ids) == 3 and set(ids) <= set(scripted.state()["aborts"])


def test_disconnect_while_tokens_flow_aborts_engine_request(scripted):
    """The engine producing (one token per 50 ms, 50 s in all) rather than blocked: the
    abort ends it, its output iterator is closed unfinished."""
    bodies = [{"inputs": f"[pace=0.05] flowing {i}", "parameters": {"max_new_tokens": 1000}} for i in range(2)]
    ids = _close_mid_generation(scripted, "/generate_stream", bodies, stream=True)
    state = scripted.state()
    assert len(ids) == 2 and set(ids) <= set(state["aborts"]) and set(ids) <= set(state["closed"])
