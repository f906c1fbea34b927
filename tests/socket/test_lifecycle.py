"""Engine stalls, engine death and graceful shutdown on the real server process (uvicorn,
lifespan, signal handling, exit codes) over the scripted engine: each request's script says
when it blocks, stalls or finishes, so every phase is reached by a condition, not by timing.
(Death by killing vLLM's own process stays with the real engine: tests/test_lifecycle.py.)"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.helpers import StreamReader, wait_for
from tests.socket.conftest import STARTUP_TIMEOUT, ScriptedServer

pytestmark = pytest.mark.socket

GENERATION_ERROR = "Request failed during generation: "


@pytest.fixture(scope="module")
def servers():
    """Each test's own server (each one ends it), all started at once: their start-ups
    (importing vLLM's output classes) overlap instead of adding up."""
    started = {
        "stall": ScriptedServer(["--health-stall-timeout", "1"], log_name="stall"),
        "death": ScriptedServer(["--engine-failure-grace", "1"], log_name="death"),
        "drain": ScriptedServer(["--shutdown-timeout", "2"], log_name="drain"),
    }
    try:
        yield started
    finally:
        for server in started.values():
            server.stop(signal.SIGKILL)


def ready(server: ScriptedServer) -> ScriptedServer:
    server.wait_ready(STARTUP_TIMEOUT)
    return server


def test_stalled_engine_makes_health_fail_until_it_recovers(servers):
    server = ready(servers["stall"])
    url = server.url
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    # One token, then the engine makes no progress until released.
    stream = StreamReader(url, {"inputs": "[stall]", "parameters": {"max_new_tokens": 50}})
    assert stream.started.wait(30)
    r = wait_for(lambda: (r := httpx.get(url + "/health", timeout=10)).status_code == 503 and r, timeout=30)
    assert r and r.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert r.headers["x-health-problem"] == "engine stalled"
    assert stream.is_alive()  # still waiting on the stalled engine
    server.http.post("/_scripted/release")
    assert wait_for(lambda: httpx.get(url + "/health", timeout=10).status_code == 200, timeout=30)
    stream.join(60)
    last = stream.events()[-1]
    assert last["generated_text"] is not None and last["index"] == 50


def test_dead_engine_fails_requests_and_exits_nonzero(servers):
    server = ready(servers["death"])
    url = server.url
    streams = [StreamReader(url, {"inputs": f"[block] {i}", "parameters": {"max_new_tokens": 100}}) for i in range(3)]
    non_stream = StreamReader(url, {"inputs": "[block] n", "parameters": {"max_new_tokens": 100}}, path="/generate")
    for s in streams:
        assert s.started.wait(30)
    server.wait_metric("tgi_compat_engine_requests", 4)
    server.http.post("/_scripted/die")
    # /health reads the engine's own state: 503 at once, not after the watchdog's poll.
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 503 and r.headers["x-health-problem"] == "engine dead"
    for s in streams + [non_stream]:
        s.join(30)
        assert not s.is_alive()
    for s in streams:
        last = s.events()[-1]
        assert last["error_type"] == "generation" and last["error"].startswith(GENERATION_ERROR), s.raw[-400:]
    assert non_stream.status == 424 and non_stream.events() == [] and b'"error_type":"generation"' in non_stream.raw
    r = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 424 and r.json()["error"] == GENERATION_ERROR + "the engine is not running"
    # Exits non-zero after the grace period, so an orchestrator restarts it.
    assert server.proc.wait(30) == 1


def test_sigterm_drains_then_exits_zero(servers):
    server = ready(servers["drain"])
    url = server.url
    # [drain]: in flight at SIGTERM, finishing during the drain; [block]: never finishing.
    # The non-stream request goes first and is in the engine before the streams are sent.
    non_stream = StreamReader(url, {"inputs": "[drain] n", "parameters": {"max_new_tokens": 300}}, path="/generate")
    server.wait_metric("tgi_compat_engine_requests", 1)
    long_streams = [StreamReader(url, {"inputs": f"[block] {i}", "parameters": {"max_new_tokens": 8000}}) for i in range(2)]
    short_streams = [StreamReader(url, {"inputs": f"[drain] {i}", "parameters": {"max_new_tokens": 60}}) for i in range(2)]
    for s in long_streams + short_streams:
        assert s.started.wait(30)
    server.wait_metric("tgi_compat_engine_requests", 5)
    log_start = server.log_path.stat().st_size
    os.kill(server.proc.pid, signal.SIGTERM)
    sent = time.monotonic()
    assert wait_for(lambda: "draining: 5 generation(s) in flight" in server.log(log_start), timeout=30), server.log(log_start)

    # No new request is admitted once draining: refused at connect, or answered 503.
    try:
        r = httpx.post(url + "/generate", json={"inputs": "x"}, timeout=5)
    except httpx.TransportError:
        pass
    else:
        assert r.status_code == 503, r.text
    # Requests in flight finish normally during the drain.
    for s in short_streams:
        s.join(30)
        last = s.events()[-1]
        assert last["generated_text"] is not None and last["index"] == 60
    non_stream.join(30)
    assert non_stream.status == 200 and non_stream.raw.startswith(b'{"generated_text":')
    # The ones still running when the shutdown timeout passes end with an error event.
    for s in long_streams:
        s.join(30)
        assert s.events()[-1] == {"error": GENERATION_ERROR + "the server is shutting down", "error_type": "generation"}
    assert server.proc.wait(30) == 0
    assert time.monotonic() - sent < 2 + 15
    assert "shutdown timeout: ending 2 generation(s) with an error" in server.log(log_start)
