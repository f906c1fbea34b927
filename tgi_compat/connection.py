"""Connection guards: clients that stop reading, trickle, idle or vanish cannot hold the server.

uvicorn's httptools protocol, subclassed, so that all of this lives at the connection level
in one place and costs nothing per token:

- **Stuck readers** (``send_timeout``): while the app's writes are blocked (uvicorn paused
  them: the write buffer is over its high-water mark), or a finished response still waits
  to be read, a timer checks once a second that the peer acknowledges bytes (the kernel's
  ``tcpi_bytes_acked``; elsewhere, that the transport's buffer shrinks). After
  ``send_timeout`` seconds without a byte acknowledged the connection is aborted; uvicorn then hands the
  app ``http.disconnect``, and the ordinary disconnect path aborts the engine request and
  releases the permit (counted as ``dropped``). A slow reader acknowledges bytes and is
  never cut, however slow.
- **Slow requests** (``request_read_timeout``): a request's headers and body must arrive
  within this many seconds of its first byte, else 408 and close. Bodies are read before a
  permit is taken, so a trickling request holds neither a permit nor engine work.
- **Idle connections**: a new connection that sends nothing is closed after the keep-alive
  timeout, as an idle keep-alive connection is (uvicorn arms that timer only after a
  response).
- **Connection cap** (``max_connections``): past it, the longest-idle connection is closed
  to make room (nginx does the same); when none is idle the new request is answered 503
  ``overloaded`` and its connection closed.
- **Dead peers**: TCP keepalive (probes after 30 s idle, 3 probes 10 s apart) and
  ``TCP_USER_TIMEOUT`` on every accepted socket (Linux), so a peer gone without a FIN is
  found within ``DEAD_PEER_SECONDS`` even when nothing is being written.
- **Disconnect record**: the time the socket closed (and why) goes into the request's ASGI
  scope (``CLOSED_KEY``); ``drop_record`` reads it back for the serving layer, which logs it
  with the abort of a dropped request.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from dataclasses import dataclass, field

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("tgi_compat.connection")

# Scope keys: (why, time.monotonic()) of the socket's close; the time the app saw http.disconnect.
CLOSED_KEY = "tgi_compat.closed"
DISCONNECT_SEEN_KEY = "tgi_compat.disconnect_seen"


def drop_record(scope: dict, now: float) -> dict:
    """Why and when the connection closed, as the connection guards recorded it: ``closed_by``
    (peer, send_timeout, read_timeout), then ms from the socket's close to the app seeing
    ``http.disconnect`` and to the engine abort (done by the time this is logged)."""
    closed = scope.get(CLOSED_KEY)
    if closed is None:
        return {"closed_by": "unknown"}
    why, at = closed
    seen = scope.get(DISCONNECT_SEEN_KEY)
    record = {"closed_by": why}
    if seen is not None:
        record["disconnect_ms"] = round((seen - at) * 1000, 1)
    record["abort_ms"] = round((now - at) * 1000, 1)
    return record


KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 30, 10, 3
DEAD_PEER_SECONDS = KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT  # 60
# Linux's struct tcp_info: tcpi_bytes_acked (u64, since 4.1) sits at byte 120.
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_BYTES_ACKED_OFFSET, _TCP_INFO_LEN = 120, 128


@dataclass
class ConnectionStats:
    """Connections closed by a guard, by reason (exported on /metrics)."""

    closed: dict[str, int] = field(
        default_factory=lambda: {"send_timeout": 0, "read_timeout": 0, "idle_evicted": 0, "over_capacity": 0}
    )
    open: int = 0


@dataclass
class ConnectionGuard:
    send_timeout: float
    request_read_timeout: float
    max_connections: int
    stats: ConnectionStats = field(default_factory=ConnectionStats)

    def protocol_class(self) -> type[GuardedHttpProtocol]:
        """uvicorn's ``http=`` protocol class, bound to these limits."""
        return type("GuardedHttpProtocol", (GuardedHttpProtocol,), {"guard": self})


def _error_response(status: bytes, message: str, error_type: str) -> bytes:
    body = orjson.dumps({"error": message, "error_type": error_type})
    return (
        b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body
    )


def set_tcp_keepalive(sock, user_timeout_s: float) -> None:
    """Keepalive probes and TCP_USER_TIMEOUT on one accepted socket (where the platform has them)."""
    s = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
            ("TCP_USER_TIMEOUT", int(user_timeout_s * 1000)),
        ):
            opt = getattr(socket, name, None)
            if opt is not None:
                s.setsockopt(socket.IPPROTO_TCP, opt, value)
    finally:
        s.detach()


class GuardedHttpProtocol(HttpToolsProtocol):
    guard: ConnectionGuard  # set by ConnectionGuard.protocol_class

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._idle_since: float | None = None  # None while a request is being read or served
        self._headers_done = False
        self._read_timer = None
        self._write_timer = None
        self._write_mark = 0
        self._write_progress_at = 0.0
        self._fd = -1
        self._over_capacity = False

    # --- connection ---

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        guard = self.guard
        guard.stats.open = len(self.connections)
        self._idle_since = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            if _TCP_INFO is not None:
                self._fd = sock.fileno()
            try:
                set_tcp_keepalive(sock, max(DEAD_PEER_SECONDS, guard.send_timeout))
            except (OSError, AttributeError, TypeError):  # a platform without these options
                logger.debug("TCP keepalive options not set", exc_info=True)
        # A connection that never sends a request is idle: same timeout as keep-alive.
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        if len(self.connections) > guard.max_connections and self._open_connections() > guard.max_connections:
            self._evict_idle()

    def connection_lost(self, exc) -> None:
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope.setdefault(CLOSED_KEY, ("peer", time.monotonic()))  # type: ignore[typeddict-item]
        for timer in (self._read_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._read_timer = self._write_timer = None
        super().connection_lost(exc)
        self.guard.stats.open = len(self.connections)

    def _close(self, reason: str, *, abort: bool) -> None:
        """Close on a guard's decision; an in-flight request sees ``http.disconnect``."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.scope[CLOSED_KEY] = (reason, time.monotonic())  # type: ignore[typeddict-item]
        self.guard.stats.closed[reason] += 1
        if abort:
            self.transport.abort()  # connection_lost follows: the app gets http.disconnect
        else:
            self.transport.close()

    def _evict_idle(self) -> bool:
        """Close the longest-idle other connection; False if none is idle."""
        victim = None
        for conn in self.connections:
            since = getattr(conn, "_idle_since", None)
            if (conn is not self and since is not None and not conn.transport.is_closing()
                    and (victim is None or since < victim._idle_since)):
                victim = conn
        if victim is None:
            return False
        victim._idle_since = None
        logger.debug("connection cap %d reached: closing the longest-idle connection", self.guard.max_connections)
        victim._close("idle_evicted", abort=victim.transport.get_write_buffer_size() > 0)
        return True

    # --- reading a request (slowloris) ---

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._idle_since is not None and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Bytes that began no request (blank lines): still idle.
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._idle_since = None
        self._headers_done = False
        if self._read_timer is None:
            self._read_timer = self.loop.call_later(self.guard.request_read_timeout, self._read_timed_out)

    def on_headers_complete(self) -> None:
        self._headers_done = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None
        super().on_message_complete()

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle if self._headers_done else None
        seconds = self.guard.request_read_timeout
        logger.warning(
            "closing connection from %s: request not received within %g s (%s)",
            _addr(self.client), seconds, "body incomplete" if cycle is not None else "headers incomplete",
        )
        if cycle is not None and cycle.response_started:
            self._close("read_timeout", abort=True)  # answered already; the rest of the body is not wanted
            return
        if cycle is not None:
            # The app is waiting for the body: it gets http.disconnect and writes nothing.
            cycle.scope[CLOSED_KEY] = ("read_timeout", time.monotonic())  # type: ignore[typeddict-item]
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.write(
            _error_response(b"408 Request Timeout", f"Request timeout: the request was not received within {seconds:g} s", "request_timeout")
        )
        self._close("read_timeout", abort=False)

    # --- the connection cap ---

    def _start_asgi_task(self, cycle, app) -> None:
        cap = self.guard.max_connections
        if len(self.connections) > cap and self._open_connections() > cap and not self._evict_idle():
            app = self._refuse_over_capacity
        super()._start_asgi_task(cycle, app)

    def _open_connections(self) -> int:
        """Connections not already closing (those leave the set a moment later)."""
        return sum(1 for conn in self.connections if not conn.transport.is_closing())

    async def _refuse_over_capacity(self, scope, receive, send) -> None:
        self.guard.stats.closed["over_capacity"] += 1
        logger.warning("connection cap %d reached, none idle: answering 503", self.guard.max_connections)
        body = orjson.dumps(
            {"error": f"Server overloaded: all {self.guard.max_connections} connections are busy", "error_type": "overloaded"}
        )
        await send({
            "type": "http.response.start",
            "status": 503,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close")],
        })
        await send({"type": "http.response.body", "body": body})

    # --- writing (stuck readers) ---

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline:
            self._idle_since = time.monotonic()
        if self.transport.get_write_buffer_size() > 0:
            self._watch_writes()  # the response is written but not read yet

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()

    def _progress_mark(self) -> int:
        """A number that grows while the peer reads: the bytes it has acknowledged (the
        kernel's ``tcpi_bytes_acked``), else the negated bytes still waiting in the buffer."""
        if self._fd >= 0:
            try:
                s = socket.socket(fileno=self._fd)
                try:
                    info = s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_LEN)
                finally:
                    s.detach()
                if len(info) >= _TCP_INFO_LEN:
                    return struct.unpack_from("Q", info, _BYTES_ACKED_OFFSET)[0]
            except (OSError, AttributeError):
                pass
        return -self.transport.get_write_buffer_size()

    def _watch_writes(self) -> None:
        if self._write_timer is None and not self.transport.is_closing():
            self._write_mark = self._progress_mark()
            self._write_progress_at = time.monotonic()
            self._write_timer = self.loop.call_later(self._check_interval(), self._check_writes)

    def _check_interval(self) -> float:
        return min(1.0, self.guard.send_timeout / 4)

    def _check_writes(self) -> None:
        self._write_timer = None
        if self.transport.is_closing() and self.transport.get_write_buffer_size() == 0:
            return
        cycle = self.cycle
        blocked = self.flow.write_paused or cycle is None or cycle.response_complete
        if not blocked or self.transport.get_write_buffer_size() == 0:
            return  # the app's writes go through again, or all was handed to the kernel
        now = time.monotonic()
        mark = self._progress_mark()
        if mark > self._write_mark:
            self._write_progress_at = now
        self._write_mark = mark
        if now - self._write_progress_at >= self.guard.send_timeout:
            logger.warning(
                "closing connection from %s: the client read nothing for %g s (send timeout)",
                _addr(self.client), self.guard.send_timeout,
            )
            self._close("send_timeout", abort=True)
            return
        self._write_timer = self.loop.call_later(self._check_interval(), self._check_writes)


FD_RESERVE = 256  # the engine's sockets, log files, model files...


def resolve_max_connections(requested: int | None, max_concurrent_requests: int) -> int:
    """The connection cap, with the process's file-descriptor limit raised to fit it.

    An explicit cap that cannot fit is a configuration error; the default shrinks to fit
    (never below ``max_concurrent_requests``)."""
    import resource

    from tgi_compat.config import ConfigError

    want = requested if requested is not None else max(1024, 4 * max_concurrent_requests)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = want + FD_RESERVE
    if needed > soft:
        new_soft = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
            soft = new_soft
        except (ValueError, OSError):
            pass
    if needed <= soft:
        return want
    if requested is not None:
        raise ConfigError(
            f"`max_connections` {requested} needs {needed} file descriptors, the limit is {soft}: "
            "raise `ulimit -n` or lower --max-connections"
        )
    fitted = max(soft - FD_RESERVE, max_concurrent_requests)
    logger.warning("max_connections lowered to %d to fit the file-descriptor limit (%d)", fitted, soft)
    return fitted


def _addr(client) -> str:
    return "%s:%d" % client if client else "?"
