"""Fixtures of the socket tier: the real server process (``tgi_compat.server.run``) on the
scripted engine of ``tests/socket/scripted_server.py``, driven over real sockets.

``scripted`` is the session's shared one (the engine tier's main-server limits);
``module_scripted_server(*flags)`` starts one with a module's own flags. A ``ScriptedServer``
reads what reached the engine (``state()``: requests with their prompts and sampling, aborts,
closed iterators, live requests) and the metrics (from the --prometheus-port listener, outside
the connection cap), and waits on them with deadlines.
"""

from __future__ import annotations

import contextlib
import signal

import httpx
import pytest

from tests.conftest import MAX_CONCURRENT_REQUESTS, MAX_TOTAL_TOKENS, ServerProcess
from tests.helpers import metric_values, wait_for

# Importing vLLM's output classes (torch) and the tokenizer: 5-15 s here, more when several
# start at once on a loaded box; a deadline, not a wait.
STARTUP_TIMEOUT = 180


class ScriptedServer(ServerProcess):
    """``python -m tests.socket.scripted_server <flags>`` in its own process group."""

    def __init__(self, flags: list[str], env: dict[str, str] | None = None, log_name: str = "scripted"):
        super().__init__(list(flags), env=env, log_name=log_name, module="tests.socket.scripted_server")
        # No keep-alive: the harness's own requests leave no idle connection behind to be
        # evicted by (or to make room under) the connection-cap tests.
        self.http = httpx.Client(base_url=self.url, timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
        self.metrics_url = f"http://127.0.0.1:{self.prometheus_port}/metrics"

    def state(self) -> dict:
        return self.http.get("/_scripted/state").json()

    def aborted(self) -> set[str]:
        return set(self.state()["aborts"])

    def wait_state(self, predicate, timeout: float = 30) -> dict:
        """The engine's state once ``predicate(state)`` holds (asserted within ``timeout``)."""
        state = wait_for(lambda: (s := self.state()) and predicate(s) and s, timeout)
        assert state, f"engine state never matched: {self.state()}"
        return state

    def metrics(self) -> str:
        """The exposition from the --prometheus-port listener: outside the main port's
        connection cap, so it can be read while every main connection is busy."""
        return httpx.get(self.metrics_url, timeout=30).text

    def metric(self, name: str, labels: str = "") -> float:
        return metric_values(self.metrics(), name).get(labels, 0.0)

    def wait_metric(self, name: str, value: float, labels: str = "", timeout: float = 30) -> None:
        assert wait_for(lambda: self.metric(name, labels) == value, timeout), (name, labels, self.metric(name, labels))

    def wait_idle(self, timeout: float = 30) -> None:
        """No permit held and no engine request unfinished (asserted within ``timeout``)."""
        def idle():
            text = self.metrics()
            return (metric_values(text, "tgi_compat_permits_in_use").get("") == 0
                    and metric_values(text, "tgi_compat_engine_requests").get("") == 0)
        assert wait_for(idle, timeout), (self.metric("tgi_compat_permits_in_use"), self.state()["live"])

    def log(self, start: int = 0) -> str:
        return self.log_path.read_bytes()[start:].decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        self.http.close()
        return super().stop(sig, timeout)


@pytest.fixture(scope="module")
def module_scripted_server():
    """``module_scripted_server(*flags, env=None)`` → a ready ``ScriptedServer`` with a module's
    own configuration; killed after the module."""
    with contextlib.ExitStack() as stack:
        def start(*flags: str, env: dict[str, str] | None = None, log_name: str = "scripted") -> ScriptedServer:
            server = ScriptedServer(list(flags), env=env, log_name=log_name)
            stack.callback(server.stop, signal.SIGKILL)
            server.wait_ready(STARTUP_TIMEOUT)
            return server

        yield start


@pytest.fixture(scope="session")
def scripted():
    """The shared scripted server, configured as the engine tier's main server (limits,
    permits); tests that hold its permits leave it idle."""
    server = ScriptedServer(["--max-total-tokens", str(MAX_TOTAL_TOKENS),
                             "--max-concurrent-requests", str(MAX_CONCURRENT_REQUESTS)], log_name="scripted-main")
    try:
        server.wait_ready(STARTUP_TIMEOUT)
        yield server
    finally:
        server.stop(signal.SIGKILL)
