"""What several API processes (``--api-server-count``) share, on its own: the permit
counter across processes, and TGI's series written by each and rendered as one. The real
server with two API processes over vLLM's engines: tests/test_api_servers.py."""

from __future__ import annotations

import multiprocessing
from types import SimpleNamespace

import pytest

from tests.conftest import free_port
from tgi_compat.admission import SharedConcurrencyLimiter
from tgi_compat.config import ConfigError
from tgi_compat.errors import OverloadedError
from tgi_compat.launcher import parse_config
from tgi_compat.metrics import SharedStore, TGIMetrics
from tgi_compat.server import bind_socket, open_ports

CONTEXT = multiprocessing.get_context("spawn")  # what the supervisor uses


def test_shared_permits_are_one_cap_over_limiters():
    counter = CONTEXT.Value("q", 0)
    a, b = SharedConcurrencyLimiter(4, counter), SharedConcurrencyLimiter(4, counter)
    held = [a.try_acquire(), b.try_acquire(2)]
    assert a.in_use == b.in_use == 3
    with pytest.raises(OverloadedError):
        a.try_acquire(2)  # all of best_of's permits or none
    assert b.in_use == 3  # a refusal takes nothing
    held.append(b.try_acquire())  # exactly the cap: no false refusal
    with pytest.raises(OverloadedError):
        a.try_acquire()
    for permit in held:
        permit.release()
        permit.release()  # idempotent
    assert a.in_use == 0


def _contend(counter, peak, limit: int, rounds: int, seed: int) -> None:
    import random

    rng = random.Random(seed)
    limiter = SharedConcurrencyLimiter(limit, counter)
    for _ in range(rounds):
        try:
            permit = limiter.try_acquire(rng.choice((1, 2, 3)))
        except OverloadedError:
            continue
        seen = limiter.in_use
        with peak.get_lock():
            peak.value = max(peak.value, seen)
        permit.release()


def test_shared_permits_never_overshoot_across_processes():
    counter, peak = CONTEXT.Value("q", 0), CONTEXT.Value("q", 0)
    procs = [multiprocessing.get_context("fork").Process(target=_contend, args=(counter, peak, 5, 3000, i))
             for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert 0 < peak.value <= 5
    assert counter.value == 0  # every permit given back


def _sched(waiting: int, running: int, usage: float):
    return SimpleNamespace(num_waiting_reqs=waiting, num_running_reqs=running, kv_cache_usage=usage)


def _iteration(prompt_tokens: int, first_tokens: int):
    return SimpleNamespace(num_prompt_tokens=prompt_tokens, time_to_first_tokens_iter=[0.1] * first_tokens)


def _without(text: bytes, *names: str) -> list[str]:
    return [line for line in text.decode().splitlines() if not line.startswith(names)]


def test_two_processes_render_as_one(tmp_path):
    last_steps = CONTEXT.RawArray("d", 2)
    workers = [TGIMetrics(100, 200, store=SharedStore(str(tmp_path), i, last_steps)) for i in range(2)]
    one = TGIMetrics(100, 200)  # what one process would have seen of the same traffic
    for m in (*workers, one):
        m.set_engines(2, kv_capacity_tokens=2000)
    assert workers[1].merged().render() == one.render()
    # Requests, spread over the two processes.
    for i, (generated, err) in enumerate([(3, None), (7, None), (0, "validation"), (12, None), (0, "overloaded")]):
        for m in (workers[i % 2], one):
            m.request_count.inc()
            m.request_input_length.observe(5 + i)
            if err:
                m.request_failure.inc(err)
            else:
                m.success(validation=0.001 * i, queue=0.002, inference=0.05 * generated, total=0.06 * generated,
                          generated=generated)
    # Engine steps: a step's scheduler statistics reach one process (vLLM), its iteration
    # statistics every process with outputs in it; counted once.
    steps = [(0, 0, _sched(3, 5, 0.25), _iteration(10, 2)), (1, 1, _sched(1, 7, 0.5), _iteration(0, 0)),
             (1, 0, _sched(2, 6, 0.3), _iteration(4, 1)), (0, 1, _sched(0, 7, 0.5), _iteration(0, 0))]
    for receiver, engine, sched, iteration in steps:
        workers[receiver].engine_step(sched, iteration, engine)
        workers[1 - receiver].engine_step(None, iteration, engine)  # the same step, seen by the other
        one.engine_step(sched, iteration, engine)
    durations = ("tgi_batch_inference_duration", "tgi_batch_forward_duration")
    for m in workers:
        merged = m.merged()
        assert _without(merged.render(), *durations) == _without(one.render(), *durations)
        assert merged.render_engines() == one.render_engines()
        for family in ("batch_inference_duration", "batch_forward_duration"):  # as many steps timed
            assert ({k: v[2] for k, v in getattr(merged, family).values.items()}
                    == {k: v[2] for k, v in getattr(one, family).values.items()})
    text = workers[0].merged().render().decode()
    assert "tgi_request_count 5" in text and "tgi_request_success 3" in text
    assert 'tgi_batch_inference_count{method="prefill"} 2' in text and "tgi_queue_size 2" in text
    assert "tgi_batch_current_size 13" in text


def test_live_values_add_up_over_processes(tmp_path):
    a, b = (TGIMetrics(100, 200, store=SharedStore(str(tmp_path), i)) for i in range(2))
    a.publish_live({"engine_requests": 2, "connections_open": 3, "closed:send_timeout": 1})
    a.request_count.inc()
    assert b"tgi_request_count 1" in b.merged().render()  # live values are not series
    assert b.live_totals({"engine_requests": 1, "connections_open": 1, "closed:send_timeout": 0}) == {
        "engine_requests": 3, "connections_open": 4, "closed:send_timeout": 1}
    alone = TGIMetrics(100, 200)
    assert alone.live_totals({"engine_requests": 5}) == {"engine_requests": 5}


def test_api_server_count_flag():
    assert parse_config([])[0].api_server_count == 1  # today's one process
    assert parse_config(["--api-server-count", "3"])[0].api_server_count == 3
    assert parse_config([], {"API_SERVER_COUNT": "2"})[0].api_server_count == 2
    with pytest.raises(ConfigError, match="`api_server_count` must be > 0"):
        parse_config(["--api-server-count", "0"])
    with pytest.raises(ConfigError, match="--headless"):
        parse_config(["--api-server-count", "2", "--headless"])


def test_a_port_another_several_process_server_listens_on_is_refused():
    """Each API process listens with SO_REUSEPORT, which would also let a second such server
    share the port: the port is proven free with a plain bind first."""
    config = parse_config(["--hostname", "127.0.0.1", "--port", "0", "--prometheus-port", str(free_port()),
                           "--api-server-count", "2"])[0]
    first, metrics = open_ports(config)
    port = first.getsockname()[1]
    api_process = bind_socket("127.0.0.1", port, "--port", reuse_port=True, probe_free=False)  # as serve() binds
    api_process.listen()
    try:
        config = parse_config(["--hostname", "127.0.0.1", "--port", str(port), "--prometheus-port", "0",
                               "--api-server-count", "2"])[0]
        with pytest.raises(ConfigError, match=f"`--port {port}`: cannot listen on 127.0.0.1:{port}"):
            open_ports(config)
    finally:
        for sock in (first, metrics, api_process):
            sock.close()


# --- the supervisor's wait (tgi_compat/api_servers.py _wait), on stand-in processes ---------

FORK = multiprocessing.get_context("fork")


def _live(seconds: float, code: int) -> None:
    import os
    import time

    time.sleep(seconds)
    os._exit(code)


class _Engines:
    """Stands in for engine.SharedEngines: real processes, engines stopped on request."""

    def __init__(self, api: list, engine):
        self.api_processes, self.engine_processes, self.stopped = api, [engine], 0
        for p in (*api, engine):
            p.start()

    def stop_engines(self, timeout=None) -> None:
        self.stopped += 1
        for p in self.engine_processes:
            p.kill()


def _config():
    return parse_config(["--engine-failure-grace", "0.5", "--graceful-termination-timeout", "1"])[0]


def test_a_killed_api_process_stops_the_engines_and_the_exit_is_1():
    from tgi_compat.api_servers import _wait

    engines = _Engines([FORK.Process(target=_live, args=(60, 0)), FORK.Process(target=_live, args=(1.0, 1))],
                       FORK.Process(target=_live, args=(60, 0)))
    engines.api_processes[0].kill()  # SIGKILL, as the test tier does to a real one
    stopping: list[str] = []
    assert _wait(_config(), engines, stopping) == 1
    assert engines.stopped == 1 and stopping == ["failure"]
    assert not engines.engine_processes[0].is_alive()


def test_a_dead_engine_is_a_failure_and_a_drain_after_a_signal_is_not():
    from tgi_compat.api_servers import _wait

    engines = _Engines([FORK.Process(target=_live, args=(1.0, 1))], FORK.Process(target=_live, args=(0, 0)))
    assert _wait(_config(), engines, []) == 1 and engines.stopped == 1
    # After SIGTERM: API processes that drained and exited 0, and an engine that got the
    # signal too (sent to the process group), end in status 0.
    engines = _Engines([FORK.Process(target=_live, args=(0.3, 0)), FORK.Process(target=_live, args=(0.5, 0))],
                       FORK.Process(target=_live, args=(0.1, 0)))
    assert _wait(_config(), engines, ["signal"]) == 0 and engines.stopped == 0
