"""TGIEventStream: byte framing and axum's keep-alive (a comment after a quiet spell)."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.routing import Route

from tgi_compat.sse import TGIEventStream, data_frame


async def _slow_frames():
    yield data_frame(b'{"a":1}')
    await asyncio.sleep(0.35)
    yield data_frame(b'{"a":2}')
    for _ in range(5):  # frames in quick succession: no keep-alive between them
        await asyncio.sleep(0.02)
        yield data_frame(b'{"b":0}')


async def endpoint(request):
    return TGIEventStream(_slow_frames(), keep_alive=0.1)


async def test_framing_and_keep_alive():
    app = Starlette(routes=[Route("/", endpoint)])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=30) as client:
        r = await client.get("/")
    assert r.headers["content-type"] == "text/event-stream"
    assert r.headers["x-accel-buffering"] == "no"
    body = r.content
    first, rest = body.split(b'data:{"a":2}\n\n')
    assert first.startswith(b'data:{"a":1}\n\n:\n\n')  # silence -> ':' comment
    assert 2 <= first.count(b":\n\n") <= 4
    assert b":\n\n" not in rest  # events reset the keep-alive timer
    assert rest == b'data:{"b":0}\n\n' * 5
