"""Server-sent events framed as TGI (axum 0.7 ``Sse``) frames them.

- Events are pre-encoded bytes, ``data:<compact JSON>\\n\\n``: no space after the colon,
  LF only, no ``event:``/``id:``/``retry:`` lines. sse-starlette passes bytes through
  untouched, so the encoding is ours.
- Keep-alive: the comment ``:\\n\\n`` once ``keep_alive`` seconds pass with nothing
  sent; the timer restarts after every event (axum's ``KeepAlive::default()``), where
  sse-starlette's own ping fires on a fixed period with a timestamped comment.
- Headers: ``content-type: text/event-stream`` (no charset), ``cache-control:
  no-cache``, ``x-accel-buffering: no`` (set by sse-starlette), plus the caller's.
- Client disconnect: sse-starlette cancels the body iterator, whose ``finally`` runs.

Relies on sse-starlette 3.x's ``_ping`` hook (pinned in pyproject).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping

import anyio
from sse_starlette.sse import EventSourceResponse
from starlette.types import Send

KEEP_ALIVE_FRAME = b":\n\n"


def data_frame(payload: bytes) -> bytes:
    """One SSE event, as TGI frames it: every ``data:`` frame sent is built here."""
    return b"data:" + payload + b"\n\n"


def frame_template(head: bytes, tail: bytes) -> tuple[bytes, bytes]:
    """(prefix, suffix) of events whose payload is ``head + <varying JSON> + tail``, built by
    ``data_frame``: the hot paths pre-encode the constant parts of their events once."""
    frame = data_frame(head + tail)
    cut = len(frame) - len(tail) - len(data_frame(b"")) + len(b"data:")
    return frame[:cut], frame[cut:]


class TGIEventStream(EventSourceResponse):
    """An SSE response whose body iterator yields ready-made frames (bytes)."""

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        headers: Mapping[str, str] | None = None,
        keep_alive: float = 15.0,
    ):
        self._last_sent = time.monotonic()
        merged = {"content-type": "text/event-stream", "Cache-Control": "no-cache"}
        if headers:
            merged.update(headers)
        super().__init__(self._track(frames), headers=merged, ping=keep_alive, sep="\n")

    async def _track(self, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        async for chunk in frames:
            self._last_sent = time.monotonic()
            yield chunk

    async def _ping(self, send: Send) -> None:
        interval = self.ping_interval
        while self.active:
            idle = time.monotonic() - self._last_sent
            if idle < interval:
                await anyio.sleep(interval - idle)
                continue
            async with self._send_lock:
                if self.active:
                    await self._send_with_timeout(
                        send, {"type": "http.response.body", "body": KEEP_ALIVE_FRAME, "more_body": True}
                    )
                    self._last_sent = time.monotonic()
