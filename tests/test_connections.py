"""Clients that stop reading, trickle, idle or vanish cannot hold the server (the connection
guards of tgi_compat/connection.py), on a real server with small timeouts and caps."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import httpx
import pytest

from tests.conftest import ServerProcess, metric, wait_idle

pytestmark = pytest.mark.engine

SEND_TIMEOUT = 5
READ_TIMEOUT = 3
MAX_CONNECTIONS = 16
MAX_CONCURRENT = 8
ROUNDS = 3  # timing on this shared 2-core box: a round may be disturbed, never all


@pytest.fixture(scope="module")
def guarded():
    server = ServerProcess(
        ["--send-timeout", str(SEND_TIMEOUT), "--request-read-timeout", str(READ_TIMEOUT),
         "--max-connections", str(MAX_CONNECTIONS), "--max-concurrent-requests", str(MAX_CONCURRENT),
         "--max-total-tokens", "8192"],
        log_name="guards",
    )
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            yield server, http
    finally:
        server.stop()


def dropped(http: httpx.Client) -> float:
    m = re.search(r'^tgi_request_failure\{err="dropped"\} (\S+)$', http.get("/metrics").text, re.M)
    return float(m.group(1)) if m else 0.0


def raw_socket(port: int, *, internet_like: bool = False) -> socket.socket:
    s = socket.socket()
    if internet_like:
        # An internet path's segment size (loopback's 64 KiB MSS makes the kernel buffer
        # megabytes) and a small receive window: the server's buffers fill in ~100 KB.
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 1460)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(60)
    s.connect(("127.0.0.1", port))
    return s


def post(s: socket.socket, path: str, body: dict, request_id: str = "") -> None:
    data = json.dumps(body).encode()
    rid = f"x-request-id: {request_id}\r\n" if request_id else ""
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{rid}"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)


def read_to_close(s: socket.socket) -> bytes:
    """A whole answer of a connection the server closes after it (408, 503)."""
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return predicate()


class StallWatch(threading.Thread):
    """The longest time this test process went without running a 20 ms ticker: on this
    shared 2-core box a process (or its GIL holder, blocked on I/O) can be stalled for
    seconds, and then its readers read nothing, however steady their code."""

    def __init__(self):
        super().__init__(daemon=True)
        self.longest = 0.0
        self._done = threading.Event()
        self.start()

    def run(self):
        last = time.monotonic()
        while not self._done.wait(0.02):
            now = time.monotonic()
            self.longest = max(self.longest, now - last - 0.02)
            last = now

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.longest


class SlowReader(threading.Thread):
    """Reads a stream steadily but slowly (4 KB every 100 ms: ~40 KB/s)."""

    def __init__(self, port: int, body: dict):
        super().__init__(daemon=True)
        self.sock = raw_socket(port, internet_like=True)
        post(self.sock, "/generate_stream", body)
        self.raw = b""
        # The longest time between one read's return and the next read: ~0.1 s unless this
        # thread was descheduled (then it was not reading steadily, and a cut is fair).
        self.longest_pause = 0.0
        self.start()

    def run(self):
        try:
            returned = None
            while True:
                if returned is not None:
                    self.longest_pause = max(self.longest_pause, time.monotonic() - returned)
                chunk = self.sock.recv(4096)
                returned = time.monotonic()
                if not chunk:
                    break
                self.raw += chunk
                if self.raw.endswith(b"0\r\n\r\n"):
                    break
                time.sleep(0.1)
        except OSError as e:
            self.raw += f"<{type(e).__name__}>".encode()
        finally:
            self.sock.close()

    def completed(self) -> bool:
        return self.raw.endswith(b"0\r\n\r\n")

    def last_event(self) -> dict:
        return json.loads(dechunk(self.raw.split(b"\r\n\r\n", 1)[1]).rstrip(b"\n").rsplit(b"\n\n", 1)[-1][5:])


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


# 7,000 tokens with top-5 alternatives and details: megabytes of events (issue 16's case).
FROZEN = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 7000, "top_n_tokens": 5, "details": True}}
# ~200 KB of events: ~5 s at the slow reader's pace, longer than the send timeout.
STEADY = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 300, "top_n_tokens": 5, "details": True}}


def test_frozen_reader_is_cut_while_a_slow_reader_completes(guarded):
    server, http = guarded
    log_start = server.log_path.stat().st_size
    disturbed = ""
    for _ in range(ROUNDS):
        assert wait_idle(http) == (0, 0)
        before = dropped(http)
        frozen = raw_socket(server.port, internet_like=True)
        start = time.monotonic()
        watch = StallWatch()
        post(frozen, "/generate_stream", FROZEN)  # and never read
        slow = SlowReader(server.port, STEADY)
        try:
            freed = wait_for(lambda: dropped(http) > before, timeout=SEND_TIMEOUT + 30)
            elapsed = time.monotonic() - start
            slow.join(60)
        finally:
            frozen.close()
            stalled = watch.stop()
        assert freed, "the frozen reader was never cut"
        if not slow.completed() and max(stalled, slow.longest_pause) > 1.0:
            # This process did not run for a while: its slow reader did not read steadily.
            disturbed = f"this test process stalled {stalled:.1f} s and its slow reader was cut"
            continue
        # The slow reader was never cut: it got its whole stream.
        assert slow.completed(), f"a steady reader was cut (longest stall {max(stalled, slow.longest_pause):.2f} s)"
        assert slow.last_event()["details"]["generated_tokens"] == 300
        assert dropped(http) == before + 1
        assert wait_idle(http) == (0, 0)
        # From the request to the permit and engine request being freed: the server's
        # buffers fill (~100 KB), then send-timeout of no progress, then the abort.
        if elapsed <= SEND_TIMEOUT + 5:
            break
        disturbed = f"the frozen reader held its permit {elapsed:.1f} s (> send timeout + 5 s)"
    else:
        pytest.fail(f"every round was disturbed; the last: {disturbed}")
    log = server.log_path.read_bytes()[log_start:].decode(errors="replace")
    assert "send timeout" in log and "closed_by=send_timeout" in log, log[-3000:]


def test_half_a_body_then_a_stall_gets_408_and_holds_nothing(guarded):
    server, http = guarded
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 5}}).encode()
    half = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head_only = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    start = time.monotonic()
    half.sendall(f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    head_only.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Le")
    # Meanwhile nothing is admitted: no permit, no engine request.
    assert wait_idle(http) == (0, 0)
    for s in (half, head_only):
        answer = read_to_close(s)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
            "error": f"Request timeout: the request was not received within {READ_TIMEOUT} s",
            "error_type": "request_timeout",
        }
        s.close()  # read_to_close saw the server close it
    assert time.monotonic() - start < READ_TIMEOUT + 10
    assert metric(http, 'tgi_compat_connections_closed{reason="read_timeout"}') >= 2
    assert http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_idle_connections_past_the_cap_leave_the_server_answering(guarded):
    server, http = guarded
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        # New clients are served: the longest-idle connections make room.
        with httpx.Client(base_url=server.url, timeout=60) as fresh:
            for _ in range(3):
                r = fresh.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
                assert r.status_code == 200
        assert metric(http, 'tgi_compat_connections_closed{reason="idle_evicted"}') >= MAX_CONNECTIONS
        assert metric(http, "tgi_compat_connections_open") <= MAX_CONNECTIONS + 1
    finally:
        for s in idle:
            s.close()


def test_busy_connections_at_the_cap_get_503_overloaded(guarded):
    server, http = guarded
    for _ in range(ROUNDS):
        # Every connection busy (a request whose body is still arriving), none idle.
        busy = []
        for _ in range(MAX_CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
            busy.append(s)
        try:
            time.sleep(0.2)  # let the server read them (not an assertion)
            extra = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            post(extra, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}})
            answer = read_to_close(extra)
            extra.close()
        finally:
            for s in busy:
                s.close()
        if answer.startswith(b"HTTP/1.1 503 "):
            break  # else the busy ones timed out first (408) on a descheduled client: again
    else:
        pytest.fail(f"never answered 503 at the cap: {answer[:300]!r}")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "error": f"Server overloaded: all {MAX_CONNECTIONS} connections are busy", "error_type": "overloaded"}
    assert b"connection: close" in answer.lower()
    assert wait_idle(http) == (0, 0)
    assert http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


# As long as the server allows (8192 total): on 2 shared cores a wave of 8 ran 2,000 tokens
# to their end (6 s) before a starved client had closed its sockets.
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8000}}


def _generated_tokens(http: httpx.Client) -> float:
    m = re.search(r"^vllm:generation_tokens_total\{[^}]*\} (\S+)$", http.get("/metrics").text, re.M)
    return float(m.group(1))


def test_200_disconnects_under_full_load_all_abort(guarded):
    server, http = guarded
    assert wait_idle(http) == (0, 0)
    log_start = server.log_path.stat().st_size
    before, tokens_before = dropped(http), _generated_tokens(http)
    total, ids = 200, []
    for wave in range(0, total, MAX_CONCURRENT):
        socks = []
        for i in range(wave, wave + MAX_CONCURRENT):  # every permit taken
            s = raw_socket(server.port)
            rid = f"drop-{i}"
            post(s, "/generate_stream" if i % 2 == 0 else "/generate", LONG, rid)
            socks.append((s, i))
            ids.append(rid)
        assert wait_for(lambda: metric(http, "tgi_compat_engine_requests") == MAX_CONCURRENT, timeout=30)
        for s, i in socks:
            if i % 2 == 0:
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # RST: vanish
            s.close()
        assert wait_idle(http, timeout=10) == (0, 0)
    assert dropped(http) - before == total
    # Aborted, not run to the end: far fewer tokens than 200 full generations.
    assert _generated_tokens(http) - tokens_before < total * 200
    log = server.log_path.read_bytes()[log_start:].decode(errors="replace")
    records = dict(re.findall(r"request_id=(drop-\d+) .*?error=dropped .*?closed_by=(\w+)", log))
    assert sorted(records) == sorted(ids)
    assert set(records.values()) == {"peer"}


def _server_side_timer(server_port: int, client_port: int) -> tuple[int, float] | None:
    """(timer kind, seconds left) of the server's end of a loopback connection, from
    /proc/net/tcp (kind 2: the keepalive timer)."""
    for line in open("/proc/net/tcp").read().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            kind, when = fields[5].split(":")
            return int(kind, 16), int(when, 16) / os.sysconf("SC_CLK_TCK")
    return None


def test_accepted_sockets_have_tcp_keepalive(guarded):
    server, http = guarded
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        # The kernel lists the connection before the server accepts it and sets its options.
        port = s.getsockname()[1]
        timer = wait_for(lambda: (t := _server_side_timer(server.port, port)) and t[0] == 2 and t, timeout=10)
        assert timer, _server_side_timer(server.port, port)  # the keepalive timer runs
        assert 0 < timer[1] <= 30  # first probe after 30 s idle
    finally:
        s.close()
