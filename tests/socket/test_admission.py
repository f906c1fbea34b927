"""Admission control (ours) on the real server process: the cap, best_of's permits, the OpenAI
routes sharing the cap, and permits released on every path. Held requests are ``[stall]``
scripts (one token, then nothing until ``/_scripted/release``), so they hold their permits
exactly as long as the test needs, with no engine to pause and no round to retry."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import OverloadedError

from tests.conftest import MAX_CONCURRENT_REQUESTS

pytestmark = pytest.mark.socket

OVERLOADED = b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
HELD_TOKENS = 20
STALLED = {"inputs": "[stall] Once upon a time", "parameters": {"max_new_tokens": HELD_TOKENS}}
PERMITS = "tgi_compat_permits_in_use"


async def _open_stream(client: httpx.AsyncClient, body: dict):
    response = await client.send(client.build_request("POST", "/generate_stream", json=body), stream=True)
    chunks = response.aiter_raw()
    first = await chunks.__anext__()
    return response, chunks, first


async def _finish(held) -> list[dict]:
    """Each held stream read to its end: its last event."""
    lasts = []
    for response, chunks, first in held:
        raw = first + b"".join([c async for c in chunks])
        await response.aclose()
        lasts.append(json.loads(raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1][5:]))
    return lasts


async def test_cap_rejects_exactly_the_extra_requests(scripted):
    n, k = MAX_CONCURRENT_REQUESTS, 4
    scripted.wait_idle()
    limits = httpx.Limits(max_connections=n + k + 8)
    async with httpx.AsyncClient(base_url=scripted.url, timeout=120, limits=limits) as client:
        held = await asyncio.gather(*[_open_stream(client, STALLED) for _ in range(n)])
        assert all(first.startswith(b'data:{"index":1,') for _, _, first in held)
        assert scripted.metric(PERMITS) == n  # every permit held until released
        # Streams over the cap: the overloaded event in-band, with status 200.
        extra = await asyncio.gather(*[client.post("/generate_stream", json=STALLED) for _ in range(k)])
        assert all(r.status_code == 200 and r.content == OVERLOADED for r in extra)
        # Non-stream over the cap: HTTP 429 with TGI's body.
        r = await client.post("/generate", json=STALLED)
        assert r.status_code == 429
        assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        assert "content-length" in r.headers
        # huggingface_hub raises OverloadedError both ways, sync and async.
        sync_client = InferenceClient(scripted.url, timeout=120)
        with pytest.raises(OverloadedError):
            await asyncio.to_thread(sync_client.text_generation, "x", max_new_tokens=2)
        with pytest.raises(OverloadedError):
            await asyncio.to_thread(lambda: list(sync_client.text_generation("x", max_new_tokens=2, stream=True)))
        with pytest.raises(OverloadedError):
            await AsyncInferenceClient(scripted.url, timeout=120).text_generation("x", max_new_tokens=2)
        assert scripted.metric(PERMITS) == n  # the refusals took none
        assert len(scripted.state()["live"]) == n  # and none reached the engine
        scripted.http.post("/_scripted/release")
        # The admitted streams all complete with their final event.
        for last in await _finish(held):
            assert last["generated_text"] is not None and last["index"] == HELD_TOKENS
    scripted.wait_idle()


def test_best_of_takes_a_permit_per_sequence_and_openai_routes_share_the_cap(scripted):
    # 31 stalled streams hold 31 of the 32 permits; best_of=2 needs two and is refused.
    scripted.wait_idle()

    async def main():
        async with httpx.AsyncClient(base_url=scripted.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as c:
            held = list(await asyncio.gather(*[_open_stream(c, STALLED) for _ in range(MAX_CONCURRENT_REQUESTS - 1)]))
            assert scripted.metric(PERMITS) == MAX_CONCURRENT_REQUESTS - 1
            two = await c.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2, "best_of": 2, "do_sample": True}})
            # A 32nd holder takes the last permit: the OpenAI routes are refused too.
            held.append(await _open_stream(c, STALLED))
            assert scripted.metric(PERMITS) == MAX_CONCURRENT_REQUESTS
            chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            full = [await c.post("/v1/chat/completions", json=chat),
                    await c.post("/v1/completions", json={"prompt": "a", "max_tokens": 2})]
            stream = await c.post("/v1/chat/completions", json={**chat, "stream": True})
            assert scripted.metric(PERMITS) == MAX_CONCURRENT_REQUESTS
            scripted.http.post("/_scripted/release")
            lasts = await _finish(held)
            one = await c.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 2}})
            return two, full, stream, one, lasts

    two, full, stream, one, lasts = asyncio.run(main())
    assert two.status_code == 429 and two.json()["error_type"] == "overloaded"
    for r in full:
        assert r.status_code == 429 and r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert stream.status_code == 200
    assert stream.content == (b'data:{"error":{"message":"Model is overloaded","http_status_code":422}}\n\n'
                              b"data: [DONE]\n\n")
    assert all(last["index"] == HELD_TOKENS for last in lasts)
    assert one.status_code == 200
    scripted.wait_idle()


async def _disconnecting_client(port: int, i: int) -> None:
    stream = i % 2 == 0
    body = json.dumps({"inputs": f"vanish-{i} [block]", "parameters": {"max_new_tokens": 1000}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = "/generate_stream" if stream else "/generate"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    await writer.drain()
    if stream:
        await reader.read(200)  # the stream has started
    else:
        # The client's behaviour (vanishing at a random point mid-request), not a wait for an outcome.
        await asyncio.sleep(random.uniform(0.05, 0.4))
    writer.transport.abort()  # vanish without a FIN handshake


async def test_many_disconnecting_clients_leak_nothing(scripted):
    scripted.wait_idle()
    before = len(scripted.state()["requests"])
    random.seed(0)
    total, wave = 200, MAX_CONCURRENT_REQUESTS - 4
    for start in range(0, total, wave):
        await asyncio.gather(*[_disconnecting_client(scripted.port, i) for i in range(start, min(start + wave, total))])
    await asyncio.to_thread(scripted.wait_idle)
    # Every one that reached the engine was aborted there (a [block] never ends otherwise).
    state = scripted.state()
    reached = {r["id"] for r in state["requests"][before:] if "vanish-" in r["prompt"]}
    assert reached and reached <= set(state["aborts"])
    # Afterwards a full load of normal streams succeeds.
    async with httpx.AsyncClient(base_url=scripted.url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 16, "details": True}}
        results = await asyncio.gather(*[client.post("/generate_stream", json=body) for _ in range(MAX_CONCURRENT_REQUESTS)])
    for r in results:
        last = json.loads(r.content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1][5:])
        assert last["details"]["generated_tokens"] == 16
    scripted.wait_idle()


def test_validation_errors_release_their_slot(scripted):
    http = scripted.http
    for _ in range(MAX_CONCURRENT_REQUESTS + 5):
        assert http.post("/generate", json={"inputs": "x", "parameters": {"top_p": 1.0}}).status_code == 422
        assert b"validation" in http.post("/generate_stream", json={"inputs": "", "parameters": {}}).content
    assert scripted.metric(PERMITS) == 0
    assert http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}).status_code == 200
