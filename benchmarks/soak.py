"""Bounded load-and-soak run against tgi-compat: far over its cap, with a mix of streams,
non-streams, client disconnects and bad requests.

    python benchmarks/soak.py --requests 10000 --cap 16 --multiplier 10
    python benchmarks/soak.py --requests 0 --duration 3600 --out benchmarks/results/soak   # 60 min
    python benchmarks/soak.py --url http://127.0.0.1:8080 --pid PID --cap 128 --duration 60

Without ``--url`` it starts its own server (the embedded tiny model) with
``--max-concurrent-requests CAP``. Loopback only; it stops by itself after ``--requests``
requests (0: no limit) or ``--duration`` seconds, whichever comes first. It prints what it
sent and how each ended, server errors (5xx: must be 0), leaked concurrency slots and
unfinished engine requests after the run (must be 0), and the server's RSS before and after.

Every ``--sample-every`` seconds it records the API process's and the engine processes'
RSS, their open file descriptors, open connections, permits in use and engine requests
(``OUT.csv``, plotted to ``OUT.png`` with matplotlib, the ``bench`` extra); RSS growth is
judged from ``--warmup`` seconds to the end (must stay under 5%).

Disconnects: each client that vanishes mid-request (RST) sends its own ``x-request-id`` and
notes when it closed; the server's log (when the soak started the server) says how each of
those requests ended: aborted as ``dropped`` (and when), finished anyway, or refused before
the close. The share aborted within 1 s of the close is printed (must be >= 99%).
Exit status 1 if any of the must-be-zero figures is not.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime as dt
import itertools
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
OVERLOADED = b'"error_type":"overloaded"'

BAD_BODIES: list[tuple[bytes, dict]] = [
    (b'{"inputs":', {"content-type": "application/json"}),
    (b'{"inputs": 5}', {"content-type": "application/json"}),
    (b'{"inputs":"a"}', {"content-type": "text/plain"}),
    (b'{"inputs":"a","parameters":{"temperature":0}}', {"content-type": "application/json"}),
    (b'{"inputs":"","parameters":{}}', {"content-type": "application/json"}),
    (b'{"inputs":"a","parameters":{"top_n_tokens":99}}', {"content-type": "application/json"}),
    (b'{"inputs":"a","parameters":{"max_new_tokens":-3}}', {"content-type": "application/json"}),
    (b"\xff\xfe\x00garbage", {"content-type": "application/json"}),
    (b"[" * 3000, {"content-type": "application/json"}),
    (b'{"inputs":"a","parameters":{"max_new_tokens":100000000}}', {"content-type": "application/json"}),
]


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(["the", "cheese", "model", "Köln", "日本", "stream", "token", "why"]) for _ in range(rng.randint(1, 30)))


class Soak:
    def __init__(self, url: str, requests: int, duration: float, concurrency: int, seed: int):
        self.url = url.rstrip("/")
        u = urlparse(self.url)
        self.host, self.port = u.hostname, u.port
        self.remaining = requests or float("inf")
        self.drops: dict[str, float] = {}  # x-request-id -> wall-clock time the client closed
        self._drop_ids = itertools.count()
        self.deadline = time.monotonic() + duration
        self.concurrency = concurrency
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        async with httpx.AsyncClient(base_url=self.url, timeout=120, limits=limits) as client:
            await asyncio.gather(*[self._worker(client) for _ in range(self.concurrency)])

    async def _worker(self, client: httpx.AsyncClient) -> None:
        while self.remaining > 0 and time.monotonic() < self.deadline:
            self.remaining -= 1
            self.counts["sent"] += 1
            kind = self.rng.choices(["stream", "generate", "stream_drop", "generate_drop", "bad"], [40, 30, 10, 5, 15])[0]
            try:
                await getattr(self, "_" + kind)(client)
            except (httpx.HTTPError, OSError) as e:
                self.counts[f"transport error: {type(e).__name__}"] += 1

    def _body(self) -> dict:
        params = {"max_new_tokens": self.rng.randint(1, 16), "details": self.rng.random() < 0.5}
        if self.rng.random() < 0.5:
            params.update(do_sample=True, seed=self.rng.randint(0, 2**32))
        return {"inputs": _prompt(self.rng), "parameters": params}

    def _status(self, status: int) -> None:
        if status >= 500:
            self.counts["5xx"] += 1

    async def _stream(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/generate_stream", json=self._body())
        self._status(r.status_code)
        last = r.content.rstrip(b"\n").rsplit(b"\n\n", 1)[-1]
        if OVERLOADED in last:
            self.counts["rejected: overloaded"] += 1
        elif last.startswith(b"data:") and json.loads(last[5:]).get("generated_text") is not None:
            self.counts["completed"] += 1
        else:
            self.counts[f"other error: {last[:80]!r}"] += 1

    async def _generate(self, client: httpx.AsyncClient) -> None:
        r = await client.post("/generate", json=self._body())
        self._status(r.status_code)
        if r.status_code == 200:
            self.counts["completed"] += 1
        elif r.status_code == 429:
            self.counts["rejected: overloaded"] += 1
        else:
            self.counts[f"other error: {r.status_code}"] += 1

    async def _drop(self, path: str, read_first: bool) -> None:
        body = json.dumps({"inputs": _prompt(self.rng), "parameters": {"max_new_tokens": 400}}).encode()
        request_id = f"soak-drop-{next(self._drop_ids)}"
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: soak\r\nContent-Type: application/json\r\n"
                f"x-request-id: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            await writer.drain()
            if read_first:
                head = b""
                while b"data:" not in head and len(head) < 4096:  # mid-stream: the first event
                    chunk = await reader.read(4096)
                    if not chunk:
                        break
                    head += chunk
                if head.startswith(b"HTTP/1.1 5"):
                    self.counts["5xx"] += 1
            else:
                await asyncio.sleep(self.rng.uniform(0.0, 0.2))
        finally:
            # Vanish now: the transport's own close waits for this busy loop's next turn,
            # so the socket is shut down here, and that moment noted.
            sock = writer.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.drops[request_id] = time.time()
            writer.transport.abort()  # RST
        self.counts["disconnected by client"] += 1

    async def _stream_drop(self, client: httpx.AsyncClient) -> None:
        await self._drop("/generate_stream", read_first=True)

    async def _generate_drop(self, client: httpx.AsyncClient) -> None:
        await self._drop("/generate", read_first=False)

    async def _bad(self, client: httpx.AsyncClient) -> None:
        content, headers = self.rng.choice(BAD_BODIES)
        path = self.rng.choice(["/generate", "/generate_stream", "/"])
        r = await client.post(path, content=content, headers=headers)
        self._status(r.status_code)
        if 400 <= r.status_code < 500 or b'"error_type":"validation"' in r.content:
            self.counts["bad request answered 4xx/validation"] += 1
        elif OVERLOADED in r.content:
            self.counts["rejected: overloaded"] += 1
        else:
            self.counts[f"bad request answered {r.status_code}"] += 1


def _gauge(url: str, name: str, text: str | None = None) -> float:
    text = text if text is not None else httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def _rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


SAMPLE_FIELDS = ["minute", "api_rss_mb", "engine_rss_mb", "api_fds", "engine_fds", "connections", "permits", "engine_requests", "sent"]


def _sample(url: str, pid: int | None, start: float, sent: int) -> dict:
    row: dict = {"minute": round((time.monotonic() - start) / 60, 2), "sent": sent}
    if pid:
        api = psutil.Process(pid)
        engine = api.children(recursive=True)
        row["api_rss_mb"] = round(api.memory_info().rss / 2**20, 1)
        row["engine_rss_mb"] = round(sum(p.memory_info().rss for p in engine) / 2**20, 1)
        row["api_fds"] = api.num_fds()
        row["engine_fds"] = sum(p.num_fds() for p in engine)
    try:
        text = httpx.get(url + "/metrics", timeout=30).text
        row["connections"] = _gauge(url, "tgi_compat_connections_open", text)
        row["permits"] = _gauge(url, "tgi_compat_permits_in_use", text)
        row["engine_requests"] = _gauge(url, "tgi_compat_engine_requests", text)
    except httpx.HTTPError:
        pass
    return row


async def _sampler(soak: Soak, url: str, pid: int | None, every: float, rows: list[dict], done: asyncio.Event) -> None:
    start = time.monotonic()
    while True:
        rows.append(await asyncio.to_thread(_sample, url, pid, start, soak.counts["sent"]))
        try:
            await asyncio.wait_for(done.wait(), every)
            return
        except asyncio.TimeoutError:
            pass


def _write_samples(rows: list[dict], out: Path, warmup_minute: float) -> dict:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, SAMPLE_FIELDS)
        w.writeheader()
        w.writerows(rows)
    later = [r for r in rows if r["minute"] >= warmup_minute and "api_rss_mb" in r]
    growth = {}
    if len(later) >= 2:
        for key in ("api_rss_mb", "engine_rss_mb"):
            first, last = later[0][key], later[-1][key]
            growth[key.replace("_mb", "_growth_pct")] = round((last - first) / first * 100, 2)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install '.[bench]'): no plot")
        return growth
    minutes = [r["minute"] for r in rows]
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for key in ("api_rss_mb", "engine_rss_mb"):
        axes[0].plot(minutes, [r.get(key) for r in rows], label=key)
    axes[0].axvline(warmup_minute, color="grey", linestyle=":", label="end of warm-up")
    axes[0].set_ylabel("RSS MB")
    for key in ("api_fds", "engine_fds", "connections"):
        axes[1].plot(minutes, [r.get(key) for r in rows], label=key)
    axes[1].set_ylabel("count")
    for key in ("permits", "engine_requests"):
        axes[2].plot(minutes, [r.get(key) for r in rows], label=key)
    axes[2].set_ylabel("in flight")
    axes[2].set_xlabel("minute")
    for ax in axes:
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("tgi-compat soak: " + ", ".join(f"{k} {v}%" for k, v in growth.items()))
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=90)
    return growth


LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ tgi_compat\.tgi: request (finished|failed) (.*)$")


def disconnect_report(log: str, drops: dict[str, float]) -> dict:
    """How each vanished client's request ended, from the server's log lines."""
    ends: dict[str, tuple[float, str, dict]] = {}
    for line in log.splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        fields = dict(kv.split("=", 1) for kv in m.group(3).split() if "=" in kv)
        rid = fields.get("request_id")
        if rid in drops:
            at = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            ends[rid] = (at, m.group(2), fields)
    outcome: Counter[str] = Counter()
    delays, ran_on = [], []
    for rid, closed in drops.items():
        if rid not in ends:
            outcome["never reached the app (closed before its body was read)"] += 1
            continue
        at, how, fields = ends[rid]
        if how == "finished" or (fields.get("error") != "dropped" and at < closed):
            if at < closed + 0.05:
                outcome["answered before the close"] += 1
            else:
                outcome["ran to the end (disconnect not seen)"] += 1
                ran_on.append(round(at - closed, 3))
        elif fields.get("error") == "dropped":
            outcome["aborted (dropped)"] += 1
            delays.append(max(at - closed, 0.0))
        else:
            outcome[f"failed: {fields.get('error')}"] += 1
    in_flight = len(delays) + outcome["ran to the end (disconnect not seen)"]
    within = sum(d <= 1.0 for d in delays)
    delays.sort()
    return {
        "vanished_clients": len(drops),
        "outcomes": dict(outcome),
        "mid_request": in_flight,
        "aborted_within_1s_pct": round(100 * within / in_flight, 2) if in_flight else None,
        "abort_delay_p50_ms": round(delays[len(delays) // 2] * 1000, 1) if delays else None,
        "abort_delay_p99_ms": round(delays[int(len(delays) * 0.99)] * 1000, 1) if delays else None,
        "abort_delay_max_ms": round(delays[-1] * 1000, 1) if delays else None,
        # Seconds from the close to the end of each generation that ran to its end anyway.
        "ran_to_the_end_after_s": sorted(ran_on),
    }


def _start_server(cap: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(ROOT / f".soak-server-{port}.log", "wb")
    _start_server.log_path = Path(log.name)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tgi_compat", "--hostname", "127.0.0.1", "--port", str(port),
         "--max-concurrent-requests", str(cap), "--max-total-tokens", "1024"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (loopback); default: start one")
    ap.add_argument("--pid", type=int, help="the running server's pid, for RSS (with --url)")
    ap.add_argument("--cap", type=int, default=16, help="the server's --max-concurrent-requests")
    ap.add_argument("--multiplier", type=int, default=10, help="concurrent clients = cap x this")
    ap.add_argument("--requests", type=int, default=10_000, help="stop after this many requests (0: no limit)")
    ap.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds")
    ap.add_argument("--sample-every", type=float, default=60.0, help="seconds between resource samples")
    ap.add_argument("--warmup", type=float, default=600.0, help="RSS growth is judged from here (seconds) to the end")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "soak"),
                    help="samples go to OUT.csv and OUT.png")
    ap.add_argument("--nice", type=int, default=0,
                    help="lower the load client's CPU priority by this much once the server runs (on this "
                    "shared-core loopback set-up the client otherwise takes the server's CPU; real clients "
                    "run elsewhere)")
    ap.add_argument("--server-log", help="the running server's log (with --url), for the disconnect report")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    proc = None
    if args.url:
        host = urlparse(args.url).hostname
        if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
            raise SystemExit("soak runs against loopback only")
        url, pid = args.url, args.pid
        log_path = Path(args.server_log) if args.server_log else None
    else:
        proc, url = _start_server(args.cap)
        pid, log_path = proc.pid, _start_server.log_path
    if args.nice:
        os.nice(args.nice)
    try:
        rss_before = _rss_mb(pid) if pid else float("nan")
        soak = Soak(url, args.requests, args.duration, args.cap * args.multiplier, args.seed)
        start = time.monotonic()
        rows: list[dict] = []

        async def run_and_sample() -> None:
            done = asyncio.Event()
            sampler = asyncio.ensure_future(_sampler(soak, url, pid, args.sample_every, rows, done))
            try:
                await soak.run()
            finally:
                done.set()
                await sampler

        asyncio.run(run_and_sample())
        elapsed = time.monotonic() - start
        # Let aborted requests settle, then count what is still held.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leaked, engine = _gauge(url, "tgi_compat_permits_in_use"), _gauge(url, "tgi_compat_engine_requests")
            if leaked == 0 and engine == 0:
                break
            time.sleep(0.2)
        rss_after = _rss_mb(pid) if pid else float("nan")
        healthy = httpx.get(url + "/health", timeout=10).status_code == 200
        growth = _write_samples(rows, Path(args.out), args.warmup / 60)
        disconnects = disconnect_report(log_path.read_text(errors="replace"), soak.drops) if log_path else None
        c = soak.counts
        other = sum(v for k, v in c.items() if k.startswith(("other error", "transport error", "bad request answered 5")))
        figures = {
            "sent": c["sent"],
            "completed": c["completed"],
            "rejected_overloaded": c["rejected: overloaded"],
            "bad_requests_answered_4xx": c["bad request answered 4xx/validation"],
            "disconnected_by_client": c["disconnected by client"],
            "other_errors": other,
            "5xx": c["5xx"],
            "leaked_slots": leaked,
            "engine_requests_left": engine,
            "healthy_after": healthy,
            "rss_mb_before": round(rss_before, 1),
            "rss_mb_after": round(rss_after, 1),
            "concurrency": soak.concurrency,
            "client_nice": args.nice,
            "seconds": round(elapsed, 1),
            "requests_per_second": round(c["sent"] / elapsed, 1),
            "rss_growth_after_warmup": growth,
            "disconnects": disconnects,
            "samples": str(Path(args.out).with_suffix(".csv")),
            "detail": {k: v for k, v in c.items() if k.startswith(("other", "transport", "bad request answered"))},
        }
        for key, value in figures.items():
            print(f"{key:28} {value}")
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
        ok = figures["5xx"] == 0 and leaked == 0 and engine == 0 and healthy
        ok = ok and all(v < 5 for v in growth.values())
        if disconnects and disconnects["aborted_within_1s_pct"] is not None:
            ok = ok and disconnects["aborted_within_1s_pct"] >= 99
        return 0 if ok else 1
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
