"""Clients that stop reading, trickle, idle or vanish cannot hold the server (the connection
guards of tgi_compat/connection.py): the real server process on the scripted engine, small
timeouts and caps, driven over raw sockets. What reached the engine and what was aborted is
read from the engine itself (``/_scripted/state``), not inferred from token counts."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import httpx
import pytest

from tests.helpers import dechunk, post, raw_socket, read_to_close, rst_close, wait_for

pytestmark = pytest.mark.socket

SEND_TIMEOUT = 5
READ_TIMEOUT = 3
MAX_CONNECTIONS = 16
MAX_CONCURRENT = 16  # = the connection cap: blocked generations can fill every connection
ROUNDS = 3  # the frozen/slow pair only: a test process descheduled for seconds reads nothing


@pytest.fixture(scope="module")
def guarded(module_scripted_server):
    return module_scripted_server(
        "--send-timeout", str(SEND_TIMEOUT), "--request-read-timeout", str(READ_TIMEOUT),
        "--max-connections", str(MAX_CONNECTIONS), "--max-concurrent-requests", str(MAX_CONCURRENT),
        "--max-total-tokens", "8192", log_name="guards",
    )


def dropped(server) -> float:
    return server.metric("tgi_request_failure", '{err="dropped"}')


def engine_ids(state: dict, marker: str) -> set[str]:
    """The engine request ids of the requests whose prompt carries ``marker``."""
    return {r["id"] for r in state["requests"] if marker in r["prompt"]}


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
    """Reads a stream steadily but slowly (4 KB every 100 ms: ~40 KB/s): the client's own pace."""

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


def test_frozen_reader_is_cut_while_a_slow_reader_completes(guarded):
    server = guarded
    log_start = server.log_path.stat().st_size
    disturbed = ""
    for n in range(ROUNDS):
        server.wait_idle()
        before = dropped(server)
        # 7,000 tokens with top-5 alternatives and details: megabytes of events (issue 16's case).
        frozen_body = {"inputs": f"frozen-{n}", "parameters": {"max_new_tokens": 7000, "top_n_tokens": 5, "details": True}}
        # ~200 KB of events: ~5 s at the slow reader's pace, longer than the send timeout.
        steady_body = {"inputs": f"steady-{n}", "parameters": {"max_new_tokens": 300, "top_n_tokens": 5, "details": True}}
        frozen = raw_socket(server.port, internet_like=True)
        start = time.monotonic()
        watch = StallWatch()
        post(frozen, "/generate_stream", frozen_body)  # and never read
        slow = SlowReader(server.port, steady_body)
        try:
            freed = wait_for(lambda: dropped(server) > before, timeout=SEND_TIMEOUT + 30)
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
        assert dropped(server) == before + 1
        server.wait_idle()
        # The engine request of the frozen reader was aborted; the slow reader's was not.
        state = server.state()
        (frozen_id,) = engine_ids(state, f"frozen-{n}")
        (steady_id,) = engine_ids(state, f"steady-{n}")
        assert frozen_id in state["aborts"] and steady_id not in state["aborts"]
        # From the request to the permit and engine request being freed: the server's
        # buffers fill (~100 KB), then send-timeout of no progress, then the abort.
        if elapsed <= SEND_TIMEOUT + 5:
            break
        disturbed = f"the frozen reader held its permit {elapsed:.1f} s (> send timeout + 5 s)"
    else:
        pytest.fail(f"every round was disturbed; the last: {disturbed}")
    log = server.log(log_start)
    assert "send timeout" in log and "closed_by=send_timeout" in log, log[-3000:]


def test_half_a_body_then_a_stall_gets_408_and_holds_nothing(guarded):
    server = guarded
    requests_before = len(server.state()["requests"])
    body = json.dumps({"inputs": "hello", "parameters": {"max_new_tokens": 5}}).encode()
    half = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    head_only = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    start = time.monotonic()
    half.sendall(f"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2])
    head_only.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\nContent-Le")
    # Meanwhile nothing is admitted: no permit, no engine request.
    server.wait_idle()
    for s in (half, head_only):
        answer = read_to_close(s)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
            "error": f"Request timeout: the request was not received within {READ_TIMEOUT} s",
            "error_type": "request_timeout",
        }
        s.close()  # read_to_close saw the server close it
    assert time.monotonic() - start < READ_TIMEOUT + 10
    assert server.metric("tgi_compat_connections_closed", '{reason="read_timeout"}') >= 2
    # Neither request ever reached the engine.
    assert len(server.state()["requests"]) == requests_before
    assert server.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_idle_connections_past_the_cap_leave_the_server_answering(guarded):
    server = guarded
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(2 * MAX_CONNECTIONS)]
    try:
        # New clients are served: the longest-idle connections make room.
        with httpx.Client(base_url=server.url, timeout=60) as fresh:
            for _ in range(3):
                r = fresh.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}})
                assert r.status_code == 200
        assert server.metric("tgi_compat_connections_closed", '{reason="idle_evicted"}') >= MAX_CONNECTIONS
        assert server.metric("tgi_compat_connections_open") <= MAX_CONNECTIONS
    finally:
        for s in idle:
            s.close()


def test_busy_connections_at_the_cap_get_503_overloaded(guarded):
    server = guarded
    server.wait_metric("tgi_compat_connections_open", 0)
    requests_before = len(server.state()["requests"])
    # Every connection busy (a generation in flight, blocked in the engine), none idle: no
    # timer can free one first, so the extra request meets the cap by construction.
    busy = []
    for i in range(MAX_CONNECTIONS):
        s = raw_socket(server.port, timeout=30)
        post(s, "/generate", {"inputs": f"busy-{i} [block]", "parameters": {"max_new_tokens": 2}})
        busy.append(s)
    try:
        server.wait_metric("tgi_compat_engine_requests", MAX_CONNECTIONS)
        extra = raw_socket(server.port, timeout=30)
        post(extra, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 2}})
        answer = read_to_close(extra)
        extra.close()
    finally:
        for s in busy:
            s.close()
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {
        "error": f"Server overloaded: all {MAX_CONNECTIONS} connections are busy", "error_type": "overloaded"}
    assert b"connection: close" in answer.lower()
    server.wait_idle()
    # The refused request never reached the engine; every busy one was aborted when its client left.
    state = server.state()
    new = [r for r in state["requests"][requests_before:]]
    assert sorted(r["prompt"] for r in new) == sorted(f"<s>busy-{i} [block]" for i in range(MAX_CONNECTIONS))
    assert {r["id"] for r in new} <= set(state["aborts"])
    assert server.http.post("/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}).status_code == 200


def test_200_disconnects_under_full_load_all_abort(guarded):
    server = guarded
    server.wait_idle()
    log_start = server.log_path.stat().st_size
    before = dropped(server)
    total, rids = 200, []
    for wave in range(0, total, MAX_CONCURRENT):
        socks = []
        for i in range(wave, min(wave + MAX_CONCURRENT, total)):  # every permit taken
            s = raw_socket(server.port)
            rid = f"drop-{i}"
            post(s, "/generate_stream" if i % 2 == 0 else "/generate",
                 {"inputs": f"{rid}. [block]", "parameters": {"max_new_tokens": 8000}}, rid)
            socks.append((s, i))
            rids.append(rid)
        server.wait_metric("tgi_compat_engine_requests", len(socks))
        for s, i in socks:
            if i % 2 == 0:
                assert s.recv(4096).startswith(b"HTTP/1.1 200")
            rst_close(s)  # vanish
        server.wait_idle()
    assert dropped(server) - before == total
    # Every one of them reached the engine and was aborted there (they never end otherwise).
    state = server.state()
    mine = {r["id"] for r in state["requests"] if r["prompt"].startswith("<s>drop-")}
    assert len(mine) == total
    assert mine <= set(state["aborts"])
    log = server.log(log_start)
    records = {}
    for line in log.splitlines():
        if "error=dropped" in line and "request_id=drop-" in line:
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            records[fields["request_id"]] = fields.get("closed_by")
    assert sorted(records) == sorted(rids)
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
    server = guarded
    s = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        # The kernel lists the connection before the server accepts it and sets its options.
        port = s.getsockname()[1]
        timer = wait_for(lambda: (t := _server_side_timer(server.port, port)) and t[0] == 2 and t, timeout=10)
        assert timer, _server_side_timer(server.port, port)  # the keepalive timer runs
        assert 0 < timer[1] <= 30  # first probe after 30 s idle
    finally:
        s.close()
