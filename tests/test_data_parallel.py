"""Data parallel on vLLM's own machinery: one front end over several engines, on one node
(``--data-parallel-size 2``) and across nodes (a headless engine process on loopback, as a
second node would run it). Every engine is a real vLLM engine on the tiny model.

On a CPU host vLLM binds each engine's OpenMP threads to cores; with one NUMA node its
automatic binding cannot give two engines cores of their own, so the engines are bound
explicitly with vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` (one core each here).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys

import httpx
import psutil
import pytest

from tests.conftest import EAGER, ROOT, ServerProcess, free_port, metric, wait_idle
from tests.helpers import PausedEngines, StreamReader, api_processes, wait_for

# Two engines start in 30-40 s here (each on one core), in under a minute on a busy host.
pytestmark = [pytest.mark.topology, pytest.mark.timeout(600)]

MAX_TOTAL = "8192"
CAP = 8
# Greedy on the tiny model, eager (EAGER), runs ~1,400 tokens before EOS: the tests act on
# these streams within a few 0.1 s bursts of PausedEngines (tens of tokens each).
LONG = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 6000}}
LONGEST = {"inputs": LONG["inputs"], "parameters": {"max_new_tokens": int(MAX_TOTAL) - 100}}


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _bind(cores: str) -> dict[str, str]:
    return {"VLLM_CPU_OMP_THREADS_BIND": cores} if _on_cpu() else {}


def per_engine(text: str, name: str, **labels: str) -> dict[str, float]:
    """engine label -> value, summed over the other labels (filtered by ``labels``)."""
    out: dict[str, float] = {}
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(got.get(k) == v for k, v in labels.items()):
            out[got["engine"]] = out.get(got["engine"], 0) + float(m.group(2))
    return out


def plain(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _api_pids(server: ServerProcess) -> tuple[int, ...]:
    pids = tuple(p.pid for p in api_processes(server.proc.pid, server.port))
    assert len(pids) == 2
    return pids


def engine_process(server: ServerProcess, rank: int) -> psutil.Process:
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        if f"EngineCore_DP{rank}" in child.name() or f"EngineCore_DP{rank}" in " ".join(child.cmdline()):
            return child
    names = [c.name() for c in psutil.Process(server.proc.pid).children(recursive=True)]
    raise AssertionError(f"no engine process for DP rank {rank} among {names}")


async def _burst(url: str, n: int, max_new_tokens: int = 8) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        return await asyncio.gather(*(
            c.post("/generate", json={"inputs": f"spread {i}", "parameters": {"max_new_tokens": max_new_tokens}})
            for i in range(n)
        ))


# --- one node ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dp_server():
    """Two engines under two API processes (--api-server-count 2: each process a client of
    both engines, vLLM's balancer in each); the headless tests below keep one front end."""
    server = ServerProcess(
        ["--max-total-tokens", MAX_TOTAL, "--max-concurrent-requests", str(CAP), "--shutdown-timeout", "3",
         "--data-parallel-size", "2", "--api-server-count", "2", *EAGER],
        env=_bind("0|1"),
        log_name="dp",
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(signal.SIGKILL)


def test_every_route_serves_and_each_engines_work_is_counted_once(dp_server):
    url = dp_server.url
    with httpx.Client(base_url=url, timeout=120) as c:
        before = c.get("/metrics").text
        assert c.get("/info").json()["max_total_tokens"] == int(MAX_TOTAL)
        assert c.post("/tokenize", json={"inputs": "hello"}).status_code == 200
        assert c.post("/", json={"inputs": "a", "parameters": {"max_new_tokens": 3}}).status_code == 200
        stream = c.post("/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 3}})
        assert stream.status_code == 200 and stream.text.count("data:") == 3
        chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3
        comp = c.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3})
        assert comp.status_code == 200 and len(comp.json()["choices"]) == 2
        # So far one connection, so one API process (one engine client) had requests.
        middle = c.get("/metrics").text
        responses = asyncio.run(_burst(url, CAP))  # a connection each: both API processes
        assert [r.status_code for r in responses] == [200] * CAP
        after = c.get("/metrics").text

    def delta(name, start=before, end=after, **labels):
        b, a = per_engine(start, name, **labels), per_engine(end, name, **labels)
        return {e: a[e] - b.get(e, 0) for e in a}

    def steps_counted(start, end) -> tuple[float, float]:
        """(TGI's batch steps, vLLM's iteration histogram count) between two scrapes."""
        ours = sum(plain(end, f'tgi_batch_inference_count{{method="{m}"}}')
                   - plain(start, f'tgi_batch_inference_count{{method="{m}"}}') for m in ("prefill", "decode"))
        return ours, sum(delta("vllm:iteration_tokens_total_count", start, end).values())

    # vLLM's front end balanced the requests over both engines.
    finished = delta("vllm:request_success_total")
    assert set(finished) == {"0", "1"} and min(finished.values()) >= 2, finished
    # TGI's series count each engine's work exactly once.
    generations = 1 + 1 + 1 + 2 + CAP
    assert plain(after, "tgi_request_success") - plain(before, "tgi_request_success") == generations
    generated = delta("vllm:generation_tokens_total")
    assert plain(after, "tgi_request_generated_tokens_sum") - plain(before, "tgi_request_generated_tokens_sum") == sum(generated.values())
    # Each engine step once. vLLM's iteration histogram is observed by every client that got
    # outputs in a step, so it counts steps exactly only while one client had requests.
    ours, steps = steps_counted(before, middle)
    assert ours == steps, (ours, steps)
    # With both clients in flight, vLLM counts a step twice when both got outputs from it:
    ours, observed = steps_counted(middle, after)
    assert 8 <= ours <= observed <= 2 * ours, (ours, observed)  # 8 tokens a request: 8 steps at least
    # Capacity: both engines' KV blocks (vLLM's cache_config_info sums them too).
    info = re.search(r'^vllm:cache_config_info\{([^}]*)\}', after, re.M).group(1)
    blocks, size = (int(re.search(rf'{k}="(\d+)"', info).group(1)) for k in ("num_gpu_blocks", "block_size"))
    assert plain(after, "tgi_batch_max_total_tokens") == blocks * size
    for gauge in ("tgi_compat_engine_queue_size", "tgi_compat_engine_batch_size", "tgi_compat_engine_kv_cache_usage"):
        assert set(per_engine(after, gauge)) == {"0", "1"}, gauge


def _send_raw_stream(port: int, body: dict) -> socket.socket:
    """A /generate_stream request sent on a raw socket (its answer is left unread)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"POST /generate_stream HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _all_running(text: str) -> bool:
    running, queued = per_engine(text, "tgi_compat_engine_batch_size"), per_engine(text, "tgi_compat_engine_queue_size")
    return sum(running.values()) + sum(queued.values()) == CAP and min(running.values(), default=0) > 0


def test_gauges_admission_and_disconnects_across_engines(dp_server):
    url = dp_server.url
    # Two engines spinning on this 2-core host starve the front end (it can go 30 s without
    # answering /metrics while they run): the engines run in short bursts and are paused
    # (SIGSTOP) whenever the test reads the front end, so every read sees a front end that
    # has caught up, and no stream can run to its end (8,092 steps) before it is checked.
    socks: list[socket.socket] = []
    with PausedEngines(dp_server.proc.pid, exclude=_api_pids(dp_server)) as engines:
        try:
            socks += [_send_raw_stream(dp_server.port, LONGEST) for _ in range(CAP)]
            with httpx.Client(base_url=url, timeout=60) as c:
                # Admitted and handed to the engines (the front end alone, the engines paused).
                assert wait_for(lambda: metric(c, "tgi_compat_engine_requests") == CAP, timeout=30)
                seen = {"text": ""}

                def every_stream_running() -> bool:  # read with the engines stopped, after a burst
                    seen["text"] = wait_for(lambda: _all_running(t := c.get("/metrics").text) and t, timeout=2) or seen["text"]
                    return _all_running(seen["text"])

                assert engines.run_until(every_stream_running, rounds=100), seen["text"][:3000]
                text = seen["text"]
            running = per_engine(text, "tgi_compat_engine_batch_size")
            usage = per_engine(text, "tgi_compat_engine_kv_cache_usage")
            queued = per_engine(text, "tgi_compat_engine_queue_size")
            # Both engines run requests; TGI's gauges are their sums; vLLM's agree per engine.
            assert min(running.values()) > 0 and min(usage.values()) > 0, (running, usage)
            assert sum(running.values()) + sum(queued.values()) == CAP
            assert plain(text, "tgi_batch_current_size") == sum(running.values())
            assert plain(text, "tgi_queue_size") == sum(queued.values())
            assert per_engine(text, "vllm:num_requests_running") == running
            assert per_engine(text, "vllm:kv_cache_usage_perc") == usage
            capacity = plain(text, "tgi_batch_max_total_tokens") / 2
            assert plain(text, "tgi_batch_current_max_tokens") == round(sum(usage.values()) * capacity)
            # Admission: the cap counts generations on every engine.
            r = httpx.post(url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=60)
            assert r.status_code == 429 and r.json()["error_type"] == "overloaded"
        finally:
            # The clients vanish mid-stream while the engines are still paused: the front end,
            # no longer starved, sees the disconnects before the engines can run any stream to
            # its end (running, they outpace the starved front end by thousands of tokens).
            for sock in socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            with httpx.Client(base_url=url, timeout=60) as c:
                wait_idle(c, timeout=30)  # the drops are recorded and the permits released
    with httpx.Client(base_url=url, timeout=60) as c:
        # Each request is aborted in whichever engine ran it.
        assert wait_idle(c, timeout=60) == (0, 0)
        assert wait_for(lambda: per_engine(c.get("/metrics").text, "vllm:num_requests_running") == {"0": 0, "1": 0}, timeout=20)
        assert plain(c.get("/metrics").text, 'tgi_request_failure{err="dropped"}') >= CAP


def test_drain_finishes_every_engines_requests_then_exits_zero(dp_server):
    url = dp_server.url
    # The engines run in bursts (PausedEngines) until every stream has started; after the
    # SIGTERM, until the short streams have finished; then they stay stopped, so the long
    # streams cannot reach their end (CI once saw one finish inside the 3 s drain) and the
    # drain's deadline ends them with the in-band error.
    with PausedEngines(dp_server.proc.pid, exclude=_api_pids(dp_server)) as engines:
        short = [StreamReader(url, {"inputs": f"drain {i}", "parameters": {"max_new_tokens": 40}}) for i in range(4)]
        long = [StreamReader(url, LONG) for _ in range(2)]
        assert engines.run_until(lambda: all(s.started.is_set() for s in short + long))
        os.kill(dp_server.proc.pid, signal.SIGTERM)
        assert engines.run_until(lambda: not any(s.is_alive() for s in short))
        assert wait_for(lambda: not any(s.is_alive() for s in long), timeout=30)
    for s in short:
        assert s.events()[-1]["generated_text"] is not None, s.raw[-400:]
    for s in long:
        assert s.events()[-1] == {
            "error": "Request failed during generation: the server is shutting down", "error_type": "generation"}
    assert dp_server.proc.wait(60) == 0


# --- across nodes (loopback) ------------------------------------------------------------


class HeadlessNode:
    """`tgi-compat --headless`: DP rank 1's engine, joining the front end as a second node would."""

    def __init__(self, rpc_port: int, log_path):
        self._log = open(log_path, "wb")
        self.log_path = log_path
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tgi_compat", "--headless", "--max-total-tokens", MAX_TOTAL,
             "--data-parallel-size", "2", "--data-parallel-size-local", "1", "--data-parallel-start-rank", "1",
             "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port), *EAGER],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **_bind("1")},
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        # SIGKILL is final, but a process blocked in the kernel (this machine's disk stalls
        # for seconds at times) is reaped only when it returns: 30 s was once not enough.
        self.proc.wait(120)
        self._log.close()


@pytest.fixture(scope="module")
def two_nodes():
    rpc = free_port()
    front = ServerProcess(
        ["--max-total-tokens", MAX_TOTAL, "--engine-failure-grace", "60", *EAGER,
         "--data-parallel-size", "2", "--data-parallel-size-local", "1",
         "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc)],
        env=_bind("0"),
        log_name="dp-front",
    )
    headless = HeadlessNode(rpc, front.log_path.with_name(f"dp-headless-{front.port}.log"))
    try:
        try:
            front.wait_ready()
        except RuntimeError as e:
            raise RuntimeError(f"{e}\nheadless node:\n{headless.log_path.read_text()[-3000:]}") from None
        yield front, headless
    finally:
        front.stop(signal.SIGKILL)
        headless.kill()


def test_requests_spread_over_the_front_end_and_the_headless_node(two_nodes):
    front, _ = two_nodes
    before = httpx.get(front.url + "/metrics", timeout=30).text
    assert [r.status_code for r in asyncio.run(_burst(front.url, 12))] == [200] * 12
    after = httpx.get(front.url + "/metrics", timeout=30).text
    b, a = per_engine(before, "vllm:request_success_total"), per_engine(after, "vllm:request_success_total")
    finished = {e: a[e] - b.get(e, 0) for e in a}
    assert set(finished) == {"0", "1"} and min(finished.values()) >= 2, finished
    assert plain(after, "tgi_request_success") - plain(before, "tgi_request_success") == 12


def test_killing_the_headless_node_fails_health_and_in_flight_requests(two_nodes):
    front, headless = two_nodes
    assert httpx.get(front.url + "/health", timeout=30).status_code == 200
    # Both nodes' engines run in bursts until every stream has started, and the headless
    # node dies while they are stopped: no stream can run to its end before the kill (busy
    # engines starve the front end and the test on this host).
    # A stream on the headless node's engine can never finish once the node is gone (one
    # on the local engine may, before the front end has declared the engines dead: CI once
    # had all four streams on the local engine). The streams start one at a time, so vLLM's
    # balancer sees each engine's load, until the headless engine runs one.
    def on_headless() -> bool:
        text = httpx.get(front.url + "/metrics", timeout=30).text
        return per_engine(text, "tgi_compat_engine_batch_size").get("1", 0) > 0

    with PausedEngines(front.proc.pid, headless.proc.pid) as engines:
        streams: list[StreamReader] = []
        for _ in range(8):
            streams.append(StreamReader(front.url, LONGEST))
            assert engines.run_until(lambda: all(s.started.is_set() for s in streams))
            if len(streams) >= 2 and on_headless():
                break
        assert on_headless(), "no stream reached the headless node's engine"
        in_flight = [s for s in streams if s.is_alive()]
        headless.kill()  # the whole node goes away
    assert in_flight, "every stream ended before the kill"
    assert wait_for(lambda: httpx.get(front.url + "/health", timeout=30).status_code == 503, timeout=30, interval=0.2)
    failed, finished = [], []
    for s in in_flight:
        s.join(60)
        last = s.events()[-1]
        # A stream whose last token was generated as the node died may still finish (its
        # final event); every other one ends with TGI's in-band generation error.
        (failed if last.get("error_type") == "generation" else finished).append(last)
        assert last.get("error_type") == "generation" or last.get("generated_text") is not None, s.raw[-400:]
    assert failed, f"no in-flight stream failed: {[f.get('index') for f in finished]}"
    r = httpx.post(front.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 424 and r.json()["error_type"] == "generation"
