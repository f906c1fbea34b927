"""Engine failure, engine stalls and graceful shutdown, each on a server of its own."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import httpx
import psutil
import pytest

from tests.conftest import ServerProcess

pytestmark = pytest.mark.engine

# Greedy decoding of this prompt does not hit EOS on the tiny model; 20-30 s of generation
# on a 2-core CPU at these batch sizes (the servers here use the model's full context), so
# it is still running when a test's clients were slow to start the rest of their requests.
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 8000}}


def engine_core(server: ServerProcess) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process")


def wait_for(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


class StreamReader(threading.Thread):
    """Reads one response to its end in the background (http.client: no per-thread
    client set-up, so many readers start at once)."""

    def __init__(self, url: str, body: dict, path: str = "/generate_stream"):
        super().__init__(daemon=True)
        self.host, self.port = url.removeprefix("http://").split(":")
        self.body, self.path = json.dumps(body), path
        self.chunks: list[bytes] = []
        self.status = None
        self.started = threading.Event()
        self.sent = threading.Event()  # the request is on the wire
        self.start()

    def run(self):
        conn = http.client.HTTPConnection(self.host, int(self.port), timeout=120)
        try:
            conn.request("POST", self.path, self.body, {"Content-Type": "application/json"})
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
        return [json.loads(e[5:]) for e in self.raw.rstrip(b"\n").split(b"\n\n") if e.startswith(b"data:")]


@pytest.fixture
def fault_server():
    server = ServerProcess(
        ["--health-stall-timeout", "2", "--engine-failure-grace", "2"],
        log_name="fault",
    )
    server.wait_ready()
    yield server
    server.stop(signal.SIGKILL)


def test_stalled_engine_makes_health_fail_until_it_recovers(fault_server):
    url = fault_server.url
    core = engine_core(fault_server)
    stream = StreamReader(url, {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1500}})
    assert stream.started.wait(30)
    core.suspend()  # alive, but makes no progress
    try:
        r = wait_for(lambda: (r := httpx.get(url + "/health", timeout=10)).status_code == 503 and r, timeout=6)
        assert r and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
        assert r.headers["x-health-problem"] == "engine stalled"
    finally:
        core.resume()
    assert wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 200, timeout=10)
    stream.join(60)
    assert stream.events()[-1]["generated_text"] is not None


def test_killed_engine_fails_requests_and_exits_nonzero(fault_server):
    url = fault_server.url
    streams = [StreamReader(url, LONG) for _ in range(3)]
    non_stream = StreamReader(url, LONG, path="/generate")
    for s in streams:
        assert s.started.wait(30)
    time.sleep(0.2)
    engine_core(fault_server).kill()
    killed = time.monotonic()
    assert wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 503, timeout=1.0)
    assert time.monotonic() - killed < 1.0
    for s in streams + [non_stream]:
        s.join(30)
    for s in streams:
        last = s.events()[-1]
        assert "error_type" in last, s.raw[-400:]
        assert last["error_type"] == "generation" and last["error"].startswith("Request failed during generation: ")
    assert non_stream.status == 424 and json.loads(non_stream.raw)["error_type"] == "generation"
    r = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 424 and r.json()["error"] == "Request failed during generation: the engine is not running"
    # Exits non-zero after the grace period, so an orchestrator restarts it.
    assert fault_server.proc.wait(30) == 1


def test_sigterm_drains_then_exits_zero():
    server = ServerProcess(["--shutdown-timeout", "3"], log_name="drain")
    try:
        server.wait_ready()
        url = server.url
        # The non-stream request goes first, so the server has read it by the time the
        # streams sent after it have started (a connection whose request was not read yet
        # is simply closed by the shutdown).
        non_stream = StreamReader(url, {"inputs": "hello", "parameters": {"max_new_tokens": 300}}, path="/generate")
        assert non_stream.sent.wait(30)
        long_streams = [StreamReader(url, LONG) for _ in range(2)]
        short_streams = [StreamReader(url, {"inputs": "hello", "parameters": {"max_new_tokens": 60}}) for _ in range(2)]
        for s in long_streams + short_streams:
            assert s.started.wait(30)
        os.kill(server.proc.pid, signal.SIGTERM)
        sent = time.monotonic()
        # No new requests are admitted once draining.
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):
            r = httpx.post(url + "/generate", json={"inputs": "x"}, timeout=5)
            assert r.status_code == 503  # only reached if a connection slipped in
            raise httpx.HTTPError("refused")
        # Short requests finish normally during the drain.
        for s in short_streams:
            s.join(30)
            assert s.events()[-1]["generated_text"] is not None
        non_stream.join(30)
        assert non_stream.status == 200 and "generated_text" in json.loads(non_stream.raw)
        # Long ones end with an error event once the shutdown timeout passes.
        for s in long_streams:
            s.join(30)
            last = s.events()[-1]
            assert last == {"error": "Request failed during generation: the server is shutting down", "error_type": "generation"}
        assert server.proc.wait(30) == 0
        assert time.monotonic() - sent < 3 + 15
    finally:
        server.stop(signal.SIGKILL)
