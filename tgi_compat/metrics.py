"""TGI's Prometheus series, exposed exactly as TGI's router exposes them.

TGI uses metrics-exporter-prometheus 0.15: names are printed as they are (counters have
no ``_total`` and no ``_created``, which prometheus_client would add and which would
break every TGI dashboard query), families are ordered counters, gauges, then
histograms, ``# HELP`` appears for described names only, and a series appears only after
its first use. Bucket bounds are TGI's (router/src/server.rs). The exposition is written
by hand here; vLLM's own ``vllm:*`` metrics (prometheus_client) are appended after it.

Updates are plain dict/list operations done once per request or engine step, never per
token. With several API processes (``--api-server-count``) each also writes every change
through to its own file in a directory they share (``SharedStore``: prometheus_client's
mmap files, as its multiprocess mode keeps them), and a scrape of any of them renders the
sum over all (``TGIMetrics.render``): counters and histograms add up, a gauge is the newest
value written (an engine step's statistics reach one API process: vLLM sends them to one
client per step).
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import time
# First description wins, as in metrics-exporter-prometheus.
HELP = {
    "tgi_request_success": "Number of successful requests",
    "tgi_request_duration": "Request duration",
    "tgi_request_validation_duration": "Request validation duration",
    "tgi_request_queue_duration": "Request queue duration",
    "tgi_request_inference_duration": "Request inference duration",
    "tgi_request_mean_time_per_token_duration": "Mean time per token per request",
    "tgi_request_generated_tokens": "Generated tokens per request",
    "tgi_batch_inference_count": "Inference calls per method (prefill or decode)",
    "tgi_request_count": "Total number of requests",
    "tgi_batch_inference_success": "Number of successful inference calls per method (prefill or decode)",
    "tgi_batch_current_size": "Current batch size",
    "tgi_queue_size": "Current queue size",
    "tgi_batch_current_max_tokens": "Maximum tokens for the current batch",
    "tgi_request_max_new_tokens": "Maximum new tokens per request",
    "tgi_batch_inference_duration": "Batch inference duration",
    "tgi_batch_forward_duration": "Batch forward duration per method (prefill or decode)",
    "tgi_request_skipped_tokens": "Speculated tokens per request",
    "tgi_batch_filter_duration": "Time spent filtering batches and sending generated tokens per method (prefill or decode)",
    "tgi_batch_decode_duration": "Time spent decoding a batch per method (prefill or decode)",
    "tgi_request_input_length": "Input token length per request",
    "tgi_batch_next_size": "Batch size of the next batch",
    # Registered by TGI under `tgi_batch_total_tokens`, so `tgi_batch_max_total_tokens` has none.
    # Ours, per data-parallel engine:
    "tgi_compat_engine_queue_size": "Requests waiting in this engine's scheduler",
    "tgi_compat_engine_batch_size": "Requests running in this engine's batch",
    "tgi_compat_engine_kv_cache_usage": "Fraction of this engine's KV-cache blocks in use (0 to 1)",
}


def duration_buckets() -> list[float]:
    """0.0001 * 1.5^k for k = 1..35, by repeated multiplication as TGI computes them."""
    out, value = [], 0.0001
    for _ in range(35):
        value *= 1.5
        out.append(value)
    return out


def _fmt(value: float) -> str:
    # Rust's f64 Display: shortest round-trip form, integers without a fraction.
    if value == float("inf"):
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{v}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Family:
    kind = ""

    def __init__(self, name: str, labels: tuple[str, ...] = ()):
        self.name = name
        self.label_names = labels
        self.store: SharedStore | None = None  # several API processes: written through
        self._keys: dict[tuple, str] = {}

    def _key(self, labels: tuple[str, ...], slot: str | int = "") -> str:
        key = self._keys.get((labels, slot))
        if key is None:
            key = self._keys[(labels, slot)] = json.dumps([self.name, list(labels), slot])
        return key

    def header(self) -> list[str]:
        lines = []
        if self.name in HELP:
            lines.append(f"# HELP {self.name} {HELP[self.name]}")
        lines.append(f"# TYPE {self.name} {self.kind}")
        return lines


class Counter(_Family):
    kind = "counter"

    def __init__(self, name: str, labels: tuple[str, ...] = ()):
        super().__init__(name, labels)
        self.values: dict[tuple[str, ...], int] = {}

    def inc(self, *labels: str, by: int = 1) -> None:
        value = self.values[labels] = self.values.get(labels, 0) + by
        if self.store is not None:
            self.store.write(self._key(labels), value)

    def render(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {v}" for k, v in self.values.items()]


class Gauge(_Family):
    kind = "gauge"

    def __init__(self, name: str, labels: tuple[str, ...] = ()):
        super().__init__(name, labels)
        self.values: dict[tuple[str, ...], float] = {}

    def set(self, value: float, *labels: str) -> None:
        self.values[labels] = value
        if self.store is not None:
            self.store.write(self._key(labels), value)

    def render(self) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, k)} {_fmt(v)}" for k, v in self.values.items()]


class Histogram(_Family):
    kind = "histogram"

    def __init__(self, name: str, buckets: list[float], labels: tuple[str, ...] = ()):
        super().__init__(name, labels)
        self.buckets = buckets
        self._bounds = [f'le="{_fmt(b)}"' for b in buckets] + ['le="+Inf"']
        # per label set: [bucket counts (non-cumulative)..., sum, count]
        self.values: dict[tuple[str, ...], list] = {}

    def observe(self, value: float, *labels: str) -> None:
        state = self.values.get(labels)
        if state is None:
            state = self.values[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        bucket = bisect.bisect_left(self.buckets, value)
        state[0][bucket] += 1
        state[1] += value
        state[2] += 1
        if self.store is not None:
            self.store.write(self._key(labels, bucket), state[0][bucket])
            self.store.write(self._key(labels, "sum"), state[1])
            self.store.write(self._key(labels, "count"), state[2])

    def merge(self, labels: tuple[str, ...], slot, value: float) -> None:
        """Add one process's value of one slot (a bucket index, "sum" or "count")."""
        state = self.values.get(labels)
        if state is None:
            state = self.values[labels] = [[0] * (len(self.buckets) + 1), 0.0, 0]
        if slot == "sum":
            state[1] += value
        elif slot == "count":
            state[2] += int(value)
        else:
            state[0][int(slot)] += int(value)

    def render(self) -> list[str]:
        lines = []
        for key, (counts, total, n) in self.values.items():
            running = 0
            for bound, c in zip(self._bounds, counts):
                running += c
                lines.append(f"{self.name}_bucket{_labels(self.label_names, key, bound)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_fmt(total)}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {n}")
        return lines


class SharedStore:
    """What the API processes of one server share (``--api-server-count``): a directory
    where each writes its TGI series to its own file (prometheus_client's ``MmapedDict``:
    a value and a timestamp per key, readable by any process at any time), and the time
    of each engine's last step (a shared array: the process that gets a step's
    statistics times it from the step before, whichever process got that one)."""

    def __init__(self, directory: str, worker: int, last_steps=None):
        from prometheus_client.mmap_dict import MmapedDict

        self.directory = directory
        self.last_steps = last_steps
        self._file = MmapedDict(os.path.join(directory, f"tgi_{worker}.db"))

    def write(self, key: str, value: float) -> None:
        self._file.write_value(key, value, time.time())

    def read_all(self):
        """(key, value, timestamp) of every API process's file."""
        from prometheus_client.mmap_dict import MmapedDict

        for path in sorted(glob.glob(os.path.join(self.directory, "tgi_*.db"))):
            for key, value, timestamp, _ in MmapedDict.read_all_values_from_file(path):
                yield key, value, timestamp


LIVE = "_live"  # the key prefix of per-process live values (requests in the engine, connections)


class TGIMetrics:
    """Every TGI series this server feeds, with TGI's buckets."""

    def __init__(self, max_input_tokens: int, max_total_tokens: int, store: SharedStore | None = None):
        self._limits = (max_input_tokens, max_total_tokens)
        d = duration_buckets()
        input_buckets = [max_input_tokens / 100 * (i + 1) for i in range(100)]
        total_buckets = [max_total_tokens / 100 * (i + 1) for i in range(100)]
        self.request_count = Counter("tgi_request_count")
        self.request_success = Counter("tgi_request_success")
        self.request_failure = Counter("tgi_request_failure", ("err",))
        self.batch_inference_count = Counter("tgi_batch_inference_count", ("method",))
        self.batch_inference_success = Counter("tgi_batch_inference_success", ("method",))
        self.queue_size = Gauge("tgi_queue_size")
        self.batch_current_size = Gauge("tgi_batch_current_size")
        self.batch_current_max_tokens = Gauge("tgi_batch_current_max_tokens")
        self.batch_max_total_tokens = Gauge("tgi_batch_max_total_tokens")
        self.request_duration = Histogram("tgi_request_duration", d)
        self.request_validation_duration = Histogram("tgi_request_validation_duration", d)
        self.request_queue_duration = Histogram("tgi_request_queue_duration", d)
        self.request_inference_duration = Histogram("tgi_request_inference_duration", d)
        self.request_mean_time_per_token_duration = Histogram("tgi_request_mean_time_per_token_duration", d)
        self.request_generated_tokens = Histogram("tgi_request_generated_tokens", total_buckets)
        self.request_input_length = Histogram("tgi_request_input_length", input_buckets)
        self.request_max_new_tokens = Histogram("tgi_request_max_new_tokens", total_buckets)
        self.batch_next_size = Histogram("tgi_batch_next_size", [float(i + 1) for i in range(1024)])
        self.batch_inference_duration = Histogram("tgi_batch_inference_duration", d, ("method",))
        self.batch_forward_duration = Histogram("tgi_batch_forward_duration", d, ("method",))
        self._families: list[_Family] = [v for v in vars(self).values() if isinstance(v, _Family)]
        # Per engine (data-parallel rank); not TGI series, so outside self._families.
        self.engine_queue_size = Gauge("tgi_compat_engine_queue_size", ("engine",))
        self.engine_batch_size = Gauge("tgi_compat_engine_batch_size", ("engine",))
        self.engine_kv_cache_usage = Gauge("tgi_compat_engine_kv_cache_usage", ("engine",))
        self.kv_capacity_per_engine = 0.0
        self._engines = (0, 0)  # (number of engines, total KV capacity in tokens)
        self._last_step: dict[int, float] = {}
        self.store = store
        if store is not None:
            for family in self._all_families():
                family.store = store

    def _all_families(self) -> list[_Family]:
        return [*self._families, self.engine_queue_size, self.engine_batch_size, self.engine_kv_cache_usage]

    # --- request events (the TGI spec layer calls these) ---

    def success(self, *, validation: float, queue: float, inference: float, total: float, generated: int) -> None:
        self.request_success.inc()
        self.request_duration.observe(total)
        self.request_validation_duration.observe(validation)
        self.request_queue_duration.observe(queue)
        self.request_inference_duration.observe(inference)
        if generated:
            self.request_mean_time_per_token_duration.observe(inference / generated)
        self.request_generated_tokens.observe(generated)

    # --- engine events (vLLM's stat logger hook calls this once per engine step) ---

    def engine_step(self, scheduler_stats, iteration_stats, engine: int = 0) -> None:
        """One step of one engine. With data parallelism each engine (DP rank, local or
        headless on another node) reports its own steps: counters add them up once each,
        TGI's gauges show the sum over engines, ``tgi_compat_engine_*`` each engine."""
        label = str(engine)
        if scheduler_stats is not None:
            self.engine_queue_size.set(scheduler_stats.num_waiting_reqs, label)
            self.engine_batch_size.set(scheduler_stats.num_running_reqs, label)
            self.engine_kv_cache_usage.set(scheduler_stats.kv_cache_usage, label)
            self.queue_size.set(sum(self.engine_queue_size.values.values()))
            self.batch_current_size.set(sum(self.engine_batch_size.values.values()))
            usage = sum(self.engine_kv_cache_usage.values.values())
            self.batch_current_max_tokens.set(round(usage * self.kv_capacity_per_engine))
        if iteration_stats is None:
            return
        shared_steps = self.store.last_steps if self.store is not None else None
        if shared_steps is not None and scheduler_stats is None:
            return  # several API processes: the one that got this step's statistics counts it
        now = time.monotonic()
        method = "prefill" if iteration_stats.num_prompt_tokens else "decode"
        self.batch_inference_count.inc(method)
        self.batch_inference_success.inc(method)
        new_requests = len(iteration_stats.time_to_first_tokens_iter)
        if new_requests:
            self.batch_next_size.observe(new_requests)
        # vLLM reports no per-step duration by default: the time since the same engine's
        # previous step, when it was busy in between, is the step's duration.
        if shared_steps is not None:  # CLOCK_MONOTONIC is one clock for every process
            last = shared_steps[engine] or None
            shared_steps[engine] = now
        else:
            last = self._last_step.get(engine)
            self._last_step[engine] = now
        if last is not None and now - last < 1.0:
            step = now - last
            self.batch_inference_duration.observe(step, method)
            self.batch_forward_duration.observe(step, method)

    def set_engines(self, num_engines: int, kv_capacity_tokens: int) -> None:
        """The engines' total KV capacity (vLLM sums it over data-parallel engines)."""
        self._engines = (num_engines, kv_capacity_tokens)
        self.batch_max_total_tokens.set(kv_capacity_tokens)
        self.kv_capacity_per_engine = kv_capacity_tokens / max(num_engines, 1)
        for engine in range(num_engines):  # every engine is listed from the start
            for gauge in (self.engine_queue_size, self.engine_batch_size, self.engine_kv_cache_usage):
                gauge.values.setdefault((str(engine),), 0)

    # --- several API processes ---

    def publish_live(self, values: dict[str, float]) -> None:
        if self.store is not None:
            for name, value in values.items():
                self.store.write(json.dumps([LIVE, name]), value)

    def live_totals(self, values: dict[str, float]) -> dict[str, float]:
        """This process's live values (e.g. its requests in the engine, its open
        connections) summed with every other API process's latest; with one process,
        ``values`` as given."""
        if self.store is None:
            return values
        self.publish_live(values)
        totals = dict.fromkeys(values, 0.0)
        for key, value, _ in self.store.read_all():
            kind, *rest = json.loads(key)
            if kind == LIVE:
                totals[rest[0]] = totals.get(rest[0], 0.0) + value
        return totals

    def merged(self) -> TGIMetrics:
        """Every API process's series in one ``TGIMetrics`` (this one with one process):
        counters and histograms summed, each gauge the newest value written, TGI's batch
        gauges the sums over engines of each engine's newest step."""
        if self.store is None:
            return self
        out = TGIMetrics(*self._limits)
        out.set_engines(*self._engines)
        families = {f.name: f for f in out._all_families()}
        newest: dict[tuple, float] = {}
        for key, value, timestamp in self.store.read_all():
            parts = json.loads(key)
            if parts[0] == LIVE:
                continue
            name, labels, slot = parts
            family = families.get(name)
            labels = tuple(labels)
            if isinstance(family, Histogram):
                family.merge(labels, slot, value)
            elif isinstance(family, Counter):
                family.values[labels] = family.values.get(labels, 0) + int(value)
            elif isinstance(family, Gauge) and timestamp >= newest.get((name, labels), float("-inf")):
                newest[(name, labels)] = timestamp
                family.values[labels] = value
        if any(name == self.engine_queue_size.name for name, _ in newest):  # after the first step, as TGI
            out.queue_size.values[()] = sum(out.engine_queue_size.values.values())
            out.batch_current_size.values[()] = sum(out.engine_batch_size.values.values())
            usage = sum(out.engine_kv_cache_usage.values.values())
            out.batch_current_max_tokens.values[()] = round(usage * out.kv_capacity_per_engine)
        return out

    def render_engines(self) -> bytes:
        """The per-engine ``tgi_compat_engine_*`` gauges (not TGI's: rendered apart)."""
        lines: list[str] = []
        for family in (self.engine_queue_size, self.engine_batch_size, self.engine_kv_cache_usage):
            if family.values:
                lines.extend(family.header())
                lines.extend(family.render())
        return ("\n".join(lines) + "\n").encode() if lines else b""

    def render(self) -> bytes:
        lines: list[str] = []
        for kind in ("counter", "gauge", "histogram"):
            for family in self._families:
                if family.kind != kind or not family.values:
                    continue
                lines.extend(family.header())
                lines.extend(family.render())
                lines.append("")
        return "\n".join(lines).encode()
