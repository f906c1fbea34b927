"""Front-end benchmark: tgi-compat against vLLM's own OpenAI server and the engine's
in-process ceiling, on the same model and engine flags, in one run.

    python benchmarks/bench.py                      # full run: c = 1, 16, 64, 256
    python benchmarks/bench.py --smoke              # seconds: keeps the harness working (CI)
    python benchmarks/bench.py --model-id embedded:smollm2 --concurrency 1,16 \
        --cells tgi_stream,vllm_stream --vllm-logprobs --results benchmarks/results/smollm2

Cells: (a) tgi-compat ``/generate_stream``, (b) tgi-compat ``/generate``, (c) vLLM's
``/v1/completions`` with ``stream: true``, (d) the engine in-process, no HTTP (the
ceiling), (e) ``front_end``: tgi-compat's ``/generate_stream`` over the tests' scripted
engine emitting tokens as fast as the front end takes them (no model: what one API
process can stream, its CPU per token). ``--api-servers N`` adds (f) tgi-compat with
``--api-server-count N`` and (g) vLLM's server with ``--api-server-count N``, same work. ``--model-id`` is served by every cell (default ``embedded:tiny``; an
``embedded:*`` id is built first and vLLM's server gets its directory). Every request
asks for exactly ``--tokens`` tokens: the prompt is one whose greedy continuation has no
EOS within 64 tokens on the tiny model and on SmolLM2, and vLLM's server also gets
``ignore_eos``. tgi-compat returns each token's logprob (TGI does); ``--vllm-logprobs``
asks vLLM's server for it too (``logprobs: 0``: the sampled token's), for the same work. Per cell: output tok/s, req/s, TTFT, TPOT, ITL and end-to-end latency
(p50/p99), errors, the API processes' CPU seconds per 1,000 streamed tokens, and the load
client's own CPU per 1,000 tokens (to show the client is not the bottleneck).

Writes ``benchmarks/results/latest.json``, ``latest.md`` (the ratio table) and
``latest.png`` (chart). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROMPT = "Once upon a time"  # greedy decoding of it does not hit EOS on the tiny model or SmolLM2
ENGINE_FLAGS = ["--max-model-len", "2048"]
MODEL_NAME = "tiny"
VLLM_LOGPROBS = False  # --vllm-logprobs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


class Stats:
    def __init__(self):
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.tpot: list[float] = []
        self.e2e: list[float] = []
        self.tokens = 0
        self.requests = 0
        self.errors = 0
        self.error_kinds: dict[str, int] = {}

    def add(self, start: float, stamps: list[float], tokens: int, end: float) -> None:
        self.requests += 1
        self.tokens += tokens
        self.e2e.append(end - start)
        if stamps:
            self.ttft.append(stamps[0] - start)
            self.itl.extend(b - a for a, b in zip(stamps, stamps[1:]))
            if tokens > 1:
                self.tpot.append((end - stamps[0]) / (tokens - 1))

    def summary(self, wall: float) -> dict:
        ms = lambda v: round(v * 1000, 2)  # noqa: E731
        return {
            "output_tok_s": round(self.tokens / wall, 1),
            "req_s": round(self.requests / wall, 2),
            "ttft_ms_p50": ms(_pct(self.ttft, 0.5)), "ttft_ms_p99": ms(_pct(self.ttft, 0.99)),
            "tpot_ms_p50": ms(_pct(self.tpot, 0.5)), "tpot_ms_p99": ms(_pct(self.tpot, 0.99)),
            "itl_ms_p50": ms(_pct(self.itl, 0.5)), "itl_ms_p99": ms(_pct(self.itl, 0.99)),
            "e2e_ms_p50": ms(_pct(self.e2e, 0.5)), "e2e_ms_p99": ms(_pct(self.e2e, 0.99)),
            "errors": self.errors, "error_kinds": self.error_kinds, "requests": self.requests, "tokens": self.tokens,
        }


# --- load clients (aiohttp, raw line reading: cheap per token) ---


async def _sse_request(session, url: str, body: dict, count_event) -> tuple[list[float], int]:
    stamps: list[float] = []
    tokens = 0
    async with session.post(url, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"status {r.status}")
        async for line in r.content:
            if not line.startswith(b"data:"):
                continue
            n = count_event(line)
            if n < 0:
                raise RuntimeError(line[:200].decode(errors="replace"))
            if n:
                now = time.perf_counter()
                stamps.extend([now] * n)
                tokens += n
    return stamps, tokens


def _tgi_event(line: bytes) -> int:
    """TGI streams: one event per token."""
    return -1 if line.startswith(b'data:{"error"') else 1


class _OpenAIEvents:
    """vLLM's completion stream: a chunk per engine output (several tokens when merged);
    the token count comes from the final usage chunk."""

    def __init__(self):
        self.completion_tokens = 0

    def __call__(self, line: bytes) -> int:
        payload = line[5:].strip()
        if payload == b"[DONE]":
            return 0
        if payload.startswith(b'{"error'):
            return -1
        if b'"usage":{' in payload or b'"usage": {' in payload:
            usage = json.loads(payload).get("usage")
            if usage:
                self.completion_tokens = usage["completion_tokens"]
                return 0
        return 1


async def _run_http(kind: str, url: str, concurrency: int, requests: int, tokens: int) -> Stats:
    stats = Stats()
    remaining = requests
    connector = aiohttp.TCPConnector(limit=concurrency + 8)
    timeout = aiohttp.ClientTimeout(total=600)

    async def worker(session):
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            start = time.perf_counter()
            try:
                if kind in ("tgi_stream", "tgi_stream_api", "front_end"):
                    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens}}
                    stamps, n = await _sse_request(session, url + "/generate_stream", body, _tgi_event)
                elif kind == "tgi_generate":
                    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens}}
                    async with session.post(url + "/generate", json=body) as r:
                        if r.status != 200:
                            raise RuntimeError(f"status {r.status}")
                        n = int(r.headers["x-generated-tokens"])
                        await r.read()
                    stamps = [time.perf_counter()]  # TTFT = the whole response for non-stream
                else:  # vLLM's OpenAI server
                    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
                            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                    if VLLM_LOGPROBS:
                        body["logprobs"] = 0
                    events = _OpenAIEvents()
                    stamps, _ = await _sse_request(session, url + "/v1/completions", body, events)
                    n = events.completion_tokens
                stats.add(start, stamps, n, time.perf_counter())
            except Exception as e:
                stats.errors += 1
                kind_name = f"{type(e).__name__}: {str(e)[:80]}"
                stats.error_kinds[kind_name] = stats.error_kinds.get(kind_name, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*[worker(session) for _ in range(concurrency)])
    return stats


# --- servers ---


class Server:
    """A server process in its own process group; ``wait_ready()`` before use."""

    def __init__(self, argv: list[str], port: int, health: str, name: str, env: dict | None = None):
        self.port, self.health, self.name = port, health, name
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(RESULTS / f"{name}.log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self._api: list[psutil.Process] | None = None

    def wait_ready(self) -> Server:
        import urllib.request

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited: see {self.log.name}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as r:
                    if r.status == 200:
                        return self
            except Exception:
                time.sleep(0.5)
        raise SystemExit(f"{self.name} did not start")

    def api_processes(self) -> list[psutil.Process]:
        """The server process and, with --api-server-count, the processes listening on its
        port (its API processes); the rest of its descendants are engines."""
        if self._api is None:
            me = psutil.Process(self.proc.pid)
            self._api = [me]
            for child in me.children(recursive=True):
                try:
                    if any(c.status == psutil.CONN_LISTEN and c.laddr.port == self.port
                           for c in child.net_connections("tcp")):
                        self._api.append(child)
                except psutil.Error:
                    pass
        return self._api

    def cpu_seconds(self) -> float:
        """The API processes' CPU, not the engines'."""
        return sum(t.user + t.system for t in (p.cpu_times() for p in self.api_processes()))

    def engine_cpu_seconds(self) -> float:
        api = self.api_processes()
        return _children_cpu(api[0]) - sum(t.user + t.system for t in (p.cpu_times() for p in api[1:]))

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)
        except Exception:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children_cpu(proc: psutil.Process) -> float:
    """CPU seconds of a process's descendants (vLLM's engine core and workers)."""
    total = 0.0
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _client_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def bench_http(kind: str, server: Server, levels: list[int], per_level, tokens: int) -> dict:
    out = {}
    asyncio.run(_run_http(kind, server.url, 2, 4, tokens))  # warm-up
    for c in levels:
        cpu0, client0, engine0 = server.cpu_seconds(), _client_cpu(), server.engine_cpu_seconds()
        t0 = time.perf_counter()
        stats = asyncio.run(_run_http(kind, server.url, c, per_level(c), tokens))
        wall = time.perf_counter() - t0
        s = stats.summary(wall)
        k = max(stats.tokens, 1) / 1000
        s["api_cpu_s_per_1k_tokens"] = round((server.cpu_seconds() - cpu0) / k, 4)
        s["client_cpu_s_per_1k_tokens"] = round((_client_cpu() - client0) / k, 4)
        s["engine_cpu_s_per_1k_tokens"] = round((server.engine_cpu_seconds() - engine0) / k, 4)
        out[str(c)] = s
        print(f"{kind:14} c={c:<4} {s['output_tok_s']:>9} tok/s  ttft p50 {s['ttft_ms_p50']:>8} ms  "
              f"api cpu/1k {s['api_cpu_s_per_1k_tokens']}  errors {s['errors']} {s['error_kinds'] or ''}", flush=True)
    return out


def bench_in_process(model: str, levels: list[int], per_level, tokens: int) -> dict:
    """The engine with no HTTP: the ceiling."""
    from vllm import AsyncEngineArgs, AsyncLLMEngine, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from tgi_compat.engine import build_engine_args

    args: AsyncEngineArgs = build_engine_args(model, ENGINE_FLAGS)
    engine = AsyncLLMEngine.from_engine_args(args)
    from transformers import AutoTokenizer

    prompt_ids = AutoTokenizer.from_pretrained(model)(PROMPT).input_ids
    out = {}

    async def run(c: int, n: int) -> Stats:
        stats = Stats()
        remaining = n
        counter = 0

        async def worker():
            nonlocal remaining, counter
            while remaining > 0:
                remaining -= 1
                counter += 1
                params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True,
                                        output_kind=RequestOutputKind.DELTA, detokenize=True)
                start = time.perf_counter()
                stamps: list[float] = []
                async for o in engine.generate({"prompt_token_ids": prompt_ids}, params, f"b{counter}"):
                    now = time.perf_counter()
                    stamps.extend([now] * len(o.outputs[0].token_ids))
                stats.add(start, stamps, len(stamps), time.perf_counter())

        await asyncio.gather(*[worker() for _ in range(c)])
        return stats

    async def main():
        await run(2, 4)
        me = psutil.Process()
        for c in levels:
            cpu0, engine0 = _client_cpu(), _children_cpu(me)
            t0 = time.perf_counter()
            stats = await run(c, per_level(c))
            s = stats.summary(time.perf_counter() - t0)
            k = max(stats.tokens, 1) / 1000
            # This process is the engine's client here (what the API process is for a server).
            s["api_cpu_s_per_1k_tokens"] = round((_client_cpu() - cpu0) / k, 4)
            s["engine_cpu_s_per_1k_tokens"] = round((_children_cpu(me) - engine0) / k, 4)
            out[str(c)] = s
            print(f"{'in_process':14} c={c:<4} {s['output_tok_s']:>9} tok/s  ttft p50 {s['ttft_ms_p50']:>8} ms", flush=True)

    asyncio.run(main())
    engine.shutdown()
    return out


def report(results: dict, levels: list[int], chart: bool) -> str:
    n = results.get("api_servers", 1)
    cells = [("tgi_stream", "tgi-compat /generate_stream"), ("tgi_generate", "tgi-compat /generate"),
             ("tgi_stream_api", f"tgi-compat /generate_stream, {n} API processes"),
             ("vllm_stream", "vLLM server /v1/completions stream"),
             ("vllm_stream_api", f"vLLM server stream, {n} API processes"),
             ("in_process", "engine in-process (ceiling)"),
             ("front_end", "tgi-compat /generate_stream, scripted engine (front-end ceiling)")]
    logprobs = "token logprobs on for both servers" if results.get("vllm_logprobs") else "token logprobs from tgi-compat only"
    lines = [f"Machine: {results['machine']}; model: {results.get('model_id', 'embedded:tiny')} ({results['tokens']} output "
             f"tokens, greedy, no EOS; {logprobs}; engine flags {' '.join(results['engine_flags'])}); vLLM {results['vllm']}.", "",
             "| cell | c | tok/s | × vLLM server | × ceiling | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | ITL p99 ms | e2e p50 ms | e2e p99 ms | API CPU s/1k tok | engine CPU s/1k tok | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, label in cells:
        for c in levels:
            s = results["cells"].get(key, {}).get(str(c))
            if not s:
                continue
            reference = "vllm_stream_api" if key.endswith("_api") else "vllm_stream"  # same number of API processes
            v = results["cells"].get(reference, {}).get(str(c), {}).get("output_tok_s")
            d = results["cells"].get("in_process", {}).get(str(c), {}).get("output_tok_s")
            ratio_v = f"{s['output_tok_s'] / v:.2f}" if v else "–"
            ratio_d = f"{s['output_tok_s'] / d:.2f}" if d else "–"
            lines.append(
                f"| {label} | {c} | {s['output_tok_s']} | {ratio_v} | {ratio_d} | {s['ttft_ms_p50']} | {s['ttft_ms_p99']} | "
                f"{s['tpot_ms_p50']} | {s['itl_ms_p99']} | {s['e2e_ms_p50']} | {s['e2e_ms_p99']} | "
                f"{s.get('api_cpu_s_per_1k_tokens', '–')} | {s.get('engine_cpu_s_per_1k_tokens', '–')} | {s['errors']} |"
            )
    table = "\n".join(lines)
    (RESULTS / "latest.md").write_text(table + "\n")
    if chart:
        try:
            import matplotlib
        except ImportError:  # the `bench` extra
            print("no chart: matplotlib is not installed (pip install '.[bench]')")
            return table

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for key, label in cells:
            ys = [results["cells"].get(key, {}).get(str(c), {}).get("output_tok_s") for c in levels]
            if any(ys):
                ax.plot(levels, ys, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"tgi-compat vs vLLM server vs engine ceiling ({results['machine']})")
        ax.legend()
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(RESULTS / "latest.png", dpi=110)
    return table


def main(argv: list[str] | None = None) -> int:
    global RESULTS, MODEL_NAME, VLLM_LOGPROBS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="1,16,64,256")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=4, help="requests per level = max(c x this, 16)")
    ap.add_argument("--cells", default="tgi_stream,tgi_generate,vllm_stream,in_process,front_end")
    ap.add_argument("--api-servers", type=int, default=1,
                    help="N > 1 adds the cells tgi_stream_api and vllm_stream_api: both servers with --api-server-count N")
    ap.add_argument("--min-requests", type=int, default=16, help="at least this many requests per level")
    ap.add_argument("--model-id", default="embedded:tiny", help="the model every cell serves (an embedded:* id or a path)")
    ap.add_argument("--vllm-logprobs", action="store_true",
                    help="vLLM's server returns each token's logprob too, as tgi-compat does (TGI's events carry it)")
    ap.add_argument("--smoke", action="store_true", help="c=1,4, few requests, no chart")
    ap.add_argument("--results", default=str(RESULTS), help="output folder")
    ap.add_argument("--engine-flags", default="",
                    help="more vLLM engine flags for every cell, e.g. '--data-parallel-size 2' "
                    "(on a one-NUMA-node CPU host also set VLLM_CPU_OMP_THREADS_BIND='0|1')")
    args = ap.parse_args(argv)
    ENGINE_FLAGS.extend(shlex.split(args.engine_flags))
    levels = [int(c) for c in args.concurrency.split(",")]
    tokens, mult = args.tokens, args.requests
    if args.smoke:
        levels, tokens, mult = [1, 4], 16, 2
    per_level = lambda c: max(c * mult, args.min_requests if not args.smoke else 4)  # noqa: E731
    cells = args.cells.split(",")
    if args.api_servers > 1 and args.cells == ap.get_default("cells"):
        cells += ["tgi_stream_api", "vllm_stream_api"]
    RESULTS = Path(args.results)
    RESULTS.mkdir(parents=True, exist_ok=True)

    from tgi_compat.config import build_embedded_model

    model = build_embedded_model(args.model_id) if args.model_id.startswith("embedded:") else args.model_id
    MODEL_NAME = args.model_id.removeprefix("embedded:").replace("/", "-")
    VLLM_LOGPROBS = args.vllm_logprobs
    import vllm

    results = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "vllm": vllm.__version__, "tokens": tokens, "levels": levels, "cells": {},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "engine_flags": ENGINE_FLAGS,
        "model_id": args.model_id, "vllm_logprobs": VLLM_LOGPROBS, "api_servers": args.api_servers,
    }

    def start_tgi(count: int = 1) -> Server:
        port = _free_port()
        return Server([sys.executable, "-m", "tgi_compat", "--hostname", "127.0.0.1", "--port", str(port),
                       "--prometheus-port", str(_free_port()), "--max-concurrent-requests", "1024", "--log-level", "warning",
                       "--model-id", args.model_id, "--api-server-count", str(count), *ENGINE_FLAGS],
                      port, "/health", f"tgi-compat-api{count}" if count > 1 else "tgi-compat")

    def start_vllm(count: int = 1) -> Server:
        port = _free_port()
        from tgi_compat.engine import build_engine_args

        kv = ["--kv-cache-memory-bytes", str(1 << 30)] if build_engine_args(model, ENGINE_FLAGS).kv_cache_memory_bytes else []
        return Server([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                       "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port), *kv, *ENGINE_FLAGS,
                       *(["--api-server-count", str(count)] if count > 1 else [])],
                      port, "/health", f"vllm-server-api{count}" if count > 1 else "vllm-server")

    def start_front_end() -> Server:
        # The tests' scripted engine inside our server process: no model, tokens as fast as
        # the front end takes them (SCRIPTED_STEP_SECONDS=0), so the API process is the limit.
        port = _free_port()
        return Server([sys.executable, "-m", "tests.socket.scripted_server", "--hostname", "127.0.0.1",
                       "--port", str(port), "--prometheus-port", str(_free_port()), "--max-concurrent-requests", "1024",
                       "--log-level", "warning"],
                      port, "/health", "front-end", env={"SCRIPTED_STEP_SECONDS": "0"})

    n = args.api_servers
    # (server, its cells), in the order they run.
    groups = [(lambda: start_tgi(), [c for c in ("tgi_stream", "tgi_generate") if c in cells]),
              (lambda: start_tgi(n), [c for c in ("tgi_stream_api",) if c in cells]),
              (lambda: start_vllm(), [c for c in ("vllm_stream",) if c in cells]),
              (lambda: start_vllm(n), [c for c in ("vllm_stream_api",) if c in cells]),
              (start_front_end, [c for c in ("front_end",) if c in cells])]
    groups = [(start, kinds) for start, kinds in groups if kinds]
    # A smoke run measures nothing, so every server starts at once (their starts are ~20 s
    # of CPU each, single-threaded mostly); a real run starts each alone, on an idle machine.
    started = [start() for start, _ in groups] if args.smoke else []
    try:
        if args.smoke and "in_process" in cells:  # while those start
            results["cells"]["in_process"] = bench_in_process(model, levels, per_level, tokens)
        for i, (start, kinds) in enumerate(groups):
            srv = (started[i] if started else start()).wait_ready()
            try:
                for kind in kinds:
                    results["cells"][kind] = bench_http(kind, srv, levels, per_level, tokens)
            finally:
                srv.stop()
    finally:
        for srv in started:
            srv.stop()
    if "in_process" in cells and not args.smoke:
        results["cells"]["in_process"] = bench_in_process(model, levels, per_level, tokens)
    (RESULTS / "latest.json").write_text(json.dumps(results, indent=2))
    print(report(results, levels, chart=not args.smoke))
    errors = sum(s["errors"] for cell in results["cells"].values() for s in cell.values())
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
