"""Fixtures of the fast in-process suite: the real app on a ``ScriptedEngine``, no vLLM process.

``app_factory(*flags)`` builds ``create_app`` from launcher flags (``parse_config``,
no environment), runs its lifespan and gives a ``Harness``: the scripted engine, an
``httpx.AsyncClient`` over ``ASGITransport``, and ``open_stream`` for what
ASGITransport cannot do (it buffers a whole response): read a response write by write
and disconnect mid-stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import httpx
import orjson
import pytest

from tests.helpers import metric_values
from tests.unit.scripted_engine import ScriptedEngine, preload, tiny_tokenizer

from tgi_compat.launcher import parse_config
from tgi_compat.server import create_app


@pytest.fixture(scope="session")
def tokenizer():
    preload()
    return tiny_tokenizer()


def sse_events(body: bytes) -> list:
    """The JSON of every ``data:`` event (``[DONE]`` as the string), in order."""
    events = []
    for frame in body.split(b"\n\n"):
        if not frame.strip() or frame.startswith(b":"):
            continue
        assert frame.startswith(b"data:"), frame
        payload = frame[5:].strip()
        events.append(payload.decode() if payload == b"[DONE]" else orjson.loads(payload))
    return events


class RawStream:
    """One request driven through the ASGI app by hand: ``writes`` are the response
    body's ``http.response.body`` messages as they are sent; ``disconnect()`` sends
    ``http.disconnect`` as a closing client does."""

    def __init__(self, app, path: str, body: dict):
        self.app = app
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.writes: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._gone = asyncio.Event()
        self._body_sent = False
        payload = orjson.dumps(body)
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"host", b"test"), (b"content-type", b"application/json"),
                                         (b"content-length", str(len(payload)).encode())],
            "client": ("127.0.0.1", 1234), "server": ("test", 80), "state": {},
        }
        self._payload = payload
        self.task = asyncio.ensure_future(self._run())

    async def _receive(self):
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self._payload, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            if message.get("body"):
                await self.writes.put(message["body"])
            if not message.get("more_body"):
                await self.writes.put(None)

    async def _run(self):
        try:
            await self.app(self.scope, self._receive, self._send)
        finally:
            await self.writes.put(None)

    async def next_write(self, timeout: float = 30.0) -> bytes | None:
        return await asyncio.wait_for(self.writes.get(), timeout)

    async def read_all(self, timeout: float = 30.0) -> list[bytes]:
        out = []
        while (w := await self.next_write(timeout)) is not None:
            out.append(w)
        return out

    async def disconnect(self, timeout: float = 30.0) -> None:
        self._gone.set()
        await asyncio.wait_for(self.task, timeout)


@dataclass
class Harness:
    app: object
    engine: ScriptedEngine
    client: httpx.AsyncClient

    def open_stream(self, path: str, body: dict) -> RawStream:
        return RawStream(self.app, path, body)

    async def metrics(self) -> str:
        r = await self.client.get("/metrics")
        assert r.status_code == 200
        return r.text

    async def metric(self, name: str, labels: str = "") -> float:
        return metric_values(await self.metrics(), name).get(labels, 0.0)


@pytest.fixture
async def app_factory(tokenizer):
    """``await app_factory(*flags, engine=None)`` → a started ``Harness``; stopped after the test."""
    stack = contextlib.AsyncExitStack()

    async def make(*flags: str, engine: ScriptedEngine | None = None) -> Harness:
        config, _ = parse_config(list(flags), environ={})
        engine = engine or ScriptedEngine(tokenizer)
        app = create_app(config, engine=engine)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=30)
        )
        return Harness(app, engine, client)

    try:
        yield make
    finally:
        await stack.aclose()


@pytest.fixture
async def h(app_factory) -> Harness:
    """The app with the default flags (128 permits, max_best_of 2, ...)."""
    return await app_factory()
