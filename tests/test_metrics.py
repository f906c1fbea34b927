"""TGI's Prometheus series: the exposition format (unit), the values fed by real traffic,
and a real Prometheus scraping the server and answering the Grafana dashboard's PromQL."""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace

import httpx
import pytest

from tests.conftest import prometheus_scraping
from tgi_compat.metrics import TGIMetrics, duration_buckets

pytestmark = pytest.mark.engine


def test_duration_buckets_are_tgis():
    b = duration_buckets()
    assert len(b) == 35
    assert b[0] == pytest.approx(0.00015) and b[-1] == pytest.approx(145.611, rel=1e-4)


def test_exposition_format():
    m = TGIMetrics(max_input_tokens=1000, max_total_tokens=2000)
    assert m.render() == b""  # series appear only after first use
    m.request_count.inc()
    m.request_failure.inc("validation")
    m.queue_size.set(3)
    m.success(validation=0.001, queue=0.002, inference=0.5, total=0.503, generated=10)
    m.request_input_length.observe(7)
    text = m.render().decode()
    assert "_total" not in text and "_created" not in text
    lines = text.splitlines()
    # counters, then gauges, then histograms
    assert lines.index("# TYPE tgi_request_count counter") < lines.index("# TYPE tgi_queue_size gauge") < lines.index("# TYPE tgi_request_duration histogram")
    assert "# HELP tgi_request_count Total number of requests" in lines
    assert "tgi_request_count 1" in lines and "tgi_request_success 1" in lines
    assert 'tgi_request_failure{err="validation"} 1' in lines
    assert "tgi_queue_size 3" in lines
    buckets = [l for l in lines if l.startswith("tgi_request_duration_bucket")]
    assert len(buckets) == 36 and buckets[-1] == 'tgi_request_duration_bucket{le="+Inf"} 1'
    assert 'tgi_request_duration_bucket{le="0.00015000000000000001"} 0' in lines
    counts = [int(l.rsplit(" ", 1)[1]) for l in buckets]
    assert counts == sorted(counts)  # cumulative
    assert "tgi_request_duration_count 1" in lines
    assert 'tgi_request_input_length_bucket{le="10"} 1' in lines  # 1000/100 * 1
    assert "tgi_request_mean_time_per_token_duration_sum 0.05" in lines


def _sched(waiting: int, running: int, usage: float):
    return SimpleNamespace(num_waiting_reqs=waiting, num_running_reqs=running, kv_cache_usage=usage)


def _iteration(prompt_tokens: int, first_tokens: int):
    return SimpleNamespace(num_prompt_tokens=prompt_tokens, time_to_first_tokens_iter=[0.01] * first_tokens)


def test_data_parallel_engines_are_summed_once_and_reported_each():
    m = TGIMetrics(max_input_tokens=100, max_total_tokens=200)
    m.set_engines(2, kv_capacity_tokens=2000)  # vLLM sums both engines' KV blocks
    text = (m.render() + m.render_engines()).decode()
    assert "tgi_batch_max_total_tokens 2000" in text
    assert 'tgi_compat_engine_queue_size{engine="1"} 0' in text  # listed before any step
    m.engine_step(_sched(3, 5, 0.25), _iteration(10, 2), engine=0)
    m.engine_step(_sched(1, 7, 0.5), _iteration(0, 0), engine=1)
    m.engine_step(_sched(2, 5, 0.25), None, engine=0)  # engine 0 again: replaces its own values
    lines = (m.render() + m.render_engines()).decode().splitlines()
    assert "tgi_queue_size 3" in lines and "tgi_batch_current_size 12" in lines
    assert "tgi_batch_current_max_tokens 750" in lines  # (0.25 + 0.5) * 1000 per engine
    assert 'tgi_batch_inference_count{method="prefill"} 1' in lines
    assert 'tgi_batch_inference_count{method="decode"} 1' in lines
    assert "tgi_batch_next_size_count 1" in lines
    assert 'tgi_compat_engine_queue_size{engine="0"} 2' in lines and 'tgi_compat_engine_queue_size{engine="1"} 1' in lines
    assert 'tgi_compat_engine_batch_size{engine="1"} 7' in lines
    assert 'tgi_compat_engine_kv_cache_usage{engine="1"} 0.5' in lines
    assert "# TYPE tgi_compat_engine_kv_cache_usage gauge" in lines
    # Step durations are measured per engine: another engine's step in between is not one.
    m.engine_step(None, _iteration(0, 0), engine=1)
    assert m.batch_inference_duration.values[("decode",)][2] == 1  # observations


def _series(text: str, name: str) -> dict[str, float]:
    return {m.group(1) or "": float(m.group(2)) for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", text, re.M)}


def test_metrics_follow_traffic(http):
    before = http.get("/metrics").text
    for _ in range(3):
        assert http.post("/generate", json={"inputs": "count me", "parameters": {"max_new_tokens": 5}}).status_code == 200
    http.post("/generate_stream", json={"inputs": "count me", "parameters": {"max_new_tokens": 5}})
    for _ in range(2):
        assert http.post("/generate", json={"inputs": "x", "parameters": {"temperature": 0}}).status_code == 422
    http.post("/generate_stream", json={"inputs": "", "parameters": {}})
    after = http.get("/metrics").text
    delta = lambda name, labels="": _series(after, name).get(labels, 0) - _series(before, name).get(labels, 0)  # noqa: E731
    assert delta("tgi_request_count") == 7
    assert delta("tgi_request_success") == 4
    assert delta("tgi_request_failure", '{err="validation"}') == 3
    assert delta("tgi_request_generated_tokens_sum") == 20
    assert delta("tgi_request_duration_count") == 4
    assert delta("tgi_request_input_length_count") == 4  # recorded when validation passes
    assert _series(after, "tgi_batch_max_total_tokens")[""] > 0
    assert "tgi_queue_size" in after and "tgi_batch_current_size" in after
    assert _series(after, "tgi_batch_inference_count")  # engine steps, by method
    assert "vllm:generation_tokens_total" in after  # vLLM's own series on the same endpoint


def test_request_id_is_echoed_or_made(http):
    r = http.post("/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 1}}, headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = http.post("/generate", json={"inputs": "a", "parameters": {"top_k": 0}}, headers={"x-request-id": "bad-1"})
    assert r.status_code == 422 and r.headers["x-request-id"] == "bad-1"
    with http.stream("POST", "/generate_stream", json={"inputs": "a", "parameters": {"max_new_tokens": 1}}) as s:
        assert len(s.headers["x-request-id"]) >= 16


# --- a real Prometheus -------------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(server_url):
    with prometheus_scraping({"tgi": server_url.removeprefix("http://")}) as url:
        yield url


def _query(prom: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom}/api/v1/query", params={"query": expr}, timeout=10).json()
    assert r["status"] == "success", r
    return r["data"]["result"]


def _scalar(prom: str, expr: str) -> float:
    result = _query(prom, expr)
    return float(result[0]["value"][1]) if result else 0.0


def _wait_scrapes(prom: str, n: int = 2, job: str = "tgi") -> None:
    """Wait until Prometheus has scraped the job's target n more times."""
    expr = f'count_over_time(up{{job="{job}"}}[10m])'
    start = _scalar(prom, expr)
    deadline = time.monotonic() + 30
    while _scalar(prom, expr) < start + n and time.monotonic() < deadline:
        time.sleep(0.25)


def test_prometheus_scrapes_and_dashboard_queries_work(prometheus, server_url, http):
    # TGI's series exist only after first use, and rate() needs a sample before the traffic.
    assert http.post("/generate", json={"inputs": "warm", "parameters": {"max_new_tokens": 2}}).status_code == 200
    _wait_scrapes(prometheus, 2)
    assert _scalar(prometheus, 'up{job="tgi"}') == 1.0
    success0 = _scalar(prometheus, "tgi_request_success")
    failures0 = {r["metric"]["err"]: float(r["value"][1]) for r in _query(prometheus, "sum by (err) (tgi_request_failure)")}

    async def traffic():
        async with httpx.AsyncClient(base_url=server_url, timeout=120) as c:
            ok = [c.post("/generate", json={"inputs": f"p {i}", "parameters": {"max_new_tokens": 8}}) for i in range(10)]
            ok += [c.post("/generate_stream", json={"inputs": f"s {i}", "parameters": {"max_new_tokens": 8}}) for i in range(5)]
            bad = [c.post("/generate", json={"inputs": "x", "parameters": {"top_p": 1.0}}) for _ in range(4)]
            return await asyncio.gather(*ok, *bad)

    responses = asyncio.run(traffic())
    assert [r.status_code for r in responses].count(200) == 15
    _wait_scrapes(prometheus, 2)

    assert _scalar(prometheus, "tgi_request_success") - success0 == 15
    failures = {r["metric"]["err"]: float(r["value"][1]) for r in _query(prometheus, "sum by (err) (tgi_request_failure)")}
    assert failures["validation"] - failures0.get("validation", 0) == 4
    assert _scalar(prometheus, "rate(tgi_request_success[1m])") > 0
    for hist in ("tgi_request_duration", "tgi_request_mean_time_per_token_duration"):
        q = _scalar(prometheus, f"histogram_quantile(0.9, sum by (le) (rate({hist}_bucket[1m])))")
        assert 0 < q < 150, (hist, q)
    for gauge in ("tgi_queue_size", "tgi_batch_current_size"):
        result = _query(prometheus, gauge)
        assert result and float(result[0]["value"][1]) >= 0
    assert _scalar(prometheus, "sum(tgi_request_generated_tokens_sum)") > 0
    assert _query(prometheus, "sum by (method) (rate(tgi_batch_inference_count[1m]))")
    assert _scalar(prometheus, "vllm:num_requests_running") >= 0


# --- what inference gateways scrape ------------------------------------------------------
# Gateway API Inference Extension's endpoint picker (and llm-d's scheduler, built on it)
# reads these by default: --total-queued-requests-metric, --total-running-requests-metric,
# --kv-cache-usage-percentage-metric, --lora-info-metric, --cache-info-metric. vLLM emits
# vllm:lora_requests_info only when LoRA is on, as here (`--lora-adapters`).


@pytest.fixture(scope="module")
def gateway_prometheus(server_url, lora_server):
    jobs = {"tgi": server_url.removeprefix("http://"), "lora": lora_server.removeprefix("http://")}
    with prometheus_scraping(jobs) as url:
        yield url


def test_gateway_metrics_through_prometheus(gateway_prometheus, server_url, lora_server):
    prom = gateway_prometheus
    with httpx.Client(timeout=120) as c:
        r = c.post(f"{lora_server}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 4, "adapter_id": "tiny-lora"}})
        assert r.status_code == 200
        assert c.post(f"{server_url}/generate", json={"inputs": "a", "parameters": {"max_new_tokens": 4}}).status_code == 200
    _wait_scrapes(prom, 2, "tgi")
    _wait_scrapes(prom, 2, "lora")
    for job in ("tgi", "lora"):
        for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"):
            result = _query(prom, f'{name}{{job="{job}"}}')
            assert result, (job, name)
            value = float(result[0]["value"][1])
            assert value >= 0 and (name != "vllm:kv_cache_usage_perc" or value <= 1), (job, name, value)
        # The picker reads block_size and num_gpu_blocks from the labels, as integers.
        (info,) = _query(prom, f'vllm:cache_config_info{{job="{job}"}}')
        labels = info["metric"]
        assert int(labels["block_size"]) > 0 and int(labels["num_gpu_blocks"]) > 0, labels
        assert float(info["value"][1]) == 1
        # Our own capacity series agrees with vLLM's.
        assert _scalar(prom, f'tgi_batch_max_total_tokens{{job="{job}"}}') == int(labels["block_size"]) * int(labels["num_gpu_blocks"])
    # LoRA: max_lora, running and waiting adapters as labels, the value a timestamp (the
    # picker takes the newest series); the adapter that just ran is named in one.
    series = _query(prom, 'vllm:lora_requests_info{job="lora"}')
    assert series
    assert {s["metric"]["max_lora"] for s in series} == {"2"}  # one adapter + vLLM's empty slot
    # (Prometheus drops empty labels: an idle engine's series has no adapter labels.)
    assert any(s["metric"].get("running_lora_adapters") == "tiny-lora" for s in series), series
    assert all(float(s["value"][1]) > 1.6e9 for s in series)
