"""Engine death by killing vLLM's own engine process, on the shared LoRA server (run last in
the engine tier: conftest.ENDS_SHARED_SERVER), whose two API processes
(--api-server-count 2) both see it. Stalls, scripted engine death and the SIGTERM drain are
the socket tier's (tests/socket/test_lifecycle.py)."""

from __future__ import annotations

import json
import os
import time

import httpx
import psutil
import pytest

from tests.conftest import LORA_MAX_TOTAL_TOKENS, ServerProcess
from tests.helpers import PausedEngines, StreamReader, api_processes, connection_owner, metric_values, wait_for

pytestmark = pytest.mark.engine

# Greedy decoding of this prompt runs for 1,407 tokens on the tiny model run eager (8,000+
# compiled), so these streams end at max_new_tokens: the engine-death test kills the engine
# within a few 0.1 s bursts of PausedEngines (tens of tokens each), long before that.
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": LORA_MAX_TOTAL_TOKENS - 16}}


def metric(url: str, name: str) -> float:
    return metric_values(httpx.get(url + "/metrics", timeout=30).text, name).get("", 0.0)


def engine_core(server: ServerProcess) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError("no EngineCore process")


def test_killed_engine_fails_requests_and_exits_nonzero(lora_server_process):
    fault_server = lora_server_process
    url = fault_server.url
    # The engine spinning at full speed starves the front end for seconds, long enough for
    # a stream to run its 8,000 tokens before the test gets to the kill (seen in CI). So the
    # engine runs in 0.1 s bursts (SIGSTOP between them) until every stream has its first
    # token and the non-stream request is in the engine (PausedEngines); the engine core
    # dies while stopped.
    workers = api_processes(fault_server.proc.pid, fault_server.port)
    assert len(workers) == 2
    with PausedEngines(fault_server.proc.pid, exclude=tuple(p.pid for p in workers)) as engines:
        streams = [StreamReader(url, LONG) for _ in range(3)]
        non_stream = StreamReader(url, LONG, path="/generate")
        assert non_stream.sent.wait(30) and all(s.sent.wait(30) for s in streams)
        assert engines.run_until(
            lambda: all(s.started.is_set() for s in streams) and metric(url, "tgi_compat_engine_requests") == 4,
            rounds=100), ([s.started.is_set() for s in streams], metric(url, "tgi_compat_engine_requests"))
        # Requests in flight in both API processes (a stream is re-sent until one lands on
        # each: the kernel picks the process per connection).
        owners = {connection_owner(workers, s.local_port) for s in streams + [non_stream]}
        assert owners == {p.pid for p in workers} or _spread(url, workers, streams, engines)
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
    # Exits non-zero after the grace period (--engine-failure-grace, 5 s), so an orchestrator
    # restarts it; nothing of it is left behind.
    assert fault_server.proc.wait(30) == 1
    assert wait_for(lambda: not _group_alive(fault_server.proc.pid), timeout=30), "engine processes left behind"


def _spread(url, workers, streams, engines) -> bool:
    """Adds streams (up to the LoRA server's cap) until both API processes hold one."""
    for _ in range(4):
        s = StreamReader(url, LONG)
        assert engines.run_until(lambda: s.started.is_set())
        streams.append(s)
        if {connection_owner(workers, x.local_port) for x in streams} == {p.pid for p in workers}:
            return True
    return False


def _group_alive(pgid: int) -> bool:
    """Whether any process is left in the server's process group."""
    return any(p.info["pid"] != pgid and _pgid(p.info["pid"]) == pgid for p in psutil.process_iter(["pid"]))


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
