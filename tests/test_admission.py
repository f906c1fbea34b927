"""Admission control against the real engine: the cap, and slots released on every path."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import httpx
import pytest
from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import OverloadedError

from tests.conftest import MAX_CONCURRENT_REQUESTS, metric, wait_idle
from tgi_compat.admission import ConcurrencyLimiter
from tgi_compat.errors import OverloadedError as OurOverloaded

pytestmark = pytest.mark.engine

OVERLOADED = b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
# Greedy decoding of this prompt does not hit EOS on the tiny model: a long stream.
# ~4 s at batch 32: the held streams must outlive the overload checks.
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1000}}


def test_limiter_unit():
    limiter = ConcurrencyLimiter(2)
    a = limiter.try_acquire()
    b = limiter.try_acquire()
    with pytest.raises(OurOverloaded):
        limiter.try_acquire()
    a.release()
    a.release()  # idempotent
    assert limiter.in_use == 1
    with pytest.raises(OurOverloaded):
        limiter.try_acquire(2)
    b.release()
    assert limiter.in_use == 0


async def _open_stream(client: httpx.AsyncClient, body: dict):
    response = await client.send(client.build_request("POST", "/generate_stream", json=body), stream=True)
    chunks = response.aiter_raw()
    first = await chunks.__anext__()
    return response, chunks, first


async def test_cap_rejects_exactly_the_extra_requests(server_url, http, main_server):
    n, k = MAX_CONCURRENT_REQUESTS, 4
    limits = httpx.Limits(max_connections=n + k + 8)
    async with httpx.AsyncClient(base_url=server_url, timeout=120, limits=limits) as client:
        with contextlib.ExitStack() as paused:
            for _ in range(3):
                held = await asyncio.gather(*[_open_stream(client, LONG) for _ in range(n)])
                assert all(first.startswith(b"data:{\"index\":1,") for _, _, first in held)
                # The engine is paused from here: the n streams keep their permits however
                # long the checks below take on a starved box (admission is the front end's).
                paused.enter_context(main_server.engine_paused())
                if metric(http, "tgi_compat_permits_in_use") == n:
                    break
                # On this shared box the first streams can finish before the last one starts;
                # the test needs all n in flight at once, so let these end and try again.
                paused.close()
                for response, chunks, _ in held:
                    async for _ in chunks:
                        pass
                    await response.aclose()
                assert wait_idle(http) == (0, 0)
            else:
                pytest.fail(f"could not hold {n} streams at once")

            # Streams over the cap: the overloaded event in-band, with status 200.
            extra = await asyncio.gather(*[client.post("/generate_stream", json=LONG) for _ in range(k)])
            assert all(r.status_code == 200 and r.content == OVERLOADED for r in extra)
            # Non-stream over the cap: HTTP 429 with TGI's body.
            r = await client.post("/generate", json=LONG)
            assert r.status_code == 429
            assert r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
            assert "content-length" in r.headers
            # huggingface_hub raises OverloadedError both ways, sync and async.
            sync_client = InferenceClient(server_url, timeout=120)
            with pytest.raises(OverloadedError):
                await asyncio.to_thread(sync_client.text_generation, "x", max_new_tokens=2)
            with pytest.raises(OverloadedError):
                await asyncio.to_thread(lambda: list(sync_client.text_generation("x", max_new_tokens=2, stream=True)))
            with pytest.raises(OverloadedError):
                await AsyncInferenceClient(server_url, timeout=120).text_generation("x", max_new_tokens=2)

        # The admitted streams all complete with their final event.
        for response, chunks, first in held:
            raw = first + b"".join([c async for c in chunks])
            await response.aclose()
            last = json.loads(raw.rstrip(b"\n").rsplit(b"\n\n", 1)[-1][5:])
            assert last["generated_text"] is not None and last["index"] == 1000
    assert wait_idle(http) == (0, 0)


async def _disconnecting_client(port: int, i: int) -> None:
    stream = i % 2 == 0
    body = json.dumps(LONG).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = "/generate_stream" if stream else "/generate"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    await writer.drain()
    if stream:
        await reader.read(200)  # the stream has started
    else:
        await asyncio.sleep(random.uniform(0.05, 0.4))  # mid-request
    writer.transport.abort()  # vanish without a FIN handshake


async def test_many_disconnecting_clients_leak_nothing(server_url, http):
    port = int(server_url.rsplit(":", 1)[1])
    random.seed(0)
    total, wave = 200, MAX_CONCURRENT_REQUESTS - 4
    for start in range(0, total, wave):
        await asyncio.gather(*[_disconnecting_client(port, i) for i in range(start, min(start + wave, total))])
    assert wait_idle(http, timeout=15) == (0, 0)
    # Afterwards a full load of normal streams succeeds.
    async with httpx.AsyncClient(base_url=server_url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        body = {"inputs": "hello", "parameters": {"max_new_tokens": 16, "details": True}}
        results = await asyncio.gather(*[client.post("/generate_stream", json=body) for _ in range(MAX_CONCURRENT_REQUESTS)])
    for r in results:
        last = json.loads(r.content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1][5:])
        assert last["details"]["generated_tokens"] == 16
    assert wait_idle(http) == (0, 0)


def test_validation_errors_release_their_slot(http):
    for _ in range(MAX_CONCURRENT_REQUESTS + 5):
        assert http.post("/generate", json={"inputs": "x", "parameters": {"top_p": 1.0}}).status_code == 422
        assert b"validation" in http.post("/generate_stream", json={"inputs": "", "parameters": {}}).content
    assert metric(http, "tgi_compat_permits_in_use") == 0
    assert http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1}}).status_code == 200
