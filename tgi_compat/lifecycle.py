"""Server lifecycle: health, engine failure, stalls and graceful shutdown.

- Engine death (its process gone, or vLLM's output loop failed): ``/health`` answers
  503 at once, in-flight requests end with a ``generation`` error (vLLM propagates the
  failure to every request), new ones get one too, and after ``engine_failure_grace``
  seconds the process exits non-zero so that an orchestrator restarts it (unless
  ``stay_up_on_engine_failure``).
- Stalls: the engine is alive but nothing has come out of it for ``stall_timeout``
  seconds while requests wait on it: ``/health`` answers 503 until output flows again.
- After a failed generation ``/health`` runs a real 1-token generation (with a timeout)
  before answering 200, as TGI's health check does.
- SIGTERM/SIGINT: stop admitting (new requests get a clear error, ``/health`` 503),
  let in-flight generations finish for up to ``shutdown_timeout`` seconds, then abort
  the rest (they end with an error event or response), shut the engine down, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import anyio
import uvicorn

from tgi_compat.engine import EngineRequest, Sampling

if TYPE_CHECKING:
    from tgi_compat.engine import EngineClient

logger = logging.getLogger("tgi_compat.lifecycle")


class Lifecycle:
    def __init__(
        self,
        *,
        shutdown_timeout: float,
        stall_timeout: float,
        probe_timeout: float,
        engine_failure_grace: float,
        stay_up_on_engine_failure: bool,
    ):
        self.shutdown_timeout = shutdown_timeout
        self.stall_timeout = stall_timeout
        self.probe_timeout = probe_timeout
        self.engine_failure_grace = engine_failure_grace
        self.stay_up = stay_up_on_engine_failure
        self.draining = False
        self.engine_dead = False
        self.exit_code = 0
        # Updated once per engine output (not per token) by the serving layer.
        self.last_progress = time.monotonic()
        self.generation_healthy = True
        self.server: uvicorn.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[str, object] = {}  # request id -> generation with .abort_reason
        self.engine: EngineClient | None = None

    # --- what the serving layer reports (the only ways it changes this object) ---

    def progress(self) -> None:
        """An engine output arrived (once per output, not per token)."""
        self.last_progress = time.monotonic()

    def generation_failed(self) -> None:
        """A generation failed in the engine: /health probes it before answering 200 again."""
        self.generation_healthy = False

    def attach(self, server: uvicorn.Server) -> None:
        """The server to stop when the engine dies."""
        self.server = server

    # --- in-flight registry (the serving layer registers each engine request) ---

    def register(self, request_id: str, generation) -> None:
        if not self._inflight:
            self.last_progress = time.monotonic()  # idle time is not a stall
        self._inflight[request_id] = generation

    def unregister(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    # --- start / engine watchdog ---

    def start(self, engine: EngineClient) -> None:
        self.engine = engine
        self._loop = asyncio.get_running_loop()
        self._spawn(self._watch_engine(engine))
        if engine.remote_engines > 0:  # headless engines on other nodes
            self._spawn(engine.watch_remote_engines())

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def _watch_engine(self, engine: EngineClient) -> None:
        while not engine.errored:
            await asyncio.sleep(0.1)
        self.engine_dead = True
        logger.error("the engine died; /health now answers 503")
        if self.stay_up:
            return
        logger.error("exiting with status 1 in %.1f s so the process can be restarted", self.engine_failure_grace)
        await asyncio.sleep(self.engine_failure_grace)
        self.exit_code = 1
        if self.server is not None:
            self.server.should_exit = True

    # --- health ---

    async def health_problem(self, engine: EngineClient) -> str | None:
        """None when healthy, else why not."""
        if self.engine_dead or engine.errored:
            return "engine dead"
        if self.draining:
            return "draining"
        if self._inflight and time.monotonic() - self.last_progress > self.stall_timeout:
            return "engine stalled"
        if not self.generation_healthy:
            if await self._probe(engine):
                self.generation_healthy = True
            else:
                return "health probe failed"
        return None

    async def _probe(self, engine: EngineClient) -> bool:
        request_id = f"health-{time.monotonic_ns()}"
        outputs = engine.generate(
            EngineRequest(request_id, [engine.tokenizer.eos_token_id or 0], Sampling(max_tokens=1))
        )
        try:
            with anyio.fail_after(self.probe_timeout):
                async for out in outputs:
                    if out.finished:
                        return True
            return False
        except Exception:
            return False
        finally:
            await outputs.aclose()
            if not engine.errored:
                await engine.abort(request_id)

    # --- graceful shutdown ---

    def begin_drain(self) -> None:
        """Called from the signal handler: switch to draining on the event loop."""
        if self.draining or self._loop is None:
            return
        self.draining = True
        self._loop.call_soon_threadsafe(lambda: self._spawn(self._drain()))

    async def _drain(self) -> None:
        logger.info("draining: %d generation(s) in flight, up to %.1f s", self.inflight, self.shutdown_timeout)
        deadline = time.monotonic() + self.shutdown_timeout
        while self._inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._inflight:
            logger.warning("shutdown timeout: ending %d generation(s) with an error", len(self._inflight))
            for generation in self._inflight.values():
                generation.abort_reason = "the server is shutting down"
            if self.engine is not None and not self.engine.errored:
                await self.engine.abort(list(self._inflight))


class Server(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT starting our drain before uvicorn's own."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle):
        super().__init__(config)
        self.lifecycle = lifecycle
        lifecycle.attach(self)

    def handle_exit(self, sig, frame) -> None:
        self.lifecycle.begin_drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets=sockets)
        # uvicorn re-raises the captured SIGTERM after serving, which would end the
        # process with -15; a completed drain is a clean exit (status 0), as in TGI.
        self._captured_signals.clear()
