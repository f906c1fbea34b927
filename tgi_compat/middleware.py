"""HTTP plumbing around the routes: the ``--api-key`` check (a route dependency), and ASGI
middleware that must see the raw request: the payload limit (and when the app learns of
a disconnect, for the dropped-request record), and ``HEAD`` on every GET route."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tgi_compat.connection import DISCONNECT_SEEN_KEY
from tgi_compat.errors import BodyError, Unauthorized, payload_too_large


def bearer_auth(api_key: str | None):
    """The routes' dependency for TGI's ``--api-key``: ``Authorization: Bearer <key>``
    (compared case-insensitively) or 401."""

    async def auth(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "").lower()
        if given != f"bearer {api_key}".lower():
            raise Unauthorized()

    return auth


class PayloadLimitMiddleware:
    """Answer 413 once a body exceeds ``limit`` bytes, while it is being read.

    A declared ``Content-Length`` over the limit is refused before any byte is read;
    a chunked body is counted as it arrives, so nothing over the limit is buffered.
    The ``BodyError`` raised from ``receive`` reaches the app's handler for it, which
    answers 413 (the fallback here covers a route that let it escape).
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    await payload_too_large(self.limit).response()(scope, receive, send)
                    return
                break

        received = 0
        started = False
        limit = self.limit

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise payload_too_large(limit)
            elif message["type"] == "http.disconnect":
                scope.setdefault(DISCONNECT_SEEN_KEY, time.monotonic())
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyError as e:
            if not started:
                await e.response()(scope, receive, send)


class HeadAsGetMiddleware:
    """``HEAD`` answered as the ``GET`` of the same path, without the body (axum's ``get``
    routes answer HEAD so; load balancers and uptime checkers probe with it).

    One mechanism for every GET route: the request goes to the app as a GET, and the
    response's status and headers (``content-length`` included) are sent as they are,
    with an empty body. A path with no GET route answers as its GET would (405, 404).
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        ended = False

        async def send_headers_only(message: Message) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                await send(message)
            elif message["type"] == "http.response.body" and not ended:
                # The first body message ends the response; the rest of the body is dropped.
                ended = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)
