"""Helpers shared by the test files (one copy each): waiting on a condition with a deadline,
Prometheus exposition parsing, raw HTTP/1.1 over sockets, background stream readers, and
engines run in short bursts."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import threading
import time

import psutil


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """``predicate()``'s first truthy value within ``timeout`` seconds, else its last value
    (falsy): the test asserts on it. Polling a condition, never sleeping for an outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return predicate()


def same_text(streamed: str, full: str) -> bool:
    """Per-token text holds back a trailing incomplete UTF-8 character; decoding the
    whole generation shows it as U+FFFD."""
    return streamed == full.rstrip("\ufffd")


# --- Prometheus' text exposition ---


def metric_values(text: str, name: str) -> dict[str, float]:
    """``{labels: value}`` of one series in a Prometheus exposition ('' for no labels,
    else the braces as written, e.g. ``{err="dropped"}``)."""
    out = {}
    for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M):
        out[m.group(1) or ""] = float(m.group(2))
    return out


def labelled_values(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample of ``name`` as (its labels as a dict, its value)."""
    return [(dict(re.findall(r'(\w+)="([^"]*)"', labels)), value)
            for labels, value in metric_values(text, name).items()]


# --- raw HTTP/1.1 ---


def raw_socket(port: int, *, internet_like: bool = False, timeout: float = 60) -> socket.socket:
    """A connected client socket; ``internet_like``: an internet path's segment size (loopback's
    64 KiB MSS makes the kernel buffer megabytes) and a small receive window, so the server's
    buffers fill in ~100 KB."""
    s = socket.socket()
    if internet_like:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def post(s: socket.socket, path: str, body: dict | bytes, request_id: str = "") -> None:
    """Send one JSON POST on ``s`` (``request_id``: its x-request-id)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    rid = f"x-request-id: {request_id}\r\n" if request_id else ""
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{rid}"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def read_to_close(s: socket.socket) -> bytes:
    """A whole answer of a connection the server closes after it (408, 503, ...)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def rst_close(s: socket.socket) -> None:
    """Vanish as a crashed client does: an RST, no FIN handshake."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    s.close()


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    out, i = [], 0
    while True:
        end = body.index(b"\r\n", i)
        size = int(body[i:end], 16)
        if size == 0:
            return b"".join(out)
        out.append(body[end + 2 : end + 2 + size])
        i = end + 2 + size + 2


def data_events(raw: bytes) -> list[dict]:
    """The JSON of every ``data:`` event of an SSE body."""
    return [json.loads(e[5:]) for e in raw.rstrip(b"\n").split(b"\n\n") if e.startswith(b"data:")]


class StreamReader(threading.Thread):
    """Reads one response to its end in the background (http.client: no per-thread
    client set-up, so many readers start at once)."""

    def __init__(self, url: str, body: dict, path: str = "/generate_stream", headers: dict | None = None):
        super().__init__(daemon=True)
        self.host, self.port = url.removeprefix("http://").split(":")
        self.body, self.path = json.dumps(body), path
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.chunks: list[bytes] = []
        self.status = None
        self.started = threading.Event()
        self.sent = threading.Event()  # the request is on the wire
        self.local_port: int | None = None  # the client end of its connection
        self._conn: http.client.HTTPConnection | None = None
        self.start()

    def close(self) -> None:
        """The client goes away mid-response (its connection shut down)."""
        sock = self._conn.sock if self._conn is not None else None
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)

    def run(self):
        conn = self._conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        try:
            conn.connect()
            self.local_port = conn.sock.getsockname()[1]
            conn.request("POST", self.path, self.body, self.headers)
            self.sent.set()
            response = conn.getresponse()
            self.status = response.status
            while chunk := response.read1(65536):
                self.chunks.append(chunk)
                self.started.set()
        except (OSError, http.client.HTTPException) as e:
            self.chunks.append(f"<{type(e).__name__}>".encode())
        finally:
            conn.close()
            self.sent.set()
            self.started.set()

    @property
    def raw(self) -> bytes:
        return b"".join(self.chunks)

    def events(self) -> list[dict]:
        return data_events(self.raw)


def api_processes(pid: int, port: int) -> list[psutil.Process]:
    """The API processes under a server started with --api-server-count: the processes
    listening on its port (each has its own socket there)."""
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def connection_owner(processes: list[psutil.Process], client_port: int) -> int | None:
    """Which of ``processes`` holds the server end of a loopback connection from ``client_port``."""
    for p in processes:
        try:
            if any(c.raddr and c.raddr.port == client_port for c in p.net_connections("tcp")):
                return p.pid
        except psutil.NoSuchProcess:
            pass
    return None


class PausedEngines:
    """The engine processes under the given server processes, stopped (SIGSTOP) and run in
    short bursts.

    On this 2-core host a spinning engine starves the front end and the test client (30 s
    without an answer has been seen), so a test that must act while long streams are in
    flight stops the engines, lets them run 0.1 s at a time between its checks, and acts
    while they are stopped: no stream can run to its end behind the test's back. Leaving
    the block resumes every engine still alive. ``exclude``: processes under them that are
    not engines (several API processes' front ends: --api-server-count), with theirs."""

    def __init__(self, *pids: int, exclude: tuple[int, ...] = ()):
        skip = {c.pid for pid in exclude for c in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]}
        self.procs = [c for pid in pids for c in psutil.Process(pid).children(recursive=True) if c.pid not in skip]

    def __enter__(self) -> "PausedEngines":
        for p in self.procs:
            p.suspend()
        self._policy(os.SCHED_IDLE)
        return self

    def __exit__(self, *exc) -> None:
        self._policy(os.SCHED_OTHER)
        self._each("resume")

    def _policy(self, policy: int) -> None:
        """Every engine thread's scheduling policy. SCHED_IDLE while the test acts: the
        engines then run only on CPU the test and the front end leave, so a 0.1 s burst
        ends when the test wakes (with the engines at normal priority, a sleep(0.1) here
        once returned after 17 s, with whole generations run in between)."""
        for p in self.procs:
            try:
                for t in p.threads():
                    try:
                        os.sched_setscheduler(t.id, policy, os.sched_param(0))
                    except (ProcessLookupError, PermissionError):
                        pass
            except psutil.NoSuchProcess:
                pass

    def _each(self, action: str) -> None:
        for p in self.procs:
            try:
                getattr(p, action)()
            except psutil.NoSuchProcess:  # killed by the test (zombies included)
                pass

    def run_until(self, condition, rounds: int = 200, burst: float = 0.1) -> bool:
        """Runs the engines ``burst`` seconds at a time until ``condition()`` holds with
        them stopped; its value then (False after ``rounds`` bursts)."""
        for _ in range(rounds):
            if condition():
                return True
            self._each("resume")
            time.sleep(burst)  # engine run time (pacing), not synchronisation: the check follows
            self._each("suspend")
        return bool(condition())
